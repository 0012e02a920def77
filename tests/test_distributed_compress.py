"""Data-parallel compress (issue 13 point 2): ``python -m torch.distributed.run --nproc-per-node 2 -m headmap
compress`` on gloo (2 CPU processes) writes the table of a single-process run.

Each item is a whole work unit (headmap.parallel.split_work): its rows come from the same prefill and
decoding on the same inputs as in one process, so the tables are compared exactly, row order included,
except the columns that measure time and memory (TIME_COLUMNS). Every subprocess has a timeout
(test_distributed_scan's), so a hung rank fails the test instead of hanging it.
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
from test_distributed_scan import TIMEOUT_S, env, finish, torchrun

from headmap.cli import compress as cc


def write_task(path: Path, n: int) -> Path:
    lines = []
    for k in range(n):
        context = " ".join(["the cat sat on the mat and the dog sat on the log"] * (2 + k % 4)) + f" the code is {k}7."
        lines.append(json.dumps({"context": context, "question": "what is the code?", "answer": f"{k}7"}))
    path.write_text("\n".join(lines) + "\n")
    return path


def args(model: Path, task: Path, out: Path, *extra: str) -> list[str]:
    return ["-m", "headmap", "compress", str(model), "--press", "knorm", "--press", "snapkv:window=8", "--press",
            "h2o", "--ratio", "0.25,0.5", "--task", str(task), "--max-new-tokens", "4", "--no-progress",
            "--out", str(out), *extra]  # fmt: skip


def single(model: Path, task: Path, out: Path) -> str:
    done = subprocess.run([sys.executable, *args(model, task, out)], env=env(), capture_output=True, text=True,
                          timeout=TIMEOUT_S)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def assert_same_table(a: Path, b: Path) -> None:
    one, two = (pd.read_parquet(d / "compress.parquet").drop(columns=list(cc.TIME_COLUMNS)) for d in (a, b))
    assert len(one) > 0
    pd.testing.assert_frame_equal(one, two, check_exact=True)
    sa, sb = (json.loads((d / "compress.json").read_text()) for d in (a, b))
    for s in sa["summary"] + sb["summary"]:
        del s["prefill_s"], s["decode_s_per_token"]
    assert sa == sb
    assert not cc.rank_folders(b)  # the ranks' own rows are gone once rank 0 wrote the table


def test_two_ranks_equal_one_process(tiny_llama_dir, tmp_path):
    task = write_task(tmp_path / "t.jsonl", 5)
    said = single(tiny_llama_dir, task, tmp_path / "one")
    code, out, err = finish(torchrun(2, args(tiny_llama_dir, task, tmp_path / "two")))
    assert code == 0, err[-3000:]
    assert out.count("wrote ") == said.count("wrote ") == 2  # rank 0 writes and says so; rank 1 is quiet
    assert "have no inputs" not in err
    assert_same_table(tmp_path / "one", tmp_path / "two")


def test_more_ranks_than_items_idle_ranks_said_once(tiny_llama_dir, tmp_path):
    task = write_task(tmp_path / "t.jsonl", 1)
    single(tiny_llama_dir, task, tmp_path / "one")
    code, _, err = finish(torchrun(2, args(tiny_llama_dir, task, tmp_path / "two")))
    assert code == 0, err[-3000:]
    assert err.count("have no inputs") == 1 and "2 ranks for 1 item: ranks 1 to 1" in err
    assert_same_table(tmp_path / "one", tmp_path / "two")


def test_ranks_that_disagree_stop_before_work(tiny_llama_dir, tmp_path):
    task = write_task(tmp_path / "t.jsonl", 3)
    other = tmp_path / "other.jsonl"
    other.write_text(task.read_text().replace("cat", "cow", 1))
    script = tmp_path / "pick.py"
    script.write_text(
        "import os, sys, runpy\n"
        f"task = {str(task)!r} if os.environ['RANK'] == '0' else {str(other)!r}\n"
        "sys.argv = ['headmap'] + [task if a == 'TASK' else a for a in sys.argv[1:]]\n"
        "runpy.run_module('headmap', run_name='__main__')\n"
    )
    code, _, err = finish(torchrun(2, [str(script), *args(tiny_llama_dir, Path("TASK"), tmp_path / "run")[2:]]))
    assert code != 0
    assert "disagree before any work" in err and "tasks differs" in err and "items differs" in err
    assert not (tmp_path / "run" / "compress.parquet").exists()
    assert not (tmp_path / "run" / cc.FINGERPRINT_FILE).exists()


def test_a_killed_rank_resumes(tiny_llama_dir, tmp_path):
    task = write_task(tmp_path / "t.jsonl", 12)
    single(tiny_llama_dir, task, tmp_path / "one")
    out = tmp_path / "two"
    proc = torchrun(2, args(tiny_llama_dir, task, out), start_new_session=True)
    rows = out / cc.RANK_DIR.format(rank=1, world=2) / cc.ROWS_FILE
    deadline = time.monotonic() + TIMEOUT_S
    while not rows.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rows.exists(), "rank 1 wrote no rows"
    rank1 = [c for c in psutil.Process(proc.pid).children(recursive=True) if c.environ().get("RANK") == "1"]
    assert len(rank1) == 1
    os.kill(rank1[0].pid, signal.SIGKILL)  # rank 1 dies mid-run
    code, _, err = finish(proc)
    assert code != 0
    assert not (out / "compress.json").exists()
    kept = sum(len(pd.read_parquet(f / cc.ROWS_FILE)) for f in cc.rank_folders(out))
    assert 0 < kept < 12 * 7  # the ranks' finished items are kept, and some are left to do
    code, stdout, err = finish(torchrun(2, args(tiny_llama_dir, task, out)))
    assert code != 0 and "--resume" in err  # without --resume the stopped run is not touched
    code, stdout, err = finish(torchrun(2, args(tiny_llama_dir, task, out, "--resume")))
    assert code == 0, err[-3000:]
    assert f"{kept // 7} of 12 items done" in stdout
    assert_same_table(tmp_path / "one", out)


def test_shard_under_torchrun_is_refused(tiny_llama_dir, tmp_path):
    task = write_task(tmp_path / "t.jsonl", 2)
    code, _, err = finish(torchrun(2, args(tiny_llama_dir, task, tmp_path / "run", "--shard", "0/2")))
    assert code != 0 and "under torchrun the ranks share the items" in err
