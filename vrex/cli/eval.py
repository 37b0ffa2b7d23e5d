"""``vrex eval``: ``live`` (LIVE metrics of a trained connector on held-out media), ``plot`` (needle
accuracy of several evaluation files), ``tags`` (the ImageNet tag rules). The work is in ``vrex.train``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from vrex.cli.options import LM_PRESETS, check_policy_specs, fail, lm_errors, model_ref_error, recent_tokens_error

app = typer.Typer(help="Evaluations.", no_args_is_help=True)


def resolve_eval_connector(connector: str | None) -> Path:
    """The weights file behind ``vrex eval live --connector``: the shipped default (``DEFAULT_VARIANT``), a
    shipped variant by name ('plain', 'long', 'tags', 'narrate'), a weights file, or a run directory (its ``checkpoint.safetensors``)."""
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


@app.command("live")
def eval_live(
    quick: bool = typer.Option(False, "--quick", help="A small subset: fewer streams, needles at 1 and 2 minutes only."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write rows {model, policy, metric, value} to this file."),
    policy: list[str] = typer.Option(["full"], "--policy", help="KV policy for the streaming runs, NAME or NAME\\[key=value,...] "
                                     "(repeatable; `vrex policies` lists them with their parameters), e.g. --policy full "
                                     "--policy 'resv\\[ratio=0.2]'; needle accuracy is reported per policy on the same streams."),
    connector: Optional[str] = typer.Option(None, "--connector", help="Trained connector to evaluate: a weights file (or a `vrex train` "
                                            "run directory), or a shipped model: 'narrate' (the default: 'tags' trained on long narration streams), 'tags' (ImageNet tag tokens + long context), 'long' "
                                            "(long context, no tags) or 'plain' (connector only)."),
    lm: str = typer.Option(LM_PRESETS[0], "--lm", help="Language model: the preset, a causal-LM directory or a repo id (see vrex run "
                           "--lm). The connectors (shipped or from vrex train) are trained for the preset, so another LM is "
                           "evaluated with the untrained connector only."),
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
    long_minutes: Optional[float] = typer.Option(None, "--long-minutes", help="Length of the long many-segment narration stream "
                                                 "(held-out subjects, a new one every 12-18 s; narration accuracy per minute, trained "
                                                 "model only). Default 10, quick 0 (none); 0 turns it off."),
    needle_sets: Optional[str] = typer.Option(None, "--needle-sets", help="Comma-separated needle sets: 'heldout' (held-out needle "
                                              "subjects, the goal's metric) and/or 'seen' (needles of training subjects: retrieval "
                                              "without the recognition gap). Default both (quick: heldout); the streams of a set "
                                              "are the same whether or not the other is run."),
) -> None:
    """LIVE metrics on held-out media, trained vs untrained connector: LM-PPL, TimeDiff, Fluency,
    narration accuracy, needle accuracy at 1/2/5-minute haystacks."""
    from vrex.train.evaluate import NEEDLE_SETS, EvalConfig, run_eval

    check_policy_specs(policy, "--policy")  # name, parameters, types, ranges: before any model loads
    if error := recent_tokens_error(recent_tokens):
        fail(error)
    if only not in (None, "trained", "untrained"):
        raise typer.BadParameter(f"must be 'trained' or 'untrained', got '{only}'", param_hint="--only")
    if error := model_ref_error("--lm", lm, LM_PRESETS, "language model"):
        fail(error)
    other_lm = lm not in LM_PRESETS
    if other_lm and (connector is not None or only == "trained"):
        fail(f"--lm '{lm}': the connectors (shipped or from vrex train) are trained for {LM_PRESETS[0]}; another LM is "
             f"evaluated with the untrained connector only (drop --connector and --only trained)")
    weights = None if other_lm else resolve_eval_connector(connector)
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
    if long_minutes is not None:
        if not math.isfinite(long_minutes) or long_minutes < 0:
            raise typer.BadParameter(f"must be a number of minutes >= 0, got {long_minutes}", param_hint="--long-minutes")
        cfg.long_minutes = long_minutes
    try:
        rows = run_eval(cfg, connector=weights, policies=policy, only=only, lm=None if lm in LM_PRESETS else lm)
    except lm_errors() as e:  # an LM a path or download could not provide, or the engine cannot run
        fail(f"--lm: {e}")
    _eval_table(rows)
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


@app.command("plot")
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


@app.command("tags")
def eval_tags(
    thresholds: str = typer.Option("0.2,0.3,0.4,0.5,0.6,0.7,0.8", "--thresholds",
                                   help="Comma-separated top-1 probabilities at which a frame shows its tag (the shipped rule: 0.5)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write one row per split, rule and threshold to this file."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="PNG of right and wrong tags against the threshold."),
) -> None:
    """How often the ImageNet tag token names the frame's subject, per rule ('global': the shipped
    whole-frame top-1; 'region': the most confident grid cell) and threshold, on the training media
    (the tag head's validation set: choose a rule here) and on the held-out media. Seconds once the
    feature cache exists (the first run encodes every media item once):

        vrex eval tags --json tags.json --plot tags.png
    """
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


def _eval_table(rows: list[dict]) -> None:
    models = sorted({r["model"] for r in rows}, key=lambda m: m != "trained")
    keys = []
    for r in rows:
        if (r["policy"], r["metric"]) not in keys:
            keys.append((r["policy"], r["metric"]))
    table = Table(title="vrex eval live (held-out media)")
    table.add_column("policy")
    table.add_column("metric")
    for m in models:
        table.add_column(m, justify="right")
    val = {(r["model"], r["policy"], r["metric"]): r["value"] for r in rows}
    for policy, metric in keys:
        table.add_row(policy, metric, *[f"{val[(m, policy, metric)]:.3f}" if (m, policy, metric) in val else "-" for m in models])
    Console().print(table)
