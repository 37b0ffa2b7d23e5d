"""One typed per-layer record with one selected-ratio computation: the session's event statistics,
the telemetry record and the benchmarks agree (issue 16: the session and the telemetry computed it
separately, and counted a layer that read everything once where the telemetry counted each head)."""

from __future__ import annotations

import pytest
import torch

from vrex.engine.session import selection_summary
from vrex.kv.cache import StepRecord
from vrex.kv.telemetry import LayerRecord, step_layers, step_to_json


def test_layer_record_ratio_per_head():
    assert LayerRecord(0, 20, [3, 10]).selected_ratio() == [0.15, 0.5]
    assert LayerRecord(0, 0, [0, 0]).selected_ratio() == [1.0, 1.0]  # no past: nothing left out


def test_layer_record_of_a_cache_entry():
    entry = {"layer": 2, "n_past": 20, "selected": 20, "stats": {"selected": torch.tensor([20, 20, 20])},
             "fetch_s": 0.5, "attend_s": 0.25}
    ly = LayerRecord.of(entry)
    assert (ly.layer, ly.n_past, ly.selected, ly.fetch_s, ly.attend_s) == (2, 20, [20, 20, 20], 0.5, 0.25)
    assert ly.selected_ratio() == [1.0, 1.0, 1.0]
    assert LayerRecord.of(ly) is ly
    # A sliding layer reports one count and no per-head statistics: one value.
    assert LayerRecord.of({"layer": 1, "n_past": 8, "selected": 4, "stats": {"window": 4}}).selected == [4]
    assert LayerRecord.of({"layer": 1, "n_past": 8, "selected": torch.tensor([1, 2])}).selected == [1, 2]


def test_session_summary_equals_telemetry_summary():
    record = StepRecord(stage="frame", frame_id=1, n_new=4, layers=[
        {"layer": 0, "n_past": 40, "selected": [4, 30], "stats": {}},
        {"layer": 1, "n_past": 40, "selected": 40, "stats": {"selected": [40, 40]}},  # read everything: one count, two heads
        {"layer": 2, "n_past": 0, "selected": 0, "stats": {}},  # no past: not counted by either
    ])
    got = selection_summary(record)["selected_ratio"]
    assert got == pytest.approx((4 + 30 + 40 + 40) / 160)
    assert got == step_to_json(record)["summary"]["selected_ratio"]
    assert [ly.to_json()["selected_ratio"] for ly in step_layers(record)] == [ly["selected_ratio"] for ly in step_to_json(record)["layers"]]
    assert selection_summary(StepRecord("decode", None, 1, [{"layer": 0, "n_past": 0, "selected": 0}])) == {}
