"""HFVisionEncoder on tiny random SigLIP / CLIP towers saved as transformers directories."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, CLIPVisionModel, SiglipVisionModel

from tiny_models import save_vision
from vrex.models.encoders import HFVisionEncoder, load_encoder
from vrex.models.weights import WeightsNotFound


def manual_adaptive_pool(patches: torch.Tensor, side: int, grid: int) -> torch.Tensor:
    """[B, side*side, C] row-major patches -> [B, grid*grid, C] by explicit bin averages (PyTorch's bins)."""
    b, _, c = patches.shape
    fmap = patches.reshape(b, side, side, c)
    out = []
    for i in range(grid):
        r0, r1 = (i * side) // grid, math.ceil((i + 1) * side / grid)
        for j in range(grid):
            c0, c1 = (j * side) // grid, math.ceil((j + 1) * side / grid)
            out.append(fmap[:, r0:r1, c0:c1].reshape(b, -1, c).mean(dim=1))
    return torch.stack(out, dim=1)


def reference(model_cls, path, images, *, has_cls: bool, grid: int):
    """What the encoder must output, computed straight from transformers."""
    processor = AutoImageProcessor.from_pretrained(path, use_fast=False)
    model = model_cls.from_pretrained(path).eval()
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(pixel_values=pixels)
    patches = out.last_hidden_state[:, 1:] if has_cls else out.last_hidden_state
    side = int(math.isqrt(patches.shape[1]))
    assert side * side == patches.shape[1]
    return out.pooler_output, manual_adaptive_pool(patches, side, grid), out.last_hidden_state


@pytest.mark.parametrize("full", [False, True], ids=["vision-only", "two-tower"])
def test_siglip_tokens(tmp_path, frames, full):
    path = save_vision(tmp_path / "siglip", "siglip", full=full)
    enc = load_encoder(str(path), grid=3)
    assert isinstance(enc, HFVisionEncoder)
    assert (enc.dim, enc.tokens_per_frame) == (32, 10)
    tokens = enc(frames[:2])
    assert tokens.shape == (2, 10, 32)
    pooled, grid, _ = reference(SiglipVisionModel, path, frames[:2], has_cls=False, grid=3)
    torch.testing.assert_close(tokens[:, 0], pooled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tokens[:, 1:], grid, atol=1e-5, rtol=1e-5)
    # distinct frames give distinct tokens (the encoder really looks at the pixels)
    assert (tokens[0] - tokens[1]).abs().max() > 1e-3


@pytest.mark.parametrize("full", [False, True], ids=["vision-only", "two-tower"])
def test_clip_tokens_exclude_cls_from_grid(tmp_path, frames, full):
    path = save_vision(tmp_path / "clip", "clip", full=full)
    enc = HFVisionEncoder(str(path), grid=3)
    tokens = enc(frames[1:3])
    assert tokens.shape == (2, 10, 32)
    pooled, grid, hidden = reference(CLIPVisionModel, path, frames[1:3], has_cls=True, grid=3)
    assert hidden.shape[1] == 1 + 16  # CLS + 4x4 patches
    torch.testing.assert_close(tokens[:, 0], pooled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tokens[:, 1:], grid, atol=1e-5, rtol=1e-5)
    # Pooling CLS in with the patches would give different grid tokens: the test can tell.
    wrong = manual_adaptive_pool(hidden[:, :16], 4, 3)
    assert (tokens[:, 1:] - wrong).abs().max() > 1e-3


@pytest.mark.parametrize("grid", [0, 1, 2])
def test_grid_sizes(siglip_dir, frames, grid):
    enc = HFVisionEncoder(str(siglip_dir), grid=grid)
    tokens = enc(frames[:1])
    assert tokens.shape == (1, 1 + grid * grid, 32)
    pooled, pool_grid, hidden = reference(SiglipVisionModel, siglip_dir, frames[:1], has_cls=False, grid=max(grid, 1))
    torch.testing.assert_close(tokens[:, 0], pooled, atol=1e-5, rtol=1e-5)
    if grid == 1:  # a 1x1 grid is the mean of all patches
        torch.testing.assert_close(tokens[:, 1], hidden.mean(dim=1), atol=1e-5, rtol=1e-5)


def test_grayscale_and_odd_sizes(siglip_dir):
    enc = HFVisionEncoder(str(siglip_dir), grid=3)
    rng = np.random.default_rng(0)
    gray = Image.fromarray(rng.integers(0, 255, (37, 91), dtype=np.uint8))  # mode "L", not square
    assert enc([gray]).shape == (1, 10, 32)


def test_unsupported_vision_type(tmp_path):
    from transformers import ViTConfig, ViTModel

    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                       image_size=32, patch_size=8)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"'vit'.*SigLIP and CLIP"):
        HFVisionEncoder(str(tmp_path))


def test_missing_vision_tower_offline():
    with pytest.raises(WeightsNotFound, match="google/siglip-base-patch16-224"):
        HFVisionEncoder("google/siglip-base-patch16-224")


def test_half_precision_checkpoint_loads_as_float32(tmp_path, frames):
    """Hub towers are often stored in fp16/bf16; the encoder computes in float32 on the original weights."""
    path = save_vision(tmp_path / "siglip16", "siglip")
    SiglipVisionModel.from_pretrained(path).to(torch.bfloat16).save_pretrained(path)
    enc = HFVisionEncoder(str(path), grid=3)
    assert enc.model.dtype == torch.float32
    tokens = enc(frames[:1])
    assert tokens.dtype == torch.float32
    model = SiglipVisionModel.from_pretrained(path, dtype=torch.float32).eval()
    processor = AutoImageProcessor.from_pretrained(path, use_fast=False)
    with torch.no_grad():
        out = model(pixel_values=processor(images=frames[:1], return_tensors="pt")["pixel_values"])
    torch.testing.assert_close(tokens[:, 0], out.pooler_output, atol=1e-5, rtol=1e-5)
