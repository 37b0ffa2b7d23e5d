"""`vrex bench kv` machinery on the real model, at a tiny size: rows, fidelity and ratios make sense."""

from __future__ import annotations

import json

import pytest
import torch

from vrex.bench.kv import Trace, fidelity, run_kv_bench
from vrex.io import list_demo_clips


def test_fidelity_of_identical_and_different_traces():
    logits = [torch.randn(50) for _ in range(6)]
    ref = Trace(logits=logits, tokens=[[1, 2, 3]], frame_ms=[1.0, 1.0, 1.0], stop=99)
    same = fidelity(ref, Trace(logits=[x.clone() for x in logits], frame_ms=[1.0] * 3))
    assert same == {"top1_agreement": 1.0, "kl": pytest.approx(0.0, abs=1e-6), "answer_agreement": 1.0}
    flipped = [x.clone() for x in logits]
    flipped[4] = -flipped[4]  # changes the argmax of the answer's 2nd position
    got = fidelity(ref, Trace(logits=flipped, frame_ms=[1.0] * 3))
    assert got["top1_agreement"] == pytest.approx(5 / 6) and got["answer_agreement"] == 0.0 and got["kl"] > 0


def test_kv_bench_tiny_run(tmp_path):
    if "vtest_pedestrians" not in list_demo_clips():
        pytest.skip("real clips not available")
    rows = run_kv_bench(["full", "resv", "streamingllm"], [160], frames=1, n_questions=1, answer_tokens=3,
                        device_tokens=64, recent_tokens=11, out=tmp_path)
    by = {r["policy"]: r for r in rows}
    assert set(by) == {"full", "resv", "streamingllm"}
    full, resv = by["full"], by["resv"]
    assert full["top1_agreement"] == 1.0 and full["kl"] == pytest.approx(0.0, abs=1e-9)
    assert full["frame_ratio"] == pytest.approx(1.0)
    assert 0.0 < resv["frame_ratio"] < 1.0 and 0.0 < resv["decode_ratio"] < 1.0
    assert resv["bytes_moved"] > 0 and resv["resident"]["host"] > 0  # offloaded beyond the 64-token device tier
    assert full["bytes_moved"] == 0
    saved = json.loads((tmp_path / "kv.json").read_text())
    for key in ("policy", "cached_tokens", "frame_ms", "token_ms", "frame_ratio", "decode_ratio", "top1_agreement", "kl",
                "answer_agreement", "resident_bytes"):
        assert key in saved["rows"][0]
    assert (tmp_path / "kv_latency.png").stat().st_size > 0


def test_answer_agreement_stops_at_the_stop_token():
    logits = [torch.randn(50) for _ in range(6)]
    ref = Trace(logits=logits, tokens=[[1, 99, 3]], frame_ms=[1.0] * 3, stop=99)
    changed = [x.clone() for x in logits]
    changed[5] = -changed[5]  # only the position after the stop token differs
    got = fidelity(ref, Trace(logits=changed, frame_ms=[1.0] * 3))
    assert got["answer_agreement"] == 1.0 and got["top1_agreement"] == pytest.approx(5 / 6)
