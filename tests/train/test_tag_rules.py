"""`vrex eval tags`: the tag-rule table counts what the shipped tag head shows, on the real media."""

from __future__ import annotations

import pytest
import torch

from vrex.train.tag_rules import RULES, plot_tag_rules, tag_choice, tag_rule_table


@pytest.fixture(scope="module")
def classifier():
    from vrex.models.encoders import load_encoder

    head = load_encoder().backbone.classifier
    return head.weight.detach(), head.bias.detach()


def test_global_rule_is_the_shipped_tag_head(cache, classifier):
    """At the shipped threshold the global rule shows a name on exactly the frames, and with exactly the
    class, that the model's tag head (ImageNetTags) shows."""
    from vrex.models.tags import ImageNetTags

    weight, bias = classifier
    head = ImageNetTags(torch.nn.Linear(weight.shape[1], 1000), torch.zeros(1000, 2, 4), torch.full((1000,), 2))
    head.weight.copy_(weight)
    head.bias.copy_(bias)
    for name in ("bird", "pets", "grace_hopper"):
        feats = cache.features[name]
        _, valid = head(feats[:, 0].float())
        head_cls, _ = head.top1(feats[:, 0].float())
        cls, p = tag_choice(feats, weight, bias, "global")
        shown = p >= head.min_prob
        assert torch.equal(shown, valid.any(-1))
        assert torch.equal(cls[shown], head_cls[shown])


def test_region_rule_finds_a_class_that_fills_one_cell():
    torch.manual_seed(0)
    weight, bias = torch.randn(1000, 16) * 0.1, torch.zeros(1000)
    feats = torch.randn(3, 10, 16) * 0.01  # 3 frames, global + 3x3 grid, no class stands out
    feats[1, 5] = weight[7] * 200  # one cell of frame 1 is class 7
    cls, p = tag_choice(feats, weight, bias, "region")
    assert int(cls[1]) == 7 and float(p[1]) > 0.9 and float(p[0]) < 0.1
    gcls, gp = tag_choice(feats, weight, bias, "global")
    assert float(gp[1]) < 0.1  # the whole frame does not show it
    with pytest.raises(ValueError, match="grid tokens"):
        tag_choice(feats[:, :1], weight, bias, "region")
    with pytest.raises(ValueError, match="tag rule"):
        tag_choice(feats, weight, bias, "top5")


def test_table_counts_every_frame_and_falls_with_the_threshold(cache, catalog, classifier, tmp_path):
    from vrex.models.tags import imagenet_names
    from vrex.train.metrics import names_subject

    thresholds = [0.2, 0.5, 0.8]
    rows = tag_rule_table(cache, catalog, *classifier, thresholds)
    assert {(r.split, r.rule) for r in rows} == {(s, rule) for s in ("train", "heldout") for rule in RULES}
    for split in ("train", "heldout"):
        media = [n for n, m in catalog.items() if m.split == split]
        for rule in RULES:
            rr = [r for r in rows if r.split == split and r.rule == rule]
            assert [r.threshold for r in rr] == thresholds
            assert all(r.frames == sum(len(cache.features[n]) for n in media) and r.subjects == len(media) for r in rr)
            shown = [r.right + r.wrong for r in rr]
            assert shown == sorted(shown, reverse=True)  # a higher threshold shows fewer tags
    # one cell recounted by hand: held-out media, global rule, 0.5
    names, right, wrong = imagenet_names(), 0, 0
    for n, m in catalog.items():
        if m.split == "heldout":
            cls, p = tag_choice(cache.features[n], *classifier, "global")
            for c in cls[p >= 0.5].tolist():
                ok = names_subject(names[c], m.keywords)
                right, wrong = right + ok, wrong + (not ok)
    cell = next(r for r in rows if (r.split, r.rule, r.threshold) == ("heldout", "global", 0.5))
    assert (cell.right, cell.wrong) == (right, wrong) and right > 0  # the chickadee is named
    plot_tag_rules(rows, tmp_path / "tags.png")
    assert (tmp_path / "tags.png").stat().st_size > 10_000
