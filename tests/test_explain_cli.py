"""``headmap explain``: the tables it writes, and one line (exit 2, nothing lost) for every bad input."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from test_cli import assert_one_line_error, run


def test_explain_writes_the_tables(monkeypatch, capsys, tiny_llama_dir, tmp_path):
    out = tmp_path / "ex"
    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat sat on the mat\n\nbirds fly south in winter\n")
    code, stdout, err = run(
        monkeypatch,
        capsys,
        "explain",
        str(tiny_llama_dir),
        "--corpus",
        str(corpus),
        "--methods",
        "rollout,attn_grad,saliency,integrated_gradients,occlusion",
        "--steps",
        "4",
        "--out",
        str(out),
        "--no-progress",
    )
    assert code == 0, err
    attributions = pd.read_parquet(out / "attributions.parquet")
    assert list(attributions.columns) == ["sample", "position", "token_id", "token", "method", "target", "value"]
    assert set(attributions.method) == {"rollout", "attn_grad", "saliency", "integrated_gradients", "occlusion"}
    assert sorted(attributions["sample"].unique()) == [0, 1]  # the blank line is not an input
    assert (attributions.target == "next").all()
    faith = pd.read_parquet(out / "faithfulness.parquet")
    assert {"comprehensiveness", "sufficiency", "deletion", "insertion", "spearman"} <= set(faith.metric)
    assert "random" in set(faith.method)
    meta = json.loads((out / "explain.json").read_text())
    assert meta["inputs"] == 2 and meta["methods"]["integrated_gradients"]["steps"] == 4
    assert len(meta["integrated_gradients_gap"]) == 2
    assert "comprehensiveness" in stdout
    page = (out / "explain.html").read_text()
    assert page.count("<polyline") == 2 * 6  # deletion and insertion: five methods and the random control
    assert page.count("<h2>input ") == 2 and page.count('<td class="strip">') == 2 * 5


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--text", "a cat", "--target", "token:unbelievableness"], ["tokens for this tokenizer"]),
        (["--text", "a cat", "--target", "class:0"], ["no classification head"]),
        (["--text", "a cat", "--target", "contrast:cat,cat"], ["same token"]),
        (["--text", "a cat", "--steps", "0"], ["steps >= 1"]),
        (["--text", "   "], ["text 0 is empty"]),
        (["--text", "a cat", "--methods", "lime"], ["unknown method 'lime'"]),
        (["--text", "a cat", "--corpus", "x.txt"], ["one of the two"]),
        ([], ["one of the two"]),
    ],
)
def test_bad_input_is_one_line_and_keeps_what_was_written(monkeypatch, capsys, tiny_llama_dir, tmp_path, args, needles):
    out = tmp_path / "ex"
    out.mkdir()
    (out / "attributions.parquet").write_text("an earlier run")
    code, _, err = run(monkeypatch, capsys, "explain", str(tiny_llama_dir), *args, "--out", str(out), "--overwrite")
    assert_one_line_error(code, err, *needles)
    assert (out / "attributions.parquet").read_text() == "an earlier run"
    assert not (out / "faithfulness.parquet").exists()


def test_an_earlier_explanation_is_not_replaced_without_overwrite(monkeypatch, capsys, tiny_llama_dir, tmp_path):
    out = tmp_path / "ex"
    out.mkdir()
    (out / "faithfulness.parquet").write_text("an earlier run")
    code, _, err = run(monkeypatch, capsys, "explain", str(tiny_llama_dir), "--text", "a cat", "--out", str(out))
    assert_one_line_error(code, err, "already holds an explanation", "--overwrite")
    assert (out / "faithfulness.parquet").read_text() == "an earlier run"


def test_out_that_is_a_file(monkeypatch, capsys, tiny_llama_dir, tmp_path):
    out = tmp_path / "file"
    out.write_text("x")
    code, _, err = run(monkeypatch, capsys, "explain", str(tiny_llama_dir), "--text", "a cat", "--out", str(out))
    assert_one_line_error(code, err, "is a file, not a folder")
