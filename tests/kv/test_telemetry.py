import json

import torch

from vrex.kv.cache import StepRecord
from vrex.kv.policies import make_policy
from vrex.kv.store import KVStore
from vrex.kv.telemetry import SCHEMA, TelemetryWriter, read_jsonl, stage_means, step_to_json


def make_steps():
    """Records shaped like VrexCache's, from a real policy + store."""
    H, HQ, D = 2, 4, 8
    pol = make_policy("resv")
    pol.setup(1, H, HQ, D)
    store = KVStore(1, H, D, device_budget_bytes=6 * 2 * D * 4 * H)
    g = torch.Generator().manual_seed(0)
    out = []
    for step, (stage, T) in enumerate([("frame", 4), ("frame", 4), ("frame", 4), ("text", 3), ("decode", 1)]):
        rec = StepRecord(stage=stage, frame_id=step if stage == "frame" else None, n_new=T)
        n = store.layers[0].length
        q = torch.randn(HQ, T, D, generator=g)
        k = torch.randn(H, T, D, generator=g)
        if n:
            sel = pol.select(0, q, n, stage)
            store.layers[0].gather(sel.indices)
            rec.layers.append({"layer": 0, "n_past": n, "selected": [int(i.numel()) for i in sel.indices],
                               "stats": sel.stats, "fetch_s": 0.001, "attend_s": 0.002})
        store.layers[0].append(k, k)
        pol.on_append(0, k, n, rec.frame_id)
        out.append((rec, {"t": 0.5 * step, "cached_tokens": store.layers[0].length, **store.counters()}))
    return out


def test_records_follow_schema_and_roundtrip(tmp_path):
    path = tmp_path / "trace.jsonl"
    with TelemetryWriter(path) as w:
        for rec, extra in make_steps():
            w(rec, extra)
    recs = list(read_jsonl(path))
    assert len(recs) == 5
    for r in recs:
        assert r["schema"] == SCHEMA and r["stage"] in ("frame", "text", "decode")
        assert set(r["resident"]) == {"device", "host", "disk"}
        assert r["io"]["gathers"] >= 0
        json.dumps(r)  # JSON-safe
    assert recs[0]["moved"] is None and recs[0]["layers"] == []
    for prev, cur in zip(recs, recs[1:]):
        assert cur["moved"] == {k: cur["io"][k] - prev["io"][k] for k in cur["io"]}
    last = recs[-1]
    ly = last["layers"][0]
    assert ly["selected_ratio"] == [s / ly["n_past"] for s in ly["selected"]]
    for key in ("clusters", "mean_cluster_size", "scan_fraction", "hc_ratio"):
        assert key in ly["policy"]
    assert 0 < last["summary"]["selected_ratio"] <= 1 and last["summary"]["hc_ratio"] > 0
    assert abs(last["wall_s"] - 0.003) < 1e-12
    means = stage_means(recs)
    assert set(means) == {"frame", "text", "decode"}


def test_step_to_json_handles_full_policy_and_tensors():
    rec = StepRecord(stage="decode", frame_id=None, n_new=1)
    rec.layers.append({"layer": 3, "n_past": 10, "selected": 10, "stats": {"selected": [10, 10], "x": torch.tensor([1.0, float("nan")])}})
    out = step_to_json(rec, {"t": 1.0, "wall_s": 0.5})
    assert out["layers"][0]["selected"] == [10, 10] and out["layers"][0]["selected_ratio"] == [1.0, 1.0]
    assert out["layers"][0]["policy"]["x"] == [1.0, None]
    assert out["wall_s"] == 0.5 and out["io"] is None
    json.dumps(out)


def test_record_keys_are_the_schema():
    """The trace format (vrex.kv.step/1) read by vrex hw simulate and vrex serve: its keys stay put."""
    rec, extra = make_steps()[-1]
    out = step_to_json(rec, extra)
    assert set(out) == {"schema", "stage", "t", "frame_id", "n_new", "cached_tokens", "wall_s", "layers", "summary",
                        "io", "moved", "resident"}
    assert set(out["layers"][0]) == {"layer", "n_past", "selected", "selected_ratio", "fetch_s", "attend_s", "policy"}
    assert set(out["summary"]) == {"selected_ratio", "policy_selected_ratio", "clusters", "mean_cluster_size",
                                   "scan_fraction", "hc_ratio"}
