"""Data-parallel eval and tune (issue 13): ``python -m torch.distributed.run --nproc-per-node 2 -m headmap eval``
on gloo (2 CPU processes) writes the files of a single-process eval.

Every rank computes whole work units of the single-process run (each batch of scored options, each
shared context, each batch of needle decoding: headmap.parallel.split_work), so every per-item number
comes from the same forward on the same inputs as in one process and the items tables are compared
for equality; the statistics are computed from them the same way, so summary.json is equal too.
Also here: ``accelerate launch`` starts a data-parallel scan (it sets the variables torchrun sets).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from test_distributed_scan import TIMEOUT_S, args, assert_same_run, corpus_lines, env, finish, single, torchrun

import headmap

EDIT = "ablate:heads=[[0,1],[1,2]]:mode=zero"
CONTEXTS = ["The capital of France is", "Two plus two is", "Snow is", "Question: is fire hot?\nAnswer:", "Ice is"]


@pytest.fixture(scope="module")
def task_file(tmp_path_factory) -> Path:
    # 13 items (an odd number, not a multiple of the batch), some with a context long enough to be shared
    items = []
    for i in range(13):
        context = CONTEXTS[i % len(CONTEXTS)] + (" and so on" * 30 if i % 4 == 0 else "")
        items.append({"id": f"q{i}", "context": context, "options": [" yes", " no", " maybe"][: 2 + i % 2],
                      "answer": i % 2})  # fmt: skip
    path = tmp_path_factory.mktemp("dpe") / "task.jsonl"
    path.write_text("".join(json.dumps(it) + "\n" for it in items), encoding="utf-8")
    return path


def eval_args(model: Path, task: str, out: Path, *extra: str) -> list[str]:
    return ["-m", "headmap", "eval", str(model), "--task", task, "--edit", EDIT, "--random-heads", "2",
            "--bootstrap", "200", "--batch-size", "3", "--out", str(out), *extra]  # fmt: skip


def one_process(argv: list[str]) -> None:
    done = subprocess.run([sys.executable, *argv], env=env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr


def assert_same_eval(a: Path, b: Path) -> None:
    one, two = pd.read_parquet(a / "items.parquet"), pd.read_parquet(b / "items.parquet")
    assert len(one) > 0
    pd.testing.assert_frame_equal(one, two, check_exact=True)
    assert json.loads((a / "summary.json").read_text()) == json.loads((b / "summary.json").read_text())


def test_two_ranks_score_the_items_of_one_process(tiny_llama_dir, task_file, tmp_path):
    one_process(eval_args(tiny_llama_dir, str(task_file), tmp_path / "one"))
    code, out, err = finish(torchrun(2, eval_args(tiny_llama_dir, str(task_file), tmp_path / "two")))
    assert code == 0, err[-3000:]
    assert out.count("wrote ") == 1  # rank 0 prints and writes; rank 1 is quiet
    assert_same_eval(tmp_path / "one", tmp_path / "two")
    assert len(pd.read_parquet(tmp_path / "one" / "items.parquet")) == 13


def test_two_ranks_needle_eval(tiny_llama_dir, tmp_path):
    needle = "needle:lengths=64:depths=0,0.5,1"
    extra = ["--limit", "5", "--max-length", "64"]
    one_process(eval_args(tiny_llama_dir, needle, tmp_path / "one", *extra))
    code, _, err = finish(torchrun(2, eval_args(tiny_llama_dir, needle, tmp_path / "two", *extra)))
    assert code == 0, err[-3000:]
    assert_same_eval(tmp_path / "one", tmp_path / "two")


def test_two_ranks_tune(tiny_llama_dir, task_file, tmp_path):
    lines = task_file.read_text().splitlines(keepends=True)
    dev, test = tmp_path / "dev.jsonl", tmp_path / "test.jsonl"
    dev.write_text("".join(lines[:7]))
    test.write_text("".join(lines[7:]))

    def argv(out: Path) -> list[str]:
        return ["-m", "headmap", "tune", str(tiny_llama_dir), "--task-dev", str(dev), "--task-test", str(test),
                "--edit-template", "scale_first_token:heads=[[0,1]]:factor={f}", "--grid", "0.5,1,2",
                "--bootstrap", "200", "--batch-size", "2", "--allow-overlap", "--out", str(out)]  # fmt: skip

    one_process(argv(tmp_path / "one"))
    code, _, err = finish(torchrun(2, argv(tmp_path / "two")))
    assert code == 0, err[-3000:]
    assert_same_eval(tmp_path / "one", tmp_path / "two")
    pd.testing.assert_frame_equal(
        pd.read_parquet(tmp_path / "one" / "dev.parquet"), pd.read_parquet(tmp_path / "two" / "dev.parquet")
    )


def test_ranks_with_other_tasks_stop_before_work(tiny_llama_dir, task_file, tmp_path):
    other = tmp_path / "other.jsonl"
    other.write_text(task_file.read_text().replace("Snow", "Rain", 1))
    script = tmp_path / "pick.py"
    script.write_text(
        "import os, sys, runpy\n"
        f"task = {str(task_file)!r} if os.environ['RANK'] == '0' else {str(other)!r}\n"
        "sys.argv = ['headmap'] + [task if a == 'TASK' else a for a in sys.argv[1:]]\n"
        "runpy.run_module('headmap', run_name='__main__')\n"
    )
    argv = eval_args(tiny_llama_dir, "TASK", tmp_path / "run")[2:]
    code, _, err = finish(torchrun(2, [str(script), *argv]))
    assert code != 0
    assert "disagree before any work" in err and "--task differs" in err and "inputs differs" in err
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_accelerate_launch_runs_a_data_parallel_scan(tiny_llama_dir, tmp_path):
    """``accelerate launch --multi_gpu --num_processes 2`` starts 2 ranks through torch's elastic launcher
    (on a machine without GPUs too: our process group is then gloo); plain ``--num_processes 2`` without a
    GPU would start one process (accelerate's multi-CPU path wants mpirun)."""
    corpus = tmp_path / "c.txt"
    corpus.write_text(corpus_lines(2))  # one batch of 3 for 2 ranks: rank 0 says once that rank 1 is idle
    plain = single(tiny_llama_dir, corpus, tmp_path / "one")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              *args(tiny_llama_dir, corpus, tmp_path / "two")]  # fmt: skip
    proc = subprocess.Popen(launch, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    code, out, err = finish(proc)
    assert code == 0, err[-3000:]
    assert out.count("wrote ") == 1
    assert err.count("have no inputs") == 1  # two ranks ran (one process would have no idle rank to name)
    assert_same_run(plain, headmap.Atlas.load(tmp_path / "two"))
