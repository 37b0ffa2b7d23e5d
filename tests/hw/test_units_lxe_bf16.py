"""BF16 rounding and the LXE's hashing/scoring vs the software (vrex.resv.hashing)."""

from __future__ import annotations

import struct

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vrex.hw.bf16 import bf16_bits, from_bf16_bits, is_bf16, round_bf16_bits, to_bf16
from vrex.hw.lxe import lxe_hash_codes, lxe_scores, mac_tree_dot
from vrex.resv.hashing import hash_codes


@settings(max_examples=500, deadline=None)
@given(st.integers(0, 0xFFFFFFFF))
def test_bf16_rounding_matches_the_integer_rule(bits):
    x = struct.unpack("<f", struct.pack("<I", bits))[0]
    got = int(bf16_bits(torch.tensor([x], dtype=torch.float32))[0])
    want = round_bf16_bits(bits)
    if x != x:  # NaN: any quiet NaN pattern is fine
        assert (got & 0x7F80) == 0x7F80 and (got & 0x7F)
    else:
        assert got == want
        assert float(from_bf16_bits(torch.tensor([want]))[0]) == float(to_bf16(torch.tensor([x]))[0])


def test_bf16_ties_round_to_even_and_products_are_exact():
    one_plus_half_ulp = 1.0 + 2.0**-8  # exactly halfway between 1 and 1 + 2^-7
    assert float(to_bf16(torch.tensor([one_plus_half_ulp]))[0]) == 1.0
    assert float(to_bf16(torch.tensor([1.0 + 3 * 2.0**-8]))[0]) == 1.0 + 2.0**-6
    a = to_bf16(torch.randn(1000))
    b = to_bf16(torch.randn(1000))
    assert torch.equal((a * b).double(), a.double() * b.double())  # BF16 x BF16 exact in float32
    assert is_bf16(a) and not is_bf16(torch.tensor([0.1]))


@settings(max_examples=100, deadline=None)
@given(
    H=st.integers(1, 3), T=st.integers(1, 6), D=st.sampled_from([8, 64, 100, 128]),
    nhp=st.sampled_from([8, 13, 32]), seed=st.integers(0, 2**16),
)
def test_lxe_hash_equals_software_on_bf16_integer_inputs(H, T, D, nhp, seed):
    """Small-integer keys and planes: every sum is exact in float32, so the codes must be identical."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randint(-8, 9, (H, T, D), generator=g).float()
    planes = torch.randint(-8, 9, (H, D, nhp), generator=g).float()
    assert torch.equal(lxe_hash_codes(keys, planes), hash_codes(keys, planes))


def test_lxe_hash_flip_rate_with_float_planes_is_small():
    """Float32 planes rounded to BF16 flip only near-zero projections (a few % of bits at most)."""
    g = torch.Generator().manual_seed(0)
    keys = to_bf16(torch.randn(8, 64, 128, generator=g))
    planes = torch.randn(8, 128, 32, generator=g)
    sw = hash_codes(keys, planes)
    hw = lxe_hash_codes(keys, planes)
    flips = int((torch.bitwise_xor(sw, hw).to(torch.int64).view(-1, 1) >> torch.arange(8) & 1).sum())
    assert flips / (8 * 64 * 32) < 0.02


def test_mac_tree_is_a_balanced_float32_tree():
    # 1 + 2^-24 + ... : a sequential float32 sum loses the small terms, the tree keeps pairs of them
    a = torch.zeros(64)
    a[0], a[1:] = 1.0, 2.0**-24
    tree = float(mac_tree_dot(a, torch.ones(64)))
    seq = torch.tensor(0.0)
    for v in a:
        seq = seq + v
    assert tree > float(seq) == 1.0
    s = lxe_scores(torch.randn(3, 128), torch.randn(5, 128))
    assert s.shape == (3, 5) and is_bf16(s)
