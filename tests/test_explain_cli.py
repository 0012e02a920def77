"""``headmap explain``: the tables it writes, and one line (exit 2, nothing lost) for every bad input."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from cli_runner import assert_one_line_error, run
from conftest import minilm_dir


def _save(folder, model) -> str:
    """Save ``model`` with MiniLM's tokenizer into ``folder``: a model folder the CLI loads."""
    from transformers import AutoTokenizer

    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory) -> str:
    """A tiny random BERT sequence classifier with 3 labels."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_labels=3
    )
    return _save(tmp_path_factory.mktemp("tiny-classifier"), BertForSequenceClassification(cfg).eval())


@pytest.fixture(scope="module")
def mamba_dir(tmp_path_factory) -> str:
    """A tiny random Mamba: no attention, so the attention methods do not apply to it."""
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    model = MambaForCausalLM(MambaConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=2, state_size=4))
    return _save(tmp_path_factory.mktemp("tiny-mamba"), model.eval())


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


@pytest.mark.parametrize(
    ("model", "args", "needles"),
    [
        ("classifier", ["--target", "class:3"], ["has 3 labels", "0 to 2"]),
        # the CLI loads models through load_model, which refuses a model the engine cannot observe, before
        # any method: the line says why (no attention), for gradient methods too (the API still runs those)
        ("mamba", ["--methods", "saliency,rollout"], ["model type 'mamba'", "has no attention"]),
        ("llama", ["--target", "similarity:a dog"], ["needs a sentence encoder"]),
        ("classifier", ["--target", "similarity:"], ["needs a reference text"]),
    ],
)
def test_bad_target_or_method_for_the_model(
    monkeypatch, capsys, tiny_llama_dir, classifier_dir, mamba_dir, tmp_path, model, args, needles
):
    """Issue 12's bad inputs that depend on the model: a class past the labels, a method that does not
    apply (Mamba has no attention; the line says why); and the similarity target's. Nothing is lost."""
    folder = {"classifier": classifier_dir, "mamba": mamba_dir, "llama": str(tiny_llama_dir)}[model]
    out = tmp_path / "ex"
    out.mkdir()
    (out / "attributions.parquet").write_text("an earlier run")
    argv = ["explain", folder, "--text", "a cat", *args, "--out", str(out), "--overwrite", "--no-progress"]
    code, _, err = run(monkeypatch, capsys, *argv)
    assert_one_line_error(code, err, *needles)
    assert (out / "attributions.parquet").read_text() == "an earlier run"


def test_a_classifier_folder_keeps_its_head(monkeypatch, capsys, classifier_dir, tmp_path):
    """class:N through the CLI: the folder loads with its classification head (not as a bare encoder)."""
    out = tmp_path / "ex"
    code, _, err = run(
        monkeypatch, capsys, "explain", classifier_dir, "--text", "a cat sat", "--target", "class:2",
        "--methods", "saliency,rollout", "--out", str(out), "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    frame = pd.read_parquet(out / "attributions.parquet")
    assert set(frame.method) == {"saliency", "rollout"} and (frame.target == "class:2").all()
    assert frame.value.notna().all() and len(frame) == 2 * 5  # [CLS] a cat sat [SEP]
