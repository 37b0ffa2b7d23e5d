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

``tag_tokens=k`` (``vrex.models.tags``) appends, after a frame's visual tokens, the ``k`` token
embeddings of the encoder's ImageNet top-1 class name, padded with the learned ``tag_pad``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn


class Connector(nn.Module):
    def __init__(self, vision_dim: int, lm_dim: int, seed: int = 0, temporal: bool = False, tag_tokens: int = 0):
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
        self.tag_tokens, self.tags, self.tag_min_prob = 0, None, 0.5  # tags: vrex.models.tags.ImageNetTags (equip_tags)
        self.set_tag_tokens(tag_tokens)

    def set_tag_tokens(self, k: int, min_prob: float | None = None) -> None:
        """``k`` ImageNet tag tokens per frame (0: none), shown when the top-1 probability is at least
        ``min_prob`` (None: unchanged). A new pad vector starts at zero; the tag head itself is
        attached separately (``vrex.models.tags.equip_tags``)."""
        if k < 0:
            raise ValueError(f"tag_tokens must be >= 0, got {k}")
        if min_prob is not None:
            if not 0.0 <= min_prob <= 1.0:
                raise ValueError(f"tag min_prob must be a probability in [0, 1], got {min_prob}")
            if min_prob != self.tag_min_prob:
                self.tags = None
            self.tag_min_prob = float(min_prob)
        if k and getattr(self, "tag_pad", None) is None:
            self.tag_pad = nn.Parameter(torch.zeros(self.fc2.out_features, device=self.fc2.weight.device, dtype=self.fc2.weight.dtype))
        elif not k and getattr(self, "tag_pad", None) is not None:
            del self.tag_pad
        if k != self.tag_tokens:
            self.tags = None
        self.tag_tokens = k

    def forward(self, visual_tokens: torch.Tensor, previous: torch.Tensor | None = None,
                tag_classes: torch.Tensor | None = None) -> torch.Tensor:
        """``visual_tokens`` [n, T, d_vis]: n *consecutive* frames of one stream -> [n, T, d_lm].

        ``previous`` [T, d_vis]: the encoder features of the frame before the first one (None: the
        stream starts here). Only a temporal connector reads it. With tag tokens the output has
        ``T + tag_tokens`` tokens per frame; ``tag_classes`` [n] (>= 0) overrides a frame's tag class
        (training augmentation)."""
        global_features = visual_tokens[..., 0, :] if visual_tokens.dim() == 3 else None
        if self.tag_tokens and global_features is None:
            raise ValueError(f"tag tokens need [frames, tokens, dim] features, got shape {tuple(visual_tokens.shape)}")
        if self.temporal:
            if visual_tokens.dim() != 3:
                raise ValueError(f"a temporal connector needs [frames, tokens, dim] features, got shape {tuple(visual_tokens.shape)}")
            first = torch.zeros_like(visual_tokens[:1]) if previous is None else previous.to(visual_tokens).reshape(visual_tokens[:1].shape)
            before = torch.cat([first, visual_tokens[:-1]])
            visual_tokens = torch.cat([visual_tokens, visual_tokens - before], dim=-1)
        out = self.fc2(self.act(self.fc1(visual_tokens)))
        if not self.tag_tokens:
            return out
        if self.tags is None:
            raise RuntimeError("this connector has ImageNet tag tokens but no tag head: load it with load_videollm, "
                               "or attach one with vrex.models.tags.equip_tags")
        names, valid = self.tags(global_features, tag_classes)
        tags = torch.where(valid[..., None], names.to(out), self.tag_pad.to(out))
        return torch.cat([out, tags], dim=1)

    def save(self, path: str | Path, metadata: dict[str, str] | None = None, extra: dict[str, torch.Tensor] | None = None) -> None:
        """``extra``: more tensors for the same file (the LM's LoRA adapters, ``lm.``-prefixed)."""
        meta = {**(metadata or {}), "temporal": "1" if self.temporal else "0", "tag_tokens": str(self.tag_tokens),
                "tag_min_prob": repr(self.tag_min_prob)}
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        tensors.update({k: v.detach().cpu().contiguous() for k, v in (extra or {}).items()})
        save_file(tensors, str(path), metadata=meta)

    def load(self, path: str | Path) -> "Connector":
        """Load weights from a safetensors file (``fc1.weight`` ...; a training checkpoint's
        ``connector.``-prefixed keys work too; ``lm.`` keys, LoRA adapters, are
        left to ``vrex.models.lora.load_lora``). The file decides temporal or not: fc1 reads
        ``d_vis`` features, or ``2 d_vis`` (features and their change); and the number of tag
        tokens (its metadata): a connector with tag tokens still needs ``equip_tags``."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"connector weights {path} do not exist")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = {k: v for k, v in load_file(str(path)).items() if not k.startswith("lm.")}  # lm.*: LoRA (vrex.models.lora)
        if any(k.startswith("connector.") for k in state):
            state = {k[len("connector."):]: v for k, v in state.items() if k.startswith("connector.")}
        fc1 = state.get("fc1.weight")
        if fc1 is not None and fc1.shape[-1] in (self.vision_dim, 2 * self.vision_dim):
            temporal = fc1.shape[-1] == 2 * self.vision_dim
            if temporal != self.temporal:
                self.temporal = temporal
                self.fc1 = nn.Linear(fc1.shape[-1], self.fc2.in_features, device=self.fc2.weight.device, dtype=self.fc2.weight.dtype)
        self.set_tag_tokens(int(meta.get("tag_tokens", 0)), float(meta.get("tag_min_prob", 0.5)))  # files written before tag tokens existed have none
        expected = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in state.items()}
        if expected != got:
            raise ValueError(f"connector weights {path} have shapes {got}, this model needs {expected}")
        self.load_state_dict(state)
        self.trained, self.source = True, str(path)
        return self
