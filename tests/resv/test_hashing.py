import torch
from hypothesis import given, settings, strategies as st

from vrex.resv.hashing import (
    code_bytes, hamming, hamming_ref, hash_bits, hash_codes, make_hyperplanes, pack_bits, unpack_bits,
)


def test_bit_order_little_endian():
    bits = torch.zeros(32, dtype=torch.bool)
    bits[0] = True  # plane 0 -> byte 0, value 1
    bits[9] = True  # plane 9 -> byte 1, value 2
    bits[31] = True  # plane 31 -> byte 3, value 128
    code = pack_bits(bits)
    assert code.tolist() == [1, 2, 0, 128]
    assert int.from_bytes(bytes(code.tolist()), "little") == (1 << 0) | (1 << 9) | (1 << 31)


@settings(max_examples=30, deadline=None)
@given(n_hp=st.integers(1, 70), seed=st.integers(0, 1000))
def test_pack_unpack_roundtrip(n_hp, seed):
    g = torch.Generator().manual_seed(seed)
    bits = torch.rand(3, 5, n_hp, generator=g) > 0.5
    codes = pack_bits(bits)
    assert codes.dtype == torch.uint8 and codes.shape == (3, 5, code_bytes(n_hp))
    assert torch.equal(unpack_bits(codes, n_hp), bits)
    # padding bits are zero
    if n_hp % 8:
        assert int(codes[..., -1].max()) < (1 << (n_hp % 8))


def test_hash_sign_strict_and_shapes():
    planes = make_hyperplanes(2, 3, 8, 16, seed=1)
    assert planes.shape == (2, 3, 8, 16)
    keys = torch.randn(3, 7, 8)
    bits = hash_bits(keys, planes[0])
    assert torch.equal(bits, (torch.einsum("htd,hdp->htp", keys, planes[0]) > 0))
    assert not hash_bits(torch.zeros(3, 1, 8), planes[0]).any()  # 0 projection -> bit 0
    assert hash_codes(keys, planes[0]).shape == (3, 7, 2)


def test_hyperplane_sharing_and_seed():
    a = make_hyperplanes(2, 3, 4, 8, seed=5)
    assert torch.equal(a, make_hyperplanes(2, 3, 4, 8, seed=5))
    assert not torch.equal(a, make_hyperplanes(2, 3, 4, 8, seed=6))
    assert not torch.equal(a[0, 0], a[0, 1]) and not torch.equal(a[0, 0], a[1, 0])
    pl = make_hyperplanes(2, 3, 4, 8, sharing="per_layer")
    assert torch.equal(pl[0, 0], pl[0, 2]) and not torch.equal(pl[0, 0], pl[1, 0])
    gl = make_hyperplanes(2, 3, 4, 8, sharing="global")
    assert torch.equal(gl[0, 0], gl[1, 2])


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000))
def test_hamming_matches_reference(seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 256, (4, 5), generator=g, dtype=torch.int64).to(torch.uint8)
    b = torch.randint(0, 256, (6, 5), generator=g, dtype=torch.int64).to(torch.uint8)
    d = hamming(a, b)
    for i in range(4):
        for j in range(6):
            assert d[i, j] == hamming_ref(a[i].tolist(), b[j].tolist())


def test_hamming_approximates_angle():
    # more similar keys -> smaller Hamming distance (LSH property)
    torch.manual_seed(0)
    planes = make_hyperplanes(1, 1, 64, 256, seed=0)[0, 0]
    k = torch.randn(1, 64)
    near = k + 0.1 * torch.randn(1, 64)
    far = torch.randn(1, 64)
    c = hash_codes(torch.cat([k, near, far]), planes)
    d = hamming(c[:1], c)[0]
    assert d[0] == 0 and d[1] < d[2]
