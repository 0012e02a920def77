"""Checkpoints and ``--resume``: an interrupted scan, resumed, writes the tables of one that never stopped.

Equality here is exact (bit for bit), never a tolerance: a resumed scan forms the same batches and
adds the same numbers in the same order as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from rich.progress import Progress
from test_cli import assert_one_line_error, run
from transformers import LlamaForCausalLM

import headmap
from headmap.errors import OptionError, OutputError, ScanInterrupted
from headmap.probes import PROBES, HeadStats, make_probes, supports_state
from headmap.scan import checkpoint

REPEATS = {
    "probes": "sink,entropy,mean_distance,waad,prev_token,duplicate_token,induction",
    "corpus": "repeats",
    "max_length": 21,
    "limit": 10,
    "batch_size": 2,
    "progress": False,
}
CKPT = checkpoint.CHECKPOINT_DIR


@pytest.fixture(scope="module")
def ragged_corpus(tmp_path_factory) -> Path:
    """Lines of very different lengths, so that every batch is padded."""
    rng = random.Random(0)
    words = "the cat sat on a mat while dogs ran through fields of wheat under grey skies".split()
    path = tmp_path_factory.mktemp("corpus") / "ragged.txt"
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(2, 40))) for _ in range(12)))
    return path


def assert_same_tables(expected: Path, actual: Path) -> None:
    a = pd.read_parquet(expected / "heads.parquet")
    b = pd.read_parquet(actual / "heads.parquet")
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    for col in ("value", "stderr"):  # bit for bit, NaN included
        assert a[col].to_numpy().tobytes() == b[col].to_numpy().tobytes(), col
    ma, mb = (json.loads((p / "meta.json").read_text()) for p in (expected, actual))
    for key in ("corpus", "probes", "architecture", "model", "dtype", "device", "fingerprint"):
        assert ma[key] == mb[key], key
    assert not (actual / CKPT).exists()


class Interrupt:
    """Raise KeyboardInterrupt (or send a signal) on the n-th call of a patched function."""

    def __init__(self, monkeypatch, owner, name: str, at: int, signum: int | None = None):
        self.calls, self.at, self.signum = 0, at, signum
        original = getattr(owner, name)

        def patched(*args, **kwargs):
            self.calls += 1
            if self.calls == self.at:
                if self.signum is None:
                    raise KeyboardInterrupt
                os.kill(os.getpid(), self.signum)
                time.sleep(1)  # the handler raises in the main thread before this returns
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, patched)


def scan_until(monkeypatch, folder, kwargs, owner, name, at, resume=False, every=3600.0, signum=None):
    with monkeypatch.context() as m:
        Interrupt(m, owner, name, at, signum)
        with pytest.raises(ScanInterrupted) as info:
            headmap.scan(folder["model"], out=folder["out"], resume=resume, checkpoint_every_s=every, **kwargs)
    return info.value


def test_interrupted_in_forward_then_resumed_equals_uninterrupted(tiny_llama_dir, tmp_path, monkeypatch):
    full = tmp_path / "full"
    headmap.scan(str(tiny_llama_dir), out=full, **REPEATS)
    out = tmp_path / "run"
    where = {"model": str(tiny_llama_dir), "out": out}
    # Ctrl-C in the 3rd forward: 2 batches of 2 are done; no periodic checkpoint was due, the interrupt writes it.
    stop = scan_until(monkeypatch, where, REPEATS, LlamaForCausalLM, "forward", at=3)
    assert (stop.inputs_done, stop.inputs_total, stop.folder, stop.signum) == (4, 10, str(out), signal.SIGINT)
    assert isinstance(stop, KeyboardInterrupt)
    assert sorted(p.name for p in out.iterdir()) == [CKPT]
    assert json.loads((out / CKPT / "progress.json").read_text())["inputs_done"] == 4
    bars = []
    add_task = Progress.add_task
    monkeypatch.setattr(Progress, "add_task", lambda self, *a, **k: bars.append(k) or add_task(self, *a, **k))
    resumed = headmap.scan(str(tiny_llama_dir), out=out, resume=True, **REPEATS)
    assert [(b["completed"], b["total"]) for b in bars] == [(4, 10)]  # the progress bar starts where it stopped
    assert_same_tables(full, out)
    assert resumed.meta["resumed_from"] == [4]
    assert json.loads((full / "meta.json").read_text())["resumed_from"] == []


def test_interrupted_mid_commit_twice_with_padding(tiny_llama_dir, ragged_corpus, tmp_path, monkeypatch):
    """Ctrl-C inside a probe's commit (some layers added, others not) saves the last whole batch boundary."""
    kwargs = dict(probes="sink,entropy,waad", corpus=ragged_corpus, batch_size=3, progress=False)
    full = tmp_path / "full"
    headmap.scan(str(tiny_llama_dir), out=full, **kwargs)
    out = tmp_path / "run"
    where = {"model": str(tiny_llama_dir), "out": out}
    per_batch = 3 * 2  # HeadStats.add calls per batch: 3 probes x 2 layers
    stop = scan_until(monkeypatch, where, kwargs, HeadStats, "add", at=per_batch + 4)  # the interrupt writes it
    assert stop.inputs_done == 3
    stop = scan_until(monkeypatch, where, kwargs, HeadStats, "add", at=per_batch * 2 + 1, resume=True, every=0)
    assert not (out / CKPT).joinpath("README").exists()
    assert stop.inputs_done == 9
    resumed = headmap.scan(str(tiny_llama_dir), out=out, resume=True, **kwargs)
    assert_same_tables(full, out)
    assert resumed.meta["resumed_from"] == [3, 9]


def test_sigterm_checkpoints_like_ctrl_c(tiny_llama_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    where = {"model": str(tiny_llama_dir), "out": out}
    stop = scan_until(monkeypatch, where, REPEATS, LlamaForCausalLM, "forward", at=4, signum=signal.SIGTERM)
    assert (stop.inputs_done, stop.signum) == (6, signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored
    headmap.scan(str(tiny_llama_dir), out=out, resume=True, **REPEATS)
    full = tmp_path / "full"
    headmap.scan(str(tiny_llama_dir), out=full, **REPEATS)
    assert_same_tables(full, out)


def test_killed_process_resumes_to_identical_tables(monkeypatch, capsys, tiny_llama_dir, tmp_path):
    """SIGKILL a real `headmap scan` after its first checkpoint; --resume finishes it exactly."""
    rng = random.Random(1)
    words = "one two three four five six seven eight nine ten eleven twelve".split()
    corpus = tmp_path / "big.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(2, 40))) for _ in range(64)))
    args = [
        "scan",
        str(tiny_llama_dir),
        "--corpus",
        str(corpus),
        "--probes",
        "sink,entropy,prev_token",
        "--batch-size",
        "4",
        "--no-progress",
    ]
    out = tmp_path / "run"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    exe = Path(sys.executable).with_name("headmap")
    proc = subprocess.Popen(
        [str(exe), *args, "--out", str(out), "--checkpoint-every", "0"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    state = out / CKPT / checkpoint.STATE_FILE
    try:
        deadline = time.monotonic() + 120
        while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, stderr.decode()
    assert not (out / "heads.parquet").exists()
    done = checkpoint.read(out).done  # (progress.json, for people, may lag one checkpoint behind after a kill)
    assert 0 < done < 64 and done % 4 == 0

    code, stdout, err = run(monkeypatch, capsys, *args, "--out", str(out), "--resume")
    assert code == 0, err
    assert "resumed at input" in stdout
    full = tmp_path / "full"
    code, _, err = run(monkeypatch, capsys, *args, "--out", str(full))
    assert code == 0, err
    assert_same_tables(full, out)


@pytest.fixture
def interrupted(tiny_llama_dir, tmp_path, monkeypatch, capsys, ragged_corpus):
    """A run folder holding the checkpoint of 4 of 12 inputs (Ctrl-C in the CLI), and the arguments that made it."""
    out = tmp_path / "run"
    args = [
        "scan",
        str(tiny_llama_dir),
        "--corpus",
        str(ragged_corpus),
        "--probes",
        "sink,entropy",
        "--batch-size",
        "2",
        "--out",
        str(out),
        "--no-progress",
    ]
    with monkeypatch.context() as m:
        Interrupt(m, LlamaForCausalLM, "forward", at=3)
        code, _, err = run(monkeypatch, capsys, *args, "--checkpoint-every", "0")
    assert code == 130, err
    assert err.strip() == (
        f"headmap: interrupted after 4 of 12 inputs; the checkpoint in {out} keeps them: run the same command "
        "with --resume to continue"
    )
    return out, args


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def other_llama_dir(tmp_path_factory, tiny_llama_dir) -> Path:
    """The tiny Llama's architecture with other weights."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("other-llama")
    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "change, needles",
    [
        ("probes", ["probe set differs", "checkpoint has sink, entropy, this run sink, waad(window=10)"]),
        ("model", ["model differs", "llama, 2 layers x 4 heads, weights"]),
        ("batch", ["--batch-size differs: checkpoint has 2, this run 3"]),
        ("corpus", ["corpus differs", "'ragged.txt' (12 inputs"]),
    ],
)
def test_resume_of_another_run_is_refused(monkeypatch, capsys, interrupted, other_llama_dir, change, needles):
    out, args = interrupted
    before = snapshot(out)
    args = list(args)
    if change == "probes":
        args[args.index("--probes") + 1] = "sink,waad"
    elif change == "model":
        args[1] = str(other_llama_dir)
    elif change == "batch":
        args[args.index("--batch-size") + 1] = "3"
    else:
        args += ["--limit", "5"]
    code, _, err = run(monkeypatch, capsys, *args, "--resume")
    assert_one_line_error(code, err, f"cannot resume the scan in {out}", "4 of 12 inputs", "is kept", *needles)
    assert snapshot(out) == before  # completed work kept, nothing else written


def test_success_removes_only_the_checkpoint(monkeypatch, capsys, interrupted):
    out, args = interrupted
    (out / "notes.txt").write_text("mine")
    (out / "sub").mkdir()
    (out / "sub" / "data.bin").write_bytes(b"\x00\x01")
    code, _, err = run(monkeypatch, capsys, *args, "--resume")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["heads.parquet", "meta.json", "notes.txt", "sub"]
    assert (out / "notes.txt").read_text() == "mine" and (out / "sub" / "data.bin").read_bytes() == b"\x00\x01"


def test_foreign_file_inside_the_checkpoint_folder_is_left(monkeypatch, capsys, interrupted):
    out, args = interrupted
    (out / CKPT / "README").write_text("not headmap's")
    code, _, err = run(monkeypatch, capsys, *args, "--resume")
    assert code == 0, err
    assert [p.name for p in (out / CKPT).iterdir()] == ["README"]


def test_checkpoint_without_resume_is_a_run(monkeypatch, capsys, interrupted):
    out, args = interrupted
    before = snapshot(out)
    code, _, err = run(monkeypatch, capsys, *args)
    assert_one_line_error(code, err, "holds an interrupted scan", "4 of 12 inputs done", "--resume", "--overwrite")
    assert snapshot(out) == before
    code, _, err = run(monkeypatch, capsys, *args, "--overwrite")  # start over
    assert code == 0, err
    assert not (out / CKPT).exists()
    assert json.loads((out / "meta.json").read_text())["resumed_from"] == []


def test_resume_with_overwrite_starts_over_on_a_mismatch(monkeypatch, capsys, interrupted):
    out, args = interrupted
    args = list(args)
    args[args.index("--probes") + 1] = "sink"
    code, _, err = run(monkeypatch, capsys, *args, "--resume", "--overwrite")
    assert code == 0, err
    assert "starting over" in err
    assert not (out / CKPT).exists()
    assert sorted(pd.read_parquet(out / "heads.parquet").probe.unique()) == ["sink"]


def test_resume_on_finished_and_on_empty_folders(monkeypatch, capsys, tiny_llama_dir, ragged_corpus, tmp_path):
    out = tmp_path / "run"
    args = ["scan", str(tiny_llama_dir), "--corpus", str(ragged_corpus), "--out", str(out), "--no-progress"]
    code, _, err = run(monkeypatch, capsys, *args, "--resume")  # nothing to resume: start, and say so
    assert code == 0, err
    assert "no checkpoint" in err and "starting from the beginning" in err
    before = snapshot(out)
    code, stdout, err = run(monkeypatch, capsys, *args, "--resume")  # finished: nothing to do
    assert code == 0, err
    assert "already holds this scan, finished" in err and "heads.parquet" in stdout
    assert snapshot(out) == before
    code, _, err = run(monkeypatch, capsys, *args, "--resume", "--probes", "entropy")
    assert_one_line_error(code, err, "finished scan of another run", "probe set differs")
    assert snapshot(out) == before


def test_bad_checkpoint_options(tiny_llama_dir, tmp_path):
    with pytest.raises(OptionError, match="needs out="):
        headmap.scan(str(tiny_llama_dir), resume=True)
    with pytest.raises(OptionError, match="--checkpoint-every"):
        headmap.scan(str(tiny_llama_dir), out=tmp_path / "r", checkpoint_every_s=-1)
    damaged = tmp_path / "damaged"
    (damaged / CKPT).mkdir(parents=True)
    (damaged / CKPT / checkpoint.STATE_FILE).write_bytes(b"not a zip")
    with pytest.raises(OutputError, match="damaged"):
        headmap.scan(str(tiny_llama_dir), out=damaged, resume=True, progress=False)


@pytest.mark.parametrize("name", sorted(PROBES))
def test_every_probe_state_round_trips(name):
    assert supports_state(PROBES[name]()), f"probe {name} needs state_dict/load_state_dict to be resumable"


def test_state_dict_continues_exactly(tiny_llama_dir):
    """Save after some inputs, load into fresh probes, go on: the totals of probes that never stopped."""
    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir).eval()
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(5, 1000, (2, 9), generator=gen) for _ in range(3)]
    names = "sink,entropy,mean_distance,waad,prev_token,duplicate_token,induction"

    def fresh():
        probes = make_probes(names)
        for p in probes:
            if hasattr(p, "repeat_length"):
                p.repeat_length, p.offset = 4, 1
        return probes

    straight, first = fresh(), fresh()
    with torch.no_grad(), headmap.observe(model, probes=straight):
        for ids in batches:
            model(ids)
    with torch.no_grad(), headmap.observe(model, probes=first):
        model(batches[0])
    saved = [p.state_dict() for p in first]
    for state in saved:
        assert all(isinstance(v, np.ndarray) for v in state.values())
    second = fresh()
    for p, state in zip(second, saved, strict=True):
        p.load_state_dict(state)
    with torch.no_grad(), headmap.observe(model, probes=second):
        for ids in batches[1:]:
            model(ids)
    for a, b in zip(straight, second, strict=True):
        assert pd.DataFrame(a.head_rows()).equals(pd.DataFrame(b.head_rows())), a.name
    with pytest.raises(ValueError, match="not a state of probe sink"):
        make_probes("sink")[0].load_state_dict({"layers": np.array([0])})


class Counter(headmap.Probe):
    """A user probe without state_dict: scans run, but write no checkpoint."""

    name = "counter"

    def update(self, block):
        pass


def test_probe_without_state_makes_the_scan_unresumable(tiny_llama_dir, ragged_corpus, tmp_path, monkeypatch):
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="counter cannot save their state"), monkeypatch.context() as m:
        Interrupt(m, LlamaForCausalLM, "forward", at=3)
        with pytest.raises(ScanInterrupted) as info:
            headmap.scan(
                str(tiny_llama_dir),
                probes=[Counter()],
                corpus=ragged_corpus,
                out=out,
                checkpoint_every_s=0,
                progress=False,
            )
    assert info.value.folder is None and "nothing was written" in str(info.value)
    assert not (out / CKPT).exists()
    with pytest.raises(OptionError, match="counter"):
        headmap.scan(str(tiny_llama_dir), probes=[Counter()], corpus=ragged_corpus, out=out, resume=True)


def test_staging_left_by_a_kill_during_the_first_checkpoint_is_no_checkpoint(tiny_llama_dir, ragged_corpus, tmp_path):
    """A kill while the first checkpoint is staged leaves a staging folder, never a partial checkpoint."""
    from headmap import rundir

    out = tmp_path / "run"
    debris = out / f"{CKPT}{rundir.STAGE_MARK}dead"
    debris.mkdir(parents=True)
    (debris / checkpoint.STATE_FILE).write_bytes(b"half a zip")
    kwargs = dict(probes="sink", corpus=ragged_corpus, progress=False)
    with pytest.warns(UserWarning, match="no checkpoint"):
        headmap.scan(str(tiny_llama_dir), out=out, resume=True, **kwargs)
    assert sorted(p.name for p in out.iterdir()) == ["heads.parquet", "meta.json"]  # the debris went with it
    full = tmp_path / "full"
    headmap.scan(str(tiny_llama_dir), out=full, **kwargs)
    assert_same_tables(full, out)
