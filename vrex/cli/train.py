"""Typer commands: ``vrex train`` (``train_app``) and ``vrex eval live`` (``eval_live``, in ``eval_app``).

Runnable on its own too: ``python -m vrex.train.cli train --help`` / ``python -m vrex.train.cli eval live --help``.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Optional

import typer

from vrex.train.trainer import DEFAULT_WEIGHTS, Recipe

train_app = typer.Typer(help="LIVE training of the connector (issue #5).", no_args_is_help=False, invoke_without_command=True)
eval_app = typer.Typer(help="Evaluations.", no_args_is_help=True)


def _frame_range(text: str, option: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"'{text}' is not MIN,MAX (two integers)", param_hint=option)
    if not 8 <= lo <= hi:
        raise typer.BadParameter(f"needle streams need 8 <= MIN <= MAX frames, got {lo},{hi}", param_hint=option)
    return lo, hi


@train_app.callback(invoke_without_command=True)
def train_cmd(
    steps: int = typer.Option(Recipe.steps, help="Optimizer steps; one stream (~400 tokens: 3-28 frames of narration, or a 12-64 frame needle stream) per step. "
                              "The default recipe (stage 1 in docs/train.md) takes ~40 min on one CPU core."),
    lr: float = typer.Option(Recipe.lr, help="Peak AdamW learning rate (linear warmup, cosine decay to 10%)."),
    lora: bool = typer.Option(False, "--lora/--no-lora", help="Also train LoRA adapters (rank 8) on the LM's linear layers via peft. "
                              "The shipped 'plain' model is connector-only; the shipped 'long' and 'tags' (the default) models "
                              "(vrex run --connector long|tags) are connector + LoRA, see docs/train.md."),
    lora_targets: str = typer.Option(",".join(Recipe.lora_targets), help="With --lora: comma-separated names of the LM's linear "
                                     "layers that get adapters (e.g. q_proj,k_proj,v_proj,o_proj for attention only)."),
    stream_loss_weight: float = typer.Option(Recipe.stream_loss_weight, help="Weight w of the streaming-EOS term "
                                             "(cross-entropy of the interval / speak label at each frame's last token)."),
    needle_fraction: float = typer.Option(Recipe.needle_fraction, help="Fraction of training streams that are needle streams."),
    needle_frames: str = typer.Option(",".join(map(str, Recipe.needle_frames)), help="Needle-stream length range in frames (2 FPS), 'MIN,MAX'."),
    silent_needle_fraction: float = typer.Option(Recipe.silent_needle_fraction, help="Fraction of needle streams with a silent haystack "
                                                 "(no narration: the answer must come from the frames)."),
    long_fraction: float = typer.Option(Recipe.long_fraction, help="Fraction of steps that are long needles: a 2-4 frame needle in a "
                                        "silent haystack of --long-frames, trained over a detached haystack memory (Transformer-XL style; "
                                        "vrex/train/long_context.py): minutes of context for the cost of a short stream."),
    long_frames: str = typer.Option(",".join(map(str, Recipe.long_frames)), help="Long-needle stream length range in frames, 'MIN,MAX' "
                                    "(600 = 5 min at 2 FPS, ~6.6K tokens: MAX must fit the LM's positions)."),
    long_narrate_fraction: float = typer.Option(Recipe.long_narrate_fraction, help="Fraction of long needles that are narrated "
                                                "(gate and narration trained at the needle) rather than silent."),
    memory_refresh: int = typer.Option(Recipe.memory_refresh, help="Rebuild the haystack memory (a new subject, the current connector) every N steps; "
                                       "a prefill of MAX frames, ~40 s at 600 frames on one core."),
    tag_tokens: int = typer.Option(Recipe.tag_tokens, help="ImageNet tag tokens per frame: the encoder's top-1 class name as k LM "
                                   "token embeddings after the visual tokens (vrex/models/tags.py), so the LM can name subjects it "
                                   "was never trained on. 0: none. 2 holds 7 of 10 class names whole (3: 9 of 10) and keeps 5 minutes "
                                   "(600 frames) within SmolLM2's 8192 positions."),
    tag_label_fraction: float = typer.Option(Recipe.tag_label_fraction, help="Fraction of steps whose subjects are named by their "
                                             "ImageNet top-1 ('A chickadee.', the name the tags carry) instead of media.json's labels: "
                                             "what teaches the LM to read the tags."),
    tag_min_prob: float = typer.Option(Recipe.tag_min_prob, help="A frame shows its tag only when the encoder's top-1 probability "
                                       "reaches this (below: pad vectors, 'no tag'); ImageNet-named streams name a subject by its "
                                       "top-1 only when its smoothed probability reaches it too."),
    random_tag_prob: float = typer.Option(Recipe.random_tag_prob, help="In ImageNet-named streams, the fraction of segments whose tag "
                                          "tokens show a random ImageNet class and whose label is that class: the name can only "
                                          "be copied from the tag, so the LM learns to read tags rather than memorise names."),
    extra_media: list[Path] = typer.Option([], "--extra-media", help="More training media: a catalog in media.json's format whose "
                                           "entries are all split 'train' (repeatable), e.g. vrex/train/media-opencv-doc.json (38 photos and "
                                           "clips of Debian's opencv-doc, fetched once with apt-get). The evaluation media do not change."),
    init: Optional[Path] = typer.Option(None, help="Start from these weights (a further training stage) instead of the seeded init: the "
                                        "connector, and with --lora the file's LoRA adapters if it has any."),
    out: Path = typer.Option(DEFAULT_WEIGHTS, help="Where the trained connector (safetensors) and its record (.json) are written "
                          "(default: the shipped 'plain' model's file, which the default recipe reproduces)."),
    run: Path = typer.Option(Path("runs/live-default"), help="Run directory for checkpoints (checkpoint.safetensors + state.pt)."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from the run directory's last checkpoint if there is one "
                                "(same seed and recipe => the same result as an uninterrupted run)."),
    seed: int = typer.Option(Recipe.seed, help="Seed of the connector init and of the stream sampler."),
    threads: int = typer.Option(Recipe.threads, help="torch threads. 1 is fastest when other jobs share the cores."),
    checkpoint_every: int = typer.Option(Recipe.checkpoint_every, help="Save a checkpoint every N steps."),
) -> None:
    """Train the connector with the LIVE objective on real media (features cached once in $VREX_CACHE/train, default ~/.cache/vrex/train)."""
    from vrex.train.trainer import train

    lo, hi = _frame_range(needle_frames, "--needle-frames")
    lo_long, hi_long = _frame_range(long_frames, "--long-frames")
    if long_fraction and checkpoint_every % memory_refresh:
        raise typer.BadParameter(f"--checkpoint-every ({checkpoint_every}) must be a multiple of --memory-refresh ({memory_refresh}) "
                                 "so that a resumed run rebuilds the same haystack memory", param_hint="--memory-refresh")
    if not 0.0 <= long_fraction <= 1.0:
        raise typer.BadParameter(f"{long_fraction} is not a fraction in [0, 1]", param_hint="--long-fraction")
    if not 0.0 <= tag_label_fraction <= 1.0:
        raise typer.BadParameter(f"{tag_label_fraction} is not a fraction in [0, 1]", param_hint="--tag-label-fraction")
    if tag_label_fraction and not tag_tokens:
        raise typer.BadParameter("ImageNet-named streams teach the tag tokens; add --tag-tokens K", param_hint="--tag-label-fraction")
    for value, hint in ((tag_min_prob, "--tag-min-prob"), (random_tag_prob, "--random-tag-prob")):
        if not 0.0 <= value <= 1.0:
            raise typer.BadParameter(f"{value} is not a probability in [0, 1]", param_hint=hint)
    if tag_tokens < 0:
        raise typer.BadParameter(f"must be >= 0, got {tag_tokens}", param_hint="--tag-tokens")
    if init is not None and not init.is_file():
        raise typer.BadParameter(f"{init} is not a file", param_hint="--init")
    missing = [str(p) for p in extra_media if not p.is_file()]
    if missing:
        raise typer.BadParameter(f"{', '.join(missing)} is not a file", param_hint="--extra-media")
    if extra_media:
        from vrex.train.data import training_catalog

        try:  # all together: names must not clash with media.json nor with each other
            training_catalog(tuple(extra_media))
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--extra-media") from e
    targets = tuple(t.strip() for t in lora_targets.split(",") if t.strip())
    unknown = [t for t in targets if t not in Recipe.lora_targets]
    if not targets or unknown:
        raise typer.BadParameter(f"'{lora_targets}': unknown layer(s) {unknown}; choose from {','.join(Recipe.lora_targets)}",
                                 param_hint="--lora-targets")
    recipe = Recipe(steps=steps, lr=lr, lora=lora, lora_targets=targets, stream_loss_weight=stream_loss_weight, needle_fraction=needle_fraction,
                    needle_frames=(lo, hi), long_fraction=long_fraction, long_frames=(lo_long, hi_long),
                    long_narrate_fraction=long_narrate_fraction, memory_refresh=memory_refresh, silent_needle_fraction=silent_needle_fraction, init=str(init) if init else None,
                    seed=seed, threads=threads, checkpoint_every=checkpoint_every,
                    tag_tokens=tag_tokens, tag_label_fraction=tag_label_fraction, tag_min_prob=tag_min_prob,
                    random_tag_prob=random_tag_prob, extra_media=tuple(str(p) for p in extra_media))
    command = "vrex train " + " ".join(shlex.quote(a) for a in sys.argv[1:] if a != "train")
    state = train(recipe, run, out=out, resume=resume, command=command.strip())
    typer.echo(f"trained {state.step} steps; connector written to {out}")


def resolve_eval_connector(connector: str | None) -> Path:
    """The weights file behind ``vrex eval live --connector``: the shipped default (``DEFAULT_VARIANT``), a
    shipped variant by name ('plain', 'long', 'tags'), a weights file, or a run directory (its ``checkpoint.safetensors``)."""
    from vrex.models.encoders import EFFNET_PRESET
    from vrex.models.lm import SMOLLM2_PRESET
    from vrex.models.videollm import DEFAULT_VARIANT, SHIPPED_VARIANTS, shipped_connector

    connector = DEFAULT_VARIANT if connector is None else connector
    if connector in SHIPPED_VARIANTS:  # the training setup's encoder and LM, as DEFAULT_WEIGHTS
        path = shipped_connector(EFFNET_PRESET, SMOLLM2_PRESET, SHIPPED_VARIANTS[connector])
    else:
        path = Path(connector)
    if path is None or not (path.is_file() or (path / "checkpoint.safetensors").is_file()):
        raise typer.BadParameter(f"'{connector}' is neither a weights file, a run directory with checkpoint.safetensors, "
                                 f"nor a shipped variant ({', '.join(SHIPPED_VARIANTS)}) whose file exists", param_hint="--connector")
    return path if path.is_file() else path / "checkpoint.safetensors"


@eval_app.command("live")
def eval_live(
    quick: bool = typer.Option(False, "--quick", help="A small subset (~5 min on 2 cores): fewer streams, needle at 1 and 2 minutes only."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write rows {model, policy, metric, value} to this file."),
    policy: list[str] = typer.Option(["full"], "--policy", help="KV policy for the streaming runs, NAME or NAME\\[key=value,...] "
                                     "(repeatable; `vrex policies` lists them with their parameters), e.g. --policy full "
                                     "--policy 'resv\\[ratio=0.2]'; needle accuracy is reported per policy on the same streams."),
    connector: Optional[str] = typer.Option(None, "--connector", help="Trained connector to evaluate: a weights file (or a `vrex train` "
                                            "run directory), or a shipped model: 'tags' (the default: ImageNet tag tokens + long context), 'long' "
                                            "(long context, no tags) or 'plain' (connector only)."),
    minutes: Optional[str] = typer.Option(None, help="Comma-separated haystack lengths in minutes (default 1,2,5; quick: 1,2)."),
    seed: int = typer.Option(0, help="Seed of the evaluation streams."),
    threads: int = typer.Option(1, help="torch threads."),
    recent_tokens: Optional[int] = typer.Option(None, help="Always-kept window of the newest tokens on top of each policy's selection "
                                                "(SessionConfig.recent_tokens; default: the session's two frames, 0: each policy bare); "
                                                "rows are labelled policy+recentN."),
    only: Optional[str] = typer.Option(None, help="Evaluate only 'trained' or 'untrained' (e.g. to run the two halves in parallel)."),
    narration_streams: Optional[int] = typer.Option(None, help="Number of narration streams (narration, TimeDiff, QA metrics; "
                                                    "default 10, quick 3). With other --seed values, more items for those rates."),
    needles: bool = typer.Option(True, "--needles/--no-needles", help="--no-needles: narration streams only (no needle streams)."),
    needle_sets: Optional[str] = typer.Option(None, "--needle-sets", help="Comma-separated needle sets: 'heldout' (held-out needle "
                                              "subjects, the goal's metric) and/or 'seen' (needles of training subjects: retrieval "
                                              "without the recognition gap). Default both (quick: heldout); the streams of a set "
                                              "are the same whether or not the other is run."),
) -> None:
    """LIVE metrics on held-out media, trained vs untrained connector: LM-PPL, TimeDiff, Fluency,
    narration accuracy, needle accuracy at 1/2/5-minute haystacks."""
    from vrex.kv.policies import PolicySpecError, make_policy
    from vrex.train.evaluate import NEEDLE_SETS, EvalConfig, print_table, run_eval

    for spec in policy:
        try:
            make_policy(spec)  # name, parameters, types, ranges: before any model loads
        except PolicySpecError as e:
            raise typer.BadParameter(str(e), param_hint="--policy")
    if recent_tokens is not None and recent_tokens < 0:
        raise typer.BadParameter(f"must be >= 0, got {recent_tokens}", param_hint="--recent-tokens")
    if only not in (None, "trained", "untrained"):
        raise typer.BadParameter(f"must be 'trained' or 'untrained', got '{only}'", param_hint="--only")
    weights = resolve_eval_connector(connector)
    cfg = EvalConfig.make(quick=quick, seed=seed, threads=threads,
                          minutes=[float(x) for x in minutes.split(",")] if minutes else None)
    cfg.recent_tokens = recent_tokens
    if narration_streams is not None:
        if narration_streams < 1:
            raise typer.BadParameter(f"must be >= 1, got {narration_streams}", param_hint="--narration-streams")
        cfg.narration_streams = narration_streams
    if needle_sets is not None:
        sets = tuple(dict.fromkeys(x.strip() for x in needle_sets.split(",") if x.strip()))
        if not sets or any(x not in NEEDLE_SETS for x in sets):
            raise typer.BadParameter(f"'heldout' and/or 'seen' expected, got '{needle_sets}'", param_hint="--needle-sets")
        cfg.needle_sets = sets
    if not needles:
        cfg.minutes = []
    rows = run_eval(cfg, connector=weights, policies=policy, only=only)
    print_table(rows)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(rows, indent=1) + "\n")


def load_eval_rows(path: Path) -> list[dict]:
    """Rows of a ``vrex eval live --json`` file (a list), or the ``rows`` of a results file such as
    vrex/weights/eval-live.json."""
    if not path.is_file():
        raise typer.BadParameter(f"'{path}' is not a file", param_hint="FILES")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise typer.BadParameter(f"'{path}' is not JSON ({e})", param_hint="FILES") from e
    rows = data.get("rows") if isinstance(data, dict) else data
    if not isinstance(rows, list) or not all(isinstance(r, dict) and {"model", "policy", "metric", "value"} <= set(r) for r in rows):
        raise typer.BadParameter(f"'{path}' holds no rows of {{model, policy, metric, value}} (write them with vrex eval live --json)",
                                 param_hint="FILES")
    return rows


@eval_app.command("plot")
def eval_plot(
    files: list[Path] = typer.Argument(..., help="Rows written by `vrex eval live --json` (one file per model or run)."),
    label: list[str] = typer.Option([], "--label", help="Legend name per file, in order (default: the file names)."),
    out: Path = typer.Option(Path("needle_accuracy.png"), "--out", help="PNG to write."),
) -> None:
    """Needle accuracy against haystack length (live and silent, held-out and seen needles), several
    evaluation files in one figure, e.g. the default and the long-context model:

        vrex eval live --only trained --json default.json
        vrex eval live --only trained --connector long --json long.json
        vrex eval plot default.json long.json --label default --label long --out needles.png
    """
    from vrex.train.plots import plot_needles

    if label and len(label) != len(files):
        raise typer.BadParameter(f"{len(label)} labels for {len(files)} files", param_hint="--label")
    names = label or [f.stem for f in files]
    if len(set(names)) != len(names):
        raise typer.BadParameter(f"labels must differ, got {names}", param_hint="--label")
    runs = {name: load_eval_rows(f) for name, f in zip(names, files)}
    try:
        plot_needles(runs, out)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="FILES") from e
    typer.echo(f"wrote {out}")


def _thresholds(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise typer.BadParameter(f"comma-separated probabilities expected, got '{text}'", param_hint="--thresholds") from e
    if not values or not all(0.0 <= v <= 1.0 for v in values):
        raise typer.BadParameter(f"probabilities in [0, 1] expected, got '{text}'", param_hint="--thresholds")
    return sorted(set(values))


@eval_app.command("tags")
def eval_tags(
    thresholds: str = typer.Option("0.2,0.3,0.4,0.5,0.6,0.7,0.8", "--thresholds",
                                   help="Comma-separated top-1 probabilities at which a frame shows its tag (the shipped rule: 0.5)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write one row per split, rule and threshold to this file."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="PNG of right and wrong tags against the threshold."),
) -> None:
    """How often the ImageNet tag token names the frame's subject, per rule ('global': the shipped
    whole-frame top-1; 'region': the most confident grid cell) and threshold, on the training media
    (the tag head's validation set: choose a rule here) and on the held-out media. Seconds once the
    feature cache exists (the first run encodes every media item, ~1.5 min):

        vrex eval tags --json tags.json --plot tags.png
    """
    from rich.console import Console
    from rich.table import Table

    from vrex.models.encoders import load_encoder
    from vrex.train.data import build_feature_cache, load_catalog
    from vrex.train.tag_rules import plot_tag_rules, tag_rule_table

    values = _thresholds(thresholds)
    encoder = load_encoder()
    classifier = encoder.backbone.classifier
    cache = build_feature_cache(encoder)
    rows = tag_rule_table(cache, load_catalog(), classifier.weight.detach(), classifier.bias.detach(), values)
    subjects = ", ".join(f"{r.split} {r.subjects}" for r in rows if r.rule == rows[0].rule and r.threshold == rows[0].threshold)
    table = Table(title="ImageNet tag tokens: frames whose tag names the subject",
                  caption=f"frames with a right / wrong name shown; subjects with >= 1 right / wrong tag (of {subjects})")
    for col in ("split", "rule", "thr", "frames", "right", "wrong", "prec", "subj ok", "subj bad"):
        table.add_column(col, justify="left" if col in ("split", "rule") else "right", no_wrap=True)
    for r in rows:
        table.add_row(r.split, r.rule, f"{r.threshold:g}", str(r.frames), str(r.right), str(r.wrong), f"{r.precision:.2f}",
                      str(r.subjects_right), str(r.subjects_wrong))
    Console().print(table)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps([r.as_dict() for r in rows], indent=1) + "\n")
    if plot:
        plot.parent.mkdir(parents=True, exist_ok=True)
        plot_tag_rules(rows, plot)
        typer.echo(f"wrote {plot}")


app = typer.Typer(no_args_is_help=True)
app.add_typer(train_app, name="train")
app.add_typer(eval_app, name="eval")

if __name__ == "__main__":
    app()
