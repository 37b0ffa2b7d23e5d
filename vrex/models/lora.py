"""LoRA adapters on the LM (peft), stored next to the connector in one safetensors file.

VideoLLM-online trains LoRA on its LM besides the connector; vrex's trainer does so with ``--lora``.
The adapters are injected with peft's ``inject_adapter_in_model`` (the LM stays a plain transformers
model, so every cache and attention path works unchanged) and saved as ``lm.``-prefixed tensors
in the connector's weight file, with the rank and target modules in its metadata. ``load_lora``
reads them back; a file without ``lm.`` tensors is a connector-only model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PREFIX = "lm."


def add_lora(lm: nn.Module, rank: int, targets: tuple[str, ...] = TARGETS) -> None:
    """Inject rank-``rank`` LoRA adapters (alpha = 2 rank, B = 0: the LM is unchanged until trained);
    only the adapters require grad afterwards."""
    from peft import LoraConfig, inject_adapter_in_model

    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(targets))
    inject_adapter_in_model(cfg, lm)
    for name, p in lm.named_parameters():
        p.requires_grad_("lora_" in name)


def merge_lora(lm: nn.Module) -> int:
    """Fold every adapter into its base weight (W + scale * B @ A) and put the plain base layer back,
    for inference: the LM then runs exactly the code and cost of the untouched model (no extra
    low-rank matmuls and wrapper calls per linear, per token). Returns the number of merged layers.
    Not for training: the adapters are gone afterwards."""
    from peft.tuners.lora import LoraLayer

    merged = 0
    for name, module in list(lm.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(lm.get_submodule(parent_name) if parent_name else lm, child, module.get_base_layer())
            merged += 1
    return merged


def has_lora(lm: nn.Module) -> bool:
    return any("lora_" in n for n, _ in lm.named_parameters())


def lora_state(lm: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors, ``lm.``-prefixed (the keys ``load_lora`` expects)."""
    return {PREFIX + k: v for k, v in lm.state_dict().items() if "lora_" in k}


def lora_metadata(rank: int, targets: tuple[str, ...] = TARGETS) -> dict[str, str]:
    return {"lora_rank": str(rank), "lora_targets": json.dumps(list(targets))}


def file_has_lora(path: str | Path) -> bool:
    with safe_open(str(path), framework="pt") as f:
        return any(k.startswith(PREFIX) for k in f.keys())


def load_lora(lm: nn.Module, path: str | Path) -> bool:
    """Inject and load the LoRA adapters stored in ``path`` (if it has any); returns whether it did."""
    with safe_open(str(path), framework="pt") as f:
        keys = [k for k in f.keys() if k.startswith(PREFIX)]
        if not keys:
            return False
        meta = f.metadata() or {}
        if "lora_rank" not in meta:
            raise ValueError(f"{path} has LM adapter tensors but no 'lora_rank' in its metadata")
        tensors = {k[len(PREFIX):]: f.get_tensor(k) for k in keys}
    if has_lora(lm):
        raise ValueError("this LM already has LoRA adapters; load the file into a fresh LM")
    add_lora(lm, int(meta["lora_rank"]), tuple(json.loads(meta.get("lora_targets", json.dumps(TARGETS)))))
    lm.requires_grad_(False)
    result = lm.load_state_dict(tensors, strict=False)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        raise ValueError(f"{path}: LoRA tensors do not match the LM (unexpected {result.unexpected_keys[:3]}, missing {missing[:3]})")
    return True
