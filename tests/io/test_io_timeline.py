"""Timestamps put back in presentation order, on plain numbers (no media needed)."""

from __future__ import annotations

from fractions import Fraction

import pytest

from vrex.io.timeline import REORDER_DEPTH, Timeline

PERIOD = Fraction(1, 25)


def run(stamps, reorder=True, period=PERIOD, decode_order=False):
    line = Timeline(period, decode_order=decode_order)
    out = []
    for i, s in enumerate(stamps):
        out += line.push(i, None if s is None else s * period, reorder)
    return out + line.drain()


def test_permuted_stamps_are_sorted_and_pictures_keep_their_order():
    # What FFmpeg attaches to the frames of a packed-B-frame AVI, in decoder output order.
    got = run([1, 2, 3, 5, 4, 6, 8, 7, 9, 11, 10, 12], decode_order=True)
    assert [item for _, item in got] == list(range(12))  # pictures: the decoder's order
    assert [t for t, _ in got] == pytest.approx([k / 25 for k in range(12)])  # times: sorted, from 0


# What a damaged chaplin.mp4 gives (in frame periods): past the dropped packets, the decoder emits the
# frame at 13 after the one at 44. MP4 stores presentation times: the stamps are right, the order is not.
LATE = [0, 1, 12, 44, 13, 45, 46, 47, 48, 49]


def test_a_late_frame_keeps_its_own_stamp_when_the_container_stores_presentation_times():
    got = run(LATE)
    # Each picture leaves with its own stamp, put back in its place (it was within the window).
    assert [(round(t * 25), LATE[item]) for t, item in got] == [(s, s) for s in sorted(LATE)]
    assert [item for _, item in got] == [0, 1, 2, 4, 3, 5, 6, 7, 8, 9]


def test_a_frame_later_than_the_window_keeps_its_stamp_and_leaves_late():
    assert REORDER_DEPTH == 4
    stamps = [0, 2, 3, 4, 5, 6, 7, 1, 8, 9]  # 1 comes 6 places late: 0, 2 and 3 have left by then
    got = run(stamps)
    assert all(round(t * 25) == stamps[item] for t, item in got)  # never another picture's time
    assert [round(t * 25) for t, _ in got] == [0, 2, 3, 1, 4, 5, 6, 7, 8, 9]  # the source drops 1 (goes back)


def test_decode_order_stamps_are_still_sorted_under_the_pictures():
    # The same stamps from an AVI (decode-order guesses): times sorted, pictures in the decoder's order.
    got = run(LATE, decode_order=True)
    assert [item for _, item in got] == list(range(len(LATE)))
    assert [round(t * 25) for t, _ in got] == sorted(LATE)


def test_without_reordering_every_item_keeps_its_stamp_and_its_place():
    for decode_order in (False, True):
        got = run(LATE, reorder=False, decode_order=decode_order)
        assert [(round(t * 25), item) for t, item in got] == [(s, i) for i, s in enumerate(LATE)]


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
