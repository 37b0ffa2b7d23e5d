"""The LIVE metrics: how a model's events on a stream are scored (definitions in ``vrex.train.evaluate``).

Pure functions of a stream, its events and the catalog (``teacher_forced`` also runs the LM over the
stream's reference layout). ``names_subject`` is the one matching rule every metric uses.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F

from vrex.train.data import FPS, FeatureCache
from vrex.train.features import stream_features
from vrex.train.layout import LM, STREAM, LayoutBuilder, embed_layout
from vrex.train.streams import Stream, sentence


def names_subject(text: str, keywords: tuple[str, ...]) -> bool:
    """The narration-accuracy matching rule: a keyword occurs at the start of a word (case-insensitive)."""
    low = text.lower()
    return any(re.search(r"(?<![a-z])" + re.escape(k.lower()), low) for k in keywords)


@torch.no_grad()
def teacher_forced(model, builder: LayoutBuilder, cache: FeatureCache, streams: list[Stream], theta: float) -> dict[str, float]:
    """LM-PPL and Fluency under teacher forcing."""
    nll, count, fluencies = 0.0, 0, []
    interval = builder.interval
    for stream in streams:
        layout = builder.build(stream.steps)
        embeds = embed_layout(model, layout, stream_features(cache, stream))
        sup = (layout.kinds != 0).nonzero().flatten()
        # the whole causal LM, any family (its decoder and head go by different names; Gemma 2 caps the
        # final logits), the head applied only at the supervised positions
        logits = model.lm(inputs_embeds=embeds[None], logits_to_keep=sup, use_cache=False).logits[0].float()
        targets, kinds = layout.targets[sup], layout.kinds[sup]
        ce = F.cross_entropy(logits, targets, reduction="none")
        lm = kinds == LM
        nll += float(ce[lm].sum())
        count += int(lm.sum())
        p_int = logits.softmax(-1)[:, interval]
        correct = torch.where(kinds == STREAM, torch.where(targets == interval, p_int >= theta, p_int < theta),
                              logits.argmax(-1) == targets)
        # split into turns: a turn ends with the stop-token target of a narration (not answers: they follow questions)
        turn: list[bool] = []
        in_narration = False
        for c, k, tgt in zip(correct.tolist(), kinds.tolist(), targets.tolist()):
            if k == STREAM:
                if tgt != interval:
                    in_narration = True
                turn.append(c)
            elif in_narration:
                turn.append(c)
                if tgt == builder.stop:
                    first_err = turn.index(False) if False in turn else len(turn)
                    fluencies.append(first_err / len(turn))
                    turn, in_narration = [], False
            # answer tokens (after questions) are not part of narration turns
    return {"lm_ppl": math.exp(nll / max(1, count)), "fluency": sum(fluencies) / max(1, len(fluencies))}


def qa_results(events, stream: Stream, catalog) -> list[bool]:
    """Questions inside narration streams, one result per question: Yes/No answers must start with
    the right word; the others must name the expected subject (keyword rule). Answers come in the
    order the questions were asked, so they are paired by order, not by text: a stream may ask
    "What is shown now?" twice and expect two different subjects."""
    keywords = {}
    for m in catalog.values():
        keywords.setdefault(sentence(m.label or ""), set()).update(m.keywords)
    asked = [t for s in stream.steps for t in s.questions]
    answers = [e for e in events if e.kind == "answer"]
    if [e.stats.get("question") for e in answers] != [t.question for t in asked]:
        raise ValueError(f"answers do not match the stream's questions in order: asked {[t.question for t in asked]}, "
                         f"answered {[e.stats.get('question') for e in answers]}")
    out = []
    for turn, e in zip(asked, answers):
        if turn.text in ("Yes.", "No."):
            out.append(e.text.strip().lower().startswith(turn.text[:-1].lower()))
        else:
            out.append(names_subject(e.text, tuple(keywords.get(turn.text, ()))))
    return out


def narration_metrics(events, stream: Stream, catalog) -> tuple[list[float], list[bool], int]:
    """Per segment change: seconds to the first narration inside the segment (its whole duration if
    none) and whether that narration names the subject; and the number of narrations."""
    responses = [e for e in events if e.kind == "response"]
    diffs, hits = [], []
    for seg in stream.segments:
        t0, t1 = seg.start / FPS, seg.end / FPS
        # the session timestamps a response with its frame's t; the change frame is at t0
        inside = [e for e in responses if t0 - 1e-6 <= e.t < t1 - 1e-6]
        diffs.append(inside[0].t - t0 if inside else t1 - t0)
        hits.append(bool(inside) and names_subject(inside[0].text, catalog[seg.media].keywords))
    return diffs, hits, len(responses)
