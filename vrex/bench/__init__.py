"""Benchmarks: side-by-side runs that print a table and write JSON and plots."""


def parse_size(text: str) -> int:
    """``"4k"`` -> 4096, ``"1500"`` -> 1500; ``ValueError`` naming the text otherwise."""
    text = text.strip().lower()
    try:
        return int(float(text[:-1]) * 1024) if text.endswith("k") else int(text)
    except ValueError:
        raise ValueError(f"size '{text}' is not a number like 4096 or 4k") from None
