"""A stream's cached encoder features as model input, for training and evaluation alike.

Training and evaluation both read frames from the feature cache (``vrex.train.data``) instead of
decoding and encoding media again: ``stream_features`` stacks a stream's frames, ``stream_tags`` its
forced tag classes, and ``feature_model`` lets ``StreamingSession`` take those features as frames.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from vrex.train.data import FeatureCache


def stream_features(cache: FeatureCache, stream) -> torch.Tensor:
    """[n_frames, tokens, d_vis]: the stream's frames, in order, from the cache."""
    return torch.stack([cache.features[s.media][s.frame] for s in stream.steps]).float()


def stream_tags(stream) -> torch.Tensor | None:
    """[n_frames] forced tag classes (-1: the encoder's own), or None when no step forces one."""
    if all(s.tag is None for s in stream.steps):
        return None
    return torch.tensor([-1 if s.tag is None else s.tag for s in stream.steps])


class _CachedFeatures(nn.Module):
    """Pass-through 'encoder': the session hands it what was pushed as the image (cached features)."""

    def __init__(self, like):
        super().__init__()
        self.dim, self.grid, self.name = like.dim, like.grid, like.name

    @property
    def tokens_per_frame(self) -> int:
        return 1 + self.grid * self.grid

    def forward(self, images):
        return torch.stack([im.float() for im in images])


def feature_model(model, connector):
    """A shallow copy of ``model`` that takes cached features as frames and uses ``connector``: the
    session path is unchanged (pending text + frame tokens per step, the gate, decoding)."""
    return dataclasses.replace(model, encoder=_CachedFeatures(model.encoder), connector=connector)
