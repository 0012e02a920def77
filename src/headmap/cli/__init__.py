"""The ``headmap`` command line. Thin: every command is one call into the library.

``app.py`` holds the Typer app and the entry point; each command lives in a module of its own
and registers itself on import.
"""

from __future__ import annotations

from . import compress, evaluate, explain, report, scan, steer  # noqa: F401  (register the commands)
from .app import app, main

__all__ = ["app", "main"]
