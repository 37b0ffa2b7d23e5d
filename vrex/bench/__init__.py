"""Benchmarks: side-by-side runs that print a table and write JSON and plots."""
