"""Real media for LIVE training: the catalog (``media.json``), frames at 2 FPS, a frozen-encoder feature cache.

Clips are decoded at their own speed (``vrex.io.open_source(fps=2)``); a still becomes a short
"camera move" over the photo (deterministic pan and zoom crops, 2 trajectories x 12 views). The
frozen encoder turns every frame into ``[tokens_per_frame, dim]`` features once; training and
``vrex eval live`` only read the cache (VideoLLM-online also trains on pre-extracted features).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vrex.models.tags import imagenet_names
from vrex.models.weights import cache_dir

CATALOG = Path(__file__).resolve().parent / "media.json"
FPS = 2.0
STILL_TRAJECTORIES = 2
STILL_VIEWS = 12
#: frames darker than this mean luminance (0-255) are dropped (Big Buck Bunny's black opening)
DARK_LUMA = 16.0
CACHE_VERSION = 1


@dataclass(frozen=True)
class Media:
    name: str
    kind: str  # "image" or "clip"
    file: str
    label: str | None
    keywords: tuple[str, ...]
    split: str  # "train" or "heldout"
    #: where ``file`` lives: "shared" (../shared/assets, or a clip name of vrex.io.list_demo_clips()) or
    #: "opencv-doc" (a path under Debian's opencv-doc examples folder, vrex.train.debian_media)
    source: str = "shared"


SOURCES = ("shared", "opencv-doc")


def load_catalog(path: Path = CATALOG) -> dict[str, Media]:
    try:
        raw = json.loads(Path(path).read_text())["media"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"media catalog {path}: not a JSON file with a 'media' object ({e})") from e
    out = {}
    for name, m in raw.items():
        if (not isinstance(m, dict) or m.get("split") not in ("train", "heldout") or m.get("kind") not in ("image", "clip")
                or m.get("source", "shared") not in SOURCES or not m.get("file") or not m.get("keywords")):
            raise ValueError(f"media catalog {Path(path).name}: bad entry {name}: {m} (split train|heldout, kind image|clip, "
                             f"source {'|'.join(SOURCES)}, a file and keywords)")
        out[name] = Media(name, m["kind"], m["file"], m.get("label"), tuple(k.lower() for k in m["keywords"]), m["split"],
                          m.get("source", "shared"))
    return out


def training_catalog(extra: tuple[str | Path, ...] = ()) -> dict[str, Media]:
    """The catalog ``vrex train`` draws from: media.json plus extra catalogs of *training* media
    (``vrex train --extra-media``). The evaluation keeps media.json alone, so its streams do not
    change when training media are added."""
    catalog = load_catalog()
    for path in extra:
        more = load_catalog(Path(path))
        clash = sorted(set(more) & set(catalog))
        if clash:
            raise ValueError(f"extra media {path}: names already in the catalog: {clash}")
        held = sorted(n for n, m in more.items() if m.split != "train")
        if held:
            raise ValueError(f"extra media {path}: only training media can be added, {held} are not split 'train'")
        catalog.update(more)
    return catalog


def split_names(catalog: dict[str, Media], split: str) -> list[str]:
    return sorted(n for n, m in catalog.items() if m.split == split)


def _assets() -> Path:
    from vrex.io import assets_dir

    root = assets_dir()
    if root is None:
        raise FileNotFoundError("shared assets folder not found (set VREX_ASSETS or check ../shared/assets)")
    return root


def still_views(image: Image.Image, trajectories: int = STILL_TRAJECTORIES, views: int = STILL_VIEWS) -> list[Image.Image]:
    """Deterministic pan/zoom 'camera moves' over a photo: square crops whose size shrinks from the
    full short side to 60% while the centre pans across the image; one trajectory per direction."""
    image = image.convert("RGB")
    w, h = image.size
    side0 = min(w, h)
    out = []
    for k in range(trajectories):
        angle = math.pi * (0.25 + 0.5 * k)
        for i in range(views):
            a = i / max(1, views - 1)
            side = side0 * (1.0 - 0.4 * a)
            cx = w / 2 + math.cos(angle) * a * (w - side) / 2 * (1 if k % 2 == 0 else -1)
            cy = h / 2 + math.sin(angle) * a * (h - side) / 2 * (1 if k % 2 == 0 else -1)
            box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
            out.append(image.crop(tuple(round(v) for v in box)))
    return out


def media_path(media: Media) -> Path:
    """The file of a media item: under the shared assets, a demo clip by name, or under opencv-doc."""
    if media.source == "opencv-doc":
        from vrex.train.debian_media import opencv_doc_examples

        path = opencv_doc_examples() / media.file
    elif media.kind == "image":
        path = _assets() / media.file
    else:
        from vrex.io import list_demo_clips

        clips = list_demo_clips()
        if media.file not in clips:
            raise FileNotFoundError(f"clip '{media.file}' not available (vrex.io.list_demo_clips())")
        path = clips[media.file]
    if not path.is_file():
        raise FileNotFoundError(f"media '{media.name}': {path} does not exist")
    return path


def media_frames(media: Media) -> list[Image.Image]:
    """All frames of one media item at 2 FPS (clips) or its pan/zoom views (stills)."""
    if media.kind == "image":
        return still_views(Image.open(media_path(media)))
    from vrex.io import open_source

    with open_source(str(media_path(media)), fps=FPS) as src:
        frames = [f.image for f in src]
    kept = [im for im in frames if np.asarray(im.convert("L"), dtype=np.float32).mean() >= DARK_LUMA]
    return kept or frames


@dataclass
class FeatureCache:
    """``features[name]``: [n_frames, tokens_per_frame, dim] (fp16); ``probs[name]``: [n_frames, 1000] ImageNet probs."""

    features: dict[str, torch.Tensor]
    probs: dict[str, torch.Tensor]
    encoder: str
    catalog_hash: str

    def check_covers(self, names) -> None:
        """Raise when any of ``names`` has no frames here (a cache built for another catalog)."""
        missing = sorted(set(names) - set(self.features))
        if missing:
            raise ValueError(f"the feature cache has no frames of {missing}: build it for this catalog")

    def smoothed_label(self, name: str, frames: slice | list[int] | None = None) -> str:
        """Self-distillation label: ImageNet top-1 of the probabilities averaged over the frames."""
        return self.smoothed_top1(name, frames)[0]

    def smoothed_top1(self, name: str, frames: slice | list[int] | None = None) -> tuple[str, float]:
        """The ImageNet top-1 class name of the probabilities averaged over the frames, and its probability."""
        p = (self.probs[name] if frames is None else self.probs[name][frames]).float().mean(0)
        return imagenet_names()[int(p.argmax())], float(p.max())


def catalog_hash(catalog: dict[str, Media]) -> str:
    # the source joins the key only when it is not the default, so media.json's hash (and cache) stay as they were
    key = json.dumps({n: [m.kind, m.file] + ([m.source] if m.source != "shared" else []) for n, m in sorted(catalog.items())})
    key += f"v{CACHE_VERSION}-{STILL_TRAJECTORIES}x{STILL_VIEWS}-{FPS}"
    return hashlib.sha1(key.encode()).hexdigest()[:12]


def default_cache_path(encoder: str = "efficientnet-lite0", catalog: dict[str, Media] | None = None) -> Path:
    return cache_dir() / "train" / f"features-{encoder}-{catalog_hash(catalog or load_catalog())}.pt"


def build_feature_cache(encoder=None, path: Path | None = None, progress: bool = True,
                        catalog: dict[str, Media] | None = None) -> FeatureCache:
    """Encode every media item of ``catalog`` (default: media.json) once with the frozen encoder and
    save the cache (or load it if present)."""
    catalog = catalog or load_catalog()
    path = Path(path) if path else default_cache_path(catalog=catalog)
    if path.is_file():
        data = torch.load(path, weights_only=False)
        if data.get("catalog_hash") == catalog_hash(catalog):
            return FeatureCache(data["features"], data["probs"], data["encoder"], data["catalog_hash"])
    if encoder is None:
        from vrex.models.encoders import load_encoder

        encoder = load_encoder()
    if not hasattr(encoder, "classify"):
        raise ValueError("the feature cache needs an encoder with ImageNet classify() (EfficientNet-Lite0)")
    from tqdm import tqdm

    feats, probs = {}, {}
    for name in tqdm(sorted(catalog), desc="encoding media", disable=not progress):
        frames = media_frames(catalog[name])
        f, p = [], []
        for i in range(0, len(frames), 16):
            batch = frames[i:i + 16]
            f.append(encoder(batch).to(torch.float16))
            p.append(encoder.classify(batch).to(torch.float16))
        feats[name], probs[name] = torch.cat(f), torch.cat(p)
    cache = FeatureCache(feats, probs, encoder.name, catalog_hash(catalog))
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename: parallel builders (test workers) never read a half-written file.
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"features": feats, "probs": probs, "encoder": encoder.name, "catalog_hash": cache.catalog_hash}, tmp)
    os.replace(tmp, path)
    return cache
