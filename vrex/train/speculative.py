"""The LIVE loop under the ``full`` policy, run fast for evaluation: speculative silent prefill.

``StreamingSession`` prefills one frame per forward because the streaming-EOS gate must be read
after every frame. Under ``full`` (every past token attended, nothing evicted) the gate decision at
frame k depends only on the tokens before it, so many frames can be prefilled at once *as if* the
model stayed silent, and the gate read at every frame end: if it fires at frame k, the cache is
cropped back to the end of frame k, the response is generated there, and prefilling resumes at
frame k+1. The token sequence, the positions and every decision are those of the session (greedy
decoding); ``tests/train/test_speculative.py`` holds the two equal. On a model that speaks rarely a
5-minute stream costs a few forwards instead of 600.

It uses the LM's own ``DynamicCache`` and attention (SDPA), not ``VrexCache``: it is a reference for
``full`` only; other policies run through the session.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from vrex.models.videollm import VideoLLM


@dataclass
class SpeculativeEvent:
    frame: int  # index of the frame after which it happened
    kind: str  # "response" or "answer"
    text: str
    question: str | None = None


class SpeculativeLive:
    """Feed a whole stream of pre-encoded frames; returns the responses and answers of the LIVE loop.

    ``theta``, ``max_response_tokens``, ``max_answer_tokens`` as in ``SessionConfig`` (greedy,
    ``min_response_gap`` 0). ``chunk``: frames per speculative forward."""

    def __init__(self, model: VideoLLM, theta: float, max_response_tokens: int, max_answer_tokens: int, chunk: int = 48):
        self.model, self.theta, self.chunk = model, theta, chunk
        self.max_response_tokens, self.max_answer_tokens = max_response_tokens, max_answer_tokens
        fmt = model.fmt
        self.interval = model.token_id(fmt.interval)
        self.stop = model.token_id(fmt.stop)
        self.stop_ids = {self.stop} | ({model.tokenizer.eos_token_id} if model.tokenizer.eos_token_id is not None else set())
        self.respond = model.tokenize(fmt.respond).tolist()
        self.resume = model.tokenize(fmt.resume).tolist()
        self.forwards = 0

    @torch.no_grad()
    def run(self, features: torch.Tensor, questions: dict[int, list[str]] | None = None) -> list[SpeculativeEvent]:
        """``features`` [N, tokens, d_vis]: the stream's frames in order; ``questions[k]``: asked at frame k
        (answered right after it; the gate is not read at such a frame, as in the session)."""
        model, questions = self.model, questions or {}
        embeds = model.connect(features)  # the whole stream at once: consecutive frames (temporal connector)
        self.cache = DynamicCache()
        self.length = 0
        self._forward(model.embed_text(model.tokenize(model.fmt.prefix)))
        pending: list[int] = []
        events: list[SpeculativeEvent] = []
        k, n, size = 0, embeds.shape[0], self.chunk
        while k < n:
            if k in questions:  # fed alone: answered right after it, never gated
                self._forward(self._frame_input(pending, embeds[k]))
                pending = []
                for q in questions[k]:
                    text, pending = self._generate(pending + model.tokenize(model.fmt.question.format(question=q)).tolist(), self.max_answer_tokens)
                    events.append(SpeculativeEvent(k, "answer", text, q))
                k += 1
                continue
            stop_at = min(n, k + size, min((j for j in questions if j > k), default=n))
            parts, ends, end = [], [], self.length
            for j in range(k, stop_at):
                parts.append(self._frame_input(pending if j == k else [self.interval], embeds[j]))
                end += parts[-1].shape[0]
                ends.append(end - 1)  # position of the frame's last token, where the gate is read
            start = self.length
            hidden = self._forward(torch.cat(parts), hidden_only=True)
            logits = model.lm.lm_head(hidden[[e - start for e in ends]]).float()
            p_interval = logits.softmax(-1)[:, self.interval]
            fired = (p_interval < self.theta).nonzero().flatten()
            if not fired.numel():
                pending, k = [self.interval], stop_at
                size = min(self.chunk, 2 * size)
                continue
            f = int(fired[0])
            drop = self.length - (ends[f] + 1)
            if drop:
                self.cache.crop(-drop)  # forget the speculative frames after the one that spoke (transformers 5: a negative count)
            self.length = ends[f] + 1
            text, pending = self._generate(list(self.respond), self.max_response_tokens)
            events.append(SpeculativeEvent(k + f, "response", text))
            k = k + f + 1
            size = 1  # a talkative stretch: speculate little until the model is silent again
        return events

    def _frame_input(self, pending: list[int], frame: torch.Tensor) -> torch.Tensor:
        if not pending:
            return frame
        return torch.cat([self.model.embed_text(torch.tensor(pending, device=self.model.device)), frame])

    def _forward(self, embeds: torch.Tensor, hidden_only: bool = False) -> torch.Tensor:
        n = embeds.shape[0]
        limit = self.model.lm.config.max_position_embeddings
        if self.length + n > limit:
            raise ValueError(f"stream needs {self.length + n} positions, the LM has {limit}: run it through "
                             "StreamingSession (positions='compress') instead")
        positions = torch.arange(self.length, self.length + n, device=self.model.device)[None]
        out = self.model.lm.model(inputs_embeds=embeds[None], position_ids=positions, past_key_values=self.cache, use_cache=True)
        self.length += n
        self.forwards += 1
        return out.last_hidden_state[0] if hidden_only else self.model.lm.lm_head(out.last_hidden_state[0, -1:]).float()[0]

    def _generate(self, prompt: list[int], max_tokens: int) -> tuple[str, list[int]]:
        """Prefill ``prompt`` and decode greedily until a stop token; returns the text and the pending
        tokens the next step starts with (the stop token and the resume text), as the session does."""
        model = self.model
        logits = self._forward(model.embed_text(torch.tensor(prompt, device=model.device)))
        out: list[int] = []
        for _ in range(max_tokens):
            nxt = int(logits.argmax())
            out.append(nxt)
            if nxt in self.stop_ids:
                break
            logits = self._forward(model.embed_text(torch.tensor([nxt], device=model.device)))
        ended = bool(out) and out[-1] in self.stop_ids
        pending = ([out[-1]] if ended else [self.stop]) + self.resume
        return model.tokenizer.decode(out[:-1] if ended else out, skip_special_tokens=True).strip(), pending
