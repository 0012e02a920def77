"""Data-parallel explain (issue 13): ``python -m torch.distributed.run --nproc-per-node 2 -m headmap explain``
on gloo (2 CPU processes) writes the tables of a single-process explain, row order included.

Each rank explains whole batches of the single-process run (batch i on rank i mod 2) and the random-order
control of every batch is drawn as one process draws it, so every row comes from the same computation on
the same inputs as in one process: the tables are compared for equality. A rank killed mid-run leaves
its finished batches in the run folder, and ``--resume`` goes on from them. Every subprocess has a
timeout (test_distributed_scan's), so a hung rank fails the test instead of hanging it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
from test_distributed_scan import TIMEOUT_S, corpus_lines, env, finish, torchrun

from headmap.explain.folder import CHECKPOINT

METHODS = "rollout,attn_grad,saliency,integrated_gradients"
TABLES = ("attributions.parquet", "faithfulness.parquet")


def explain_args(model: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    return ["-m", "headmap", "explain", str(model), "--corpus", str(corpus), "--methods", METHODS, "--steps", "4",
            "--batch-size", "2", "--max-length", "24", "--out", str(out), "--no-progress", *extra]  # fmt: skip


def one_process(argv: list[str]) -> None:
    done = subprocess.run([sys.executable, *argv], env=env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr


def assert_same_explain(a: Path, b: Path) -> None:
    for name in TABLES:
        one, two = pd.read_parquet(a / name), pd.read_parquet(b / name)
        assert len(one) > 0
        pd.testing.assert_frame_equal(one, two, check_exact=True)
    meta_a, meta_b = (json.loads((x / "explain.json").read_text()) for x in (a, b))
    assert meta_a["integrated_gradients_gap"] == meta_b["integrated_gradients_gap"]
    assert meta_a["fingerprint"] == meta_b["fingerprint"]
    assert not (b / CHECKPOINT).exists()


def test_two_ranks_explain_the_samples_of_one_process(tiny_llama_dir, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(corpus_lines(7))  # 4 batches of 2 (the last one short): rank 0 has 2, rank 1 has 2
    one_process(explain_args(tiny_llama_dir, corpus, tmp_path / "one"))
    code, out, err = finish(torchrun(2, explain_args(tiny_llama_dir, corpus, tmp_path / "two")))
    assert code == 0, err[-3000:]
    assert out.count("wrote ") == 1  # rank 0 prints and writes; rank 1 is quiet
    assert_same_explain(tmp_path / "one", tmp_path / "two")
    assert json.loads((tmp_path / "two" / "explain.json").read_text())["ranks"] == 2


def test_ranks_with_other_texts_stop_before_work(tiny_llama_dir, tmp_path):
    corpus, other = tmp_path / "c.txt", tmp_path / "other.txt"
    corpus.write_text(corpus_lines(4))
    other.write_text(corpus.read_text().replace("the", "a", 1))
    script = tmp_path / "pick.py"
    script.write_text(
        "import os, sys, runpy\n"
        f"corpus = {str(corpus)!r} if os.environ['RANK'] == '0' else {str(other)!r}\n"
        "sys.argv = ['headmap'] + [corpus if a == 'CORPUS' else a for a in sys.argv[1:]]\n"
        "runpy.run_module('headmap', run_name='__main__')\n"
    )
    argv = explain_args(tiny_llama_dir, Path("CORPUS"), tmp_path / "run")[2:]
    code, _, err = finish(torchrun(2, [str(script), *argv]))
    assert code != 0
    assert "disagree before any work" in err and "texts differs" in err
    assert not (tmp_path / "run" / CHECKPOINT).exists()
    assert not (tmp_path / "run" / "attributions.parquet").exists()


def test_a_killed_rank_resumes(tiny_llama_dir, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(corpus_lines(60))  # 30 batches: the kill comes long before the end
    one_process(explain_args(tiny_llama_dir, corpus, tmp_path / "one"))
    out = tmp_path / "two"
    proc = torchrun(2, explain_args(tiny_llama_dir, corpus, out), start_new_session=True)
    first = out / CHECKPOINT / "batch-000001.json"  # rank 1's first batch
    deadline = time.monotonic() + TIMEOUT_S
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first.exists(), "rank 1 finished no batch"
    rank1 = [c for c in psutil.Process(proc.pid).children(recursive=True) if c.environ().get("RANK") == "1"]
    assert len(rank1) == 1
    os.kill(rank1[0].pid, signal.SIGKILL)  # rank 1 dies mid-run
    code, _, err = finish(proc)
    assert code != 0
    assert not (out / "attributions.parquet").exists()
    kept = sorted(p.name for p in (out / CHECKPOINT).glob("batch-*.json"))
    assert "batch-000001.json" in kept and len(kept) < 30  # finished batches kept, the run not done
    code, stdout, err = finish(torchrun(2, explain_args(tiny_llama_dir, corpus, out, "--resume")))
    assert code == 0, err[-3000:]
    meta = json.loads((out / "explain.json").read_text())
    assert meta["resumed_batches"] == len(kept)  # a batch is done once its .json is there (written last)
    assert "resumed: " in stdout
    assert_same_explain(tmp_path / "one", out)
