"""Timestamps put back in presentation order, on plain numbers (no media needed)."""

from __future__ import annotations

from fractions import Fraction

import pytest

from vrex.io.timeline import REORDER_DEPTH, Timeline

PERIOD = Fraction(1, 25)


def run(stamps, reorder=True, period=PERIOD):
    line = Timeline(period)
    out = []
    for i, s in enumerate(stamps):
        out += line.push(i, None if s is None else s * period, reorder)
    return out + line.drain()


def test_permuted_stamps_are_sorted_and_pictures_keep_their_order():
    # What FFmpeg attaches to the frames of a packed-B-frame AVI, in decoder output order.
    got = run([1, 2, 3, 5, 4, 6, 8, 7, 9, 11, 10, 12])
    assert [item for _, item in got] == list(range(12))  # pictures: the decoder's order
    assert [t for t, _ in got] == pytest.approx([k / 25 for k in range(12)])  # times: sorted, from 0


def test_right_stamps_pass_unchanged_and_without_delay_when_the_decoder_does_not_reorder():
    line = Timeline(PERIOD)
    assert line.push("a", Fraction(3), reorder=False) == [(0.0, "a")]  # out at once: no latency
    assert line.push("b", Fraction(7, 2), reorder=False) == [(0.5, "b")]
    held = Timeline(PERIOD)
    assert all(held.push(i, i * PERIOD, reorder=True) == [] for i in range(REORDER_DEPTH))
    assert held.push(9, 9 * PERIOD, reorder=True) == [(0.0, 0)]


def test_missing_stamps_take_the_next_slot():
    got = run([None, None, None])  # raw streams: counted at the declared rate
    assert [t for t, _ in got] == pytest.approx([0.0, 0.04, 0.08])
    got = run([0, 1, 2, None])  # a decoder's last flushed frame without a timestamp
    assert [t for t, _ in got] == pytest.approx([0.0, 0.04, 0.08, 0.12])


def test_rebase_continues_a_new_timestamp_space():
    line = Timeline(PERIOD)
    first = line.push("a", Fraction(100), False) + line.push("b", Fraction(101), False)
    line.rebase(line.last + 2.5)  # re-opened live stream: 2.5 s lost
    second = line.push("c", Fraction(7), False) + line.push("d", Fraction(8), False)
    assert [t for t, _ in first + second] == pytest.approx([0.0, 1.0, 3.5, 4.5])
