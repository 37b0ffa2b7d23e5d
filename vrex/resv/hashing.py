"""ReSV step A.1: random-hyperplane sign hashing of post-RoPE keys, bit packing, Hamming distance.

Pure tensor functions (no state). The hardware model (``vrex.hw``, HCU) must reproduce them bit
for bit, so every convention is fixed here:

* **Hyperplanes.** ``make_hyperplanes`` draws ``N(0, 1)`` float32 entries from a CPU
  ``torch.Generator`` seeded with ``seed``. Shape is ``[num_layers, num_kv_heads, head_dim, n_hp]``
  whatever the sharing; ``sharing`` decides which slices are *identical* copies:
  ``"per_head"`` (default; independent planes for every layer and KV head, drawn in
  layer-major, head-minor order), ``"per_layer"`` (one set per layer, shared by its heads),
  ``"global"`` (one set for everything). [U] The paper does not say; per-head is the most
  general and costs ``L*H*D*n_hp*4`` bytes (Llama-3-8B: 4 MiB), off the critical path.
* **Projection and sign.** ``bits = (keys.float() @ planes) > 0`` in float32 (matmul), i.e.
  bit ``j`` is 1 iff the projection onto hyperplane ``j`` is *strictly* positive (0 -> bit 0).
* **Packing (bit order).** ``n_hp`` bits are packed into ``ceil(n_hp / 8)`` ``uint8`` bytes,
  **little-endian in both byte and bit**: hyperplane ``j`` goes to byte ``j // 8``, bit
  ``j % 8`` (value ``1 << (j % 8)``). Padding bits of the last byte are 0. With
  ``n_hp = 32`` a code is 4 bytes; read as a little-endian ``uint32`` its bit ``j`` is plane ``j``.
* **Hamming distance.** ``popcount(a XOR b)`` summed over bytes, via a 256-entry lookup table
  (``POPCOUNT_LUT``), returned as ``int64``.
"""

from __future__ import annotations

from typing import Literal

import torch

HyperplaneSharing = Literal["per_head", "per_layer", "global"]

#: popcount of every byte value, ``int64[256]``.
POPCOUNT_LUT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)
_BIT_WEIGHTS = torch.tensor([1 << b for b in range(8)], dtype=torch.int64)


def code_bytes(n_hp: int) -> int:
    """Bytes of one packed code with ``n_hp`` hyperplanes."""
    return (n_hp + 7) // 8


def make_hyperplanes(
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    n_hp: int = 32,
    *,
    seed: int = 0,
    sharing: HyperplaneSharing = "per_head",
) -> torch.Tensor:
    """Random hyperplanes ``float32 [num_layers, num_kv_heads, head_dim, n_hp]`` (see module doc)."""
    if n_hp < 1:
        raise ValueError(f"n_hp must be >= 1, got {n_hp}")
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    if sharing == "per_head":
        planes = torch.randn(num_layers, num_kv_heads, head_dim, n_hp, generator=g, dtype=torch.float32)
    elif sharing == "per_layer":
        planes = torch.randn(num_layers, 1, head_dim, n_hp, generator=g, dtype=torch.float32)
        planes = planes.expand(num_layers, num_kv_heads, head_dim, n_hp).contiguous()
    elif sharing == "global":
        planes = torch.randn(1, 1, head_dim, n_hp, generator=g, dtype=torch.float32)
        planes = planes.expand(num_layers, num_kv_heads, head_dim, n_hp).contiguous()
    else:
        raise ValueError(f"sharing must be 'per_head', 'per_layer' or 'global', got {sharing!r}")
    return planes


def hash_bits(keys: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """Sign bits ``bool [..., T, n_hp]`` of ``keys [..., T, D]`` against ``planes [..., D, n_hp]``.

    Leading dimensions broadcast (e.g. keys ``[H, T, D]`` with planes ``[H, D, n_hp]``).
    """
    proj = torch.matmul(keys.to(torch.float32), planes.to(torch.float32))
    return proj > 0


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack ``bool [..., n_hp]`` into ``uint8 [..., ceil(n_hp/8)]`` (little-endian bit order)."""
    n_hp = bits.shape[-1]
    nb = code_bytes(n_hp)
    pad = nb * 8 - n_hp
    b = bits.to(torch.int64)
    if pad:
        b = torch.nn.functional.pad(b, (0, pad))
    b = b.reshape(*bits.shape[:-1], nb, 8)
    return (b * _BIT_WEIGHTS).sum(-1).to(torch.uint8)


def unpack_bits(codes: torch.Tensor, n_hp: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``uint8 [..., B]`` -> ``bool [..., n_hp]``."""
    c = codes.to(torch.int64).unsqueeze(-1)
    bits = (c >> torch.arange(8, dtype=torch.int64)) & 1
    return bits.reshape(*codes.shape[:-1], codes.shape[-1] * 8)[..., :n_hp].bool()


def hash_codes(keys: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """Packed sign codes ``uint8 [..., T, ceil(n_hp/8)]`` of ``keys [..., T, D]``."""
    return pack_bits(hash_bits(keys, planes))


def popcount(x: torch.Tensor) -> torch.Tensor:
    """Per-byte popcount of a ``uint8`` tensor, as ``int64``."""
    return POPCOUNT_LUT[x.to(torch.int64)]


def hamming(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise Hamming distances ``int64 [..., M, N]`` between codes ``a [..., M, B]`` and ``b [..., N, B]``."""
    x = torch.bitwise_xor(a.unsqueeze(-2), b.unsqueeze(-3))
    return popcount(x).sum(-1)


def hamming_ref(a: bytes | list[int], b: bytes | list[int]) -> int:
    """Reference Hamming distance of two packed codes (plain Python, for tests and hardware models)."""
    return sum(bin(x ^ y).count("1") for x, y in zip(a, b, strict=True))


def hash_overhead(n_hp: int, head_dim: int, key_bytes: int = 2) -> float:
    """Code bytes relative to one token's key bytes (32 bits vs 128 x bf16 keys: 1.6%; vs K+V: 0.8%)."""
    return code_bytes(n_hp) / (head_dim * key_bytes)


__all__ = [
    "POPCOUNT_LUT",
    "code_bytes",
    "make_hyperplanes",
    "hash_bits",
    "pack_bits",
    "unpack_bits",
    "hash_codes",
    "popcount",
    "hamming",
    "hamming_ref",
    "hash_overhead",
]
