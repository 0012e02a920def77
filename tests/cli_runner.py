"""Running the ``headmap`` command line inside a test, and checking its one-line errors."""

from __future__ import annotations

import sys

from headmap import cli


def run(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """``headmap ARGS...`` in this process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["headmap", *args])
    code = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    """Exit code 2, exactly one ``headmap: error:`` line holding every needle, and no traceback
    (other lines, such as progress or warnings, may stand beside it)."""
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("headmap: error:")]
    assert len(errors) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in errors[0], errors[0]


def assert_only_error_line(code: int, err: str, *needles: str) -> None:
    """Exit code 2 and stderr is nothing but one ``headmap: error:`` line holding every needle (and no
    traceback, even inside the message)."""
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("headmap: error:"), err
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
