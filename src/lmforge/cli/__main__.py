"""`python -m lmforge.cli ...` (torchrun, the tests' subprocesses, the board's launches)."""

from lmforge.cli import main

main()
