"""The ``headmap`` command line. Thin: every command is one call into the library.

Any :class:`~headmap.errors.HeadmapError` becomes one line on stderr and exit code 2; a usage
mistake (an unknown command or option, a missing value or argument) gets click's usage message,
its "Try 'headmap COMMAND --help'" hint and exit code 2.
"""

from __future__ import annotations

import inspect
import os
import re
import sys
import warnings
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import HeadmapError

#: The program name in usage messages, however the CLI was started (``python -m headmap`` too).
PROG = "headmap"


def help_text(text: str | None) -> str | None:
    """Help as typer's rich formatter should show it: paragraphs reflowed to the terminal, text literal.

    Docstrings keep hard line breaks that rich would show as they are (a line cut mid-sentence at
    every break), so the lines of each paragraph are joined; ``[...]`` (``heads=[[layer,head]]``) is
    escaped so that rich does not read it as markup and drop it.
    """
    if text is None:
        return None
    paragraphs = re.split(r"\n\s*\n", inspect.cleandoc(text))
    return "\n\n".join(escape(" ".join(line.strip() for line in p.splitlines())) for p in paragraphs)


class _Command(typer.core.TyperCommand):
    """A command whose help and every parameter's help go through :func:`help_text`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.help = help_text(self.help)
        for param in self.params:
            if getattr(param, "help", None):
                param.help = help_text(param.help)

    def invoke(self, ctx: Any) -> Any:
        """Run the command; a Ctrl-C (KeyboardInterrupt), or a SIGTERM, which stops the command the same
        way while it runs, gets one line saying what is kept and exit code 130 (143 for SIGTERM); typer
        would turn it into a bare exit code. ``scan`` says its own line (how many inputs its checkpoint
        keeps) before this is reached."""
        from ..errors import Terminated
        from ..scan.loop import sigterm_as_interrupt

        try:
            with sigterm_as_interrupt(True):
                return super().invoke(ctx)
        except KeyboardInterrupt as exc:
            err.print(interrupted_line(ctx.params), highlight=False, markup=False, soft_wrap=True)
            raise typer.Exit(143 if isinstance(exc, Terminated) else 130) from None


def interrupted_line(params: dict[str, Any]) -> str:
    """What a stopped command says: with ``--out`` and ``--resume`` (eval, tune, compress, explain keep
    each finished unit in --out as it is done), how to go on."""
    out = params.get("out")
    if out is not None and "resume" in params:
        return (
            f"headmap: interrupted; what was finished is kept in {out}: run the same command with --resume to "
            "go on from there"
        )
    return "headmap: interrupted"


class _App(typer.Typer):
    """A Typer app whose commands are :class:`_Command` (help reflowed and literal)."""

    def command(self, name: str | None = None, *, cls: Any = None, **kwargs: Any):
        return super().command(name, cls=cls or _Command, **kwargs)


app = _App(
    add_completion=False,
    no_args_is_help=True,
    help=help_text("headmap: measure what every attention head of a Hugging Face model does, exactly."),
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
console = Console()

# The click behind typer (typer >= 0.20 carries its own copy): its base class of usage and parameter errors.
_CLICK_EXCEPTION = next(k for k in typer.BadParameter.__mro__ if k.__name__ == "ClickException")


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


def _context(args: list[str]) -> Any:
    """A click context for the command named in ``args`` (the app's when none is), for usage messages."""
    group = typer.main.get_command(app)
    root = group.make_context(PROG, [], resilient_parsing=True)
    name = next((a for a in args if not a.startswith("-")), None)
    command = group.get_command(root, name) if name else None
    if command is None:
        return root
    return command.make_context(name, [], parent=root, resilient_parsing=True)


def main() -> None:
    """Console entry point."""
    _quiet_libraries()
    try:
        code = app(prog_name=PROG, standalone_mode=False)  # returns the code of a typer.Exit raised by a command
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
    except _CLICK_EXCEPTION as exc:  # usage mistakes: click's usage line, its --help hint, the error; exit 2
        if getattr(exc, "ctx", None) is None:  # e.g. an option's missing value: find the command it was for
            exc.ctx = _context(sys.argv[1:])
        exc.show()
        sys.exit(exc.exit_code)
