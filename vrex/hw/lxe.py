"""The LXE's share of retrieval, bit-exact: hashing (K·H) and cluster scoring (Q·Kcᵀ) in BF16.

V-Rex §IV-A: the LPU-based LXE (DPE of 64 MAC trees x 64 inputs) computes in BF16 and also runs the
hashing and the Q·Kcᵀ product that feed the DRE. Modelled arithmetic ([U] the paper gives no
accumulator detail; this is the common BF16 MAC-tree design):

* operands are stored in BF16 (the KV cache, the hyperplanes, the cluster mean keys, the queries),
  so they are rounded to BF16 (RNE) on the way in;
* each product is exact in float32 (see :mod:`vrex.hw.bf16`);
* a 64-input MAC tree sums its products as a balanced binary tree in float32 (pair ``2i`` with
  ``2i+1`` at every level); a ``D``-long dot product takes ``ceil(D/64)`` tree passes whose results
  are accumulated sequentially in float32 (zero padding to a multiple of 64 is exact);
* hashing takes the sign of the float32 accumulator (bit = 1 iff > 0, as :mod:`vrex.resv.hashing`)
  and packs bits with the software's convention (:func:`vrex.resv.hashing.pack_bits`);
* scores are written back in BF16 (RNE of the float32 accumulator).

Consequence for equivalence with the software (float32 ``matmul``): codes agree bit for bit when the
keys and planes are BF16 values and no projection sits within float32 rounding of zero; with float32
planes the BF16 rounding of the planes flips the bits of near-zero projections (the tests measure
the rate). Software that wants bit-exact agreement should draw BF16-representable hyperplanes.
"""

from __future__ import annotations

import torch

from ..resv.hashing import pack_bits
from .bf16 import to_bf16

TREE_INPUTS = 64  # inputs per MAC tree (V-Rex Table III: DPE = 64 trees x 64 inputs)


def mac_tree_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Dot products over the last dim of BF16-rounded ``a [..., D]`` and ``b [..., D]`` (broadcast).

    Returns the float32 accumulator (before any output rounding).
    """
    p = to_bf16(a) * to_bf16(b)  # exact float32 products
    D = p.shape[-1]
    pad = (-D) % TREE_INPUTS
    if pad:
        p = torch.nn.functional.pad(p, (0, pad))
    p = p.reshape(*p.shape[:-1], -1, TREE_INPUTS)
    while p.shape[-1] > 1:  # balanced binary adder tree, float32 at every level
        p = p[..., 0::2] + p[..., 1::2]
    tiles = p.squeeze(-1)  # [..., n_tiles]
    acc = torch.zeros(tiles.shape[:-1], dtype=torch.float32)
    for k in range(tiles.shape[-1]):  # sequential float32 accumulation of the tree outputs
        acc = acc + tiles[..., k]
    return acc


def lxe_hash_bits(keys: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """Sign bits ``bool [..., T, n_hp]`` of ``keys [..., T, D]`` against ``planes [..., D, n_hp]``."""
    k = keys.to(torch.float32).unsqueeze(-2)  # [..., T, 1, D]
    h = planes.to(torch.float32).transpose(-1, -2).unsqueeze(-3)  # [..., 1, n_hp, D]
    return mac_tree_dot(k, h) > 0


def lxe_hash_codes(keys: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """Packed codes ``uint8 [..., T, ceil(n_hp/8)]`` (software bit order)."""
    return pack_bits(lxe_hash_bits(keys, planes))


def lxe_scores(queries: torch.Tensor, cluster_keys: torch.Tensor) -> torch.Tensor:
    """BF16 scores (as float32) ``[..., R, C]`` = ``queries [..., R, D]`` · ``cluster_keys [..., C, D]``ᵀ."""
    q = queries.to(torch.float32).unsqueeze(-2)
    kc = cluster_keys.to(torch.float32).unsqueeze(-3)
    return to_bf16(mac_tree_dot(q, kc))


__all__ = ["TREE_INPUTS", "mac_tree_dot", "lxe_hash_bits", "lxe_hash_codes", "lxe_scores"]
