"""ImageNet tag tokens: the frozen encoder's own top-1 class name, appended to each frame as text.

Why: a connector trained on a few dozen subjects can only teach the LM the names it was trained
on; a held-out chickadee is then "a cat". EfficientNet-Lite0 already knows 1000 ImageNet classes,
and its classifier reads exactly the frame's global token (the pooled feature map). So each frame
carries, after its visual tokens, the ``k`` LM token embeddings of its top-1 class name (``"
chickadee"``), padded with a learned vector (``Connector.tag_pad``) when the name is shorter and
cut when longer. The LM reads them as ordinary text and can copy a name it was never trained on:
LIVE training with ``--tag-label-fraction`` teaches it to narrate and answer with these names.

A frame whose top-1 probability is below ``min_prob`` (default 0.5: the classifier is more likely
right than wrong) gets pad vectors only, "no tag": on video that ImageNet does not cover (a
cartoon meadow, a street scene) its top-1 is a guess ("lakeside", "pole") that would mislead.

The tag head is frozen and derived from the encoder and the LM, so it is not stored in weight
files; a connector file records ``tag_tokens`` in its metadata and the loader rebuilds the head
(``equip_tags``). Class names: ``imagenet_labels.txt`` (google-coral test_data, Apache-2.0; first
synonym of each class).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch
from torch import nn

LABELS_FILE = Path(__file__).with_name("imagenet_labels.txt")


@cache  # read once: stream drawing asks for names on every label
def imagenet_names() -> tuple[str, ...]:
    """The 1000 ImageNet class names, first synonym only (the file starts with 'background')."""
    lines = LABELS_FILE.read_text().splitlines()
    return tuple(line.split(",")[0].strip() for line in lines[1:1001])


def imagenet_phrase(name: str) -> str:
    """A class name as a narration label: 'a chickadee', 'an Egyptian cat'."""
    return ("an " if name[:1].lower() in "aeiou" else "a ") + name


class ImageNetTags(nn.Module):
    """Frozen: global visual feature -> top-1 ImageNet class -> its name's ``k`` token embeddings.

    ``forward(global_features [n, d_vis]) -> (embeddings [n, k, d_lm], valid [n, k])``; positions
    past the name's length, and every position of a frame below ``min_prob``, are not valid (the
    connector fills them with its pad vector)."""

    def __init__(self, classifier: nn.Linear, name_embeddings: torch.Tensor, name_lengths: torch.Tensor, min_prob: float = 0.5):
        super().__init__()
        self.min_prob = float(min_prob)
        # buffers, not parameters, and not persistent: derived from the encoder and the LM at load time
        self.register_buffer("weight", classifier.weight.detach().clone(), persistent=False)
        self.register_buffer("bias", classifier.bias.detach().clone(), persistent=False)
        self.register_buffer("names", name_embeddings.detach().clone(), persistent=False)
        self.register_buffer("lengths", name_lengths.clone(), persistent=False)
        self.k = int(name_embeddings.shape[1])

    def top1(self, global_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[n] class indices and [n] probabilities: the encoder's ImageNet top-1 for these global features."""
        probs = (global_features.to(self.weight) @ self.weight.T + self.bias).softmax(-1)
        p, cls = probs.max(-1)
        return cls, p

    def forward(self, global_features: torch.Tensor, classes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``classes`` [n] (optional): show these classes instead where >= 0 (training augmentation:
        a random name the answer must copy, ``vrex.train.streams``)."""
        cls, p = self.top1(global_features)
        shown = p >= self.min_prob
        if classes is not None:
            forced = classes.to(cls.device) >= 0
            cls, shown = torch.where(forced, classes.to(cls.device), cls), shown | forced
        valid = torch.arange(self.k, device=cls.device)[None, :] < self.lengths[cls][:, None]
        return self.names[cls], valid & shown[:, None]


def build_imagenet_tags(encoder: nn.Module, lm: nn.Module, tokenizer, k: int, min_prob: float = 0.5) -> ImageNetTags:
    """The tag head for a frame encoder with an ImageNet classifier on its global token
    (EfficientNet-Lite0) and an LM/tokenizer pair."""
    backbone = getattr(encoder, "backbone", None)
    classifier = getattr(backbone, "classifier", None)
    if not isinstance(classifier, nn.Linear) or classifier.out_features != 1000:
        raise ValueError(f"ImageNet tag tokens need a frame encoder with a 1000-class ImageNet classifier on its global "
                         f"token (efficientnet-lite0); encoder '{getattr(encoder, 'name', encoder)}' has none")
    if k < 1:
        raise ValueError(f"tag tokens: k must be >= 1, got {k}")
    table = lm.get_input_embeddings().weight.detach()
    ids = torch.zeros(1000, k, dtype=torch.long)
    lengths = torch.zeros(1000, dtype=torch.long)
    for c, name in enumerate(imagenet_names()):
        # leading space: the tokens the name has inside a sentence ("A chickadee.")
        toks = tokenizer(" " + name, add_special_tokens=False)["input_ids"][:k]
        ids[c, :len(toks)] = torch.tensor(toks)
        lengths[c] = len(toks)
    return ImageNetTags(classifier, table[ids.to(table.device)], lengths.to(table.device), min_prob)


def equip_tags(model, k: int, min_prob: float | None = None) -> None:
    """Give ``model.connector`` ``k`` tag tokens per frame (a new, zero pad vector if it had none)
    and attach the tag head built from ``model``'s encoder, LM and tokenizer. ``min_prob``: None
    keeps the connector's (from its weight file, default 0.5)."""
    model.connector.set_tag_tokens(k, min_prob)
    if k:
        model.connector.tags = build_imagenet_tags(model.encoder, model.lm, model.tokenizer, k,
                                                   model.connector.tag_min_prob).to(model.connector.fc2.weight.device)
