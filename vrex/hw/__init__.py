"""V-Rex's hardware half, as runnable models (issue #4).

Bit-exact functional units of the Dynamic Retrieval Engine (V-Rex §IV) that reproduce the
software ReSV (:mod:`vrex.resv`) on the same inputs:

* :mod:`vrex.hw.lxe`  -- the LXE's BF16 hashing (K·H) and cluster scoring (Q·Kcᵀ)
* :mod:`vrex.hw.hcu`  -- hash clustering unit (XOR/popcount, threshold, HC-table writes)
* :mod:`vrex.hw.wtu`  -- WiCSum thresholding unit (bucketed top-down scan with early exit)
* :mod:`vrex.hw.kvmu` -- KV memory management (tiers, cluster-contiguous layout, transfer lists)

and a performance/energy simulator of whole systems (:mod:`vrex.hw.sim`: compute time from shapes in
:mod:`vrex.hw.compute`, the units' cycles in the loop via :mod:`vrex.hw.dre`, capacity and spill in
:mod:`vrex.hw.capacity`, activity-based energy in :mod:`vrex.hw.energy`) checked against the paper's
figures (:mod:`vrex.hw.check`), with a CLI (:mod:`vrex.cli.hw`). See ``docs/hw.md``.
"""
