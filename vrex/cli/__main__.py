"""``python -m vrex.cli ...`` = ``vrex ...``."""

from vrex.cli import app

app(prog_name="vrex")
