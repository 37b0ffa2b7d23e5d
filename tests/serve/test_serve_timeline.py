"""The "what did it look at" timeline against the cache's own accounting, with the real model."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from vrex.kv.policies import make_policy
from vrex.serve.limits import ServeLimits
from vrex.serve.live import LiveSession, SessionSettings
from vrex.serve.timeline import read_counts, with_kept


def run_live(model, jpegs, spec: str, frames: int = 8) -> tuple[LiveSession, list]:
    """A LiveSession stepped by hand; records every non-frame step's (StepRecord, recorded selections)."""
    live = LiveSession(model, make_policy(spec), SessionSettings(policy=spec, theta=0.0, recent_tokens=0), ServeLimits())
    seen = []

    def trace(record, extra):
        seen.append((record, list(live.recorder.step)))
        live.timeline.on_step(record, live.session.spans)
    live.session.trace = trace
    for i, data in enumerate(jpegs[:frames]):
        live.offer_frame(Image.open(io.BytesIO(data)).convert("RGB"), t=0.5 * i)
        live.step()
    live.ask("What do you see?")
    live.step()
    return live, seen


@pytest.mark.parametrize("spec", ["resv[ratio=0.3]", "rekv"])
def test_recorded_reads_equal_what_the_cache_read(model, jpegs, spec):
    live, seen = run_live(model, jpegs, spec)
    keep, checked = live.session.cache.keep, 0
    for record, step in seen:
        if record.stage == "frame":
            assert step == []  # frame steps are not recorded (no cost on the frame path)
            continue
        by_layer = {entry["layer"]: entry for entry in record.layers}
        for layer, n_past, indices in step:
            mask = with_kept(indices, n_past, keep.sink_tokens, keep.recent_tokens, 3)
            selected = by_layer[layer]["selected"]
            assert mask.sum(-1).tolist() == (selected if isinstance(selected, list) else [selected] * 3)
            checked += 1
    assert checked >= 30 * 2  # at least the question's prompt step and one decoded token, every layer


def test_shares_are_per_frame_fractions(model, jpegs):
    live, _ = run_live(model, jpegs, "resv[ratio=0.3]")
    answer = next(a for a in live.answers.values() if a["kind"] == "answer")
    tl = live.timeline_json(answer["id"], layers=True)
    shares = [f["share"] for f in tl["frames"]]
    assert len(shares) == 8 and all(0.0 <= s <= 1.0 for s in shares)
    assert min(shares) < 1.0  # ReSV reads part of the past, not all of it
    assert tl["top"][0]["share"] == max(shares)
    per_layer = torch.tensor(tl["layers"])
    assert per_layer.shape == (30, 8)
    assert per_layer.mean(0).tolist() == pytest.approx(shares, abs=1e-3)


def test_read_counts_groups_tokens_by_frame():
    group_of = torch.tensor([-1, -1, 0, 0, 0, -1, 1, 1])
    mask = torch.tensor([[True, False, True, False, True, True, False, True]])
    assert read_counts(mask, group_of, 2).tolist() == [[2.0, 1.0]]
    full = with_kept(None, 8, 0, 0, 2)
    assert read_counts(full, group_of, 2).tolist() == [[3.0, 2.0], [3.0, 2.0]]
    kept = with_kept([torch.tensor([3])], 8, 2, 2, 1)
    assert kept[0].nonzero().flatten().tolist() == [0, 1, 3, 6, 7]


def test_cache_reported_reads_are_used_as_is():
    """When the cache's StepRecord carries what it read (CACHE_HOOK), the timeline uses it unchanged."""
    from vrex.kv.cache import KeepConfig, StepRecord
    from vrex.serve.timeline import CACHE_HOOK, ReadRecorder, ReadTimeline

    timeline = ReadTimeline(ReadRecorder(make_policy("full")), KeepConfig(sink_tokens=2, recent_tokens=2), num_layers=1, num_heads=1)
    spans = [(0, 2, None), (2, 3, 0), (5, 3, 1), (8, 1, None)]
    read = StepRecord("text", None, 1, [{"layer": 0, "n_past": 8, "selected": [2], CACHE_HOOK: [torch.tensor([2, 5])]}])
    timeline.on_step(read, spans)
    timeline.on_step(StepRecord("decode", None, 1, [{"layer": 0, "n_past": 9, "selected": [9], CACHE_HOOK: None}]), spans)
    gen = timeline.take()[0]
    # Step 1: one of frame 0's three tokens and one of frame 1's; step 2: everything.
    assert gen.steps == 2 and timeline.shares(gen)[0, 0].tolist() == pytest.approx([(1 / 3 + 1) / 2, (1 / 3 + 1) / 2])
