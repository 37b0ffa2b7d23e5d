"""ReSV (V-Rex, HPCA 2026): hash-bit key clustering + WiCSum thresholding, as pure tensor functions.

* :mod:`vrex.resv.hashing`    random hyperplanes, sign codes, bit packing, Hamming distance
* :mod:`vrex.resv.clustering` one frame's Hamming clustering (fast + reference)
* :mod:`vrex.resv.wicsum`     score normalisation and WiCSum selection (fast + reference), the token cap
* :mod:`vrex.resv.table`      the stateful per-layer HC table built from the functions above

Every convention the hardware models (``vrex.hw``) must match bit for bit is written in the
docstring of the module that implements it.
"""

from .clustering import FrameAssignment, cluster_frame, cluster_frame_ref, majority_codes, new_cluster_ids
from .hashing import (
    POPCOUNT_LUT,
    code_bytes,
    hamming,
    hamming_ref,
    hash_bits,
    hash_codes,
    make_hyperplanes,
    pack_bits,
    popcount,
    unpack_bits,
)
from .table import HCTable
from .wicsum import WiCSumResult, cap_clusters, normalize_scores, wicsum_ref, wicsum_select

__all__ = [
    "POPCOUNT_LUT", "code_bytes", "hamming", "hamming_ref", "hash_bits", "hash_codes", "make_hyperplanes",
    "pack_bits", "popcount", "unpack_bits",
    "FrameAssignment", "cluster_frame", "cluster_frame_ref", "majority_codes", "new_cluster_ids",
    "HCTable",
    "WiCSumResult", "cap_clusters", "normalize_scores", "wicsum_ref", "wicsum_select",
]
