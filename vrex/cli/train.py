"""``vrex train``: LIVE training of the connector (and LoRA adapters) on real media (the work is in ``vrex.train``)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Optional

import typer

from vrex.train.trainer import DEFAULT_WEIGHTS, Recipe

app = typer.Typer(help="LIVE training of the connector (issue #5).", no_args_is_help=False, invoke_without_command=True)


def _frame_range(text: str, option: str, least: int = 8, what: str = "needle streams need") -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"'{text}' is not MIN,MAX (two integers)", param_hint=option)
    if not least <= lo <= hi:
        raise typer.BadParameter(f"{what} {least} <= MIN <= MAX, got {lo},{hi}", param_hint=option)
    return lo, hi


@app.callback(invoke_without_command=True)
def train_cmd(
    steps: int = typer.Option(Recipe.steps, help="Optimizer steps; one stream (~400 tokens: 3-28 frames of narration, or a 12-64 frame needle stream) per step. "
                              "The default recipe is stage 1 in docs/train.md (its timings are there)."),
    lr: float = typer.Option(Recipe.lr, help="Peak AdamW learning rate (linear warmup, cosine decay to 10%)."),
    lora: bool = typer.Option(False, "--lora/--no-lora", help="Also train LoRA adapters (rank 8) on the LM's linear layers via peft. "
                              "The shipped 'plain' model is connector-only; the shipped 'long', 'tags' and 'narrate' (the default) models "
                              "(vrex run --connector long|tags|narrate) are connector + LoRA, see docs/train.md."),
    lora_targets: str = typer.Option(",".join(Recipe.lora_targets), help="With --lora: comma-separated names of the LM's linear "
                                     "layers that get adapters (e.g. q_proj,k_proj,v_proj,o_proj for attention only)."),
    stream_loss_weight: float = typer.Option(Recipe.stream_loss_weight, help="Weight w of the streaming-EOS term "
                                             "(cross-entropy of the interval / speak label at each frame's last token)."),
    needle_fraction: float = typer.Option(Recipe.needle_fraction, help="Fraction of training streams that are needle streams."),
    needle_frames: str = typer.Option(",".join(map(str, Recipe.needle_frames)), help="Needle-stream length range in frames (2 FPS), 'MIN,MAX'."),
    narration_segments: str = typer.Option(",".join(map(str, Recipe.narration_segments)), help="Segments (subject changes) per "
                                           "narration stream, 'MIN,MAX'. Longer runs of changes (e.g. 6,12) train narration after many "
                                           "narrations of the model's own, as long live streams have."),
    narration_frames: str = typer.Option(",".join(map(str, Recipe.narration_frames)), help="Frames per narration segment (2 FPS), "
                                         "'MIN,MAX'."),
    long_narration_fraction: float = typer.Option(Recipe.long_narration_fraction, help="Fraction of narration streams drawn with the "
                                                  "long shape (--long-narration-segments, --long-narration-frames) instead: a mix keeps "
                                                  "quick changes narrated on time while teaching long live streams."),
    long_narration_segments: str = typer.Option(",".join(map(str, Recipe.long_narration_segments)), help="Segments per long "
                                                "narration stream, 'MIN,MAX'."),
    long_narration_frames: str = typer.Option(",".join(map(str, Recipe.long_narration_frames)), help="Frames per segment of a long "
                                              "narration stream (2 FPS), 'MIN,MAX'."),
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
                                       "each rebuild is a prefill of MAX frames."),
    tag_tokens: int = typer.Option(Recipe.tag_tokens, help="ImageNet tag tokens per frame: the encoder's top-1 class name as k LM "
                                   "token embeddings after the visual tokens (vrex/models/tags.py), so the LM can name subjects it "
                                   "was never trained on. 0: none. 2 keeps 5 minutes "
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
    narration_segments_range = _frame_range(narration_segments, "--narration-segments", 1, "narration streams need")
    narration_frames_range = _frame_range(narration_frames, "--narration-frames", 1, "narration segments need")
    long_narration_segments_range = _frame_range(long_narration_segments, "--long-narration-segments", 1, "narration streams need")
    long_narration_frames_range = _frame_range(long_narration_frames, "--long-narration-frames", 1, "narration segments need")
    if long_fraction and checkpoint_every % memory_refresh:
        raise typer.BadParameter(f"--checkpoint-every ({checkpoint_every}) must be a multiple of --memory-refresh ({memory_refresh}) "
                                 "so that a resumed run rebuilds the same haystack memory", param_hint="--memory-refresh")
    for value, hint in ((long_narration_fraction, "--long-narration-fraction"), (long_fraction, "--long-fraction"),
                        (tag_label_fraction, "--tag-label-fraction")):
        if not 0.0 <= value <= 1.0:
            raise typer.BadParameter(f"{value} is not a fraction in [0, 1]", param_hint=hint)
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
                    needle_frames=(lo, hi), narration_segments=narration_segments_range, narration_frames=narration_frames_range,
                    long_narration_fraction=long_narration_fraction, long_narration_segments=long_narration_segments_range,
                    long_narration_frames=long_narration_frames_range,
                    long_fraction=long_fraction, long_frames=(lo_long, hi_long),
                    long_narrate_fraction=long_narrate_fraction, memory_refresh=memory_refresh, silent_needle_fraction=silent_needle_fraction, init=str(init) if init else None,
                    seed=seed, threads=threads, checkpoint_every=checkpoint_every,
                    tag_tokens=tag_tokens, tag_label_fraction=tag_label_fraction, tag_min_prob=tag_min_prob,
                    random_tag_prob=random_tag_prob, extra_media=tuple(str(p) for p in extra_media))
    command = "vrex train " + " ".join(shlex.quote(a) for a in sys.argv[1:] if a != "train")
    state = train(recipe, run, out=out, resume=resume, command=command.strip())
    typer.echo(f"trained {state.step} steps; connector written to {out}")
