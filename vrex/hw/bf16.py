"""BF16 number format helpers for the bit-exact unit models (V-Rex §IV: the LXE computes in BF16).

BF16 is the upper half of an IEEE binary32: 1 sign, 8 exponent, 7 stored mantissa bits (8 with the
hidden bit). The hardware conventions modelled here, used by :mod:`vrex.hw.lxe` and
:mod:`vrex.hw.wtu`:

* **Rounding** float32 -> BF16 is round-to-nearest-even (RNE), as ``torch.Tensor.to(torch.bfloat16)``
  does; NaN stays NaN. :func:`round_bf16_bits` spells the integer rule out so the tests can check
  torch against it.
* **Products** of two BF16 values are exact in float32 (8 x 8 = 16 significand bits <= 24), and a
  BF16 value times a 16-bit token count is exact in float32 too (8 + 16 = 24 bits). The WTU relies
  on this: its products never round.
* **Sums** are where formats differ; each unit states its accumulator (MAC trees: float32 adder
  tree; WTU: exact wide fixed point).
"""

from __future__ import annotations

import torch


def to_bf16(x: torch.Tensor) -> torch.Tensor:
    """Round to BF16 (RNE) and return the values as float32 (exactly representable)."""
    return x.to(torch.float32).to(torch.bfloat16).to(torch.float32)


def bf16_bits(x: torch.Tensor) -> torch.Tensor:
    """The 16-bit patterns (``int32`` in ``[0, 65535]``) of ``x`` rounded to BF16."""
    b = x.to(torch.float32).to(torch.bfloat16).view(torch.int16).to(torch.int32)
    return b & 0xFFFF


def from_bf16_bits(bits: torch.Tensor) -> torch.Tensor:
    """float32 values of 16-bit BF16 patterns (inverse of :func:`bf16_bits`)."""
    return (bits.to(torch.int32) << 16).view(torch.float32)


def round_bf16_bits(f32_bits: int) -> int:
    """Reference RNE rounding of one float32 bit pattern to a BF16 bit pattern (plain integers).

    Keeps the upper 16 bits, adding ``0x7FFF + lsb`` first so that exact halves round to the even
    neighbour; NaNs are quieted instead of rounded (rounding could carry into infinity).
    """
    f32_bits &= 0xFFFFFFFF
    if (f32_bits & 0x7F800000) == 0x7F800000 and (f32_bits & 0x007FFFFF):
        return ((f32_bits >> 16) | 0x0040) & 0xFFFF  # quiet NaN
    lsb = (f32_bits >> 16) & 1
    return ((f32_bits + 0x7FFF + lsb) >> 16) & 0xFFFF


def is_bf16(x: torch.Tensor) -> bool:
    """True when every element of ``x`` is exactly representable in BF16."""
    x32 = x.to(torch.float32)
    ok = ~torch.isnan(x32)
    return bool(torch.equal(to_bf16(x32[ok]), x32[ok]))


__all__ = ["to_bf16", "bf16_bits", "from_bf16_bits", "round_bf16_bits", "is_bf16"]
