"""Storage of the HC table's key sums (the mean key of cluster ``c`` of head ``h`` is ``sum / count``).

They are nine tenths of an HC table's bytes, and every cluster ever made is scored at every step, so
all of them stay in memory. Two stores behind one interface (:class:`vrex.resv.table.HCTable` picks by
``frozen_means``):

* :class:`FlatKeySums` (``"float32"``): one ``float32 [H, capacity, D]`` buffer grown by doubling,
  every sum kept; vectorised over heads (what ``vrex.hw.opcount`` counts as the GPU's ReSV).
* :class:`PagedKeySums` (``"bfloat16"``, the default; issue 18): per KV head, fixed pages of
  ``KEY_PAGE`` cluster ids (``[KEY_PAGE, D]``, made when the head's first cluster of the page is,
  never reallocated). A full page whose clusters have all left the scope window (never candidates
  again: their sums are final) is compacted to its means in bfloat16: half the bytes, and the
  precision the hardware's HC table keeps them in (``HCTable.nbytes``' ``key_bytes`` 2; the LXE
  reads BF16 operands). Scores of old clusters move by the rounding of their mean (2^-9 relative).
  Measured at 12K cached tokens of the shared clips (SmolLM2, 30 layers): the flat buffers held
  1.7x the clusters in use (doubling, every head sized for the busiest one, a whole chunk's worth
  of new clusters reserved by each fused add) and 11.3 MB; the pages hold 6.0 MB.

Both give the C++ ``hc_add`` per-head lists of float32 pages to add into (``kernel_pages``); a flat
store's page is the whole head. Sums are added in token order within a cluster, as ``index_add_``
does, so the two stores hold bit-equal sums until a page is compacted.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .grow import grow

#: Cluster ids per page (a power of two: the kernel splits an id with a shift and a mask). A page of
#: 64 dims is 32 KiB of float32 sums, 16 KiB once compacted; a head makes a few hundred clusters in a
#: 10-minute stream (SmolLM2, 13 tokens a frame).
KEY_PAGE = 128
#: ``hc_add``'s shift for a flat store: one page per head, never split.
_FLAT_SHIFT = 62


def _divisor(count: Tensor) -> Tensor:
    """``float32 [..., 1]`` member counts to divide sums by (at least 1: padding divides 0 by 1)."""
    return count.clamp(min=1).unsqueeze(-1).to(torch.float32)


class FlatKeySums:
    """Every sum in one ``float32 [H, capacity, D]`` buffer (see the module docstring)."""

    def __init__(self, H: int, D: int) -> None:
        self.H, self.D = H, D
        self.buf = torch.zeros(H, 0, D, dtype=torch.float32)

    def ensure(self, n_clusters: Tensor, n_max: int) -> None:
        self.buf = grow(self.buf, 1, n_max)

    def add(self, ids: Tensor, keys: Tensor) -> None:
        """``keys [H, T, D]`` into the sums of clusters ``ids [H, T]``."""
        C = self.buf.shape[1]
        flat = (ids + torch.arange(self.H).unsqueeze(1) * C).reshape(-1)
        self.buf.view(-1, self.D).index_add_(0, flat, keys.reshape(-1, self.D))

    def sums_at(self, head: Tensor, ids: Tensor) -> Tensor:
        """Sums of clusters ``ids[i]`` of heads ``head[i]``: ``float32 [n, D]``."""
        return self.buf[head, ids]

    def means(self, count: Tensor, n_clusters: Tensor, nmax: int) -> Tensor:
        return self.buf[:, :nmax] / _divisor(count[:, :nmax])

    def compact(self, last: Tensor, before: int, count: Tensor, n_clusters: Tensor) -> None:
        """Keeps every sum."""

    def set_sums(self, sums: Tensor, count: Tensor) -> None:
        """All sums recomputed (``float32 [H, C, D]``, C at least the clusters made)."""
        self.buf.zero_()
        n = min(sums.shape[1], self.buf.shape[1])
        self.buf[:, :n] = sums[:, :n]

    def state(self, nmax: int) -> tuple[Tensor, Tensor]:
        return self.buf[:, :nmax].clone(), torch.zeros(self.H, 0, dtype=torch.bool)

    def load(self, key_sum: Tensor, compacted: Tensor, n_clusters: Tensor) -> None:
        if compacted.any():
            raise ValueError("HC table state has bfloat16 means (frozen_means='bfloat16'); this table keeps float32 sums")
        self.buf = key_sum.clone()

    def kernel_pages(self) -> tuple[list[list[Tensor]], int]:
        return [[self.buf[h]] for h in range(self.H)], _FLAT_SHIFT

    def set_kernel_pages(self, pages: list[list[Tensor]]) -> None:
        """The kernel makes no pages for a flat store (its capacity was ensured)."""

    def nbytes(self) -> int:
        return self.buf.untyped_storage().nbytes()

    def compacted_pages(self) -> int:
        return 0


class PagedKeySums:
    """Per-head pages, compacted to bfloat16 means once out of scope (see the module docstring)."""

    def __init__(self, H: int, D: int) -> None:
        self.H, self.D = H, D
        self.pages: list[list[Tensor]] = [[] for _ in range(H)]
        self.shift = KEY_PAGE.bit_length() - 1

    @staticmethod
    def spans(n: int):
        """``(page, first id, end id)`` of the pages covering cluster ids ``0 .. n-1``."""
        for p in range(-(-n // KEY_PAGE)):
            yield p, p * KEY_PAGE, min((p + 1) * KEY_PAGE, n)

    def _page(self) -> Tensor:
        return torch.zeros(KEY_PAGE, self.D, dtype=torch.float32)

    def ensure(self, n_clusters: Tensor, n_max: int) -> None:
        for pages, n in zip(self.pages, n_clusters.tolist(), strict=True):
            while len(pages) * KEY_PAGE < n:
                pages.append(self._page())

    def add(self, ids: Tensor, keys: Tensor) -> None:
        for h in range(self.H):
            page = ids[h] >> self.shift
            for p in torch.unique(page).tolist():
                buf = self.pages[h][p]
                if buf.dtype != torch.float32:  # an invariant: compacted pages hold clusters out of scope only
                    raise RuntimeError(f"HC table: head {h} page {p} was compacted but one of its clusters got a member")
                m = page == p
                buf.index_add_(0, ids[h][m] & (KEY_PAGE - 1), keys[h][m])

    def sums_at(self, head: Tensor, ids: Tensor) -> Tensor:
        out = torch.empty(ids.numel(), self.D, dtype=torch.float32)
        for i, (h, c) in enumerate(zip(head.tolist(), ids.tolist(), strict=True)):
            out[i] = self.pages[h][c >> self.shift][c & (KEY_PAGE - 1)]
        return out

    def means(self, count: Tensor, n_clusters: Tensor, nmax: int) -> Tensor:
        # one copy of each head's pages (bfloat16 means widen exactly), then the live pages' sums divided
        # in place: a few tensor ops per head and step, however many pages the stream has made
        width = -(-nmax // KEY_PAGE) * KEY_PAGE
        mean = torch.zeros(self.H, width, self.D, dtype=torch.float32)  # padding: 0, as 0 / 1 was
        for h, pages in enumerate(self.pages):
            n = int(n_clusters[h])
            n_pages = -(-n // KEY_PAGE)
            if not n_pages:
                continue
            torch.cat(pages[:n_pages], 0, out=mean[h, : n_pages * KEY_PAGE])
            for p, a, b in self.spans(n):
                if pages[p].dtype == torch.float32:
                    m = mean[h, a:b]
                    torch.div(m, _divisor(count[h, a:b]), out=m)
        return mean[:, :nmax]

    def compact(self, last: Tensor, before: int, count: Tensor, n_clusters: Tensor) -> None:
        """Compact each head's full pages whose clusters were all last touched (``last [H, >= clusters]``)
        before frame clock ``before``: out of scope for good. Only live full pages are looked at."""
        for h, pages in enumerate(self.pages):
            for p in range(int(n_clusters[h]) // KEY_PAGE):  # pages whose every id exists
                if pages[p].dtype == torch.float32:
                    a, b = p * KEY_PAGE, (p + 1) * KEY_PAGE
                    if bool((last[h, a:b] < before).all()):
                        pages[p] = (pages[p] / _divisor(count[h, a:b])).to(torch.bfloat16)

    def set_sums(self, sums: Tensor, count: Tensor) -> None:
        for h, pages in enumerate(self.pages):
            for p, a, b in self.spans(min(sums.shape[1], len(pages) * KEY_PAGE)):
                if pages[p].dtype == torch.float32:
                    pages[p][: b - a] = sums[h, a:b]
                else:  # a compacted page keeps its form: the new means, rounded as before
                    pages[p][: b - a] = (sums[h, a:b] / _divisor(count[h, a:b])).to(torch.bfloat16)

    def state(self, nmax: int) -> tuple[Tensor, Tensor]:
        """``float32 [H, nmax, D]`` sums, or in compacted pages their bfloat16 means (float32 holds them
        exactly), and which pages are compacted, ``bool [H, pages]``."""
        key_sum = torch.zeros(self.H, nmax, self.D, dtype=torch.float32)
        compacted = torch.zeros(self.H, max((len(p) for p in self.pages), default=0), dtype=torch.bool)
        for h, pages in enumerate(self.pages):
            for p, a, b in self.spans(min(nmax, len(pages) * KEY_PAGE)):
                key_sum[h, a:b] = pages[p][: b - a]
                compacted[h, p] = pages[p].dtype == torch.bfloat16
        return key_sum, compacted

    def load(self, key_sum: Tensor, compacted: Tensor, n_clusters: Tensor) -> None:
        self.pages = [[] for _ in range(self.H)]
        for h, pages in enumerate(self.pages):
            for p, a, b in self.spans(int(n_clusters[h])):
                page = self._page()
                page[: b - a] = key_sum[h, a:b]
                pages.append(page.to(torch.bfloat16) if p < compacted.shape[1] and bool(compacted[h, p]) else page)

    def kernel_pages(self) -> tuple[list[list[Tensor]], int]:
        return self.pages, self.shift

    def set_kernel_pages(self, pages: list[list[Tensor]]) -> None:
        self.pages = [list(p) for p in pages]

    def nbytes(self) -> int:
        return sum(p.untyped_storage().nbytes() for pages in self.pages for p in pages)

    def compacted_pages(self) -> int:
        return sum(p.dtype == torch.bfloat16 for pages in self.pages for p in pages)


KeySums = FlatKeySums | PagedKeySums

__all__ = ["KEY_PAGE", "FlatKeySums", "KeySums", "PagedKeySums"]
