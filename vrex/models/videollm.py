"""A video LLM = frozen frame encoder + connector + causal LM + the LIVE text format.

Presets name real weights available on this machine; any part can be swapped for a local directory
or a Hugging Face repo id (``load_videollm(lm=..., encoder=...)``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from vrex.kv.layers import text_config
from vrex.models import videollm_online
from vrex.models.connector import Connector
from vrex.models.dtypes import DEFAULT_LM_DTYPE, lm_torch_dtype
from vrex.models.encoders import EFFNET_PRESET, load_encoder
from vrex.models.live_format import DEFAULT_SYSTEM, LiveFormat, LiveFormatError  # noqa: F401  (public here too)
from vrex.models.lm import SMOLLM2_PRESET, TESTED_LM_TYPES, load_lm
from vrex.models.lora import load_lora, merge_lora
from vrex.models.model import VideoLLM
from vrex.models.tags import equip_tags

#: Trained connector weights shipped with vrex (written by `vrex train`), keyed by encoder+LM.
SHIPPED_CONNECTORS = Path(__file__).resolve().parent.parent / "weights"


#: shipped weight files by name -> file suffix (docs/train.md measures them side by side)
SHIPPED_VARIANTS = {"plain": "", "long": "-long", "tags": "-tags", "narrate": "-narrate"}
#: the shipped model behind ``"auto"`` (``vrex run``'s default): ``"tags"`` trained further on long
#: many-segment narration streams, so it keeps naming what it sees over a 10-minute stream where ``"tags"``
#: repeats one narration after the first minute (issue 22; docs/train.md); ``"plain"`` (connector only,
#: 10 tokens per frame) is the lightest
DEFAULT_VARIANT = "narrate"


def shipped_connector(encoder_name: str, lm_name: str, variant: str = "") -> Path | None:
    path = SHIPPED_CONNECTORS / f"connector-{encoder_name}-{lm_name}{variant}.safetensors"
    return path if path.is_file() else None


def load_videollm(
    lm: str = SMOLLM2_PRESET,
    encoder: str = EFFNET_PRESET,
    *,
    connector: str | Path | None = "auto",
    grid: int = 3,
    system: str = DEFAULT_SYSTEM,
    seed: int = 0,
    device: str | torch.device = "cpu",
    base_lm: str | None = None,
    temporal: bool = True,
    lm_dtype: str | torch.dtype = DEFAULT_LM_DTYPE,
) -> VideoLLM:
    """Assemble a video LLM. ``connector``: a safetensors file, ``"auto"`` (the trained weights vrex
    ships for this encoder+LM, if any: ``DEFAULT_VARIANT``) or ``None`` (seeded untrained init), or a shipped
    variant (docs/train.md): ``"narrate"`` (the default: ``"tags"`` trained further on long many-segment narration
    streams, keeps narrating right over long streams), ``"tags"`` (connector with ImageNet tag tokens + LoRA,
    ``vrex.models.tags``, trained on minutes-long needle streams; names subjects it was never trained on), ``"long"``
    (connector + LoRA, the long-context training without tags) or ``"plain"`` (connector only, no LoRA: the
    lightest, 10 tokens per frame). A weights file with LoRA adapters (``vrex train --lora``) also loads them into the LM
    (``vrex.models.lora``), merged into its weights (inference: the plain LM's cost), and one with tag tokens
    rebuilds their frozen head.

    ``lm`` may also name a VideoLLM-online checkpoint (directory or repo id; see
    ``vrex.models.videollm_online``): its own vision tower, connector and text layout are used, unless
    ``encoder`` (other than the default preset) / ``connector`` (a file) / ``system`` say otherwise;
    ``base_lm`` replaces the base LM it names (e.g. a local copy of Meta-Llama-3-8B-Instruct).
    ``temporal``: the architecture of an *untrained* connector (see ``vrex.models.connector``); a
    weights file carries its own. ``lm_dtype``: the LM's weights type after loading (and after merging
    LoRA), a name of ``vrex.models.dtypes.LM_DTYPES`` or its torch dtype; ``"bfloat16"`` halves the weights
    each step reads, the vision side stays float32.
    """
    lm_dtype = lm_torch_dtype(lm_dtype)
    if videollm_online.is_videollm_online(lm):
        return _cast_lm(videollm_online.load_videollm_online(
            lm, base_lm=base_lm, vision=None if encoder == EFFNET_PRESET else encoder,
            connector=None if connector in ("auto", None) else connector,
            system=None if system == DEFAULT_SYSTEM else system, device=device,
        ), lm_dtype)
    if base_lm is not None:
        raise ValueError(f"base_lm applies to VideoLLM-online checkpoints only; '{lm}' is a plain LM")
    lm_model, tokenizer = load_lm(lm, device=device)
    enc = load_encoder(encoder, grid=grid).to(device)
    conn = Connector(enc.dim, text_config(lm_model.config).hidden_size, seed=seed, temporal=temporal).to(device)
    if connector == "auto":
        connector = shipped_connector(enc.name, lm, SHIPPED_VARIANTS[DEFAULT_VARIANT]) if Path(lm).name == lm else None
    elif connector in SHIPPED_VARIANTS:
        name = connector
        connector = shipped_connector(enc.name, lm, SHIPPED_VARIANTS[name])
        if connector is None:
            raise FileNotFoundError(f"connector '{name}': vrex ships no such weights for encoder {enc.name} + LM {lm}")
    lora = False
    if connector is not None:
        conn.load(connector)
        lora = load_lora(lm_model, connector)  # the file may carry LoRA adapters for the LM too
        if lora:
            merge_lora(lm_model)  # inference only: the plain LM's speed, same outputs
    try:
        fmt = LiveFormat.for_tokenizer(tokenizer, system)
    except LiveFormatError as err:
        raise LiveFormatError(f"LM '{lm}': {err}") from None
    model = VideoLLM(enc, conn, lm_model, tokenizer, fmt, name=f"{encoder}+{lm}")
    if conn.tag_tokens:  # the file's connector appends ImageNet tag tokens: rebuild their frozen head
        equip_tags(model, conn.tag_tokens)
    if not conn.trained:
        model.notes.append("connector is UNTRAINED (seeded random init): narration and answers do not reflect the frames")
    family = text_config(lm_model.config).model_type
    if family not in TESTED_LM_TYPES:
        model.notes.append(f"LM family '{family}' is not among the families vrex's tests run ({', '.join(TESTED_LM_TYPES)})")
    if lora:
        model.notes.append(f"LM has LoRA adapters from {connector} (merged into its weights)")
    return _cast_lm(model, lm_dtype)


def _cast_lm(model: VideoLLM, dtype: torch.dtype) -> VideoLLM:
    if dtype != model.lm.dtype:
        model.lm.to(dtype)
        model.notes.append(f"LM weights in {str(dtype).removeprefix('torch.')} (the session casts its inputs to it)")
    return model
