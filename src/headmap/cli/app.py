"""The ``headmap`` command line. Thin: every command is one call into the library.

Any :class:`~headmap.errors.HeadmapError` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import os
import sys
import warnings

import typer
from rich.console import Console

from ..errors import HeadmapError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="headmap: measure what every attention head of a Hugging Face model does, exactly.",
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
console = Console()


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    def show(message, category, filename, lineno, file=None, line=None):  # one clean line per warning
        err.print(f"headmap: warning: {message}", highlight=False, markup=False, soft_wrap=True)

    warnings.showwarning = show


@app.callback()
def _root() -> None:
    """Measure, steer and compress attention heads."""


def main() -> None:
    """Console entry point."""
    _quiet_libraries()
    try:
        code = app(standalone_mode=False)  # returns the code of a typer.Exit raised by a command
        if isinstance(code, int) and code:
            sys.exit(code)
    except HeadmapError as exc:
        err.print(f"headmap: error: {exc}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        err.print("headmap: interrupted", highlight=False)
        sys.exit(130)
    except KeyboardInterrupt:
        err.print("headmap: interrupted", highlight=False)
        sys.exit(130)
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.ClickException):
            err.print(f"headmap: error: {exc.format_message()}", highlight=False, markup=False, soft_wrap=True)
            sys.exit(exc.exit_code)
        raise
