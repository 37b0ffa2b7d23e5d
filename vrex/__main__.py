"""``python -m vrex ...`` = ``vrex ...``."""

from vrex.cli import app

app(prog_name="vrex")
