"""llama.cpp as a peer (`python -m vrex.bench.peer`): the timed steps are real steps on the same weights.

llama-cpp-python is an optional extra (`make bench-peer` builds it from source, several minutes on 2
cores); it is not part of `make setup`, so these tests skip without it, under CI too.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is an optional extra (make bench-peer builds it); not installed")

from vrex.bench.peer import FRAME_TOKENS, Peer, f16_gguf, measure_sizes, real_tokens, run_peer_bench  # noqa: E402
from vrex.models.weights import smollm2_gguf  # noqa: E402

CACHED = 200


@pytest.fixture(scope="module")
def peer():
    with Peer(smollm2_gguf(), n_ctx=512, threads=2) as p:
        yield p


@pytest.fixture(scope="module")
def peer_f16():
    with Peer(f16_gguf(), n_ctx=512, threads=2) as p:
        yield p


# llama.cpp's Q4_1 matmuls quantize activations to 8 bits, so a tiny change upstream (another batch shape,
# RoPE applied in another order) moves logits by up to ~0.6 here; with F16 weights by ~0.03.
TOLERANCE = {"Q4_1": 1.0, "F16": 0.1}


@pytest.mark.parametrize("weights", ["Q4_1", "F16"])
def test_restored_cache_steps_are_real_steps(weights, request):
    """After the timed repetitions (each one removed again), a 12-token prefill + 1-token decode on the cache gives
    bit for bit the logits of the same steps on a cache that was never restored, and llama.cpp's own logits for
    the same tokens computed in one pass from an empty cache (within its kernels' batch-shape rounding)."""
    peer = request.getfixturevalue("peer" if weights == "Q4_1" else "peer_f16")
    ids = real_tokens(peer, CACHED + FRAME_TOKENS + 1)

    def step_logits() -> np.ndarray:
        peer.decode(ids[CACHED:CACHED + FRAME_TOKENS])
        peer.decode(ids[-1:])
        return peer.logits()

    peer.clear()
    (row,) = measure_sizes(peer, [CACHED], reps=3)
    assert peer.n_past == CACHED  # every timed step was removed again
    assert len(row["prefill12_ms_all"]) == len(row["decode_ms_all"]) == 3
    assert row["prefill12_ms"] > 0 and row["decode_ms"] > 0
    restored = step_logits()
    peer.clear()
    peer.decode(ids[:CACHED])
    never = step_logits()
    assert np.array_equal(restored, never)
    peer.decode(ids[CACHED:])  # control: the same 13 tokens on a cache whose previous step was NOT removed
    stale = peer.logits()
    peer.clear()
    peer.decode(ids)
    scratch = peer.logits()
    err = np.abs(restored - scratch).max()
    assert restored.argmax() == scratch.argmax() and err < TOLERANCE[weights], err
    assert np.abs(stale - scratch).max() > 3 * err


@pytest.mark.parametrize("flash_attn", [False, True])  # V is stored transposed without flash attention
def test_tiled_fill_equals_the_block_prefilled_again_at_its_positions(flash_attn):
    """fill_tiled's copies (saved K/V moved by llama.cpp's K-shift) are what decoding the block again, attending
    to itself only, at those positions gives: the next step's logits agree; a cache filled otherwise does not."""
    with Peer(f16_gguf(), n_ctx=512, threads=2, flash_attn=flash_attn) as peer:
        tiled, apart, joined = _tiled_apart_joined(peer, block=96, tail=40)
    err = np.abs(tiled - apart).max()  # ~0.02: K rotated after storing in f16 vs rotated before
    assert tiled.argmax() == apart.argmax() and err < TOLERANCE["F16"], err
    assert np.abs(joined - apart).max() > 10 * max(err, 0.01)  # ~2.2


def _tiled_apart_joined(peer: Peer, block: int, tail: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits of one step after filling 2 blocks + tail three ways: fill_tiled, copies prefilled apart, one prefill."""
    ids = real_tokens(peer, block)
    step = real_tokens(peer, 300)[200:200 + FRAME_TOKENS + 1]

    def step_logits() -> np.ndarray:
        peer.decode(step[:FRAME_TOKENS])
        peer.decode(step[FRAME_TOKENS:])
        return peer.logits()

    peer.clear()
    peer.fill_tiled(ids * 3, 2 * block + tail, block)
    assert peer.n_past == 2 * block + tail
    tiled = step_logits()
    peer.clear()
    peer.decode(ids)
    for n in (block, tail):  # each copy prefilled for real in the scratch sequence, then merged
        peer.decode(ids[:n], seq=1)
        peer.merge_scratch(n)
    apart = step_logits()
    peer.clear()
    peer.decode(ids + ids + ids[:tail])  # control: one contiguous prefill (copies attend to earlier ones)
    joined = step_logits()
    return tiled, apart, joined


def test_tiled_fill_without_room_for_a_block_says_so(peer):
    peer.clear()
    with pytest.raises(ValueError, match="needs n_ctx >= 576"):
        peer.fill_tiled(real_tokens(peer, 600), 600, 192)  # 3 copies fit in n_ctx 512, the 4th block does not


def test_f16_gguf_is_the_same_model(peer, peer_f16):
    """The F16 file (Q4_1 dequantised by llama.cpp) predicts like the Q4_1 one: same argmax, close logits."""
    assert f16_gguf().stat().st_size > 2.5 * smollm2_gguf().stat().st_size  # 16 bits per weight against ~5
    ids = real_tokens(peer, 64)
    logits = []
    for p in (peer, peer_f16):
        p.clear()
        p.decode(ids)
        logits.append(p.logits())
    q4, half = logits
    assert half.argmax() == q4.argmax()
    assert np.corrcoef(half, q4)[0, 1] > 0.999


def test_run_writes_rows(tmp_path):
    rows = run_peer_bench([128, 64], out=tmp_path, threads=2, weights=("Q4_1",), reps=2, flash_attn=(False, True),
                          fill_block=96, log=lambda s: None)
    assert [(r["flash_attn"], r["cached_tokens"], r["fill"]) for r in rows] == [
        (False, 64, "prefill"), (False, 128, "prefill 96 + copies"), (True, 64, "prefill"), (True, 128, "prefill 96 + copies")]
    saved = json.loads((tmp_path / "peer.json").read_text())
    for row in saved["rows"]:
        assert row["system"] == "llama.cpp" and row["threads"] == 2
        assert row["prefill12_ms"] > 0 and row["decode_ms"] > 0
    assert saved["setup"]["Q4_1"]["rope"] == "trained"  # 141 positions stay within SmolLM2's 8192
