"""One selected-ratio computation: the session's event statistics and the telemetry record agree
(issue 16: the two computed it separately)."""

from __future__ import annotations

import pytest

from vrex.engine.session import selection_summary
from vrex.kv.cache import StepRecord
from vrex.kv.telemetry import selected_ratios, step_to_json


def test_selected_ratios_per_head():
    assert selected_ratios([3, 10], 20) == [0.15, 0.5]
    assert selected_ratios(20, 20) == [1.0]
    assert selected_ratios([0, 0], 0) == [1.0, 1.0]


def test_session_summary_equals_telemetry_summary():
    record = StepRecord(stage="frame", frame_id=1, n_new=4, layers=[
        {"layer": 0, "n_past": 40, "selected": [4, 30], "stats": {}},
        {"layer": 1, "n_past": 40, "selected": [10, 22], "stats": {}},
        {"layer": 2, "n_past": 0, "selected": 0, "stats": {}},  # no past: not counted by either
    ])
    got = selection_summary(record)["selected_ratio"]
    assert got == pytest.approx((4 + 30 + 10 + 22) / 160)
    assert got == pytest.approx(step_to_json(record)["summary"]["selected_ratio"])
