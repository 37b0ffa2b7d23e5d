"""How often an ImageNet tag names the frame's subject, per tag rule and threshold (``vrex eval tags``).

A tag token (``vrex.models.tags``) helps only when the class name it shows is the subject: the
stage-5 model learned to copy the name it is shown, a wrong one as readily as a right one. This
module counts, per media split, rule and probability threshold, the frames whose tag names the
subject (the narration-accuracy keyword rule, ``names_subject``), the frames that show a wrong
name, and how many subjects get at least one right or wrong tag.

Choose a rule on the ``train`` split, not on ``heldout``: the frozen ImageNet classifier never saw
either, so for the tag head the training media are unseen too and serve as its validation set,
while choosing on the held-out media would tune on the test set.

Rules:

* ``global`` (the shipped one): the top-1 class of the whole frame's pooled feature.
* ``region``: the most confident top-1 over the frame's grid cells, the same linear classifier on
  each cell's pooled feature (class-activation style), which might name a subject that fills only
  part of the frame (a hat, a face).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from vrex.models.tags import imagenet_names
from vrex.train.data import FeatureCache, Media, split_names
from vrex.train.metrics import names_subject

RULES = ("global", "region")


def tag_choice(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, rule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[n] classes and [n] probabilities that ``rule`` picks for frames of ``features`` [n, 1 + g*g, d]
    (global token first, as the encoders emit them); ``weight``/``bias``: the 1000-class classifier."""
    if rule not in RULES:
        raise ValueError(f"tag rule must be one of {RULES}, got '{rule}'")
    if features.dim() != 3 or features.shape[-1] != weight.shape[1]:
        raise ValueError(f"features must be [frames, tokens, {weight.shape[1]}], got {list(features.shape)}")
    tokens = features[:, :1] if rule == "global" else features[:, 1:]
    if tokens.shape[1] == 0:
        raise ValueError("the region rule needs grid tokens; these features carry only the global token")
    probs = (tokens.float() @ weight.float().T + bias.float()).softmax(-1)  # [n, t, 1000]
    p, cls = probs.max(-1)  # [n, t]
    best = p.argmax(-1, keepdim=True)  # the most confident token of each frame
    return cls.gather(1, best)[:, 0], p.gather(1, best)[:, 0]


@dataclass
class TagRuleRow:
    split: str
    rule: str
    threshold: float
    frames: int
    right: int  # frames tagged with a name of the subject
    wrong: int  # frames tagged with another name
    subjects: int
    subjects_right: int  # subjects with at least one right tag
    subjects_wrong: int  # subjects with at least one wrong tag

    @property
    def precision(self) -> float:
        """Of the frames that show a tag, the share that names the subject (0 when none shows one)."""
        return self.right / (self.right + self.wrong) if self.right + self.wrong else 0.0

    def as_dict(self) -> dict:
        return asdict(self) | {"precision": round(self.precision, 4)}


def tag_rule_table(cache: FeatureCache, catalog: dict[str, Media], weight: torch.Tensor, bias: torch.Tensor,
                   thresholds: list[float], rules: tuple[str, ...] = RULES, splits: tuple[str, ...] = ("train", "heldout")) -> list[TagRuleRow]:
    """One row per (split, rule, threshold) over every frame of the cached media of each split."""

    names = imagenet_names()
    rows = []
    for split in splits:
        media = split_names(catalog, split)
        if not media:
            raise ValueError(f"no media in split '{split}' of the catalog")
        cache.check_covers(media)
        for rule in rules:
            picks = {n: tag_choice(cache.features[n], weight, bias, rule) for n in media}
            for th in thresholds:
                frames = right = wrong = s_right = s_wrong = 0
                for n in media:
                    cls, p = picks[n]
                    shown = cls[p >= th].tolist()
                    ok = sum(names_subject(names[c], catalog[n].keywords) for c in shown)
                    frames += len(cls)
                    right, wrong = right + ok, wrong + len(shown) - ok
                    s_right, s_wrong = s_right + (ok > 0), s_wrong + (len(shown) - ok > 0)
                rows.append(TagRuleRow(split, rule, float(th), frames, right, wrong, len(media), s_right, s_wrong))
    return rows


def plot_tag_rules(rows: list[TagRuleRow], path, shipped: float | None = 0.5) -> None:
    """Right and wrong tagged frames (shares of all frames) against the threshold, one panel per split;
    ``shipped``: the threshold of the shipped models (``ImageNetTags.min_prob``), marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = list(dict.fromkeys(r.split for r in rows))
    fig, axes = plt.subplots(1, len(splits), figsize=(5 * len(splits), 3.8), sharey=True, squeeze=False)
    for ax, split in zip(axes[0], splits):
        for k, rule in enumerate(dict.fromkeys(r.rule for r in rows)):
            rr = sorted((r for r in rows if r.split == split and r.rule == rule), key=lambda r: r.threshold)
            th = [r.threshold for r in rr]
            ax.plot(th, [r.right / r.frames for r in rr], marker="o", color=f"C{k}", label=f"{rule}: right name")
            ax.plot(th, [r.wrong / r.frames for r in rr], marker="x", ls="--", color=f"C{k}", label=f"{rule}: wrong name")
        if shipped is not None:
            ax.axvline(shipped, color="grey", ls=":", lw=1)
        n_media = next(r.subjects for r in rows if r.split == split)
        ax.set(title=f"{split} media ({n_media} subjects)", xlabel="tag threshold (top-1 probability)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("share of frames")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
