"""CLI (Typer sub-app), telemetry loader and model shapes."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from vrex.cli.hw import app, parse_kv
from vrex.hw.model_shapes import from_hf_config, preset
from vrex.hw.stats import PAPER, load_trace, stats_from_records

runner = CliRunner()


def test_check_command_prints_and_writes_json(tmp_path):
    out = tmp_path / "check.json"
    res = runner.invoke(app, ["check", "--json", str(out)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "calibration: 6/7 within 25%" in res.output
    rows = json.loads(out.read_text())
    assert all({"figure", "paper", "simulated", "rel_error", "fitted"} <= set(r) for r in rows)
    withheld = [r for r in rows if r["paper"] is None]
    from vrex.hw.check import figures

    spec_null = {f["id"] for g in figures().values() for f in g if f.get("paper") is None}
    assert {r["id"] for r in withheld} == spec_null and len(spec_null) >= 39  # every withheld figure, printed
    assert all(r["rel_error"] is None and r["simulated"] > 0 for r in withheld)
    assert runner.invoke(app, ["check", "--strict"]).exit_code == 1  # --strict fails on the calibration miss


def test_simulate_command_writes_json_and_plots(tmp_path):
    res = runner.invoke(app, ["simulate", "--system", "vrex8", "--model", "llama3-8b", "--kv", "1k,5k,10k,20k,40k",
                              "--batch", "1", "--out", str(tmp_path)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "simulate.json").read_text())
    assert doc["kv_tokens"] == [1000, 5000, 10000, 20000, 40000]
    assert {"vrex8", "agx+flexgen", "agx+resv"} <= set(doc["systems"])
    st = doc["systems"]["vrex8"]["steps"][0]
    assert {"frame", "text", "decode", "episode"} <= set(st) and st["frame"]["latency_s"] > 0
    for png in ("fps_vs_kv.png", "breakdown_vrex8.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_simulate_rejects_bad_input(tmp_path):
    assert runner.invoke(app, ["simulate", "--kv", "lots", "--out", str(tmp_path)]).exit_code == 2
    res = runner.invoke(app, ["simulate", "--system", "tpu9000", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "unknown system" in res.output
    assert runner.invoke(app, ["--help"]).exit_code == 0


def test_parse_kv():
    assert parse_kv("1k, 5K,512,1.5k") == [1000, 5000, 512, 1500]


def test_systems_command_lists_table_i():
    res = runner.invoke(app, ["systems"], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "vrex48" in res.output and "203.68" in res.output


def _rec(stage, ratio, n_past, **kw):
    r = {"schema": "vrex.kv.step/1", "stage": stage, "layers": [{"n_past": n_past, "selected": [1, 1]}] * 2,
         "summary": {"policy_selected_ratio": ratio, "mean_cluster_size": kw.get("cs"), "scan_fraction": kw.get("sf"),
                     "hc_ratio": kw.get("hc")}}
    if "moved" in kw:
        r["moved"], r["resident"], r["cached_tokens"] = kw["moved"], kw["resident"], kw["cached"]
    return r


def test_stats_from_schema_records():
    recs = [_rec("frame", 0.4, 100, cs=20.0, sf=0.2, hc=0.02), _rec("frame", 0.2, 300),
            _rec("decode", 0.05, 400, cs=30.0),
            _rec("text", 0.03, 400, moved={"fetch_disk_bytes": 4096, "fetch_disk_transfers": 2},
                 resident={"device": 1000, "host": 0, "disk": 3096}, cached=8)]
    s = stats_from_records(recs)
    assert s.frame_ratio == pytest.approx(0.3) and s.text_ratio == pytest.approx(0.04)
    assert s.cluster_size == pytest.approx(25.0) and s.scan_fraction == pytest.approx(0.2)
    assert s.hc_overhead == pytest.approx(0.02) and s.ref_kv == pytest.approx(300.0)
    # 2048 B per transfer / (4096 B / (8 tokens x 2 layers x 2 heads) = 128 B per head-token) = 16 tokens
    assert s.run_tokens == pytest.approx(16.0) and s.source == "trace"
    assert stats_from_records([{"stage": "frame"}]).frame_ratio is None  # nothing measured: paper defaults kept


def test_trace_from_the_real_engine_drives_the_simulator(tmp_path):
    """A tiny Llama through VrexCache + ReSV + tiered store writes telemetry; the simulator reads it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import vrex.kv.attention  # noqa: F401
    from vrex.hw.sim import Workload, simulate
    from vrex.kv.cache import KeepConfig, VrexCache
    from vrex.kv.policies import make_policy
    from vrex.kv.store import KVStore
    from vrex.kv.telemetry import TelemetryWriter

    hid, nl, hq, hkv, T = 32, 2, 4, 2, 5
    cfg = LlamaConfig(vocab_size=16, hidden_size=hid, intermediate_size=64, num_hidden_layers=nl,
                      num_attention_heads=hq, num_key_value_heads=hkv, max_position_embeddings=256)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    model.set_attn_implementation("vrex")
    tb = 2 * (hid // hq) * 4 * hkv * nl
    store = KVStore(nl, hkv, hid // hq, device_budget_bytes=7 * tb, host_budget_bytes=12 * tb, disk_dir=tmp_path / "kv")
    cache = VrexCache(store, make_policy("resv"), KeepConfig(), num_q_heads=hq)
    path = tmp_path / "trace.jsonl"
    g = torch.Generator().manual_seed(1)
    base = torch.randn(T, hid, generator=g)
    with TelemetryWriter(path) as w, torch.no_grad():
        for i in range(8):
            base = base + 0.1 * torch.randn(T, hid, generator=g)
            cache.begin_step("frame", i)
            model(inputs_embeds=base[None], position_ids=torch.arange(i * T, (i + 1) * T)[None],
                  past_key_values=cache, use_cache=True, vrex_cache=cache)
            w(cache.end_step(), {"t": float(i), "cached_tokens": (i + 1) * T, **store.counters()})
    store.close()
    s = load_trace(path)
    assert s.source == "trace" and 0 < s.frame_ratio <= 1 and s.ref_kv > 0
    r = simulate("vrex8", "llama3-8b", Workload(10_000), s)
    assert r["frame"].latency_s > 0
    with pytest.raises(ValueError):
        (tmp_path / "empty.jsonl").write_text("\n")
        load_trace(tmp_path / "empty.jsonl")


def test_model_shapes_presets_and_hf_configs(tmp_path):
    ll = preset("llama3-8b")
    assert ll.num_hidden_layers * ll.layer_params == pytest.approx(6.98e9, rel=0.01)
    assert ll.kv_bytes_per_token == 32 * 2 * 8 * 128 * 2 and ll.vision.params == pytest.approx(3.2e8, rel=0.05)
    smol = preset("smollm2-135m")
    assert smol.num_hidden_layers * smol.layer_params + smol.lm_head_params == pytest.approx(134.5e6, rel=0.01)
    hf = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
          "intermediate_size": 14336, "vocab_size": 128256, "torch_dtype": "bfloat16"}
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(hf))
    got = from_hf_config(tmp_path / "m")
    assert (got.layer_params, got.kv_bytes_per_token, got.weight_bytes) == (ll.layer_params, ll.kv_bytes_per_token, ll.weight_bytes)
    assert from_hf_config({"text_config": hf}).head_dim == 128
    with pytest.raises(KeyError):
        preset("gpt-17")
    assert PAPER.frame_ratio is None  # paper mode keeps each method's own ratios
