"""Per-token indexes of a long stream: int32 in fixed-size pages that are never moved, and 16-bit
offsets once a page is final (issue 18).

A stream keeps a few integers per cached token and KV head in memory even when its K/V went to
disk: the store's token -> slot map (``vrex.kv.store``) and ReSV's token -> cluster map
(``vrex.resv.table``). Three choices bound what they cost over hours:

* **int32**, not int64: half the bytes. The values are slots, token ids and cluster ids, each at
  most the number of tokens ever appended (a tier's slots count the tokens pushed into it; every
  cluster has a member), so they fit while the token count does: up to ``INT32_MAX`` tokens (at
  2 fps and 13 tokens per frame, about 2.6 years of stream). Past that :class:`IndexOverflow`
  names the index instead of wrapping silently.
* **Fixed pages** of ``page`` tokens (``[rows, page]`` each), allocated when needed and never
  reallocated. A capacity-doubling buffer copies itself at every doubling and frees the old copy;
  over a 15-minute ``vrex bench soak`` those freed blocks stayed in the allocator as free heap that
  grew with the stream. Pages are appended, so the index never frees and never copies; the unused
  tail is less than one page.
* **Narrow pages**: the values of one page and row are close together (the slots of 4096
  consecutive tokens are about 4096 consecutive slots of a tier; their clusters are the clusters
  made or joined in about 3 minutes of stream). ``compact(below)`` rewrites every page that lies
  wholly below token ``below`` and whose rows each span at most 65535 as int16
  ``[rows, 2 + page]``: the first two int16 of a row hold the row's bias (an int32), the rest
  ``value - bias``. Half the bytes again for the pages that will not change (tokens on the disk
  tier, tokens already clustered). A page whose values spread wider stays int32; a write into a
  narrow page makes it int32 again first (so a wrong ``below`` costs bytes, never a wrong value).

Reading: ``read(a, b)`` (a range, every row), ``take(ids)`` (sorted ids, every row), ``gather``
(``[rows, n]`` ids, any order); they return int64 copies (per-step temporaries that torch's gather,
scatter and index arithmetic take as they are). Writing: ``write(start, values)`` and
``scatter(ids, values)``.
The C++ kernels (``vrex.kv.fast``) read and write ``pages`` directly (``t >> shift``,
``t & (page - 1)``; an int16 page is read through its bias, and never written there).
"""

from __future__ import annotations

import torch
from torch import Tensor

INT32_MAX = 2**31 - 1
#: Tokens per page: a power of two (the kernels split an id with a shift and a mask). 4096 tokens of
#: 3 KV heads are 48 KiB per page (24 KiB narrow); an hour at 2 fps is about 24 pages per index and layer.
PAGE_TOKENS = 4096
#: Widest spread of one row of a narrow page: an int16 offset from the row's bias covers 2^16 values.
NARROW_SPAN = 2**16 - 1
#: int16 columns before a narrow row's offsets: its int32 bias.
NARROW_HEAD = 2


class IndexOverflow(OverflowError):
    """A per-token index would hold a value or a token count past ``INT32_MAX``; the message names it."""


def _narrow_page(wide: Tensor) -> Tensor | None:
    """``wide`` int32 ``[rows, P]`` as int16 ``[rows, 2 + P]`` (bias, then offsets), or None when a
    row spans more than :data:`NARROW_SPAN`."""
    lo = wide.amin(1).to(torch.int64)
    if bool(((wide.amax(1).to(torch.int64) - lo) > NARROW_SPAN).any()):
        return None
    # offsets -32768 .. 32767 cover bias - 32768 .. bias + 32767: lo .. lo + 65535, or, near the top
    # of the int32 range, everything up to INT32_MAX (the bias itself must be an int32)
    bias = (lo + 2**15).clamp(max=INT32_MAX - (2**15 - 1))
    out = torch.empty(wide.shape[0], NARROW_HEAD + wide.shape[1], dtype=torch.int16)
    out[:, :NARROW_HEAD] = bias.to(torch.int32).unsqueeze(1).view(torch.int16)
    out[:, NARROW_HEAD:] = (wide.to(torch.int64) - bias.unsqueeze(1)).to(torch.int16)
    return out


def _bias(page: Tensor) -> Tensor:
    """The int32 bias of every row of a narrow page, ``int64 [rows, 1]``."""
    # reshape(-1) packs the heads even for one row (a [1, 2] slice counts as contiguous with its stride)
    return page[:, :NARROW_HEAD].reshape(-1).view(torch.int32).to(torch.int64).unsqueeze(1)


class PagedIndex:
    """``rows`` x (growing) tokens of int32 in pages ``[rows, page]`` (see the module docstring).

    ``name`` is used in error messages. Entries not written yet hold ``fill``. ``page`` None:
    ``PAGE_TOKENS`` (read when the index is made)."""

    def __init__(self, rows: int, name: str, *, page: int | None = None, fill: int = 0) -> None:
        page = PAGE_TOKENS if page is None else page
        if page < 1 or page & (page - 1):
            raise ValueError(f"page must be a power of two, got {page}")
        self.rows, self.name, self.page, self.fill = rows, name, page, fill
        self.shift = page.bit_length() - 1
        self.pages: list[Tensor] = []
        self._unchecked = 0  # compact() has looked at every page before this one since it was last written

    @property
    def capacity(self) -> int:
        return len(self.pages) * self.page

    def nbytes(self) -> int:
        return sum(p.untyped_storage().nbytes() for p in self.pages)

    def narrow_pages(self) -> int:
        """Pages held as int16 offsets."""
        return sum(p.dtype == torch.int16 for p in self.pages)

    def ensure(self, n: int) -> None:
        """Room for tokens ``0 .. n-1`` (new pages only; existing ones stay where they are)."""
        if n > INT32_MAX + 1:
            raise IndexOverflow(f"{self.name}: {n} tokens do not fit an int32 index (at most 2^31 = {INT32_MAX + 1})")
        while self.capacity < n:
            self.pages.append(torch.full((self.rows, self.page), self.fill, dtype=torch.int32))

    def compact(self, below: int) -> None:
        """Rewrite the int32 pages wholly below token ``below`` as int16 offsets where they fit
        (callers pass the first token whose entry may still change; see the module docstring)."""
        end = min(below >> self.shift, len(self.pages))
        for p in range(self._unchecked, end):
            if self.pages[p].dtype == torch.int32:
                narrow = _narrow_page(self.pages[p])
                if narrow is not None:
                    self.pages[p] = narrow
        self._unchecked = max(self._unchecked, end)

    def _wide(self, p: int) -> Tensor:
        """Page ``p`` as int32 ``[rows, page]``, made int32 for good if it was narrow (before a write)."""
        page = self.pages[p]
        if page.dtype == torch.int16:
            page = self.pages[p] = (page[:, NARROW_HEAD:].to(torch.int64) + _bias(page)).to(torch.int32)
        self._unchecked = min(self._unchecked, p)
        return page

    def _stored(self, p: int) -> tuple[Tensor, Tensor | int]:
        """Page ``p`` as stored, ``[rows, page]``, and what to add to an entry read from it: 0 for an
        int32 page; for a narrow one its offsets (a view) and the rows' biases ``int64 [rows, 1]``."""
        page = self.pages[p]
        return (page, 0) if page.dtype == torch.int32 else (page[:, NARROW_HEAD:], _bias(page))

    def _cols(self, p: int, cols: Tensor | slice, row: int | None = None) -> Tensor:
        """Columns ``cols`` of page ``p`` (every row, or one ``row``) as int64, whatever its width."""
        stored, bias = self._stored(p)
        if row is None:
            return stored[:, cols].to(torch.int64) + bias
        return stored[row, cols].to(torch.int64) + (bias if isinstance(bias, int) else bias[row])

    def _narrow(self, values: Tensor) -> Tensor:
        """``values`` as int32, refusing any outside the int32 range (never a silent wrap)."""
        if values.dtype != torch.int32 and values.numel():
            lo, hi = int(values.min()), int(values.max())
            if hi > INT32_MAX or lo < -INT32_MAX - 1:
                raise IndexOverflow(f"{self.name}: value {hi if hi > INT32_MAX else lo} does not fit an int32 index")
        return values.to(torch.int32)

    def _spans(self, a: int, b: int):
        """``(page, offset in page, offset in a..b, length)`` for the range ``a .. b-1``."""
        t = a
        while t < b:
            p, o = t >> self.shift, t & (self.page - 1)
            n = min(b - t, self.page - o)
            yield p, o, t - a, n
            t += n

    def write(self, start: int, values: Tensor) -> None:
        """Entries ``start .. start+T-1`` of every row from ``values`` ``[rows, T]`` (or ``[T]``: every row)."""
        T = values.shape[-1]
        self.ensure(start + T)
        v = self._narrow(values.cpu())
        for p, o, i, n in self._spans(start, start + T):
            self._wide(p)[:, o : o + n] = v[..., i : i + n]

    def read(self, a: int, b: int) -> Tensor:
        """Entries ``a .. b-1`` of every row, ``int64 [rows, b - a]`` (a copy)."""
        if b > self.capacity:
            raise IndexError(f"{self.name}: entries up to {b} asked, {self.capacity} allocated")
        out = torch.empty(self.rows, max(b - a, 0), dtype=torch.int64)
        for p, o, i, n in self._spans(a, b):
            out[:, i : i + n] = self._cols(p, slice(o, o + n))
        return out

    def take(self, ids: Tensor, row: int | None = None) -> Tensor:
        """Entries at the ascending ``ids`` ``[n]``: ``int64 [rows, n]``, or ``[n]`` of one ``row``."""
        ids = ids.to(torch.int64)
        out = torch.empty((ids.numel(),) if row is not None else (self.rows, ids.numel()), dtype=torch.int64)
        if not ids.numel():
            return out
        if int(ids[-1]) >= self.capacity or int(ids[0]) < 0:
            raise IndexError(f"{self.name}: ids must be sorted and in [0, {self.capacity})")
        first, last = int(ids[0]) >> self.shift, int(ids[-1]) >> self.shift
        bounds = torch.arange(first, last + 2, dtype=torch.int64) << self.shift
        cuts = torch.searchsorted(ids, bounds).tolist()
        for j, p in enumerate(range(first, last + 1)):
            a, b = cuts[j], cuts[j + 1]
            if b > a:
                out[..., a:b] = self._cols(p, ids[a:b] & (self.page - 1), row)
        return out

    def gather(self, ids: Tensor) -> Tensor:
        """Entries at ``ids`` ``[rows, n]`` (row ``h`` reads its own ids, any order): ``int64 [rows, n]``."""
        ids = ids.to(torch.int64)
        out = torch.empty(ids.shape, dtype=torch.int64)
        if not ids.numel():
            return out
        pg = ids >> self.shift
        for p in torch.unique(pg).tolist():
            m = pg == p
            cols = torch.where(m, ids & (self.page - 1), 0)  # ids of other pages read column 0, then are masked out
            stored, bias = self._stored(p)
            out[m] = (stored.gather(1, cols).to(torch.int64) + bias)[m]
        return out

    def scatter(self, ids: Tensor, values: Tensor) -> None:
        """Entry ``ids[h, j]`` of row ``h`` gets ``values[h, j]`` (``ids``, ``values`` ``[rows, n]``)."""
        ids = ids.to(torch.int64)
        if not ids.numel():
            return
        self.ensure(int(ids.max()) + 1)
        v = self._narrow(values.cpu()).expand(ids.shape)
        pg = ids >> self.shift
        for p in torch.unique(pg).tolist():
            m = pg == p
            flat = (torch.arange(self.rows).unsqueeze(1).expand_as(ids)[m] << self.shift) + (ids[m] & (self.page - 1))
            self._wide(p).view(-1)[flat] = v[m]


__all__ = ["INT32_MAX", "NARROW_SPAN", "PAGE_TOKENS", "IndexOverflow", "PagedIndex"]
