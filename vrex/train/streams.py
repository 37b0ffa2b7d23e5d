"""Synthetic LIVE dialogues over real media: multi-segment narration streams and needle streams.

A stream is a list of ``Step``s (one frame each, 2 FPS) made of segments of real media (a clip
window at its own speed, or a pan/zoom move over a still). Dialogue, in the LIVE format:

* narration: at every segment change the model speaks the segment's label ("A cockatoo."), every
  other frame is silent (streaming EOS);
* questions at frames that are not segment changes (at most 3 per stream, as in VideoLLM-online):
  about the present ("What is shown now?"), the past ("What was shown before a cat?") and
  occurrence ("Did you see a horse?" -> "Yes." / "No.");
* needle streams: a haystack of one subject with one short segment of another subject, and at
  the last frame the question ``NEEDLE_QUESTION`` whose answer is the needle's label.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from vrex.models.tags import imagenet_names, imagenet_phrase
from vrex.train.data import FPS, FeatureCache, Media
from vrex.train.layout import Step, Turn

PRESENT_QUESTIONS = ["What is shown now?", "What do you see now?"]
NEEDLE_QUESTION = "What appeared briefly in the stream?"


def sentence(label: str) -> str:
    return label[0].upper() + label[1:] + "."


@dataclass
class Segment:
    media: str
    start: int  # first step index
    end: int  # one past the last step index
    label: str | None = None  # what the dialogue calls it (None: the maker's label of the media)


@dataclass
class Stream:
    steps: list[Step]
    segments: list[Segment]
    kind: str  # "narration" or "needle"
    needle: str | None = None

    @property
    def duration(self) -> float:
        return len(self.steps) / FPS


class StreamMaker:
    """Draws streams from the cached media of one split (train or heldout)."""

    def __init__(self, cache: FeatureCache, catalog: dict[str, Media], names: list[str], labels: str = "hand",
                 tag_min_prob: float = 0.5, random_tag_prob: float = 0.0):
        """``labels``: "hand" (media.json's label; ImageNet top-1 where it has none) or "imagenet":
        streams that teach a model with tag tokens (``vrex.models.tags``) to read them. A subject
        whose smoothed ImageNet top-1 reaches ``tag_min_prob`` (the probability at which its frames
        show the tag) is named by it ("A macaw."), the others keep their hand label; and a
        ``random_tag_prob`` fraction of segments shows a random ImageNet class in its tag tokens and
        is named by it, so the name can only come from copying the tag."""
        if labels not in ("hand", "imagenet"):
            raise ValueError(f"labels must be 'hand' or 'imagenet', got {labels!r}")
        self.cache, self.catalog, self.names, self.labels = cache, catalog, sorted(names), labels
        self.tag_min_prob, self.random_tag_prob = tag_min_prob, random_tag_prob
        if len(self.names) < 2:
            raise ValueError("need at least two media items to build streams")
        self.all_labels = sorted({self.label(n) for n in catalog})

    def label(self, name: str) -> str:
        media = self.catalog[name]
        if self.labels == "imagenet" or not media.label:
            top1, prob = self.cache.smoothed_top1(name)
            if prob >= self.tag_min_prob or not media.label:
                return imagenet_phrase(top1)
        return media.label

    def segment_frames(self, rng: random.Random, name: str, n: int) -> list[int]:
        """``n`` consecutive frame indices of a media item (ping-pong when it is shorter than ``n``).
        Stills: frames of one pan/zoom trajectory."""
        total = int(self.cache.features[name].shape[0])
        media = self.catalog[name]
        if media.kind == "image":
            from vrex.train.data import STILL_TRAJECTORIES, STILL_VIEWS

            traj = rng.randrange(STILL_TRAJECTORIES)
            base, span = traj * STILL_VIEWS, STILL_VIEWS
        else:
            base, span = 0, total
        if span == 1:
            return [base] * n
        cycle = list(range(span)) + list(range(span - 2, 0, -1))  # ping-pong
        start = rng.randrange(len(cycle)) if span > n else rng.randrange(span)
        return [base + cycle[(start + i) % len(cycle)] for i in range(n)]

    def _pick(self, rng: random.Random, exclude_labels: set[str]) -> str:
        choices = [n for n in self.names if self.label(n) not in exclude_labels]
        return rng.choice(choices)

    def _append(self, steps: list[Step], segments: list[Segment], rng: random.Random, name: str, n: int, narrate: bool = True,
                random_tag: bool = True) -> None:
        start = len(steps)
        label, tag = self.label(name), None
        if random_tag and self.random_tag_prob and rng.random() < self.random_tag_prob:
            tag = rng.randrange(len(imagenet_names()))
            label = imagenet_phrase(imagenet_names()[tag])
        for i, f in enumerate(self.segment_frames(rng, name, n)):
            steps.append(Step(name, f, (start + i) / FPS, tag=tag))
        if narrate:
            steps[start].turns.append(Turn(sentence(label)))
        segments.append(Segment(name, start, len(steps), label))

    def narration_stream(self, rng: random.Random, n_segments: tuple[int, int] = (2, 4), seg_len: tuple[int, int] = (3, 7),
                         max_questions: int = 3, question_prob: float = 0.6) -> Stream:
        steps: list[Step] = []
        segments: list[Segment] = []
        prev: set[str] = set()
        for _ in range(rng.randint(*n_segments)):
            name = self._pick(rng, prev)
            self._append(steps, segments, rng, name, rng.randint(*seg_len))
            prev = {self.label(name)}
        stream = Stream(steps, segments, "narration")
        for _ in range(max_questions):
            if rng.random() < question_prob:
                self._add_question(rng, stream)
        return stream

    def _add_question(self, rng: random.Random, stream: Stream) -> None:
        seg_of = {}
        for k, seg in enumerate(stream.segments):
            for i in range(seg.start, seg.end):
                seg_of[i] = k
        free = [i for i, s in enumerate(stream.steps) if not s.turns]
        if not free:
            return
        i = rng.choice(free)
        k = seg_of[i]
        seen = [stream.segments[j].label or self.label(stream.segments[j].media) for j in range(k + 1)]
        kind = rng.choice(["present", "before", "seen"]) if k > 0 else rng.choice(["present", "seen"])
        if kind == "present":
            turn = Turn(sentence(seen[-1]), rng.choice(PRESENT_QUESTIONS))
        elif kind == "before":
            j = rng.randint(1, k)
            if seen[j] in seen[:j]:  # ambiguous reference: ask about the present instead
                turn = Turn(sentence(seen[-1]), rng.choice(PRESENT_QUESTIONS))
            else:
                turn = Turn(sentence(seen[j - 1]), f"What was shown before {seen[j]}?")
        else:
            if rng.random() < 0.5:
                turn = Turn("Yes.", f"Did you see {rng.choice(seen)}?")
            else:
                unseen = [x for x in self.all_labels if x not in seen]
                turn = Turn("No.", f"Did you see {rng.choice(unseen)}?")
        stream.steps[i].turns.append(turn)

    def needle_stream(self, rng: random.Random, n_frames: int, needle_len: tuple[int, int] = (2, 4),
                      haystack: str | None = None, needle: str | None = None, position: float | None = None,
                      narrate: bool = True) -> Stream:
        """``n_frames`` of one haystack subject with a short needle of another subject inside it
        (at relative ``position``, default random in [0.1, 0.8]); the needle question at the last frame.
        ``narrate=False``: a silent haystack (no narration, no gate labels), the layout that
        ``StreamingSession.fast_forward`` produces; the evaluation feeds needle streams that way."""
        haystack = haystack or rng.choice(self.names)
        needle = needle or self._pick(rng, {self.label(haystack)})
        k = rng.randint(*needle_len)
        pos = position if position is not None else rng.uniform(0.1, 0.8)
        before = max(1, min(n_frames - k - 2, int(round(pos * (n_frames - k)))))
        steps: list[Step] = []
        segments: list[Segment] = []
        self._append(steps, segments, rng, haystack, before, narrate, random_tag=False)
        self._append(steps, segments, rng, needle, k, narrate)
        self._append(steps, segments, rng, haystack, n_frames - k - before, narrate, random_tag=False)
        if not narrate:
            for s in steps:
                s.gate = False
        steps[-1].turns = [Turn(sentence(segments[1].label or self.label(needle)), NEEDLE_QUESTION)]
        return Stream(steps, segments, "needle" if narrate else "needle-silent", needle=needle)
