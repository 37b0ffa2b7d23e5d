"""Model shapes for the simulator: presets as data (``configs/models/*.yaml``) or any transformers config.

Only shapes matter to the performance model: parameter bytes per layer, FLOPs per token, KV bytes
per token. :func:`from_hf_config` reads a ``config.json`` (a path, a directory holding one, or an
already-parsed dict) without touching the network.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass(frozen=True)
class VisionShape:
    """A ViT frame encoder (+ MLP connector): per-frame FLOPs and weight bytes."""

    name: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_patches: int
    patch_dim: int
    connector: tuple[int, ...] = ()
    head_dim: int = 64  # SigLIP/CLIP ViTs: 64-dim heads

    @property
    def num_heads(self) -> int:
        return self.hidden_size // self.head_dim

    @property
    def params(self) -> int:
        d, f = self.hidden_size, self.intermediate_size
        layer = 4 * d * d + 2 * d * f
        conn = sum(a * b for a, b in zip(self.connector, self.connector[1:]))
        return self.num_hidden_layers * layer + self.patch_dim * d + conn

    def flops_per_frame(self, tokens_per_frame: int = 10) -> float:
        """Dense matmuls (2 FLOPs per MAC) plus attention over the patches, plus the connector."""
        n, d = self.num_patches, self.hidden_size
        dense = 2 * n * (self.num_hidden_layers * (4 * d * d + 2 * d * self.intermediate_size) + self.patch_dim * d)
        attn = self.num_hidden_layers * 4 * n * n * d
        conn = 2 * tokens_per_frame * sum(a * b for a, b in zip(self.connector, self.connector[1:]))
        return float(dense + attn + conn)


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer (Llama-style: GQA attention, gated MLP)."""

    name: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    bytes_per_param: int = 2
    vision: VisionShape | None = None
    tokens_per_frame: int = 10

    # --- per layer -----------------------------------------------------------------------
    @property
    def qkv_params(self) -> int:
        d, hq, hk, hd = self.hidden_size, self.num_attention_heads, self.num_key_value_heads, self.head_dim
        return d * (hq + 2 * hk) * hd

    @property
    def o_ffn_params(self) -> int:
        d = self.hidden_size
        return self.num_attention_heads * self.head_dim * d + 3 * d * self.intermediate_size

    @property
    def layer_params(self) -> int:
        return self.qkv_params + self.o_ffn_params

    @property
    def lm_head_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def kv_bytes_per_token_layer(self) -> int:
        """K and V of one token in one layer, all KV heads."""
        return 2 * self.num_key_value_heads * self.head_dim * self.bytes_per_param

    @property
    def kv_bytes_per_token(self) -> int:
        return self.num_hidden_layers * self.kv_bytes_per_token_layer

    @property
    def weight_bytes(self) -> int:
        """Weights read per decoding step (layers + LM head; the embedding table is only indexed)."""
        return (self.num_hidden_layers * self.layer_params + self.lm_head_params) * self.bytes_per_param


def _build(d: dict[str, Any]) -> ModelShape:
    vis = d.get("vision")
    vision = None
    if vis:
        vis = dict(vis)
        vis["connector"] = tuple(vis.get("connector", ()))
        vision = VisionShape(**vis)
    keys = {f for f in ModelShape.__dataclass_fields__ if f != "vision"}
    return ModelShape(vision=vision, **{k: v for k, v in d.items() if k in keys})


def preset(name: str) -> ModelShape:
    """A preset from ``configs/models/<name>.yaml`` (``llama3-8b``, ``smollm2-135m``)."""
    path = CONFIG_DIR / "models" / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in (CONFIG_DIR / "models").glob("*.yaml"))
        raise KeyError(f"unknown model preset {name!r}; known: {known} (or pass a config.json path)")
    return _build(yaml.safe_load(path.read_text()))


def from_hf_config(cfg: str | Path | dict[str, Any], *, name: str | None = None, vision: VisionShape | None = None) -> ModelShape:
    """Shape of a transformers decoder from its ``config.json`` (path, directory or dict); no network.

    Multimodal configs with a ``text_config`` use it. ``head_dim`` defaults to hidden/heads and the
    KV heads to the attention heads (no GQA), as in transformers.
    """
    if not isinstance(cfg, dict):
        p = Path(cfg)
        if p.is_dir():
            p = p / "config.json"
        cfg = json.loads(p.read_text())
        name = name or p.parent.name
    c = cfg.get("text_config", cfg)
    heads = c["num_attention_heads"]
    hidden = c["hidden_size"]
    dtype = str(c.get("torch_dtype", c.get("dtype", "bfloat16")))
    return ModelShape(
        name=name or c.get("model_type", "hf-model"),
        hidden_size=hidden,
        num_hidden_layers=c["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=c.get("num_key_value_heads") or heads,
        head_dim=c.get("head_dim") or hidden // heads,
        intermediate_size=c.get("intermediate_size", 4 * hidden),
        vocab_size=c["vocab_size"],
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        bytes_per_param=4 if "float32" in dtype else 2,
        vision=vision,
    )


def resolve(model: str | Path | dict | ModelShape) -> ModelShape:
    """A preset name, a config.json path/dict, or a shape."""
    if isinstance(model, ModelShape):
        return model
    if isinstance(model, (dict, Path)) or (isinstance(model, str) and (model.endswith(".json") or Path(model).is_dir())):
        return from_hf_config(model)
    return preset(model)


__all__ = ["VisionShape", "ModelShape", "preset", "from_hf_config", "resolve", "CONFIG_DIR"]
