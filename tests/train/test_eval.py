"""Scoring rules of `vrex eval live` and the evaluation streams (held-out media only)."""

from __future__ import annotations

import pytest

from vrex.engine.session import Event
from vrex.train.data import FPS, split_names
from vrex.train.evaluate import LONG_SEGMENT_FRAMES, EvalConfig, eval_streams, long_narration_streams, policy_metrics
from vrex.train.metrics import names_subject, narration_metrics, qa_results
from vrex.train.layout import Step, Turn
from vrex.train.streams import Segment, Stream


def test_names_subject_rule():
    assert names_subject("Two cats on a sofa.", ("cat",))
    assert not names_subject("A scattered pile.", ("cat",))
    assert names_subject("A HOT DOG.", ("hot dog",))
    assert not names_subject("", ("cat",))


def test_narration_metrics(catalog):
    steps = [Step("cat", i, i / 2) for i in range(4)] + [Step("bird", i, (4 + i) / 2) for i in range(4)]
    stream = Stream(steps, [Segment("cat", 0, 4), Segment("bird", 4, 8)], "narration")
    events = [Event(0.0, "response", "A cat."), Event(3.0, "response", "A dog."), Event(3.5, "response", "A bird.")]
    diffs, hits, n = narration_metrics(events, stream, catalog)
    assert diffs == [0.0, 1.0] and hits == [True, False] and n == 3  # first narration in a segment counts
    diffs, hits, _ = narration_metrics([], stream, catalog)
    assert diffs == [2.0, 2.0] and hits == [False, False]


def test_qa_results_pair_answers_with_questions_in_order(catalog):
    # the same question twice, expecting two different subjects: each answer is judged against its own
    steps = [Step("cat", i, i / 2) for i in range(4)] + [Step("bird", i, (4 + i) / 2) for i in range(4)]
    steps[1].turns.append(Turn("A cat.", "What is shown now?"))
    steps[5].turns.append(Turn("A small bird.", "What is shown now?"))
    steps[6].turns.append(Turn("Yes.", "Did you see a cat?"))
    stream = Stream(steps, [Segment("cat", 0, 4), Segment("bird", 4, 8)], "narration")

    def answers(*texts):
        questions = ["What is shown now?", "What is shown now?", "Did you see a cat?"]
        return [Event(0.5, "response", "A cat.")] + [Event(1.0, "answer", x, {"question": q}) for x, q in zip(texts, questions)]

    assert qa_results(answers("A cat.", "A bird.", "Yes, I did."), stream, catalog) == [True, True, True]
    assert qa_results(answers("A bird.", "A cat.", "No."), stream, catalog) == [False, False, False]
    with pytest.raises(ValueError, match="in order"):
        qa_results(answers("A cat.", "A bird."), stream, catalog)


def test_eval_streams_use_heldout_media_only(cache, catalog):
    held = set(split_names(catalog, "heldout"))
    cfg = EvalConfig(narration_streams=3, minutes=[1.0, 5.0], needles_per_length=2)
    narr, needles = eval_streams(cache, cfg)
    for s in narr:
        assert {x.media for x in s.steps} <= held
    for kind, by_len in needles.items():
        for minutes, streams in by_len.items():
            for s in streams:
                assert len(s.steps) == int(minutes * 120)
                assert s.segments[0].media in held
                assert (s.needle in held) == (kind == "heldout")
                assert all(not x.gate for x in s.steps)
    # the same haystack/needle at every length
    assert [s.needle for s in needles["heldout"][1.0]] == [s.needle for s in needles["heldout"][5.0]]
    # one set alone: the same streams as in the run of both
    seen_only = eval_streams(cache, EvalConfig(narration_streams=3, minutes=[1.0, 5.0], needles_per_length=2, needle_sets=("seen",)))[1]
    assert set(seen_only) == {"seen"}
    for minutes in (1.0, 5.0):
        assert [(s.segments[0].media, s.needle, [(x.media, x.frame) for x in s.steps]) for s in seen_only["seen"][minutes]] == \
               [(s.segments[0].media, s.needle, [(x.media, x.frame) for x in s.steps]) for s in needles["seen"][minutes]]
    with pytest.raises(ValueError, match="needle sets"):
        eval_streams(cache, EvalConfig(minutes=[1.0], needle_sets=("unseen",)))


def test_long_narration_stream_is_long_heldout_and_changes_subject(cache, catalog):
    assert long_narration_streams(cache, EvalConfig(long_minutes=0.0)) == []
    (stream,) = long_narration_streams(cache, EvalConfig(long_minutes=10.0))
    assert 600 <= stream.duration < 600 + LONG_SEGMENT_FRAMES[1] / FPS  # cut at the first segment past 10 min
    assert stream.segments[-1].end == len(stream.steps) and stream.segments[0].start == 0
    assert {seg.media for seg in stream.segments} <= set(split_names(catalog, "heldout"))
    assert all(LONG_SEGMENT_FRAMES[0] <= seg.end - seg.start <= LONG_SEGMENT_FRAMES[1] for seg in stream.segments)
    assert all(a.label != b.label for a, b in zip(stream.segments, stream.segments[1:]))  # every segment a change
    assert not any(st.questions for st in stream.steps)
    again = long_narration_streams(cache, EvalConfig(long_minutes=10.0))[0]
    assert [(s.media, s.start) for s in again.segments] == [(s.media, s.start) for s in stream.segments]  # fixed seed


def test_run_eval_rows_and_denominators(cache, catalog):
    """The real eval loop, shipped weights, two narration streams and no needles: every rate comes
    with its denominator, and the denominators are the stream's own segments and questions."""
    from vrex.train.evaluate import run_eval
    from vrex.train.trainer import DEFAULT_WEIGHTS

    cfg = EvalConfig(narration_streams=2, minutes=[], seed=3, long_minutes=1.0)
    narr, needles = eval_streams(cache, cfg)
    assert all(not by_len for by_len in needles.values())
    (long,) = long_narration_streams(cache, cfg)
    rows = run_eval(cfg, DEFAULT_WEIGHTS, progress=False, log=lambda *_: None, only="trained")
    value = {r["metric"]: r["value"] for r in rows}
    # the long stream: one row per minute in which a segment starts, rates of k out of n segments
    minutes = sorted({int(seg.start / FPS // 60) + 1 for seg in long.segments})
    assert sorted(m for m in value if m.startswith("long_narration_acc@")) == [f"long_narration_acc@min{m}" for m in minutes]
    assert value["long_narration_segments"] == len(long.segments)
    n_long = value["long_narration_segments"]
    assert abs(value["long_narration_acc"] * n_long - round(value["long_narration_acc"] * n_long)) < 1e-3 * n_long
    if value["long_narrations"]:
        assert 1 / value["long_narrations"] - 1e-4 <= value["long_narration_top_share"] <= 1.0
    assert {r["model"] for r in rows} == {"trained"}
    assert value["narration_segments"] == sum(len(s.segments) for s in narr)
    n_questions = sum(len(st.questions) for s in narr for st in s.steps)
    assert n_questions > 0 and value["qa_questions"] == n_questions
    for rate, count in (("narration_acc", "narration_segments"), ("qa_acc", "qa_questions")):  # k of n items, 4 decimals
        assert abs(value[rate] * value[count] - round(value[rate] * value[count])) < 1e-3 * value[count], (rate, value)
    assert value["lm_ppl"] > 1.0 and not any(m.startswith("needle") for m in value)


def test_run_eval_takes_a_connector_with_tag_tokens(cache, videollm, tmp_path):
    """A weights file whose connector appends ImageNet tag tokens runs through the whole loop
    (teacher forcing, the live session and a needle): its layouts carry the extra tokens per frame."""
    import copy

    from vrex.models.tags import equip_tags
    from vrex.train.evaluate import run_eval

    tagged = copy.copy(videollm)
    tagged.connector = copy.deepcopy(videollm.connector)
    equip_tags(tagged, 2)
    tagged.connector.save(tmp_path / "tagged.safetensors")
    # the gate never opens (theta 0) and answers stop after 2 tokens: the loop runs, cheaply
    cfg = EvalConfig(narration_streams=1, minutes=[0.1], needles_per_length=1, seed=3, theta=0.0, max_answer_tokens=2,
                     long_minutes=0.0)
    rows = run_eval(cfg, tmp_path / "tagged.safetensors", progress=False, log=lambda *_: None, only="trained")
    value = {r["metric"]: r["value"] for r in rows}
    assert value["lm_ppl"] > 1.0 and value["needle_acc_silent@0.1min"] in (0.0, 1.0) and value["needle_recognized"] in (0.0, 1.0)
    assert value["needle_narrations@0.1min"] == 0.0  # theta 0: the gate never opens, live or not


def test_load_trained_keeps_the_files_tag_threshold(videollm, tmp_path):
    """The evaluated model's tag head uses the file's min_prob, as load_videollm's does."""
    import copy

    from vrex.models.tags import equip_tags
    from vrex.train.evaluate import load_trained

    tagged = copy.copy(videollm)
    tagged.connector = copy.deepcopy(videollm.connector)
    equip_tags(tagged, 2, min_prob=0.8)
    tagged.connector.save(tmp_path / "t.safetensors")
    model = load_trained(tmp_path / "t.safetensors", videollm)
    assert model.connector.tag_min_prob == 0.8 and model.connector.tags.min_prob == 0.8
    assert model.tokens_per_frame == videollm.tokens_per_frame + 2


def test_metric_runner_table():
    """Per model and policy: narration, the long narration stream (trained model only), then per needle
    set recognition, live and silent needles; the seen-needle diagnostic only for the trained model."""
    from functools import partial

    def names(runners):
        return [r.func.__name__ + ":" + ",".join(map(str, r.keywords.values())) if isinstance(r, partial) else r.__name__
                for r in runners]

    assert names(policy_metrics(("heldout", "seen"), "trained")) == [
        "narration_rows", "long_narration_rows", "recognition_rows:heldout", "needle_rows:heldout,live", "needle_rows:heldout,silent",
        "recognition_rows:seen", "needle_rows:seen,live", "needle_rows:seen,silent"]
    assert names(policy_metrics(("heldout", "seen"), "untrained")) == [
        "narration_rows", "recognition_rows:heldout", "needle_rows:heldout,live", "needle_rows:heldout,silent"]
