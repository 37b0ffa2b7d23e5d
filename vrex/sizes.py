"""Sizes typed by users: token counts (``4k``) and byte sizes (``512MB``, ``2GiB``).

Kept free of heavy imports: the CLI parses options with these before anything loads.
"""

from __future__ import annotations

import math
import re

# SI units are powers of 1000, IEC units powers of 1024; a bare K/M/G/T is binary (as in `ls -h`, docker).
_BYTE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$", re.I)


def parse_count(text: str) -> int:
    """``"4k"`` -> 4096, ``"1500"`` -> 1500 (k = 1024); ``ValueError`` naming the text otherwise."""
    clean = text.strip().lower()
    try:
        value = float(clean[:-1]) * 1024 if clean.endswith("k") else float(clean)
    except ValueError:
        raise ValueError(f"size '{text}' is not a number like 4096 or 4k") from None
    if not math.isfinite(value) or value < 0 or (not clean.endswith("k") and value != int(value)):
        raise ValueError(f"size '{text}' is not a whole number >= 0 like 4096 or 4k")
    return int(value)


def parse_bytes(text: str) -> int:
    """``"512MB"`` -> 512 000 000, ``"2GiB"`` -> 2 147 483 648, ``"1024"`` -> 1024, ``"1.5G"``
    (bare K/M/G/T are binary); ``ValueError`` naming the text and the accepted forms otherwise."""
    m = _SIZE.match(text)
    unit = m.group(2).lower() if m else None
    value = float(m.group(1)) * _BYTE_UNITS[unit] if m and unit in _BYTE_UNITS else math.nan
    if not math.isfinite(value):
        raise ValueError(f"'{text}' is not a size: a number of bytes with an optional unit "
                         f"(B, KB/MB/GB/TB = powers of 1000, KiB/MiB/GiB/TiB or K/M/G/T = powers of 1024), e.g. 512MB or 2GiB")
    return int(value)
