"""A scripted stream -> the exact token sequence ``StreamingSession`` feeds, with LIVE training targets.

The layout (``vrex.engine.session``, VideoLLM-online's LIVE format)::

    prefix
    per frame:  pending + <frame tokens>
      silent    -> pending = [interval]                      target at the frame's last token: interval
      speaks    -> respond + text + stop, pending = resume   target at the frame's last token: respond[0]
      questions -> for each: pending + question.format(q) + answer + stop, pending = resume
                   (a frame with a question due is never gated: no target at its last token)

``pending`` is fed with the *next* frame, so a stream ends right after its last frame or its last
answer token (the trailing interval / stop are owed to a frame that never comes).

Targets sit on the position whose output predicts them: a response's first text token at the last
prompt token, ..., ``stop`` at the last text token (kind ``LM``); the gate label at a frame's last
token (kind ``STREAM``: ``interval`` on a silent frame, the first token of ``respond`` when the model
must speak). Frame positions hold the placeholder id ``FRAME`` in ``ids``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from vrex.models.videollm import LiveFormat

IGNORE = -100
FRAME = -1  # placeholder id at frame-token positions
NONE, LM, STREAM = 0, 1, 2


@dataclass
class Turn:
    """Text after a frame: ``question`` None = the model's own narration (it chose to speak)."""

    text: str
    question: str | None = None


@dataclass
class Step:
    media: str
    frame: int  # index into the feature cache of ``media``
    t: float
    turns: list[Turn] = field(default_factory=list)
    #: False: no gate label on this frame (it is fed like a silent frame, but the loss ignores the
    #: decision; used for haystacks fed with ``StreamingSession.fast_forward``, which skips the gate)
    gate: bool = True
    #: ImageNet class shown by this frame's tag tokens instead of the encoder's top-1 (training
    #: augmentation that teaches copying a name, ``vrex.models.tags``); None: the encoder's own
    tag: int | None = None

    @property
    def questions(self) -> list[Turn]:
        return [x for x in self.turns if x.question is not None]

    @property
    def narration(self) -> Turn | None:
        return next((x for x in self.turns if x.question is None), None)


@dataclass
class Layout:
    ids: torch.Tensor  # [T] long; FRAME at frame-token positions
    targets: torch.Tensor  # [T] long; IGNORE where nothing is predicted
    kinds: torch.Tensor  # [T] uint8; NONE / LM / STREAM
    frame_starts: list[int]  # first position of each step's frame tokens
    tokens_per_frame: int

    def __len__(self) -> int:
        return int(self.ids.numel())

    @property
    def frame_mask(self) -> torch.Tensor:
        return self.ids == FRAME


class LayoutBuilder:
    """Builds ``Layout``s for one tokenizer/format (token ids of the fixed strings computed once)."""

    def __init__(self, tokenize: Callable[[str], list[int]], fmt: LiveFormat, tokens_per_frame: int):
        self.tokenize, self.fmt, self.tpf = tokenize, fmt, tokens_per_frame
        self.prefix = tokenize(fmt.prefix)
        interval = tokenize(fmt.interval)
        stop = tokenize(fmt.stop)
        if len(interval) != 1 or len(stop) != 1:
            raise ValueError("interval and stop must be single tokens")
        self.interval, self.stop = interval[0], stop[0]
        self.respond = tokenize(fmt.respond)
        self.resume = tokenize(fmt.resume)

    @classmethod
    def for_model(cls, model) -> "LayoutBuilder":
        return cls(lambda s: model.tokenize(s).tolist(), model.fmt, model.tokens_per_frame)

    def silent_length(self, n_frames: int) -> int:
        """``len(self.build(steps))`` for ``n_frames`` silent steps, without building them: the prefix,
        each frame's tokens and the interval owed to every frame but the first."""
        return len(self.prefix) + n_frames * self.tpf + max(0, n_frames - 1)

    def build(self, steps: list[Step]) -> Layout:
        ids: list[int] = list(self.prefix)
        targets: list[int] = [IGNORE] * len(ids)
        kinds: list[int] = [NONE] * len(ids)
        frame_starts: list[int] = []
        pending: list[int] = []

        def feed(tokens: list[int]) -> None:
            ids.extend(tokens)
            targets.extend([IGNORE] * len(tokens))
            kinds.extend([NONE] * len(tokens))

        def reply(prompt: list[int], text: str) -> None:
            feed(prompt)
            answer = self.tokenize(text) + [self.stop]
            targets[-1], kinds[-1] = answer[0], LM  # the prompt's last token predicts the first text token
            # feed the text tokens (not stop: it is owed to the next step); each predicts the next one
            for tok, nxt in zip(answer[:-1], answer[1:]):
                ids.append(tok)
                targets.append(nxt)
                kinds.append(LM)

        for step in steps:
            feed(pending)
            frame_starts.append(len(ids))
            ids.extend([FRAME] * self.tpf)
            targets.extend([IGNORE] * self.tpf)
            kinds.extend([NONE] * self.tpf)
            questions, narration = step.questions, step.narration
            pending = []
            if questions:  # answered at this frame; the gate is not consulted
                for turn in questions:
                    reply(pending + self.tokenize(self.fmt.question.format(question=turn.question)), turn.text)
                    pending = [self.stop] + self.resume
            elif narration is not None:
                targets[-1], kinds[-1] = self.respond[0], STREAM
                reply(self.respond, narration.text)
                pending = [self.stop] + self.resume
            else:
                if step.gate:
                    targets[-1], kinds[-1] = self.interval, STREAM
                pending = [self.interval]
        return Layout(torch.tensor(ids), torch.tensor(targets), torch.tensor(kinds, dtype=torch.uint8), frame_starts, self.tpf)


def embed_layout(model, layout: Layout, frame_feats: torch.Tensor, tag_classes: torch.Tensor | None = None) -> torch.Tensor:
    """[T, d] input embeddings: token embeddings, frame positions replaced by ``connector(features)``.

    ``frame_feats``: [n_frames, tokens_per_frame, dim] encoder features, one per step, in order;
    ``tag_classes``: [n_frames] forced tag classes (-1: the encoder's own), see ``Step.tag``."""
    mask = layout.frame_mask
    ids = layout.ids.clamp(min=0).to(model.device)
    text = model.embed_text(ids)
    conn = model.connector
    vis = conn(frame_feats.to(model.device, dtype=conn.fc1.weight.dtype), tag_classes=tag_classes).reshape(-1, text.shape[-1])
    if vis.shape[0] != int(mask.sum()):
        raise ValueError(f"{vis.shape[0]} frame tokens for {int(mask.sum())} frame positions")
    out = text.clone()
    out[mask.to(model.device)] = vis.to(text.dtype)
    return out
