"""A Ctrl-C (or SIGTERM) in the middle of a command: one line saying what is kept, exit code 130 (143),
no traceback.

typer turns a KeyboardInterrupt into a bare exit code; before this, ``eval``, ``tune``, ``compress`` and
``explain`` stopped by Ctrl-C printed nothing at all. ``scan`` says its own line (its test: test_resume.py).
"""

from __future__ import annotations

import importlib

import pytest
from cli_runner import run

evaluation = importlib.import_module("headmap.evaluation")
explain_folder = importlib.import_module("headmap.explain.folder")


def _stop(*_args, **_kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize(
    ("target", "name", "args"),
    [
        (evaluation, "run_tune", ["tune", "--edit-template", "scale_first_token:heads=[[0,1]]:factor={f}"]),
        (evaluation, "run_eval", ["eval", "--edit", "scale_first_token:heads=[[0,1]]:factor=0.5"]),
        (explain_folder, "run_explain", ["explain", "smollm2", "--text", "a b c"]),
    ],
)
def test_interrupt_with_out_says_how_to_resume(monkeypatch, capsys, tmp_path, target, name, args):
    monkeypatch.setattr(target, name, _stop)
    out = tmp_path / "run"
    code, _, err = run(monkeypatch, capsys, *args, "--out", str(out))
    assert code == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == [
        f"headmap: interrupted; what was finished is kept in {out}: run the same command with --resume to go on "
        "from there"
    ], err


def test_interrupt_without_out(monkeypatch, capsys):
    monkeypatch.setattr(evaluation, "run_tune", _stop)
    code, _, err = run(monkeypatch, capsys, "tune", "--edit-template", "scale_first_token:heads=[[0,1]]:factor={f}")
    assert code == 130, err
    assert [line for line in err.splitlines() if line.strip()] == ["headmap: interrupted"], err


def test_sigterm_stops_like_ctrl_c(monkeypatch, capsys, tmp_path):
    """A real SIGTERM to this process while the command runs: the same line, exit code 143."""
    import os
    import signal

    def wait_for_term(*_args, **_kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the command")

    monkeypatch.setattr(evaluation, "run_tune", wait_for_term)
    out = tmp_path / "run"
    args = ["tune", "--edit-template", "scale_first_token:heads=[[0,1]]:factor={f}", "--out", str(out)]
    code, _, err = run(monkeypatch, capsys, *args)
    assert code == 143, err
    assert "headmap: interrupted; what was finished is kept in" in err and "Traceback" not in err, err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back
