"""``headmap compress``: its table, summary and plot on a tiny model, and one clear line for each bad input."""

from __future__ import annotations

import json
import sys

import pandas as pd
import pytest

from headmap import cli


def run(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["headmap", *args])
    code = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("headmap: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in errors[0], errors[0]


@pytest.fixture
def task_file(tmp_path):
    path = tmp_path / "task.jsonl"
    lines = []
    for k in range(3):
        context = " ".join(["the cat sat on the mat and the dog sat on the log"] * 6) + f" the code is {k}7{k}."
        lines.append(json.dumps({"context": context, "question": "what is the code?", "answer": f"{k}7{k}"}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_compress_writes_table_summary_and_plot(monkeypatch, capsys, tiny_llama_dir, task_file, tmp_path):
    out = tmp_path / "run"
    code, stdout, err = run(
        monkeypatch, capsys, "compress", str(tiny_llama_dir), "--press", "knorm", "--press", "snapkv:window=8",
        "--ratio", "0.25,0.5", "--task", str(task_file), "--max-new-tokens", "3", "--out", str(out),
    )  # fmt: skip
    assert code == 0, err
    table = pd.read_parquet(out / "compress.parquet")
    assert {"press", "ratio", "item", "correct", "cache_bytes", "prefill_s", "decode_s_per_token"} <= set(table.columns)
    assert len(table) == 3 * (1 + 2 * 2)  # items x (full + presses x ratios)
    full = table[table.press == "full"].set_index("item").cache_bytes
    for _, row in table[table.press != "full"].iterrows():
        # cache bytes are measured from the tensors: within 2 % of (1 - ratio) x the full cache
        assert abs(row.cache_bytes - (1 - row.ratio) * full[row["item"]]) <= 0.02 * full[row["item"]]
    summary = json.loads((out / "compress.json").read_text())["summary"]
    assert {(s["press"], s["ratio"]) for s in summary} >= {("full", 0.0), ("knorm", 0.25), ("snapkv:window=8", 0.5)}
    assert all(s["low"] <= s["accuracy"] <= s["high"] for s in summary)
    assert (out / "compress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--press", "zip"], ["unknown press 'zip'"]),
        (["--press", "snapkv:windw=3"], ["no parameter 'windw'"]),
        (["--press", "knorm", "--ratio", "0.5,1"], ["outside [0, 1)"]),
        (["--press", "knorm", "--ratio", "half"], ["not a number"]),
        (["--press", "head_aware"], ["head_aware needs an atlas"]),
    ],
)
def test_bad_options(monkeypatch, capsys, tiny_llama_dir, task_file, tmp_path, args, needles):
    out = tmp_path / "run"
    code, _, err = run(monkeypatch, capsys, "compress", str(tiny_llama_dir), *args, "--task", str(task_file),
                       "--out", str(out))  # fmt: skip
    one_line_error(code, err, *needles)
    assert not out.exists()  # nothing written before the options are checked


def test_malformed_task_line(monkeypatch, capsys, tiny_llama_dir, tmp_path):
    task = tmp_path / "bad.jsonl"
    task.write_text('{"context": "a b c", "answer": "c"}\n{"context": 3}\n')
    code, _, err = run(monkeypatch, capsys, "compress", str(tiny_llama_dir), "--press", "knorm", "--task", str(task),
                       "--out", str(tmp_path / "o"))  # fmt: skip
    one_line_error(code, err, "line 2")


def test_existing_table_is_not_replaced(monkeypatch, capsys, tiny_llama_dir, task_file, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "compress.parquet").write_text("earlier")
    code, _, err = run(monkeypatch, capsys, "compress", str(tiny_llama_dir), "--press", "knorm", "--task",
                       str(task_file), "--out", str(out))  # fmt: skip
    one_line_error(code, err, "--overwrite")
    assert (out / "compress.parquet").read_text() == "earlier"


def test_context_longer_than_the_model_limit(monkeypatch, capsys, tiny_llama_dir, tmp_path):
    task = tmp_path / "long.jsonl"
    task.write_text(json.dumps({"id": "long-1", "context": "the cat sat " * 200, "answer": "cat"}) + "\n")
    out = tmp_path / "o"
    code, _, err = run(monkeypatch, capsys, "compress", str(tiny_llama_dir), "--press", "knorm", "--task", str(task),
                       "--out", str(out))  # fmt: skip
    one_line_error(code, err, "item long-1", "limit of 256")
    assert not (out / "compress.parquet").exists()
