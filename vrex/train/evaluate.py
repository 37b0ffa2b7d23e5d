"""``vrex eval live``: LIVE metrics on held-out media, trained vs untrained connector, side by side.

Streams are built from the held-out media only (``split: heldout`` in ``media.json``) with a
fixed seed, from the cached encoder features, and run through the real ``StreamingSession``
(``vrex.train.live``: frames are fed as cached features through a pass-through encoder, so the
session path is unchanged: pending text + frame tokens per step, the streaming-EOS gate at theta,
greedy decoding). The layers: ``streams`` (what is shown), ``features`` (frames as model input),
``live`` (the session runs), ``metrics`` (scoring), and here the runner: ``EvalConfig``, the eval's
streams, and ``POLICY_METRICS``, the table of metric runners ``run_eval`` walks per model and policy.

Metrics (as in VideoLLM-online, adapted; all on held-out media):

* ``lm_ppl``: exp(mean cross-entropy) of the reference narration/answer tokens under teacher forcing.
* ``fluency``: per narration turn, the teacher-forced predictions [gate decision of every silent
  frame since the previous turn, the speak decision at the segment change, the narration tokens];
  the fraction that is correct before the first error, averaged over turns. A gate decision is
  correct when it agrees with the session's rule (P(interval) >= theta means silent).
* ``timediff_s``: free-running session; per segment change, seconds from the change to the first
  narration inside that segment; a segment without one counts its whole duration.
* ``narration_acc``: free-running; a segment counts as correct when the first narration inside it
  names the subject: one of the media's ``keywords`` occurs in it, case-insensitive, at the start
  of a word (so "cat" matches "cats" but not "scat").
* ``needle_acc@{m}min``: a haystack of one held-out subject (m minutes at 2 FPS), a 2-4 frame
  needle of another held-out subject at a fixed relative position, the question
  "What appeared briefly in the stream?" at the last frame; correct when the answer names the
  needle (same keyword rule). The stream runs as a user runs it: the live loop over every frame
  (the model narrates when its gate fires, and may answer from its own narrations);
  ``needle_narrations@{m}min`` is how many narrations it made per stream. Run with each ``--policy``.
* ``needle_acc_silent@{m}min``: the same streams with the haystack fed silent
  (``StreamingSession.fast_forward``: no gate, no narration), so the answer must come from the
  frames' tokens alone.
* ``needle_recognized``: the same needles, asked "What is shown now?" right after the needle's
  last frame (silent haystack before it, shortest length): recognition without retrieval, the
  ceiling of ``needle_acc_silent`` (a needle the model cannot name when it sees it cannot be
  recalled by name minutes later).
* ``..._seen_needle``: held-out haystack, needle from a *training* subject (its frames were trained
  on): separates remembering from recognising a subject never seen named.
* ``qa_acc`` (free-running): the present/past/occurrence questions inside the narration streams;
  Yes/No answers must start with the right word, the others must name the expected subject.
* ``responses_per_min`` (free-running): how talkative the model is.
* ``long_narration_acc@min{m}`` (trained model, free-running): one ``--long-minutes`` stream (default
  10; quick: none) of held-out subjects changing every 12-18 s; narration accuracy of the segments
  starting in minute m, overall ``long_narration_acc`` (denominator ``long_narration_segments``),
  and ``long_narration_top_share``: the most frequent narration's share of all narrations
  (``long_narrations``), which shows a model that repeats one narration whatever is shown.
* ``narration_segments``, ``qa_questions``: the denominators of ``narration_acc`` and ``qa_acc``.
  The streams are drawn with a fixed seed from the feature cache, so they depend on the number of
  frames the decoder yields per clip: compare rows measured from the same cache.
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterable

import torch

from vrex.train.data import FPS, FeatureCache, build_feature_cache, load_catalog, split_names
from vrex.train.features import feature_model
from vrex.train.layout import LayoutBuilder
from vrex.train.live import run_needle_live, run_needle_silent, run_stream, session_for
from vrex.train.metrics import names_subject, narration_metrics, qa_results, teacher_forced
from vrex.train.streams import PRESENT_QUESTIONS, Stream, StreamMaker


#: "heldout": needle subjects held out from training (the issue's metric); "seen": needles of training
#: subjects (retrieval without the recognition gap, a diagnostic)
NEEDLE_SETS = ("heldout", "seen")


@dataclass
class EvalConfig:
    narration_streams: int = 10
    minutes: list[float] = field(default_factory=lambda: [1.0, 2.0, 5.0])
    needles_per_length: int = 8  # held-out needles: every held-out subject once; seen-needle diagnostic: 4
    seed: int = 0
    threads: int = 1
    theta: float | None = None  # None: the session default
    max_response_tokens: int = 12
    max_answer_tokens: int = 16
    quick: bool = False
    #: live needle runs of the untrained connector only up to this length: it speaks at ~every frame, so a
    #: 5-minute stream is ~600 decoded responses
    untrained_live_max_minutes: float = 1.0
    #: SessionConfig.recent_tokens for the session runs (an always-kept recent window); None: the
    #: session default (two frames), 0: each policy bare
    recent_tokens: int | None = None
    #: which of NEEDLE_SETS to run; each stream depends only on its own set, seed and index, so a run of
    #: one set has the streams of a run of both
    needle_sets: tuple[str, ...] = NEEDLE_SETS
    #: one long many-segment narration stream of this many minutes (0: none): held-out subjects in
    #: segments of LONG_SEGMENT_FRAMES, narration accuracy per minute of stream (issue 22: after the
    #: first minute the default model repeated one narration). The trained model only: the untrained
    #: one speaks at ~every frame.
    long_minutes: float = 10.0

    @staticmethod
    def make(quick: bool = False, seed: int = 0, threads: int = 1, minutes: list[float] | None = None) -> "EvalConfig":
        if quick:
            return EvalConfig(narration_streams=3, minutes=minutes or [1.0, 2.0], needles_per_length=3, seed=seed, threads=threads, quick=True,
                              needle_sets=("heldout",), long_minutes=0.0)
        return EvalConfig(minutes=minutes or [1.0, 2.0, 5.0], seed=seed, threads=threads)


#: segment length (frames at FPS) of the long narration stream: 12-18 s per subject, the pace of a
#: real stream of clips, where the training's narration streams change every 1.5-3.5 s
LONG_SEGMENT_FRAMES = (24, 36)

RECOGNITION_QUESTION = PRESENT_QUESTIONS[0]  # "What is shown now?", asked by needle_recognized


def heldout_maker(cache: FeatureCache, catalog: dict) -> StreamMaker:
    """Streams of the held-out media only (``split: heldout``), the only media every eval stream shows."""
    return StreamMaker(cache, catalog, split_names(catalog, "heldout"))


def long_narration_streams(cache: FeatureCache, cfg: EvalConfig) -> list[Stream]:
    """One narration stream of ``cfg.long_minutes`` (at least) of held-out subjects, a new subject every
    12-18 s, no questions (fixed seed; none when ``long_minutes`` is 0)."""
    if cfg.long_minutes <= 0:
        return []
    held = heldout_maker(cache, load_catalog())
    n = math.ceil(cfg.long_minutes * 60 * FPS / LONG_SEGMENT_FRAMES[0])  # enough segments for the shortest draw
    stream = held.narration_stream(random.Random(f"long-{cfg.seed}"), n_segments=(n, n), seg_len=LONG_SEGMENT_FRAMES,
                                   question_prob=0.0)
    end = next(k for k, seg in enumerate(stream.segments) if seg.end >= cfg.long_minutes * 60 * FPS) + 1
    stream.segments[end:] = []
    del stream.steps[stream.segments[-1].end:]
    return [stream]


def eval_streams(cache: FeatureCache, cfg: EvalConfig) -> tuple[list[Stream], dict[str, dict[float, list[Stream]]]]:
    """Narration streams and needle streams, all from held-out media (fixed seed). Needle sets:
    ``heldout`` (haystack and needle held out: the issue's metric) and, unless quick, ``seen``
    (held-out haystack, needle from a *training* subject: retrieval without the recognition gap)."""
    catalog = load_catalog()
    held = heldout_maker(cache, catalog)
    train_names = split_names(catalog, "train")
    rng = random.Random(f"eval-{cfg.seed}")
    narr = [held.narration_stream(rng, n_segments=(3, 4), seg_len=(4, 8), question_prob=0.5) for _ in range(cfg.narration_streams)]
    unknown = [k for k in cfg.needle_sets if k not in NEEDLE_SETS]
    if unknown:
        raise ValueError(f"needle sets are {NEEDLE_SETS}, got {unknown}")
    needles: dict[str, dict[float, list[Stream]]] = {kind: {} for kind in cfg.needle_sets}
    names = held.names
    for minutes in cfg.minutes:
        for kind in needles:
            out = []
            count = cfg.needles_per_length if kind == "heldout" else min(4, cfg.needles_per_length)
            for k in range(count):
                r = random.Random(f"needle-{cfg.seed}-{k}")  # same haystack/needle/position at every length
                if kind == "heldout":  # every held-out subject is the needle once (k < len(names))
                    needle = names[k % len(names)]
                    hay = next(names[(k + j) % len(names)] for j in range(1, len(names))
                               if held.label(names[(k + j) % len(names)]) != held.label(needle))
                else:
                    hay = names[k % len(names)]
                    needle = r.choice([n for n in train_names if held.label(n) != held.label(hay)])
                maker = held if kind == "heldout" else StreamMaker(cache, catalog, [hay, needle])
                out.append(maker.needle_stream(r, int(minutes * 60 * FPS), haystack=hay, needle=needle,
                                               position=r.uniform(0.15, 0.75), narrate=False))
            needles[kind][minutes] = out
    return narr, needles


@dataclass
class EvalRun:
    """One model under one policy, and the streams every metric runner reads."""

    model_name: str  # "trained" or "untrained"
    model: object  # a feature model (``features.feature_model``)
    policy: str
    cfg: EvalConfig
    cache: FeatureCache
    catalog: dict
    narration: list[Stream]
    needles: dict[str, dict[float, list[Stream]]]
    log: Callable[[str], None] = print
    long: list[Stream] = field(default_factory=list)  # long many-segment narration streams

    def session(self):
        """A fresh session for one stream."""
        cfg = self.cfg
        return session_for(self.model, self.policy, theta=cfg.theta, max_response_tokens=cfg.max_response_tokens,
                           max_answer_tokens=cfg.max_answer_tokens, recent_tokens=cfg.recent_tokens)

    def named(self, answer: str, stream: Stream) -> bool:
        return names_subject(answer, self.catalog[stream.needle].keywords)


Metric = tuple[str, float]


def narration_rows(run: EvalRun) -> Iterable[Metric]:
    """timediff_s, narration_acc, responses_per_min, qa_acc (and their denominators) on the narration streams."""
    diffs, hits, n_resp, seconds, qa = [], [], 0, 0.0, []
    for stream in run.narration:
        events = run_stream(run.session(), run.cache, stream)
        d, h, n = narration_metrics(events, stream, run.catalog)
        qa += qa_results(events, stream, run.catalog)
        diffs, hits, n_resp, seconds = diffs + d, hits + h, n_resp + n, seconds + stream.duration
    yield "timediff_s", sum(diffs) / len(diffs)
    yield "narration_acc", sum(hits) / len(hits)
    yield "narration_segments", len(hits)  # the denominators: one item moves a rate by 1/n
    yield "responses_per_min", 60 * n_resp / seconds
    if qa:
        yield "qa_acc", sum(qa) / len(qa)
        yield "qa_questions", len(qa)


def long_narration_rows(run: EvalRun) -> Iterable[Metric]:
    """On the long many-segment stream: narration_acc per minute of stream (``long_narration_acc@min<m>``,
    the segments that start in minute m, 1-based), overall with its denominator, and the share of the
    most frequent narration text among all narrations (1.0: the model says one thing all along)."""
    for stream in run.long:
        events = run_stream(run.session(), run.cache, stream)
        _, hits, _ = narration_metrics(events, stream, run.catalog)
        by_minute: dict[int, list[bool]] = {}
        for seg, hit in zip(stream.segments, hits):
            by_minute.setdefault(int(seg.start / FPS // 60) + 1, []).append(hit)
        for minute, minute_hits in sorted(by_minute.items()):
            yield f"long_narration_acc@min{minute}", sum(minute_hits) / len(minute_hits)
        yield "long_narration_acc", sum(hits) / len(hits)
        yield "long_narration_segments", len(hits)
        said = Counter(e.text for e in events if e.kind == "response")
        n_said = sum(said.values())
        yield "long_narrations", n_said
        if n_said:
            yield "long_narration_top_share", said.most_common(1)[0][1] / n_said
        run.log(f"    long narration {stream.duration / 60:.1f} min: most said {said.most_common(3)}")


def _suffix(kind: str) -> str:
    return "" if kind == "heldout" else "_seen_needle"


def recognition_rows(run: EvalRun, kind: str) -> Iterable[Metric]:
    """needle_recognized: the present question right after the needle (shortest haystack, silent)."""
    by_len = run.needles.get(kind)
    if not by_len:
        return
    named = []
    for stream in by_len[min(by_len)]:
        answer = run_needle_silent(run.session(), run.cache, stream, RECOGNITION_QUESTION, upto=stream.segments[1].end)
        named.append(run.named(answer, stream))
        run.log(f"    needle[{kind},recognized] {stream.segments[0].media}+{stream.needle}: {answer!r} {'OK' if named[-1] else 'x'}")
    yield "needle_recognized" + _suffix(kind), sum(named) / len(named)


def needle_rows(run: EvalRun, kind: str, mode: str) -> Iterable[Metric]:
    """needle_acc (live: the gate runs, plus needle_narrations) or needle_acc_silent, per haystack length."""
    for minutes, streams in run.needles.get(kind, {}).items():
        if mode == "live" and run.model_name == "untrained" and minutes > run.cfg.untrained_live_max_minutes:
            continue  # it speaks at ~every frame: minutes of decoding per stream (see EvalConfig)
        correct, narrations = 0, 0
        for stream in streams:
            if mode == "live":
                answer, n = run_needle_live(run.session(), run.cache, stream)
                narrations += n
            else:
                answer = run_needle_silent(run.session(), run.cache, stream)
            ok = run.named(answer, stream)
            correct += ok
            run.log(f"    needle[{kind},{mode}] {minutes:g} min {stream.segments[0].media}+{stream.needle}: "
                    f"{answer!r} {'OK' if ok else 'x'}" + (f" ({n} narrations)" if mode == "live" else ""))
        metric = "needle_acc" + ("" if mode == "live" else "_silent") + f"@{minutes:g}min" + _suffix(kind)
        yield metric, correct / len(streams)
        if mode == "live":
            yield metric.replace("needle_acc", "needle_narrations"), narrations / len(streams)


def policy_metrics(needle_sets: tuple[str, ...], model_name: str) -> list[Callable[[EvalRun], Iterable[Metric]]]:
    """The table of metric runners for one model under one policy, in row order. The seen-needle set
    is a diagnostic of the trained model only (the untrained one names nothing)."""
    runners: list[Callable[[EvalRun], Iterable[Metric]]] = [narration_rows]
    if model_name != "untrained":
        runners.append(long_narration_rows)
    for kind in needle_sets:
        if kind == "seen" and model_name == "untrained":
            continue
        runners += [partial(recognition_rows, kind=kind), partial(needle_rows, kind=kind, mode="live"),
                    partial(needle_rows, kind=kind, mode="silent")]
    return runners


def run_eval(cfg: EvalConfig, connector: Path | None, policies: list[str] = ("full",), progress: bool = True,
             log=print, only: str | None = None, lm: str | None = None) -> list[dict]:
    """Rows {model, policy, metric, value} for the trained and the untrained connector. ``lm``: the
    language model (``load_videollm``'s ``lm``; None: the preset the connectors are trained for)."""
    torch.set_num_threads(cfg.threads)
    from vrex.engine.session import DEFAULT_THETA, SessionConfig, recent_window
    from vrex.models.videollm import load_videollm

    base = load_videollm(connector=None) if lm is None else load_videollm(lm=lm, connector=None)
    log(f"  model: {base.name}")
    cache = build_feature_cache(progress=progress)
    catalog = load_catalog()
    models = {"untrained": base}
    if connector is not None:
        models = {"trained": load_trained(connector, base), "untrained": base}
    if only:
        models = {only: models[only]}
    narr, needles = eval_streams(cache, cfg)
    long = long_narration_streams(cache, cfg)
    theta = cfg.theta if cfg.theta is not None else DEFAULT_THETA
    rows: list[dict] = []

    def add(model_name: str, policy: str, metric: str, value: float, window: int = 0) -> None:
        if window and policy not in ("-", "full"):  # full reads everything: a recent window changes nothing there
            policy = f"{policy}+recent{window}"
        rows.append({"model": model_name, "policy": policy, "metric": metric, "value": round(float(value), 4)})
        log(f"  {model_name:9s} {policy:12s} {metric:18s} {value:.4f}")

    for model_name, model in models.items():
        fmodel = feature_model(model, model.connector)
        window = recent_window(SessionConfig(recent_tokens=cfg.recent_tokens), fmodel.tokens_per_frame)
        t0 = time.time()
        for metric, value in teacher_forced(fmodel, LayoutBuilder.for_model(fmodel), cache, narr, theta).items():
            add(model_name, "-", metric, value)
        for policy in policies:
            run = EvalRun(model_name, fmodel, policy, cfg, cache, catalog, narr, needles, log, long=long)
            for runner in policy_metrics(tuple(needles), model_name):
                for metric, value in runner(run):
                    add(model_name, policy, metric, value, window)
        log(f"  ({model_name}: {time.time() - t0:.0f} s)")
    return rows


def load_connector(path: Path, base):
    """A connector from a safetensors file: exported weights, or a run's ``checkpoint.safetensors``."""
    from vrex.models.connector import Connector

    return Connector(base.encoder.dim, base.lm.config.hidden_size).load(path)


def load_trained(path: Path, base):
    """The trained model of a weights file (exported weights or a run's ``checkpoint.safetensors``;
    ``vrex.cli.eval.resolve_eval_connector`` maps a run directory to it): ``base`` with the file's
    connector; when the file also carries LoRA adapters, a second copy of the LM with them loaded
    (the untrained baseline keeps the plain LM)."""
    import copy

    from vrex.models.lora import file_has_lora, load_lora
    from vrex.models.tags import equip_tags

    model = copy.copy(base)
    model.connector = load_connector(path, base)
    if file_has_lora(path):
        model.lm = copy.deepcopy(base.lm)
        load_lora(model.lm, path)
    if model.connector.tag_tokens:  # rebuild the frozen tag head with the file's k and min_prob, as load_videollm does
        equip_tags(model, model.connector.tag_tokens)
    return model
