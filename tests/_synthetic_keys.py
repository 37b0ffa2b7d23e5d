"""Synthetic keys shared by the policy tests (tests/kv) and the ReSV tests (tests/resv); this folder is
on sys.path because tests/conftest.py lives in it."""

import torch


def correlated_frames(n_frames: int, H: int, T: int, D: int, noise: float, seed: int) -> list[torch.Tensor]:
    """Key blocks ``[H, T, D]`` of a drifting scene: each frame is the previous plus ``noise``."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(H, T, D, generator=g)
    frames = []
    for _ in range(n_frames):
        base = base + noise * torch.randn(H, T, D, generator=g)
        frames.append(base.clone())
    return frames
