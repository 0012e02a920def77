"""``python -m headmap``: the command line (what the ``headmap`` console script runs)."""

from .cli import main

main()
