"""Exceptions headmap raises. One type per family; every message says what was wrong and what to do.

The CLI turns any :class:`HeadmapError` into one line on stderr and exit code 2.
"""

from __future__ import annotations


class HeadmapError(Exception):
    """Base class of every error headmap raises on purpose."""


class ModelError(HeadmapError):
    """The model cannot be found, loaded, or is of an architecture headmap does not support."""


class UnsupportedModelError(ModelError):
    """The model's attention does not go through transformers' AttentionInterface."""


class CorpusError(HeadmapError):
    """The corpus is missing, empty, unreadable or does not fit the model."""


class TaskError(HeadmapError):
    """An evaluation task file is missing, unreadable, or has a malformed item (file and line named)."""


class ProbeError(HeadmapError):
    """A probe name or parameter is wrong, or a probe does not apply to the model."""


class EditError(HeadmapError):
    """An edit names heads that do not exist or has a bad parameter."""


class PressError(HeadmapError):
    """A press name or parameter is wrong, or a press does not apply to the model."""


class OutputError(HeadmapError):
    """The output folder cannot be written without losing something."""


class OptionError(HeadmapError):
    """A command-line or API option has a value outside its range."""


class NumericalError(HeadmapError):
    """Attention produced NaN or infinite values."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an interrupt while a scan with an output folder runs."""


class ScanInterrupted(KeyboardInterrupt):
    """A scan stopped by Ctrl-C (or SIGTERM) after saving what it had completed.

    A :class:`KeyboardInterrupt`, so code that catches Ctrl-C still does. ``inputs_done`` of
    ``inputs_total`` inputs are kept in the checkpoint in ``folder`` (None: nothing was kept);
    ``signum`` is the signal that stopped it.
    """

    def __init__(self, inputs_done: int, inputs_total: int, folder: str | None, signum: int) -> None:
        self.inputs_done = inputs_done
        self.inputs_total = inputs_total
        self.folder = folder
        self.signum = signum
        if folder is None:
            message = "interrupted; nothing was written"
        else:
            message = (
                f"interrupted after {inputs_done} of {inputs_total} inputs; the checkpoint in {folder} keeps them: "
                "run the same command with --resume to continue"
            )
        super().__init__(message)
