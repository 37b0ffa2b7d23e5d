"""LIVE training of the connector (optionally LoRA on the LM) on cached encoder features, on CPU.

Loss (VideoLLM-online): L = (1/N) sum_j [ l_j CE_j(response token) + w f_j CE_j(gate label) ] over
the N supervised positions: response/answer tokens (``LM``) and each frame's last token (``STREAM``:
the interval token on silent frames, the first token of ``respond`` where the model must speak).

Every step draws one stream from an RNG seeded by ``(seed, step)``, so a resumed run sees exactly
the streams an uninterrupted one would. Checkpoints (``<run>/checkpoint.safetensors`` +
``<run>/state.pt``) hold the trainable weights, the optimizer and the loss history.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from vrex.train.data import FeatureCache, build_feature_cache, split_names, training_catalog
from vrex.train.features import stream_features, stream_tags
from vrex.train.layout import LM, STREAM, Layout, LayoutBuilder, embed_layout
from vrex.models.lora import TARGETS as LORA_TARGETS
from vrex.models.lora import add_lora, file_has_lora, has_lora, load_lora, lora_metadata, lora_state
from vrex.models.tags import equip_tags
from vrex.train.long_context import build_memory, check_haystack_fits, long_needle_loss
from vrex.train.streams import StreamMaker

DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "connector-efficientnet-lite0-smollm2-135m.safetensors"


@dataclass
class Recipe:
    steps: int = 900
    lr: float = 1e-3
    warmup: int = 20
    weight_decay: float = 0.0
    stream_loss_weight: float = 1.0
    needle_fraction: float = 0.4
    silent_needle_fraction: float = 0.3  # of needle streams: silent haystack (fast_forward layout)
    needle_frames: tuple[int, int] = (12, 64)
    #: narration streams: segments per stream and frames per segment (2 FPS); the defaults are the
    #: short streams every shipped model trained on; longer runs of changes teach the LM to narrate the
    #: frame in front of it after many narrations of its own (issue 22: it repeated one after a minute)
    narration_segments: tuple[int, int] = (2, 4)
    narration_frames: tuple[int, int] = (3, 7)
    #: this fraction of narration streams has the long shape instead: many changes, each longer, so
    #: a model learns long live streams while the short ones keep its timing on quick changes
    long_narration_fraction: float = 0.0
    long_narration_segments: tuple[int, int] = (6, 12)
    long_narration_frames: tuple[int, int] = (12, 24)
    #: long needles (vrex.train.long_context): this fraction of steps is a needle in a detached haystack
    #: memory of up to long_frames[1] frames, rebuilt every memory_refresh steps
    long_fraction: float = 0.0
    long_frames: tuple[int, int] = (120, 600)
    long_narrate_fraction: float = 0.5
    memory_refresh: int = 25
    lora: bool = False
    lora_rank: int = 8
    lora_targets: tuple[str, ...] = LORA_TARGETS  # the LM's linear layers that get adapters
    temporal: bool = True  # connector sees each frame's change since the previous one (vrex.models.connector)
    init: str | None = None  # start from these weights (connector, and LoRA adapters if the file has them and lora is on)
    #: ImageNet tag tokens per frame (vrex.models.tags; 0: none), and the fraction of streams whose
    #: subjects are named by their ImageNet top-1 (the tags' names) instead of media.json's labels
    tag_tokens: int = 0
    tag_label_fraction: float = 0.0
    tag_min_prob: float = 0.5  # a frame shows its tag when the top-1 probability reaches this
    random_tag_prob: float = 0.3  # of segments in ImageNet-named streams: a random class in the tag, named by it
    #: catalogs of extra training media on top of media.json (vrex.train.data.training_catalog)
    extra_media: tuple[str, ...] = ()
    seed: int = 0
    grad_clip: float = 1.0
    checkpoint_every: int = 50
    threads: int = 1

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class TrainState:
    step: int = 0
    history: list[dict] = field(default_factory=list)


def live_loss(model, layout: Layout, frame_feats: torch.Tensor, stream_loss_weight: float = 1.0,
              tag_classes: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """LIVE loss for one stream; logits are only computed at supervised positions."""
    embeds = embed_layout(model, layout, frame_feats, tag_classes)
    hidden = model.lm.model(inputs_embeds=embeds[None]).last_hidden_state[0]
    sup = layout.kinds != 0
    logits = model.lm.lm_head(hidden[sup.to(hidden.device)]).float()
    targets = layout.targets[sup].to(logits.device)
    kinds = layout.kinds[sup].to(logits.device)
    ce = F.cross_entropy(logits, targets, reduction="none")
    w = torch.where(kinds == STREAM, torch.tensor(stream_loss_weight, device=ce.device), torch.tensor(1.0, device=ce.device))
    loss = (w * ce).sum() / ce.numel()
    lm, st = kinds == LM, kinds == STREAM
    ce, logits = ce.detach(), logits.detach()
    stats = {
        "loss": loss.item(),
        "lm_ce": float(ce[lm].mean()) if lm.any() else float("nan"),
        "stream_ce": float(ce[st].mean()) if st.any() else float("nan"),
        "stream_acc": float((logits[st].argmax(-1) == targets[st]).float().mean()) if st.any() else float("nan"),
        "tokens": len(layout),
    }
    return loss, stats


def pick_maker(makers: dict[str, StreamMaker], recipe: Recipe, step: int) -> StreamMaker:
    """The stream maker of this step: ImageNet-named subjects for a ``tag_label_fraction`` of steps.
    Its own RNG, so recipes without tag labels draw the streams they always drew."""
    if recipe.tag_label_fraction and random.Random(f"{recipe.seed}-{step}-labels").random() < recipe.tag_label_fraction:
        return makers["imagenet"]
    return makers["hand"]


def narration_shape(recipe: Recipe, step: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(segments, frames per segment) of this step's narration stream. The long/short draw has its own
    RNG, so recipes without long narration draw the streams they always drew."""
    if recipe.long_narration_fraction and random.Random(f"{recipe.seed}-{step}-long-narration").random() < recipe.long_narration_fraction:
        return recipe.long_narration_segments, recipe.long_narration_frames
    return recipe.narration_segments, recipe.narration_frames


def draw_stream(maker: StreamMaker, recipe: Recipe, step: int):
    rng = random.Random(f"{recipe.seed}-{step}")
    if rng.random() < recipe.needle_fraction:
        return maker.needle_stream(rng, rng.randint(*recipe.needle_frames), narrate=rng.random() >= recipe.silent_needle_fraction)
    segments, frames = narration_shape(recipe, step)
    return maker.narration_stream(rng, n_segments=segments, seg_len=frames)


def trainable_state(model, recipe: Recipe) -> dict[str, torch.Tensor]:
    state = {f"connector.{k}": v for k, v in model.connector.state_dict().items()}
    if recipe.lora:
        state.update(lora_state(model.lm))
    return state


def check_lora_matches(lm, recipe: Recipe) -> None:
    """The adapters loaded from ``--init`` must be the ones the recipe trains (rank and layers)."""
    adapted = [(n, m) for n, m in lm.named_modules() if hasattr(m, "lora_A") and isinstance(getattr(m, "r", None), dict)]
    ranks = {m.r["default"] for _, m in adapted}
    layers = {n.rsplit(".", 1)[-1] for n, _ in adapted}
    if ranks != {recipe.lora_rank} or layers != set(recipe.lora_targets):
        raise ValueError(f"--init {recipe.init} has LoRA rank {sorted(ranks)} on {sorted(layers)}; the recipe asks for rank "
                         f"{recipe.lora_rank} on {sorted(recipe.lora_targets)}")


def _lr(recipe: Recipe, step: int) -> float:
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    progress = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    return recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def save_checkpoint(run: Path, model, recipe: Recipe, state: TrainState, optimizer) -> None:
    run.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in trainable_state(model, recipe).items()}
    tmp = run / "checkpoint.safetensors.tmp"
    meta = {"step": str(state.step), "tag_tokens": str(recipe.tag_tokens),
            **(lora_metadata(recipe.lora_rank, recipe.lora_targets) if recipe.lora else {})}
    save_file(tensors, str(tmp), metadata=meta)  # loadable as weights too (eval live --connector RUN_DIR)
    torch.save({"optimizer": optimizer.state_dict(), "state": asdict(state), "recipe": recipe.to_json()}, run / "state.pt.tmp")
    tmp.replace(run / "checkpoint.safetensors")
    (run / "state.pt.tmp").replace(run / "state.pt")


def load_checkpoint(run: Path, model, recipe: Recipe, optimizer) -> TrainState:
    tensors = load_file(str(run / "checkpoint.safetensors"))
    extra = torch.load(run / "state.pt", weights_only=False)
    saved = extra["recipe"]
    for key in ("seed", "lora", "lora_rank", "lora_targets", "steps", "lr", "stream_loss_weight", "temporal", "init", "needle_frames",
                "long_fraction", "long_frames", "memory_refresh", "tag_tokens", "tag_label_fraction",
                "tag_min_prob", "random_tag_prob", "narration_segments", "narration_frames", "long_narration_fraction",
                "long_narration_segments", "long_narration_frames"):
        if _jsonable(saved.get(key, _OLD_DEFAULTS.get(key))) != _jsonable(getattr(recipe, key)):
            raise ValueError(f"cannot resume {run}: it was trained with {key}={saved.get(key)}, now {getattr(recipe, key)}")
    model.connector.load_state_dict({k[len("connector."):]: v for k, v in tensors.items() if k.startswith("connector.")})
    if recipe.lora:
        model.lm.load_state_dict({k[len("lm."):]: v for k, v in tensors.items() if k.startswith("lm.")}, strict=False)
    optimizer.load_state_dict(extra["optimizer"])
    return TrainState(**extra["state"])


_OLD_DEFAULTS = {"lora_targets": list(LORA_TARGETS), "temporal": False, "long_fraction": 0.0, "long_frames": [120, 600], "memory_refresh": 25,
                 "tag_tokens": 0, "tag_label_fraction": 0.0, "tag_min_prob": 0.5, "random_tag_prob": 0.3,
                 "narration_segments": [2, 4], "narration_frames": [3, 7], "long_narration_fraction": 0.0,
                 "long_narration_segments": [6, 12], "long_narration_frames": [12, 24]}  # runs saved before the key existed


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value


def export_connector(model, path: Path, recipe: Recipe, state: TrainState, command: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"trained_by": "vrex train", "step": str(state.step), "seed": str(recipe.seed), "command": command,
            "recipe": json.dumps(recipe.to_json())}
    if recipe.lora:  # one file: connector + the LM's adapters (vrex.models.lora)
        meta.update(lora_metadata(recipe.lora_rank, recipe.lora_targets))
    model.connector.save(path, metadata=meta, extra=lora_state(model.lm) if recipe.lora else None)


def train(recipe: Recipe, run: Path, out: Path | None = DEFAULT_WEIGHTS, resume: bool = True, model=None,
          cache: FeatureCache | None = None, progress: bool = True, command: str | None = None,
          stop_after: int | None = None) -> TrainState:
    """Train; returns the final state. ``stop_after``: stop (with a checkpoint) after that many
    steps of this call, as an interruption would (used by tests)."""
    if recipe.long_fraction and recipe.checkpoint_every % recipe.memory_refresh:
        # a resumed run rebuilds the haystack memory of its block: equal to the uninterrupted run's only at block starts
        raise ValueError(f"checkpoint_every ({recipe.checkpoint_every}) must be a multiple of memory_refresh ({recipe.memory_refresh})")
    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    from vrex.models.videollm import load_videollm

    model = model or load_videollm(connector=None, seed=recipe.seed, temporal=recipe.temporal)
    catalog = training_catalog(recipe.extra_media)
    cache = cache or build_feature_cache(progress=progress, catalog=catalog)
    cache.check_covers(catalog)
    train_names = split_names(catalog, "train")
    makers = {"hand": StreamMaker(cache, catalog, train_names),
              "imagenet": StreamMaker(cache, catalog, train_names, labels="imagenet", tag_min_prob=recipe.tag_min_prob,
                                      random_tag_prob=recipe.random_tag_prob)}
    model.lm.requires_grad_(False)
    model.lm.eval()  # no dropout; the LM is frozen
    if recipe.init:
        model.connector.load(recipe.init)
        if recipe.lora and file_has_lora(recipe.init) and not has_lora(model.lm):
            load_lora(model.lm, recipe.init)  # continue the file's adapters
            check_lora_matches(model.lm, recipe)
        if model.connector.tag_tokens not in (0, recipe.tag_tokens):
            raise ValueError(f"--init {recipe.init} has {model.connector.tag_tokens} tag tokens per frame; "
                             f"pass --tag-tokens {model.connector.tag_tokens} to continue it")
    if recipe.lora and not has_lora(model.lm):
        add_lora(model.lm, recipe.lora_rank, tuple(recipe.lora_targets))
    for name, p in model.lm.named_parameters():
        p.requires_grad_(recipe.lora and "lora_" in name)
    if recipe.tag_tokens:
        equip_tags(model, recipe.tag_tokens, recipe.tag_min_prob)
    builder = LayoutBuilder.for_model(model)  # after the tags: they change the tokens per frame
    if recipe.long_fraction:  # fail before training, not at the first long step minutes later
        check_haystack_fits(model, builder, recipe.long_frames[1], hint=": lower --long-frames MAX or --tag-tokens")
    model.connector.requires_grad_(True)
    params = list(model.connector.parameters()) + [p for n, p in model.lm.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    state = TrainState()
    if resume and (run / "checkpoint.safetensors").is_file():
        state = load_checkpoint(run, model, recipe, optimizer)
    command = command or " ".join(["vrex", "train"] + sys.argv[1:])
    from tqdm import tqdm

    bar = tqdm(total=recipe.steps, initial=state.step, desc="LIVE training", disable=not progress, dynamic_ncols=True)
    done_here = 0
    t0 = time.time()
    memory = None
    while state.step < recipe.steps:
        for group in optimizer.param_groups:
            group["lr"] = _lr(recipe, state.step)
        if recipe.long_fraction and random.Random(f"{recipe.seed}-{state.step}-long").random() < recipe.long_fraction:
            # one memory per block of memory_refresh steps, built at the block's first long step from a
            # block-seeded RNG: a run resumed at a checkpoint rebuilds exactly what it would have had
            block = state.step // recipe.memory_refresh
            if memory is None or memory.block != block:
                memory = None
                bar.set_postfix_str("building haystack memory")
                memory = build_memory(model, builder, cache, makers["hand"], random.Random(f"{recipe.seed}-memory-{block}"), recipe.long_frames[1])
                memory.block = block
            loss, stats = long_needle_loss(model, builder, cache, pick_maker(makers, recipe, state.step), memory, random.Random(f"{recipe.seed}-{state.step}"),
                                           recipe.long_frames, recipe.long_narrate_fraction, recipe.stream_loss_weight)
            kind = stats.pop("kind")
        else:
            stream = draw_stream(pick_maker(makers, recipe, state.step), recipe, state.step)
            loss, stats = live_loss(model, builder.build(stream.steps), stream_features(cache, stream), recipe.stream_loss_weight,
                                    stream_tags(stream))
            kind = stream.kind
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
        optimizer.step()
        state.step += 1
        done_here += 1
        state.history.append({"step": state.step, "kind": kind, "lr": optimizer.param_groups[0]["lr"],
                              **{k: round(v, 5) if isinstance(v, float) else v for k, v in stats.items()}})
        recent = state.history[-50:]
        bar.set_postfix(loss=f"{sum(h['loss'] for h in recent) / len(recent):.3f}", tok=stats["tokens"])
        bar.update(1)
        last = state.step == recipe.steps
        if state.step % recipe.checkpoint_every == 0 or last or (stop_after and done_here >= stop_after):
            save_checkpoint(run, model, recipe, state, optimizer)
        if stop_after and done_here >= stop_after and not last:
            bar.close()
            return state
    bar.close()
    elapsed = time.time() - t0
    if out is not None:
        export_connector(model, out, recipe, state, command)
        write_record(out.with_suffix(".json"), recipe, state, command, elapsed)
    return state


def write_record(path: Path, recipe: Recipe, state: TrainState, command: str, elapsed: float) -> None:
    """The recipe, seed, exact command and a compact loss curve (means over 25-step windows)."""
    hist = state.history
    curve = []
    for i in range(0, len(hist), 25):
        w = hist[i:i + 25]
        acc = [h["stream_acc"] for h in w if not math.isnan(h["stream_acc"])]  # silent needles have no gate label
        lm = [h["lm_ce"] for h in w if not math.isnan(h["lm_ce"])]
        curve.append({"step": w[-1]["step"], "loss": round(sum(h["loss"] for h in w) / len(w), 4),
                      "lm_ce": round(sum(lm) / max(1, len(lm)), 4), "stream_acc": round(sum(acc) / max(1, len(acc)), 4)})
    import platform
    import os

    record = {"command": command, "recipe": recipe.to_json(), "steps_done": state.step,
              "train_seconds_this_call": round(elapsed, 1), "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}",
              "loss_curve": curve}
    if recipe.init:  # a second stage: keep the record of the stage it started from (written next to its weights)
        earlier = Path(recipe.init).with_suffix(".json")
        record["init_record"] = json.loads(earlier.read_text()) if earlier.is_file() else f"{earlier} not found"
    path.write_text(json.dumps(record, indent=1) + "\n")
