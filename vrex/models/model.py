"""The assembled video LLM: frozen frame encoder + connector + causal LM + the LIVE text format.

Its own module so that loaders (``vrex.models.videollm``, ``vrex.models.videollm_online``) both build
it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from vrex.models.connector import Connector
from vrex.models.encoders import FrameEncoder
from vrex.models.live_format import LiveFormat


@dataclass
class VideoLLM:
    encoder: FrameEncoder
    connector: Connector
    lm: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    fmt: LiveFormat
    name: str = "custom"
    notes: list[str] = field(default_factory=list)

    @property
    def device(self) -> torch.device:
        return self.lm.device

    @property
    def tokens_per_frame(self) -> int:
        """Visual tokens plus the connector's ImageNet tag tokens (``vrex.models.tags``)."""
        return self.encoder.tokens_per_frame + self.connector.tag_tokens

    def tokenize(self, text: str) -> torch.Tensor:
        ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        return ids.to(self.device)

    def token_id(self, text: str) -> int:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"'{text}' must be a single token for this tokenizer, got {len(ids)} tokens")
        return ids[0]

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm.get_input_embeddings()(ids)

    @torch.no_grad()
    def encode_frames(self, images: list[Image.Image]) -> torch.Tensor:
        """[B, tokens_per_frame, d_vis]: the frozen encoder's features of a batch of frames."""
        return self.encoder(images).to(self.device, dtype=self.connector.fc1.weight.dtype)

    @torch.no_grad()
    def connect(self, features: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
        """[B, tokens_per_frame, d_lm] from the features of B consecutive frames; ``previous``: the
        features of the frame before them (None: a stream starts; read by temporal connectors only)."""
        dtype = self.connector.fc1.weight.dtype
        return self.connector(features.to(self.device, dtype=dtype), None if previous is None else previous.to(self.device, dtype=dtype))

    def embed_frames(self, images: list[Image.Image], previous: torch.Tensor | None = None) -> torch.Tensor:
        """[B, tokens_per_frame, d_lm] for a batch of consecutive frames (see ``connect``)."""
        return self.connect(self.encode_frames(images), previous)

    def describe(self) -> str:
        tags = f" + {self.connector.tag_tokens} ImageNet tag tokens" if self.connector.tag_tokens else ""
        return (f"{self.name}: encoder={self.encoder.name} ({self.encoder.tokens_per_frame} tokens/frame{tags}), "
                f"LM={getattr(self.lm.config, '_name_or_path', '?')}, connector={self.connector.source}")
