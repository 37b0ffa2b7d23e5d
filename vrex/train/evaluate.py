"""``vrex eval live``: LIVE metrics on held-out media, trained vs untrained connector, side by side.

Streams are built from the held-out media only (``split: heldout`` in ``media.json``) with a
fixed seed, from the cached encoder features, and run through the real ``StreamingSession``
(frames are fed as cached features through a pass-through encoder, so the session path is
unchanged: pending text + frame tokens per step, the streaming-EOS gate at theta, greedy decoding).

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
* ``narration_segments``, ``qa_questions``: the denominators of ``narration_acc`` and ``qa_acc``.
  The streams are drawn with a fixed seed from the feature cache, so they depend on the number of
  frames the decoder yields per clip: compare rows measured from the same cache.
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vrex.train.data import FPS, FeatureCache, build_feature_cache, load_catalog, split_names
from vrex.train.layout import LM, STREAM, LayoutBuilder, embed_layout
from vrex.train.streams import NEEDLE_QUESTION, PRESENT_QUESTIONS, Stream, StreamMaker
from vrex.train.trainer import stream_features


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
    direct_full: bool = True  # under `full`: speculative LIVE loop / one SDPA prefill instead of the session (same results, tested)
    #: live needle runs of the untrained connector only up to this length: it speaks at ~every frame, so a
    #: 5-minute stream is ~600 decoded responses
    untrained_live_max_minutes: float = 1.0
    #: SessionConfig.recent_tokens for the session runs (an always-kept recent window); None: the
    #: session default (two frames), 0: each policy bare
    recent_tokens: int | None = None
    #: which of NEEDLE_SETS to run; each stream depends only on its own set, seed and index, so a run of
    #: one set has the streams of a run of both
    needle_sets: tuple[str, ...] = NEEDLE_SETS

    @staticmethod
    def make(quick: bool = False, seed: int = 0, threads: int = 1, minutes: list[float] | None = None) -> "EvalConfig":
        if quick:
            return EvalConfig(narration_streams=3, minutes=minutes or [1.0, 2.0], needles_per_length=3, seed=seed, threads=threads, quick=True,
                              needle_sets=("heldout",))
        return EvalConfig(minutes=minutes or [1.0, 2.0, 5.0], seed=seed, threads=threads)


RECOGNITION_QUESTION = PRESENT_QUESTIONS[0]  # "What is shown now?", asked by needle_recognized


def names_subject(text: str, keywords: tuple[str, ...]) -> bool:
    """The narration-accuracy matching rule: a keyword occurs at the start of a word (case-insensitive)."""
    low = text.lower()
    return any(re.search(r"(?<![a-z])" + re.escape(k.lower()), low) for k in keywords)


class _CachedFeatures(nn.Module):
    """Pass-through 'encoder': the session hands it what was pushed as the image (cached features)."""

    def __init__(self, like):
        super().__init__()
        self.dim, self.grid, self.name = like.dim, like.grid, like.name

    @property
    def tokens_per_frame(self) -> int:
        return 1 + self.grid * self.grid

    def forward(self, images):
        return torch.stack([im.float() for im in images])


def feature_model(model, connector):
    """A shallow copy of ``model`` that takes cached features as frames and uses ``connector``."""
    return dataclasses.replace(model, encoder=_CachedFeatures(model.encoder), connector=connector)


def eval_streams(cache: FeatureCache, cfg: EvalConfig) -> tuple[list[Stream], dict[str, dict[float, list[Stream]]]]:
    """Narration streams and needle streams, all from held-out media (fixed seed). Needle sets:
    ``heldout`` (haystack and needle held out: the issue's metric) and, unless quick, ``seen``
    (held-out haystack, needle from a *training* subject: retrieval without the recognition gap)."""
    catalog = load_catalog()
    held = StreamMaker(cache, catalog, split_names(catalog, "heldout"))
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


@torch.no_grad()
def teacher_forced(model, builder: LayoutBuilder, cache: FeatureCache, streams: list[Stream], theta: float) -> dict[str, float]:
    """LM-PPL and Fluency under teacher forcing."""
    nll, count, fluencies = 0.0, 0, []
    interval = builder.interval
    for stream in streams:
        layout = builder.build(stream.steps)
        embeds = embed_layout(model, layout, stream_features(cache, stream))
        hidden = model.lm.model(inputs_embeds=embeds[None]).last_hidden_state[0]
        sup = (layout.kinds != 0).nonzero().flatten()
        logits = model.lm.lm_head(hidden[sup]).float()
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


def _session(model, policy_name: str, cfg: EvalConfig):
    from vrex.engine.session import SessionConfig, StreamingSession
    from vrex.kv.policies import make_policy

    scfg = SessionConfig(max_response_tokens=cfg.max_response_tokens, max_answer_tokens=cfg.max_answer_tokens,
                         recent_tokens=cfg.recent_tokens)
    if cfg.theta is not None:
        scfg.theta = cfg.theta
    return StreamingSession(model, make_policy(policy_name), scfg)


def run_stream(fmodel, cache: FeatureCache, stream: Stream, policy: str, cfg: EvalConfig) -> list:
    """Free-run the LIVE loop over the stream's frames, questions at their frames; returns the
    session's events. Under ``full`` (and ``cfg.direct_full``) the speculative loop of
    ``vrex.train.speculative`` gives the same events (tested) in a fraction of the forwards."""
    from vrex.engine.session import DEFAULT_THETA, Event

    if policy == "full" and cfg.direct_full:
        from vrex.train.speculative import SpeculativeLive

        live = SpeculativeLive(fmodel, cfg.theta if cfg.theta is not None else DEFAULT_THETA,
                               cfg.max_response_tokens, cfg.max_answer_tokens)
        questions = {k: [t.question for t in s.questions] for k, s in enumerate(stream.steps) if s.questions}
        return [Event(stream.steps[e.frame].t, e.kind, e.text, {"question": e.question} if e.question else {})
                for e in live.run(stream_features(cache, stream).to(fmodel.device), questions)]
    session = _session(fmodel, policy, cfg)
    events = []
    for step in stream.steps:
        for turn in step.questions:  # queued for this frame's time: answered right after it
            session.ask(turn.question, step.t)
        events += session.push_frame(step.t, cache.features[step.media][step.frame])
    return events


def run_needle_live(fmodel, cache: FeatureCache, stream: Stream, policy: str, cfg: EvalConfig) -> tuple[str, int]:
    """The needle stream as a user would run it: the live loop (gate, narrations) over every frame,
    the needle question at the last one. Returns the answer and the number of narrations."""
    from vrex.train.layout import Step, Turn

    steps = list(stream.steps[:-1]) + [Step(stream.steps[-1].media, stream.steps[-1].frame, stream.steps[-1].t,
                                            [Turn("", NEEDLE_QUESTION)])]
    events = run_stream(fmodel, cache, Stream(steps, stream.segments, stream.kind, stream.needle), policy, cfg)
    answers = [e for e in events if e.kind == "answer"]
    return (answers[-1].text if answers else ""), sum(e.kind == "response" for e in events)


def _until(stream: Stream, upto: int | None) -> Stream:
    """The stream's first ``upto`` steps (all when None): a question asked earlier in the stream."""
    return stream if upto is None else Stream(stream.steps[:upto], stream.segments, stream.kind, stream.needle)


@torch.no_grad()
def run_needle(fmodel, cache: FeatureCache, stream: Stream, policy: str, cfg: EvalConfig,
               question: str = NEEDLE_QUESTION, upto: int | None = None) -> str:
    """Silent haystack via ``StreamingSession.fast_forward`` (no gate, chunked prefill: the layout of a
    stream where the model stayed silent), then the last frame with ``question`` due. ``upto``: ask
    after the first ``upto`` steps instead of the last one. Returns the answer."""
    stream = _until(stream, upto)
    session = _session(fmodel, policy, cfg)
    feats = stream_features(cache, stream)
    session.fast_forward([s.t for s in stream.steps[:-1]], feats[:-1])
    last = stream.steps[-1]
    session.ask(question, last.t)
    events = session.push_frame(last.t, feats[-1])
    answers = [e for e in events if e.kind == "answer"]
    return answers[-1].text if answers else ""


def qa_results(events, stream: Stream, catalog) -> list[bool]:
    """Questions inside narration streams, one result per question: Yes/No answers must start with
    the right word; the others must name the expected subject (keyword rule). Answers come in the
    order the questions were asked, so they are paired by order, not by text: a stream may ask
    "What is shown now?" twice and expect two different subjects."""
    from vrex.train.streams import sentence

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


@torch.no_grad()
def run_needle_direct(fmodel, builder: LayoutBuilder, cache: FeatureCache, stream: Stream, cfg: EvalConfig,
                      question: str = NEEDLE_QUESTION, upto: int | None = None) -> str:
    """``run_needle`` under ``full`` without the session machinery: the identical token layout
    prefilled in one SDPA forward, then greedy decoding with the LM's own KV cache (the same answers,
    tests/train/test_eval.py). Reads every past token, as ``full`` does; ~6x faster on a 5-minute haystack."""
    from vrex.train.layout import Step

    stream = _until(stream, upto)
    steps = list(stream.steps[:-1]) + [Step(stream.steps[-1].media, stream.steps[-1].frame, stream.steps[-1].t, gate=False)]
    layout = builder.build(steps)
    lm = fmodel.lm
    embeds = embed_layout(fmodel, layout, stream_features(cache, stream))
    prompt = fmodel.tokenize(fmodel.fmt.question.format(question=question))
    embeds = torch.cat([embeds, fmodel.embed_text(prompt)])
    out = lm(inputs_embeds=embeds[None], use_cache=True, logits_to_keep=1)
    past, tokens = out.past_key_values, []
    nxt = int(out.logits[0, -1].argmax())
    while nxt != builder.stop and nxt != fmodel.tokenizer.eos_token_id and len(tokens) < cfg.max_answer_tokens:
        tokens.append(nxt)
        out = lm(input_ids=torch.tensor([[nxt]], device=fmodel.device), past_key_values=past, use_cache=True)
        past, nxt = out.past_key_values, int(out.logits[0, -1].argmax())
    return fmodel.tokenizer.decode(tokens, skip_special_tokens=True).strip()


def narration_metrics(events, stream: Stream, catalog) -> tuple[list[float], list[bool], int]:
    responses = [e for e in events if e.kind == "response"]
    diffs, hits = [], []
    for seg in stream.segments:
        t0, t1 = seg.start / FPS, seg.end / FPS
        # the session timestamps a response with its frame's t; the change frame is at t0
        inside = [e for e in responses if t0 - 1e-6 <= e.t < t1 - 1e-6]
        diffs.append(inside[0].t - t0 if inside else t1 - t0)
        hits.append(bool(inside) and names_subject(inside[0].text, catalog[seg.media].keywords))
    return diffs, hits, len(responses)


def run_eval(cfg: EvalConfig, connector: Path | None, policies: list[str] = ("full",), progress: bool = True,
             log=print, only: str | None = None) -> list[dict]:
    """Rows {model, policy, metric, value} for the trained and the untrained connector."""
    torch.set_num_threads(cfg.threads)
    from vrex.models.videollm import load_videollm

    base = load_videollm(connector=None)
    cache = build_feature_cache(progress=progress)
    catalog = load_catalog()
    models = {"untrained": base}
    if connector is not None:
        models = {"trained": load_trained(connector, base), "untrained": base}
    if only:
        models = {only: models[only]}
    narr, needles = eval_streams(cache, cfg)
    from vrex.engine.session import DEFAULT_THETA, SessionConfig, recent_window

    theta = cfg.theta if cfg.theta is not None else DEFAULT_THETA
    rows: list[dict] = []

    def add(model_name, policy, metric, value):
        # window: the current model's recent window (set in the loop below). full reads everything:
        # a recent window changes nothing there
        if window and policy not in ("-", "full"):
            policy = f"{policy}+recent{window}"
        rows.append({"model": model_name, "policy": policy, "metric": metric, "value": round(float(value), 4)})
        log(f"  {model_name:9s} {policy:12s} {metric:18s} {value:.4f}")

    for model_name, model in models.items():
        fmodel = feature_model(model, model.connector)
        builder = LayoutBuilder.for_model(fmodel)  # per model: tag tokens change the tokens per frame
        window = recent_window(SessionConfig(recent_tokens=cfg.recent_tokens), fmodel.tokens_per_frame)
        t0 = time.time()
        tf = teacher_forced(fmodel, builder, cache, narr, theta)
        add(model_name, "-", "lm_ppl", tf["lm_ppl"])
        add(model_name, "-", "fluency", tf["fluency"])
        for policy in policies:
            diffs, hits, n_resp, seconds, qa = [], [], 0, 0.0, []
            for stream in narr:
                events = run_stream(fmodel, cache, stream, policy, cfg)
                d, h, n = narration_metrics(events, stream, catalog)
                qa += qa_results(events, stream, catalog)
                diffs += d
                hits += h
                n_resp += n
                seconds += stream.duration
            add(model_name, policy, "timediff_s", sum(diffs) / len(diffs))
            add(model_name, policy, "narration_acc", sum(hits) / len(hits))
            add(model_name, policy, "narration_segments", len(hits))  # the denominators: one item moves a rate by 1/n
            add(model_name, policy, "responses_per_min", 60 * n_resp / seconds)
            if qa:
                add(model_name, policy, "qa_acc", sum(qa) / len(qa))
                add(model_name, policy, "qa_questions", len(qa))
            for kind, by_len in needles.items():
                if kind == "seen" and model_name == "untrained":
                    continue  # diagnostic for the trained model only (the untrained one names nothing)
                if by_len:  # recognition alone: the present question right after the needle, shortest haystack
                    streams = by_len[min(by_len)]
                    named = []
                    for stream in streams:
                        upto = stream.segments[1].end  # the needle's last frame
                        if policy == "full" and cfg.direct_full:
                            answer = run_needle_direct(fmodel, builder, cache, stream, cfg, RECOGNITION_QUESTION, upto)
                        else:
                            answer = run_needle(fmodel, cache, stream, policy, cfg, RECOGNITION_QUESTION, upto)
                        named.append(names_subject(answer, catalog[stream.needle].keywords))
                        log(f"    needle[{kind},recognized] {stream.segments[0].media}+{stream.needle}: {answer!r} {'OK' if named[-1] else 'x'}")
                    add(model_name, policy, "needle_recognized" + ("" if kind == "heldout" else "_seen_needle"), sum(named) / len(named))
                for minutes, streams in by_len.items():
                    for mode in ("live", "silent"):
                        if mode == "live" and model_name == "untrained" and minutes > cfg.untrained_live_max_minutes:
                            continue  # it speaks at ~every frame: minutes of decoding per stream (see EvalConfig)
                        correct, narrations = 0, 0
                        for stream in streams:
                            if mode == "live":
                                answer, n = run_needle_live(fmodel, cache, stream, policy, cfg)
                                narrations += n
                            elif policy == "full" and cfg.direct_full:
                                answer = run_needle_direct(fmodel, builder, cache, stream, cfg)
                            else:
                                answer = run_needle(fmodel, cache, stream, policy, cfg)
                            ok = names_subject(answer, catalog[stream.needle].keywords)
                            correct += ok
                            log(f"    needle[{kind},{mode}] {minutes:g} min {stream.segments[0].media}+{stream.needle}: "
                                f"{answer!r} {'OK' if ok else 'x'}" + (f" ({n} narrations)" if mode == "live" else ""))
                        metric = "needle_acc" + ("" if mode == "live" else "_silent") + f"@{minutes:g}min" + ("" if kind == "heldout" else "_seen_needle")
                        add(model_name, policy, metric, correct / len(streams))
                        if mode == "live":
                            add(model_name, policy, metric.replace("needle_acc", "needle_narrations"), narrations / len(streams))
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
