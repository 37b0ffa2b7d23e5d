"""The connector: an MLP from the frame encoder's feature space into the LM's embedding space.

VideoLLM-online: Linear(d_vis -> d_lm), GELU, Linear(d_lm -> d_lm). It is the only trained part
of the default model (LoRA on the LM is optional). Until trained weights are loaded the connector
is a seeded random initialisation, and ``trained`` says so, so every output can report it.

``temporal=True`` (vrex's default model) feeds each visual token together with its change since the
previous frame, ``[x_t, x_t - x_{t-1}]`` (``x_{-1} = 0`` at the start of a stream). Why: the
streaming-EOS gate has to decide "did the scene change?", and a frozen LM cannot learn to compare
two frames' tokens from a few dozen training subjects; with the difference in the token it is one
linear read-out that transfers to subjects never seen in training. The difference also marks the
frames where something new appeared, which is what a question about the past has to find.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn


class Connector(nn.Module):
    def __init__(self, vision_dim: int, lm_dim: int, seed: int = 0, temporal: bool = False):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.vision_dim, self.temporal = vision_dim, temporal
        self.fc1 = nn.Linear(vision_dim * (2 if temporal else 1), lm_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(lm_dim, lm_dim)
        with torch.no_grad():  # seeded, so an untrained connector is still reproducible
            for layer in (self.fc1, self.fc2):
                bound = layer.in_features ** -0.5
                layer.weight.copy_(torch.empty_like(layer.weight).uniform_(-bound, bound, generator=gen))
                layer.bias.zero_()
        self.trained = False
        self.source = f"untrained (seeded random init, seed={seed})"

    def forward(self, visual_tokens: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
        """``visual_tokens`` [n, T, d_vis]: n *consecutive* frames of one stream -> [n, T, d_lm].

        ``previous`` [T, d_vis]: the encoder features of the frame before the first one (None: the
        stream starts here). Only a temporal connector reads it."""
        if self.temporal:
            if visual_tokens.dim() != 3:
                raise ValueError(f"a temporal connector needs [frames, tokens, dim] features, got shape {tuple(visual_tokens.shape)}")
            first = torch.zeros_like(visual_tokens[:1]) if previous is None else previous.to(visual_tokens).reshape(visual_tokens[:1].shape)
            before = torch.cat([first, visual_tokens[:-1]])
            visual_tokens = torch.cat([visual_tokens, visual_tokens - before], dim=-1)
        return self.fc2(self.act(self.fc1(visual_tokens)))

    def save(self, path: str | Path, metadata: dict[str, str] | None = None, extra: dict[str, torch.Tensor] | None = None) -> None:
        """``extra``: more tensors for the same file (the LM's LoRA adapters, ``lm.``-prefixed)."""
        meta = {**(metadata or {}), "temporal": "1" if self.temporal else "0"}
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        tensors.update({k: v.detach().cpu().contiguous() for k, v in (extra or {}).items()})
        save_file(tensors, str(path), metadata=meta)

    def load(self, path: str | Path) -> "Connector":
        """Load weights from a safetensors file (``fc1.weight`` ...; a training checkpoint's
        ``connector.``-prefixed keys work too; ``lm.`` keys, LoRA adapters, are
        left to ``vrex.models.lora.load_lora``). The file decides temporal or not: fc1 reads
        ``d_vis`` features, or ``2 d_vis`` (features and their change)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"connector weights {path} do not exist")
        state = {k: v for k, v in load_file(str(path)).items() if not k.startswith("lm.")}  # lm.*: LoRA (vrex.models.lora)
        if any(k.startswith("connector.") for k in state):
            state = {k[len("connector."):]: v for k, v in state.items() if k.startswith("connector.")}
        fc1 = state.get("fc1.weight")
        if fc1 is not None and fc1.shape[-1] in (self.vision_dim, 2 * self.vision_dim):
            temporal = fc1.shape[-1] == 2 * self.vision_dim
            if temporal != self.temporal:
                self.temporal = temporal
                self.fc1 = nn.Linear(fc1.shape[-1], self.fc2.in_features, device=self.fc2.weight.device, dtype=self.fc2.weight.dtype)
        expected = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in state.items()}
        if expected != got:
            raise ValueError(f"connector weights {path} have shapes {got}, this model needs {expected}")
        self.load_state_dict(state)
        self.trained, self.source = True, str(path)
        return self
