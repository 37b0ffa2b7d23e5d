"""A video LLM = frozen frame encoder + connector + causal LM + the LIVE text format.

Presets name real weights available on this machine; any part can be swapped for a local directory
or a Hugging Face repo id (``load_videollm(lm=..., encoder=...)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from vrex.models.connector import Connector
from vrex.models.encoders import EFFNET_PRESET, FrameEncoder, load_encoder
from vrex.models.lm import SMOLLM2_PRESET, load_lm
from vrex.models.lora import load_lora, merge_lora
from vrex.models.tags import equip_tags

DEFAULT_SYSTEM = (
    "You are a live video assistant. Frames of a video stream arrive over time. "
    "When the scene changes, say in a few words what is shown. Answer the user's questions about the stream."
)
#: Trained connector weights shipped with vrex (written by `vrex train`), keyed by encoder+LM.
SHIPPED_CONNECTORS = Path(__file__).resolve().parent.parent / "weights"


@dataclass
class LiveFormat:
    """The interleaved LIVE text layout around frame tokens (VideoLLM-online's, in the LM's chat format).

    ::

        {prefix}<frame>{interval}<frame>{interval}<frame>      silent frames
        {respond}<generated narration>{stop}{resume}<frame>    the model chose to speak
        {ask(question)}<generated answer>{stop}{resume}<frame> a user question at time t

    ``interval`` is the streaming-EOS label: after a frame, P(interval) >= theta means stay silent.
    The first token of ``respond`` is what training teaches the model to predict when it should speak.
    """

    prefix: str
    interval: str
    respond: str
    question: str  # contains "{question}"
    resume: str
    stop: str

    @staticmethod
    def for_tokenizer(tokenizer: PreTrainedTokenizerBase, system: str = DEFAULT_SYSTEM) -> "LiveFormat":
        vocab = tokenizer.get_vocab()
        if "<|im_start|>" in vocab:  # ChatML: SmolLM2, Qwen2
            return LiveFormat(
                prefix=f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n",
                interval=",",
                respond="<|im_end|>\n<|im_start|>assistant\n",
                question="\n{question}<|im_end|>\n<|im_start|>assistant\n",
                resume="\n<|im_start|>user\n",
                stop="<|im_end|>",
            )
        if "<|start_header_id|>" in vocab:  # Llama 3
            return LiveFormat(
                prefix=f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>"
                "<|start_header_id|>user<|end_header_id|>\n\n",
                interval=",",
                respond="<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
                question="\n{question}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
                resume="<|start_header_id|>user<|end_header_id|>\n\n",
                stop="<|eot_id|>",
            )
        # VideoLLM-online's plain layout (Llama-2 style tokenizers without chat markers)
        eos = tokenizer.eos_token or "</s>"
        return LiveFormat(prefix=f"{system}\n[", interval=",", respond="]\nAssistant:", question="]\nUser: {question}\nAssistant:",
                          resume="\n[", stop=eos)


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


#: shipped weight files by name -> file suffix (docs/train.md measures them side by side)
SHIPPED_VARIANTS = {"plain": "", "long": "-long", "tags": "-tags"}
#: the shipped model behind ``"auto"`` (``vrex run``'s default): long-context recall, ImageNet tag tokens and
#: the best narration in one model; ``"plain"`` (connector only, 10 tokens per frame) is the lightest
DEFAULT_VARIANT = "tags"


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
) -> VideoLLM:
    """Assemble a video LLM. ``connector``: a safetensors file, ``"auto"`` (the trained weights vrex
    ships for this encoder+LM, if any: ``DEFAULT_VARIANT``) or ``None`` (seeded untrained init), or a shipped
    variant (docs/train.md): ``"tags"`` (the default: connector with ImageNet tag tokens + LoRA, ``vrex.models.tags``,
    trained on minutes-long needle streams; names subjects it was never trained on, narrates best), ``"long"``
    (connector + LoRA, the long-context training without tags) or ``"plain"`` (connector only, no LoRA: the
    lightest, 10 tokens per frame). A weights file with LoRA adapters (``vrex train --lora``) also loads them into the LM
    (``vrex.models.lora``), merged into its weights (inference: the plain LM's cost), and one with tag tokens
    rebuilds their frozen head.

    ``lm`` may also name a VideoLLM-online checkpoint (directory or repo id; see
    ``vrex.models.videollm_online``): its own vision tower, connector and text layout are used, unless
    ``encoder`` (other than the default preset) / ``connector`` (a file) / ``system`` say otherwise;
    ``base_lm`` replaces the base LM it names (e.g. a local copy of Meta-Llama-3-8B-Instruct).
    ``temporal``: the architecture of an *untrained* connector (see ``vrex.models.connector``); a
    weights file carries its own.
    """
    from vrex.models import videollm_online  # imports this module

    if videollm_online.is_videollm_online(lm):
        return videollm_online.load_videollm_online(
            lm, base_lm=base_lm, vision=None if encoder == EFFNET_PRESET else encoder,
            connector=None if connector in ("auto", None) else connector,
            system=None if system == DEFAULT_SYSTEM else system, device=device,
        )
    if base_lm is not None:
        raise ValueError(f"base_lm applies to VideoLLM-online checkpoints only; '{lm}' is a plain LM")
    lm_model, tokenizer = load_lm(lm, device=device)
    enc = load_encoder(encoder, grid=grid).to(device)
    conn = Connector(enc.dim, lm_model.config.hidden_size, seed=seed, temporal=temporal).to(device)
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
    model = VideoLLM(enc, conn, lm_model, tokenizer, LiveFormat.for_tokenizer(tokenizer, system), name=f"{encoder}+{lm}")
    if conn.tag_tokens:  # the file's connector appends ImageNet tag tokens: rebuild their frozen head
        equip_tags(model, conn.tag_tokens)
    if not conn.trained:
        model.notes.append("connector is UNTRAINED (seeded random init): narration and answers do not reflect the frames")
    if lora:
        model.notes.append(f"LM has LoRA adapters from {connector} (merged into its weights)")
    return model
