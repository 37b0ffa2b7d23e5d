"""Benchmarks: side-by-side runs that print a table and write JSON and plots."""

from vrex.sizes import parse_count as parse_size  # token counts: "4k" -> 4096

__all__ = ["parse_size"]
