"""Data-parallel scans (issue 13): ``python -m torch.distributed.run --nproc-per-node 2 -m headmap scan``
on gloo (2 CPU processes) writes the tables of a single-process scan.

Token tables are compared for equality (each input's rows come from the same batch of the same
forward). Head values are float64 sums merged in another order (rank by rank): for m inputs and
non-negative per-input values each order's sum is within (m - 1) u sum|x| of the exact one
(u = 2^-53), so the two differ by at most 2 (m - 1) u relative, far below 1e-12 here (m < 100).
Standard errors come from sum x^2 - n mean^2, which cancels: their bound is derived in
:func:`assert_same_run`. Every subprocess has a timeout, so a hung rank fails the test instead of
hanging it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest

import headmap

PROBES = "sink,entropy,prev_token,received"
U = 2.0**-53
TIMEOUT_S = 900  # a loaded 2-core machine runs each launched process far slower than an idle one


def corpus_lines(n: int) -> str:
    words = "the cat sat on a mat and dog ran far away with some big red ball".split()
    rng = np.random.default_rng(1)
    return "\n".join(" ".join(rng.choice(words, size=int(rng.integers(3, 20)))) for _ in range(n)) + "\n"


def args(model: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    return [
        "-m", "headmap", "scan", str(model), "--corpus", str(corpus), "--probes", PROBES, "--max-length", "32",
        "--batch-size", "3", "--out", str(out), "--no-progress", *extra,
    ]  # fmt: skip


def env() -> dict[str, str]:
    src = str(Path(headmap.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""), "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1"}  # fmt: skip


def torchrun(nproc: int, argv: list[str], **kw) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *argv]
    return subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"torchrun did not finish in {TIMEOUT_S} s:\n{err[-3000:]}")
    return proc.returncode, out, err


def single(model: Path, corpus: Path, out: Path) -> headmap.Atlas:
    done = subprocess.run([sys.executable, *args(model, corpus, out)], env=env(), capture_output=True, text=True,
                          timeout=TIMEOUT_S)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return headmap.Atlas.load(out)


def assert_same_run(a: headmap.Atlas, b: headmap.Atlas) -> None:
    pd.testing.assert_frame_equal(a.tokens, b.tokens, check_exact=True)
    keys = ["probe", "metric", "layer", "head", "kv_head", "n"]
    pd.testing.assert_frame_equal(a.heads[keys], b.heads[keys], check_exact=True)
    m = int(a.heads.n.max())
    assert (a.heads.value >= 0).all()  # the bound below is for sums of non-negative values
    # 1e-12 relative, as promised; the derived bound 2 (m - 1) u is smaller still
    assert 2 * (m - 1) * U < 1e-12
    np.testing.assert_allclose(b.heads.value, a.heads.value, rtol=2 * (m - 1) * U, atol=0)
    # stderr^2 = (sum x^2 - n mean^2) / (n (n - 1)); both terms carry 2 (m - 1) u sum x^2 of order
    # rounding each, and the spread is zeroed below 16 eps sum x^2: |d se^2| <= (4 (m - 1) u + 16 eps)
    # * sum x^2 / (n (n - 1)), with sum x^2 = n (n - 1) se^2 + n mean^2
    n = a.heads.n.to_numpy(float)
    se2 = a.heads.stderr.to_numpy() ** 2
    total_sq = n * (n - 1) * se2 + n * a.heads.value.to_numpy() ** 2
    bound = (4 * (m - 1) * U + 16 * 2 * U) * total_sq / (n * (n - 1))
    theirs = b.heads.stderr.to_numpy() ** 2
    assert np.array_equal(np.isnan(theirs), np.isnan(se2))  # metrics without a standard error: NaN in both
    ok = ~np.isnan(se2)
    assert np.all(np.abs(theirs[ok] - se2[ok]) <= bound[ok])
    assert a.meta["fingerprint"] == b.meta["fingerprint"]
    assert a.meta["corpus"] == b.meta["corpus"]


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dp") / "corpus.txt"
    path.write_text(corpus_lines(23))
    return path


def test_two_ranks_equal_one_process(tiny_llama_dir, small_corpus, tmp_path):
    plain = single(tiny_llama_dir, small_corpus, tmp_path / "one")
    code, out, err = finish(torchrun(2, args(tiny_llama_dir, small_corpus, tmp_path / "two")))
    assert code == 0, err[-3000:]
    assert out.count("wrote ") == 1  # rank 0 writes and says so; rank 1 is quiet
    assert_same_run(plain, headmap.Atlas.load(tmp_path / "two"))
    assert not [p for p in (tmp_path / "two").iterdir() if p.name.startswith(".headmap-rank")]


def test_more_ranks_than_batches_idle_ranks_said_once(tiny_llama_dir, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(corpus_lines(2))  # one batch of 3 for 2 ranks
    plain = single(tiny_llama_dir, corpus, tmp_path / "one")
    code, _, err = finish(torchrun(2, args(tiny_llama_dir, corpus, tmp_path / "two")))
    assert code == 0, err[-3000:]
    assert err.count("have no inputs") == 1
    assert_same_run(plain, headmap.Atlas.load(tmp_path / "two"))


def test_ranks_that_disagree_stop_before_work(tiny_llama_dir, small_corpus, tmp_path):
    # each rank reads its own corpus file (by its RANK): rank 1's differs in one line
    other = tmp_path / "other.txt"
    other.write_text(small_corpus.read_text().replace("the", "a", 1))
    script = tmp_path / "pick.py"
    script.write_text(
        "import os, sys, runpy\n"
        f"corpus = {str(small_corpus)!r} if os.environ['RANK'] == '0' else {str(other)!r}\n"
        "sys.argv = ['headmap'] + [corpus if a == 'CORPUS' else a for a in sys.argv[1:]]\n"
        "runpy.run_module('headmap', run_name='__main__')\n"
    )
    argv = args(tiny_llama_dir, Path("CORPUS"), tmp_path / "run")[2:]
    code, _, err = finish(torchrun(2, [str(script), *argv]))
    assert code != 0
    assert "disagree before any work" in err and "corpus differs" in err
    assert not (tmp_path / "run" / "heads.parquet").exists()


def test_a_killed_rank_resumes(tiny_llama_dir, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(corpus_lines(240))
    plain = single(tiny_llama_dir, corpus, tmp_path / "one")
    out = tmp_path / "two"
    proc = torchrun(2, args(tiny_llama_dir, corpus, out, "--checkpoint-every", "0"), start_new_session=True)
    state = out / ".headmap-rank-1-of-2" / ".headmap-checkpoint" / "checkpoint.npz"
    deadline = time.monotonic() + TIMEOUT_S
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert state.exists(), "rank 1 wrote no checkpoint"
    rank1 = [c for c in psutil.Process(proc.pid).children(recursive=True) if c.environ().get("RANK") == "1"]
    assert len(rank1) == 1
    os.kill(rank1[0].pid, signal.SIGKILL)  # rank 1 dies mid-scan
    code, _, err = finish(proc)
    assert code != 0
    assert not (out / "heads.parquet").exists()
    assert state.exists()  # the dead rank's last checkpoint is kept
    code, _, err = finish(torchrun(2, args(tiny_llama_dir, corpus, out, "--resume")))
    assert code == 0, err[-3000:]
    resumed = headmap.Atlas.load(out)
    assert resumed.meta["resumed_from"]
    assert_same_run(plain, resumed)


def test_every_state_form_merges(tiny_llama_dir, small_corpus, tmp_path):
    """Per-sample maps, per-dimension sums and more token probes: the other forms of probe state."""
    probes = ["--probes", "attention_maps,massive_values,sinks,fai"]
    one = [sys.executable, *args(tiny_llama_dir, small_corpus, tmp_path / "one"), *probes]
    done = subprocess.run(one, env=env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    code, _, err = finish(torchrun(2, [*args(tiny_llama_dir, small_corpus, tmp_path / "two"), *probes]))
    assert code == 0, err[-3000:]
    a, b = headmap.Atlas.load(tmp_path / "one"), headmap.Atlas.load(tmp_path / "two")
    assert len(a.maps) > 0 and len(a.tokens) > 0
    pd.testing.assert_frame_equal(a.maps, b.maps, check_exact=True)  # one map per input: no sum across inputs
    assert_same_run(a, b)
