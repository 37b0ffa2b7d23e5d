"""VideoLLM-online checkpoints (showlab/videollm-online; e.g. ``chenjoya/videollm-online-8b-v1plus``).

A VideoLLM-online checkpoint is a PEFT LoRA adapter trained on ``LiveLlamaForCausalLM``, i.e. a
``LlamaForCausalLM`` with one extra submodule, ``connector`` = Linear(d_vis -> d) GELU Linear(d -> d)::

    adapter_config.json        peft_type LORA; base_model_name_or_path -> the LM
                               (meta-llama/Meta-Llama-3-8B-Instruct); r, lora_alpha, target_modules
                               (q/k/v/o/gate/up/down + lm_head); modules_to_save ["connector"]
    adapter_model.safetensors  LoRA A/B per target, e.g.
    (or adapter_model.bin)       base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight
                                 base_model.model.lm_head.lora_B.weight
                               and the fully trained connector:
                                 base_model.model.connector.{0,2}.{weight,bias}
    config.json (optional)     LiveLlamaConfig fields: vision_pretrained, frame_token_cls,
                               frame_token_pooled, frame_token_interval

The published checkpoints ship only the adapter; the vision side then comes from the training
arguments of ``live1+`` (``LIVE1_PLUS``): SigLIP ``google/siglip-large-patch16-384``, pooler output
+ 3x3 adaptive pool of the patch grid = 10 tokens per frame, interval token ``','``.

``load_videollm_online`` loads the base LM (``load_lm``), applies the adapter with peft and merges
the LoRA (``merge_and_unload``), moves the connector into vrex's ``Connector`` (fc1 = connector.0,
fc2 = connector.2), loads the vision tower as an ``HFVisionEncoder`` (frames letterboxed to a
square, as its ffmpeg preprocessing pads them) and uses VideoLLM-online's own text layout
(``models/tokenization_live.py``): ``{bos}{system}\\n\\n[`` frames joined by ``,``
``]\\nAssistant:`` reply ``{eos}\\n[`` and ``]\\nUser: {question}\\nAssistant:``.

The base LM and vision tower named inside the checkpoint are usually hub ids; ``base_lm=`` and
``vision=`` override them with local directories (offline machines).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from vrex.models.connector import Connector
from vrex.models.encoders import HFVisionEncoder
from vrex.models.lm import SMOLLM2_PRESET, is_causal_lm_type, load_lm
from vrex.models.live_format import LiveFormat
from vrex.models.model import VideoLLM
from vrex.models.weights import WeightsNotFound, part_of

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
#: Key prefix of the (non-LoRA) connector weights inside the adapter file.
CONNECTOR_PREFIX = "base_model.model.connector."
VISION_TYPES = ("siglip", "siglip_vision_model", "clip", "clip_vision_model")

#: The model layouts vrex accepts where it takes a model directory or repo id.
LAYOUTS = (
    "a transformers causal-LM directory (config.json of a model AutoModelForCausalLM builds, weights, tokenizer)",
    f"a VideoLLM-online checkpoint (a PEFT LoRA adapter: {ADAPTER_CONFIG} naming the base Llama LM + "
    f"{ADAPTER_WEIGHTS[0]} with the LoRA and the connector)",
)


class UnknownModelLayout(ValueError):
    """A directory is none of the model layouts vrex loads; the message names it and the layouts."""


@dataclass(frozen=True)
class LiveSettings:
    """The vision/stream settings of a VideoLLM-online model (``LiveConfigMixin`` fields)."""

    vision_pretrained: str = "google/siglip-large-patch16-384"
    frame_token_cls: bool = True
    frame_token_pooled: tuple[int, int] | None = (3, 3)
    frame_token_interval: str = ","
    system_prompt: str = (
        "A multimodal AI assistant is helping users with some activities."
        " Below is their conversation, interleaved with the list of video frames received by the assistant."
    )

    @staticmethod
    def from_dir(path: Path) -> "LiveSettings":
        """``config.json`` fields if the checkpoint has them, else the ``live1+`` defaults."""
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            return LIVE1_PLUS
        cfg = json.loads(cfg_file.read_text())
        kw = {}
        for key in ("vision_pretrained", "frame_token_cls", "frame_token_interval"):
            if cfg.get(key) is not None:
                kw[key] = cfg[key]
        if "frame_token_pooled" in cfg:
            pooled = cfg["frame_token_pooled"]
            kw["frame_token_pooled"] = tuple(pooled) if pooled else None
        return LiveSettings(**kw)

    @property
    def grid(self) -> int:
        """Side of the pooled grid (0: CLS only); vrex's encoders pool to a square grid."""
        if not self.frame_token_pooled:
            return 0
        h, w = self.frame_token_pooled
        if h != w:
            raise NotImplementedError(f"frame_token_pooled={list(self.frame_token_pooled)}: vrex pools to a square grid")
        return int(h)


LIVE1_PLUS = LiveSettings()


# -- layout detection ------------------------------------------------------------------------
def _adapter_weights_file(path: Path) -> Path | None:
    for name in ADAPTER_WEIGHTS:
        if (path / name).is_file():
            return path / name
    return None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UnknownModelLayout(f"{path} is not a readable JSON file ({err})") from err


def _is_live_adapter(path: Path) -> bool:
    """An adapter directory whose trained modules include the connector."""
    if not (path / ADAPTER_CONFIG).is_file():
        return False
    if "connector" in (_read_json(path / ADAPTER_CONFIG).get("modules_to_save") or []):
        return True
    weights = _adapter_weights_file(path)
    if weights is None or weights.suffix != ".safetensors":
        return False
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        return any(k.startswith(CONNECTOR_PREFIX) for k in f.keys())


def detect_layout(path: str | Path) -> str:
    """``"videollm-online"`` or ``"lm"`` for a local directory; otherwise ``UnknownModelLayout``."""
    path = Path(path)
    accepted = "; ".join(LAYOUTS)
    if not path.is_dir():
        raise UnknownModelLayout(f"{path} is not a directory; vrex loads {accepted}")
    if (path / ADAPTER_CONFIG).is_file():
        if _is_live_adapter(path):
            return "videollm-online"
        raise UnknownModelLayout(
            f"{path} is a PEFT adapter without a 'connector' (modules_to_save / {CONNECTOR_PREFIX}* weights), "
            f"so not a VideoLLM-online checkpoint; vrex loads {accepted}"
        )
    if (path / "config.json").is_file():
        model_type = _read_json(path / "config.json").get("model_type")
        if is_causal_lm_type(model_type):
            return "lm"
        if model_type in VISION_TYPES:
            raise UnknownModelLayout(
                f"{path} is a '{model_type}' vision tower, not a language model: pass it as the encoder "
                f"(--encoder / encoder=); as the model vrex loads {accepted}"
            )
        raise UnknownModelLayout(
            f"{path} is a '{model_type}' model, not a causal language model (transformers' AutoModelForCausalLM has "
            f"no class for it); vrex loads {accepted}"
        )
    raise UnknownModelLayout(
        f"{path} has neither config.json nor {ADAPTER_CONFIG}; vrex loads {accepted}"
    )


def _hub_snapshot(repo_id: str, patterns: list[str] | None, what: str) -> Path:
    """Download (or find in the Hugging Face cache) files of a hub repo; clear error when impossible."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as err:  # offline, no such repo, gated, ...: all end the same way for the user
        raise WeightsNotFound(
            f"{what} '{repo_id}' is not a local directory and the Hugging Face hub could not provide it "
            f"({err.__class__.__name__}: {str(err).splitlines()[0] if str(err) else ''}). On a machine with network "
            f"access run `hf download {repo_id} --local-dir DIR` and pass DIR."
        ) from err


def is_videollm_online(spec: str | Path) -> bool:
    """Does ``spec`` (a local directory or a hub repo id) name a VideoLLM-online checkpoint?

    Hub ids are probed by fetching only their small JSON files (or reading the hub cache).
    Raises ``UnknownModelLayout`` for a local directory of no accepted layout, and
    ``WeightsNotFound`` for a repo id the hub cannot provide.
    """
    spec = str(spec)
    if spec == SMOLLM2_PRESET:
        return False
    path = Path(spec)
    if path.exists():
        if path.is_file():  # load_lm explains this case
            return False
        return detect_layout(path) == "videollm-online"
    snapshot = _hub_snapshot(spec, ["config.json", ADAPTER_CONFIG], "model")
    return (snapshot / ADAPTER_CONFIG).is_file() and _is_live_adapter(snapshot)


def resolve_checkpoint(spec: str | Path) -> Path:
    """A local VideoLLM-online directory, or a hub repo id downloaded (adapter files only)."""
    path = Path(spec)
    if path.is_dir():
        return path
    if path.exists():
        raise UnknownModelLayout(f"{path} is a file; a VideoLLM-online checkpoint is a directory")
    return _hub_snapshot(str(spec), ["*.json", "adapter_model.*"], "VideoLLM-online checkpoint")


# -- loading ---------------------------------------------------------------------------------
def letterbox(image: Image.Image) -> Image.Image:
    """Pad to a centred square with black, as VideoLLM-online's ffmpeg preprocessing does
    (``scale`` the long side to the resolution, ``pad`` to a square, colour #000000)."""
    image = image.convert("RGB")
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), (0, 0, 0))
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


class LiveVisionEncoder(HFVisionEncoder):
    """The vision tower fed like VideoLLM-online: frames letterboxed to a square (not stretched),
    then the tower's own resize and normalisation."""

    def forward(self, images: list[Image.Image]) -> torch.Tensor:
        return super().forward([letterbox(im) for im in images])


def videollm_online_format(tokenizer, system: str, interval: str = ",") -> LiveFormat:
    """VideoLLM-online's plain chat layout (``tokenization_live.chat_template``), as a ``LiveFormat``."""
    if not interval:
        raise NotImplementedError("VideoLLM-online 'live1' checkpoints (no interval token) are not supported; use live1+")
    eos = tokenizer.eos_token
    if eos is None:
        raise ValueError("the base LM's tokenizer has no eos_token; VideoLLM-online ends every reply with it")
    return LiveFormat(
        prefix=f"{tokenizer.bos_token or ''}{system}\n\n[",
        interval=interval,
        respond="]\nAssistant:",
        question="]\nUser: {question}\nAssistant:",
        resume="\n[",
        stop=eos,
    )


def _split_connector(weights: dict[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    """``base_model.model.connector.{0,2}.*`` -> vrex ``Connector`` keys ``fc1.*`` / ``fc2.*``."""
    mapping = {"0.weight": "fc1.weight", "0.bias": "fc1.bias", "2.weight": "fc2.weight", "2.bias": "fc2.bias"}
    found = {k[len(CONNECTOR_PREFIX):]: v for k, v in weights.items() if k.startswith(CONNECTOR_PREFIX)}
    # peft versions differ in whether the adapter name is kept in modules_to_save keys
    found = {k.replace("modules_to_save.default.", ""): v for k, v in found.items()}
    if set(found) != set(mapping):
        raise ValueError(
            f"{source}: expected the connector as Linear-GELU-Linear with keys "
            f"{sorted(CONNECTOR_PREFIX + k for k in mapping)}, found {sorted(CONNECTOR_PREFIX + k for k in found)}"
        )
    return {mapping[k]: v for k, v in found.items()}


def _merge_lora(lm: nn.Module, checkpoint: Path, weights: dict[str, torch.Tensor], conn: dict[str, torch.Tensor]) -> nn.Module:
    """Apply the checkpoint's LoRA + connector to ``lm`` with peft and merge; returns the plain LM."""
    from peft import LoraConfig, PeftConfig, get_peft_model
    from peft.utils import set_peft_model_state_dict

    config = PeftConfig.from_pretrained(str(checkpoint))
    if not isinstance(config, LoraConfig):
        raise ValueError(f"{checkpoint}: a VideoLLM-online checkpoint is a LoRA adapter, this one is {config.peft_type}")
    config.inference_mode = True
    config.base_model_name_or_path = lm.name_or_path  # the LM actually loaded (may be a local override)
    # LiveLlamaForCausalLM = the LM + a `connector` submodule: recreate that module tree so adapter keys match.
    d_vis, d = conn["fc1.weight"].shape[1], conn["fc1.weight"].shape[0]
    lm.connector = nn.Sequential(nn.Linear(d_vis, d), nn.GELU(), nn.Linear(d, d)).to(lm.device, lm.dtype)
    out_emb, in_emb = lm.get_output_embeddings(), lm.get_input_embeddings()
    if any(".lm_head." in k and "lora_" in k for k in weights) and out_emb.weight is in_emb.weight:
        # Merging LoRA into a tied lm_head would change the input embeddings too; the trained model only
        # changed the output projection, so untie first.
        out_emb.weight = nn.Parameter(out_emb.weight.detach().clone(), requires_grad=False)
        lm.config.tie_word_embeddings = False
    peft_model = get_peft_model(lm, config)
    result = set_peft_model_state_dict(peft_model, weights)
    if result.unexpected_keys:
        raise ValueError(
            f"{checkpoint}: {len(result.unexpected_keys)} adapter weights match no module of the base LM "
            f"(e.g. {result.unexpected_keys[:3]}): is base_model_name_or_path the LM it was trained on?"
        )
    missing = [k for k in result.missing_keys if "lora_" in k or "modules_to_save" in k]
    if missing:
        raise ValueError(f"{checkpoint}: the adapter file lacks {len(missing)} LoRA/connector weights (e.g. {missing[:3]})")
    merged = peft_model.merge_and_unload()
    del merged.connector
    return merged


def load_videollm_online(
    checkpoint: str | Path,
    *,
    base_lm: str | None = None,
    vision: str | None = None,
    connector: str | Path | None = None,
    system: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> VideoLLM:
    """Load a VideoLLM-online checkpoint (local directory or hub repo id) as a vrex ``VideoLLM``.

    ``base_lm`` / ``vision``: local directories (or other repo ids) replacing the base LM and
    vision tower the checkpoint names. ``connector``: a vrex connector .safetensors to use instead
    of the checkpoint's. ``system``: replaces VideoLLM-online's training system prompt.
    """
    from peft.utils import load_peft_weights

    ckpt = resolve_checkpoint(checkpoint)
    layout = detect_layout(ckpt)
    if layout != "videollm-online":
        raise UnknownModelLayout(f"{ckpt} is a '{layout}' directory, not a VideoLLM-online checkpoint")
    settings = LiveSettings.from_dir(ckpt)
    if not settings.frame_token_cls:
        raise NotImplementedError(f"{ckpt}: frame_token_cls=False (grid tokens only) is not supported; vrex puts the global token first")
    if not settings.frame_token_interval:
        raise NotImplementedError(f"{ckpt}: 'live1' checkpoints (no interval token) are not supported; use a live1+ one")
    grid = settings.grid
    adapter_cfg = _read_json(ckpt / ADAPTER_CONFIG)

    base = base_lm or adapter_cfg.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{ckpt}/{ADAPTER_CONFIG} names no base_model_name_or_path; pass the base LM (base_lm=DIR)")
    with part_of(f"the base LM of VideoLLM-online checkpoint {ckpt}", "pass a local copy with base_lm=DIR, CLI --base-lm DIR"):
        lm, tokenizer = load_lm(base, dtype=dtype, device=device)
    if lm.config.model_type != "llama":
        log.warning("VideoLLM-online checkpoints are trained on Llama; %s is '%s'", base, lm.config.model_type)

    weights = load_peft_weights(str(ckpt), device="cpu")
    conn_state = _split_connector(weights, ckpt)
    d_vis, d_lm = conn_state["fc1.weight"].shape[1], conn_state["fc1.weight"].shape[0]
    if lm.config.hidden_size != d_lm:
        raise ValueError(f"base LM {base} has hidden size {lm.config.hidden_size}; the connector of {ckpt} outputs {d_lm}")
    lm = _merge_lora(lm, ckpt, weights, conn_state)
    lm.eval().requires_grad_(False)

    vision_spec = vision or settings.vision_pretrained
    with part_of(f"the vision tower of VideoLLM-online checkpoint {ckpt}", "pass a local copy with vision=DIR, CLI --encoder DIR"):
        encoder = LiveVisionEncoder(vision_spec, grid=grid).to(device)

    if encoder.dim != d_vis:
        raise ValueError(f"vision tower {vision_spec} outputs {encoder.dim}-d features; the connector of {ckpt} takes {d_vis}-d")
    conn = Connector(d_vis, d_lm).to(device)
    if connector is not None:
        conn.load(connector)
    else:
        conn.load_state_dict({k: v.to(conn.fc1.weight.dtype) for k, v in conn_state.items()})
        conn.trained, conn.source = True, f"{ckpt} (VideoLLM-online connector)"
    conn.to(device=device, dtype=dtype).eval().requires_grad_(False)

    fmt = videollm_online_format(tokenizer, system or settings.system_prompt, settings.frame_token_interval)
    name = f"videollm-online:{Path(str(checkpoint)).name or checkpoint}"
    model = VideoLLM(encoder, conn, lm, tokenizer, fmt, name=name)
    model.notes.append(
        f"VideoLLM-online checkpoint {ckpt}: LoRA (r={adapter_cfg.get('r')}, alpha={adapter_cfg.get('lora_alpha')}) "
        f"merged into {base}; vision {vision_spec}, {encoder.tokens_per_frame} tokens/frame"
    )
    return model
