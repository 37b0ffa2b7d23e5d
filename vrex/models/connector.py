"""The connector: an MLP from the frame encoder's feature space into the LM's embedding space.

VideoLLM-online: Linear(d_vis -> d_lm), GELU, Linear(d_lm -> d_lm). It is the only trained part
of the default model (LoRA on the LM is optional). Until trained weights are loaded the connector
is a seeded random initialisation, and ``trained`` says so, so every output can report it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn


class Connector(nn.Module):
    def __init__(self, vision_dim: int, lm_dim: int, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.fc1 = nn.Linear(vision_dim, lm_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(lm_dim, lm_dim)
        with torch.no_grad():  # seeded, so an untrained connector is still reproducible
            for layer in (self.fc1, self.fc2):
                bound = layer.in_features ** -0.5
                layer.weight.copy_(torch.empty_like(layer.weight).uniform_(-bound, bound, generator=gen))
                layer.bias.zero_()
        self.trained = False
        self.source = f"untrained (seeded random init, seed={seed})"

    def forward(self, visual_tokens: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(visual_tokens)))

    def save(self, path: str | Path, metadata: dict[str, str] | None = None) -> None:
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(path), metadata=metadata)

    def load(self, path: str | Path) -> "Connector":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"connector weights {path} do not exist")
        state = load_file(str(path))
        expected = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in state.items()}
        if expected != got:
            raise ValueError(f"connector weights {path} have shapes {got}, this model needs {expected}")
        self.load_state_dict(state)
        self.trained, self.source = True, str(path)
        return self
