"""Other LM families through the parts built on the session: the batched engine (Gemma 2's soft-capped
attention must reach every stream's cache) and ``vrex serve``'s live session (GPT-NeoX has no
``num_key_value_heads``). Tiny random-weight models (``tiny_models``), real photos."""

from __future__ import annotations

import json

import pytest

from vrex.engine.batch import BatchEngine
from vrex.engine.session import SessionConfig, StreamingSession
from vrex.kv.layers import model_geometry
from vrex.kv.policies import make_policy


def _config() -> SessionConfig:
    # theta 1.0: the gate always speaks, so decode steps batch too
    return SessionConfig(theta=1.0, max_response_tokens=3, max_answer_tokens=4)


def _frames(frames, k: int, n: int):
    return [(0.5 * i, frames[(k + i) % len(frames)]) for i in range(n)]


def _summary(events) -> list:
    return [(e.kind, e.text, e.stats.get("cached_tokens")) for e in events]


def _p(events) -> list[float]:
    return [e.stats["p_interval"] for e in events if e.kind == "frame"]


@pytest.mark.parametrize("policy", ["full", "resv"])
def test_batched_gemma2_equals_each_stream_alone(family_model, frames, policy):
    model = family_model("gemma2")
    assert model.lm.config.attn_logit_softcapping  # the attention passes softcap
    n = 5  # 5 frames of 10 tokens: past the tiny model's 16-token sliding window
    engine = BatchEngine(model)
    got = {}
    for k, sid in enumerate(("a", "b")):
        engine.add_stream(sid, make_policy(policy), _config())
        got[sid] = []
    streams = {sid: _frames(frames, k, n) for k, sid in enumerate(("a", "b"))}
    for i in range(n):
        for sid, events in engine.step({sid: streams[sid][i] for sid in streams}).items():
            got[sid] += events
    for sid, events in engine.ask({sid: "What do you see?" for sid in streams}).items():
        got[sid] += events
    assert engine.counters["lm_rows"] > engine.counters["lm_forwards"], "no LM step was batched"
    for sid, frame_list in streams.items():
        alone = StreamingSession(model, make_policy(policy), _config())
        ref = []
        for t, image in frame_list:
            ref += alone.push_frame(t, image)
        ref += alone.ask("What do you see?")
        assert _summary(got[sid]) == _summary(ref), sid
        assert _p(got[sid]) == pytest.approx(_p(ref), abs=1e-4), sid


def test_serve_live_session_runs_gpt_neox(family_model, frames):
    from vrex.serve.limits import ServeLimits
    from vrex.serve.live import LiveSession, SessionSettings

    model = family_model("gpt_neox")
    assert getattr(model.lm.config, "num_key_value_heads", None) is None
    live = LiveSession(model, make_policy("resv"), SessionSettings(policy="resv", theta=0.0, recent_tokens=0), ServeLimits())
    geo = model_geometry(model.lm)
    assert (live.timeline.num_layers, live.timeline.num_heads) == (geo.num_layers, geo.num_kv_heads)
    for i, image in enumerate(frames):
        live.offer_frame(image, t=0.5 * i)
        live.step()
    qid = live.ask("What do you see?")
    live.step()
    answer = live.timeline_json(qid)
    assert live.session.frames == len(frames) and answer["kind"] == "answer"
    assert len(answer["frames"]) == len(frames)  # a share per frame the answer could read


def test_eval_live_runs_another_lm(family_dir, tmp_path):
    from typer.testing import CliRunner

    from vrex.cli.app import app

    path = family_dir("gpt_neox")
    out = tmp_path / "rows.json"
    result = CliRunner().invoke(app, ["eval", "live", "--lm", str(path), "--quick", "--no-needles", "--narration-streams", "1",
                                      "--json", str(out)])
    assert result.exit_code == 0, result.output[-3000:]
    assert f"model: efficientnet-lite0+{path}" in result.output  # the LM named, not the preset, was loaded
    rows = json.loads(out.read_text())
    assert {r["model"] for r in rows} == {"untrained"}  # the connectors are SmolLM2's: the untrained one only
    assert {"lm_ppl", "narration_acc"} <= {r["metric"] for r in rows}


def test_eval_live_another_lm_with_a_trained_connector_is_refused(family_dir):
    from typer.testing import CliRunner

    from vrex.cli.app import app

    result = CliRunner().invoke(app, ["eval", "live", "--lm", str(family_dir("llama")), "--only", "trained"])
    assert result.exit_code == 2 and "--lm" in result.output and "untrained connector only" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("family", ["gpt_neox", "gemma3_text"])
def test_durable_session_saves_and_loads_another_family(family, family_model, frames, tmp_path):
    """The model fingerprint of a saved session reads the first decoder layer of any family (GPT-NeoX
    keeps its layers under ``gpt_neox``, not ``model``)."""
    model = family_model(family)
    session = StreamingSession(model, make_policy("resv"), _config())
    for t, image in _frames(frames, 0, 3):
        session.push_frame(t, image)
    session.save(tmp_path / "s")
    loaded = StreamingSession.load(tmp_path / "s", model)
    assert loaded.cached_tokens == session.cached_tokens and loaded.frames == session.frames
    t, image = _frames(frames, 0, 4)[3]
    assert _summary(loaded.push_frame(t, image)) == _summary(session.push_frame(t, image))  # the same state goes on alike
    loaded.close()
    session.close()
