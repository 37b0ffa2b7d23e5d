"""The ``vrex`` command line: one module per command group (the table is in ``vrex/cli/app.py``).

Only this package imports typer and rich; the library below it takes plain callbacks (``log=``) and
returns rows. Nothing in the library imports this package.
"""

from vrex.cli.app import app

__all__ = ["app"]
