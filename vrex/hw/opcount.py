"""Count the framework ops the software ReSV launches per layer (what a GPU runtime pays per op).

On a GPU baseline (AGX Orin + ReSV, A100 + ReSV) the prediction runs as eager PyTorch: every aten op
costs host time (Python glue, dispatcher, kernel launch) whatever its size, and an op whose output
size depends on data (``nonzero``, ``.item()``) makes the host wait for the GPU. The simulator charges
``ops_per_layer x op_overhead_us + syncs_per_layer x sync_us`` (``configs/methods.yaml``,
``hardware/*.yaml``); this module measures the op and sync counts on the real
``vrex.kv.policies.resv.ReSVPolicy`` with float32 key sums (one layer of a frame step:
``on_append`` of the frame's keys + ``select`` for its query rows) with a ``TorchDispatchMode``, and
the host time per op on this machine (``python -m vrex.hw.opcount``), from which the per-op overhead
on the Orin's Cortex-A78AE is derived (docs/hw.md, "Constants"). ``tests/hw`` holds the configured
count to the live count, so a change of ``vrex.resv`` that adds or removes ops shows up.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# ops that return a view (no kernel launch, host cost only) and ops that wait for the device
VIEWS = frozenset({"view", "_unsafe_view", "unsqueeze", "squeeze", "select", "slice", "expand", "detach", "alias",
                   "transpose", "t", "permute", "as_strided", "unbind", "split", "split_with_sizes", "reshape"})
SYNCS = frozenset({"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "unique_dim",
                   "unique_consecutive", "repeat_interleave"})


@dataclass(frozen=True)
class OpCount:
    """aten ops of one layer of one frame step (all KV heads of the layer)."""

    total: int
    clustering: int  # of ``total``: hashing + clustering (``on_append``); the rest scores and selects
    views: int  # no kernel: host cost only
    syncs: int  # data-dependent output size: the host waits for the device
    clustering_syncs: int  # of ``syncs``: in hashing + clustering
    by_op: dict[str, int]

    @property
    def kernels(self) -> int:
        return self.total - self.views


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.c: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        name = func.overloadpacket.__name__
        if name == "index" and any(isinstance(a, torch.Tensor) and a.dtype == torch.bool
                                   for a in (args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else [])):
            name = "index(bool)"  # boolean indexing = nonzero + gather: a sync
        self.c[name] += 1
        return func(*args, **(kwargs or {}))


def _policy(past_frames: int, frame_tokens: int, kv_heads: int, q_heads: int, head_dim: int, seed: int):
    from vrex.kv.policies.resv import ReSVPolicy

    g = torch.Generator().manual_seed(seed)
    # float32 sums in one buffer, vectorised over heads, as a GPU would keep the table in device memory;
    # the default's bfloat16 pages (vrex.resv.keysums) are vrex's bound on host memory, not the algorithm
    pol = ReSVPolicy(frozen_means="float32")
    pol.setup(1, kv_heads, q_heads, head_dim)
    # keys with temporal structure (a slowly drifting scene), so clusters form as on real video
    base = torch.randn(kv_heads, 1, head_dim, generator=g)
    n = 0
    for f in range(past_frames):
        k = base + 0.5 * torch.randn(kv_heads, frame_tokens, head_dim, generator=g)
        pol.on_append(0, k.to(torch.bfloat16), n, f)
        n += frame_tokens
    return pol, base, g, n


def count_ops(past_frames: int = 100, frame_tokens: int = 10, kv_heads: int = 8, q_heads: int = 32,
              head_dim: int = 128, seed: int = 0) -> OpCount:
    """Ops of one layer of a frame step after ``past_frames`` frames (Llama-3-8B's head layout by default)."""
    pol, base, g, n = _policy(past_frames, frame_tokens, kv_heads, q_heads, head_dim, seed)
    k = (base + 0.5 * torch.randn(kv_heads, frame_tokens, head_dim, generator=g)).to(torch.bfloat16)
    q = torch.randn(q_heads, frame_tokens, head_dim, generator=g)
    with _Count() as ca:
        pol.on_append(0, k, n, past_frames)
    with _Count() as cs:
        pol.select(0, q, n + frame_tokens, "frame")
    c = dict(ca.c + cs.c)
    views = sum(v for o, v in c.items() if o in VIEWS)
    return OpCount(sum(c.values()), sum(ca.c.values()), views, _syncs(c), _syncs(ca.c), c)


def _syncs(c: dict[str, int]) -> int:
    return sum(v for o, v in c.items() if o in SYNCS or o == "index(bool)")


def host_us_per_op(past_frames: int = 20, repeats: int = 30, seed: int = 0) -> float:
    """Median host time per op of one layer's ReSV on this machine's CPU, single thread, at a small KV
    (so the ops' arithmetic is negligible and the time is Python glue + dispatch)."""
    torch.set_num_threads(1)
    pol, base, g, n = _policy(past_frames, 10, 8, 32, 128, seed)
    q = torch.randn(32, 10, 128, generator=g)
    ts = []
    for f in range(repeats):
        k = (base + 0.5 * torch.randn(8, 10, 128, generator=g)).to(torch.bfloat16)
        t0 = time.perf_counter()
        pol.on_append(0, k, n, past_frames + f)
        n += 10
        pol.select(0, q, n, "frame")
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2] * 1e6 / count_ops(past_frames=past_frames, seed=seed).total


def main() -> None:
    oc = count_ops()
    print(f"ReSV ops per layer (frame step, 8 KV heads, D=128): {oc.total} ({oc.clustering} clustering; "
          f"{oc.kernels} kernels, {oc.views} views, {oc.syncs} syncs, {oc.clustering_syncs} of them clustering)")
    print(f"host time per op on this CPU (1 thread): {host_us_per_op():.1f} us")


if __name__ == "__main__":
    main()


__all__ = ["OpCount", "count_ops", "host_us_per_op", "VIEWS", "SYNCS"]
