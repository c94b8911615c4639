"""The `lmforge` command line (`lmforge.cli:app`): app.py holds the Typer app and what every verb shares;
each family of verbs registers itself from its own file."""

# ruff: noqa: I001  (the verb families import in the order --help lists them)
import sys

from lmforge.cli.app import app

# each family registers its verbs on the app, in the order --help lists them
from lmforge.cli import runs, measure, generation, tools  # noqa: E402, F401

__all__ = ["app", "main"]


def main() -> None:  # pragma: no cover
    sys.exit(app())
