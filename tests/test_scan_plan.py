"""How a scan chooses probes and corpora, and what it refuses.

- without --probes: every probe that applies to the model (encoders: no causal-only probe);
- without --corpus: each probe reads its own built-in corpus; with one, probes that cannot read
  it are an error when named, skipped (and recorded in meta.json) when they come from the default;
- probe parameters on the command line (``waad:window=20``);
- NaN or inf in attention stops the scan with the layer and head, and writes no table.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import headmap
from headmap.cli import app
from headmap.errors import NumericalError, ProbeError
from headmap.probes import PROBES, default_probe_names, make_probes
from headmap.probes.waad import WaadProbe


def test_default_probe_sets():
    causal = default_probe_names(causal=True)
    encoder = default_probe_names(causal=False)
    assert "retrieval" in causal and "induction" in causal and "sink" in causal
    assert not any(PROBES[n].causal_only for n in encoder)
    assert set(encoder) < set(causal)
    assert all(PROBES[n].default for n in causal)


def test_probe_parameters_from_names():
    (waad,) = make_probes("waad:window=20")
    assert isinstance(waad, WaadProbe) and waad.window == 20
    probes = make_probes("sink, retrieval:mode=teacher")
    assert [p.name for p in probes] == ["sink", "retrieval"] and probes[1].mode == "teacher"
    with pytest.raises(ProbeError, match="probe waad has no parameter 'size'; its parameters: window"):
        make_probes("waad:size=3")
    with pytest.raises(ProbeError, match="not key=value"):
        make_probes("waad:20")
    with pytest.raises(ProbeError, match="whole number of tokens >= 1"):
        make_probes("waad:window=0")
    with pytest.raises(ProbeError, match="probe waad sets window twice"):
        make_probes("waad:window=3:window=4")
    (span,) = make_probes('span:key="Answer: yes, no":query=[0,2]')  # quotes and brackets keep : and ,
    assert span.key == "Answer: yes, no" and list(span.query) == [0, 2]
    with pytest.raises(ProbeError, match="unclosed quote"):
        make_probes('span:key="Answer')
    with pytest.raises(ProbeError, match="named twice"):
        make_probes("waad,waad:window=3")
    with pytest.raises(ProbeError, match="unknown probe 'attention'"):
        make_probes("sink,attention")


@pytest.fixture(scope="module")
def model_and_tok(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    return model, AutoTokenizer.from_pretrained(tiny_llama_dir)


def test_named_probe_that_cannot_read_the_corpus_is_an_error(model_and_tok, tmp_path):
    model, tok = model_and_tok
    corpus = tmp_path / "c.txt"
    corpus.write_text("one two three four five\n")
    with pytest.raises(ProbeError, match="probe induction cannot read corpus '.*c.txt'.*repeated twice"):
        headmap.scan(model, tokenizer=tok, probes="sink,induction", corpus=corpus, progress=False)


def test_default_probes_that_cannot_read_a_user_corpus_are_skipped(model_and_tok, tmp_path):
    model, tok = model_and_tok
    corpus = tmp_path / "c.txt"
    corpus.write_text("one two three four five six seven\neight nine ten\n")
    atlas = headmap.scan(model, tokenizer=tok, corpus=corpus, progress=False, out=tmp_path / "run")
    skipped = atlas.meta["skipped_probes"]
    assert {"duplicate_token", "induction", "retrieval"} <= set(skipped)
    assert "repeated twice" in skipped["induction"]
    assert {"sink", "entropy", "prev_token"} <= set(atlas.heads.probe)
    assert {c.rsplit("/", 1)[-1] for c in atlas.meta["probe_corpora"].values()} == {"c.txt"}
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["skipped_probes"] == skipped


def test_nan_attention_names_layer_and_head_and_writes_nothing(model_and_tok, tmp_path):
    model, tok = model_and_tok
    broken = AutoModelForCausalLM.from_config(model.config).eval()
    broken.load_state_dict(model.state_dict())
    head_dim = broken.config.hidden_size // broken.config.num_attention_heads
    with torch.no_grad():
        broken.model.layers[1].self_attn.q_proj.weight[2 * head_dim, :] = math.nan  # head 2 of layer 1
    corpus = tmp_path / "c.txt"
    corpus.write_text("one two three four five\n")
    out = tmp_path / "run"
    with pytest.raises(NumericalError, match="layer 1 head 2 is NaN or infinite"):
        headmap.scan(broken, tokenizer=tok, probes="sink,entropy", corpus=corpus, out=out, progress=False)
    assert not (out / "heads.parquet").exists()


def test_cli_lists_skipped_probes_and_exits_2_on_unreadable_corpus(tiny_llama_dir, tmp_path):
    from typer.testing import CliRunner

    corpus = tmp_path / "c.txt"
    corpus.write_text("one two three four five six\n")
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "scan",
            str(tiny_llama_dir),
            "--probes",
            "prev_token,duplicate_token",
            "--corpus",
            str(corpus),
            "--out",
            str(tmp_path / "a"),
        ],
    )
    assert result.exit_code != 0
    assert isinstance(result.exception, ProbeError) and "duplicate_token cannot read" in str(result.exception)
    result = runner.invoke(
        app, ["scan", str(tiny_llama_dir), "--corpus", str(corpus), "--out", str(tmp_path / "b"), "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    assert "skipped induction" in result.output


def test_strict_refuses_an_over_long_line_and_writes_nothing(tiny_llama_dir, tmp_path):
    from typer.testing import CliRunner

    corpus = tmp_path / "c.txt"
    corpus.write_text("short line\n" + "word " * 40 + "\n")
    out = tmp_path / "run"
    args = ["scan", str(tiny_llama_dir), "--probes", "sink", "--corpus", str(corpus), "--max-length", "16"]
    result = CliRunner().invoke(app, [*args, "--strict", "--out", str(out)])
    assert result.exit_code != 0 and "line 2" in str(result.exception) and "--strict" in str(result.exception)
    assert not out.exists() or not any(out.iterdir())
    with pytest.warns(UserWarning, match="truncated"):
        atlas = headmap.scan(str(tiny_llama_dir), probes="sink", corpus=corpus, max_length=16, progress=False)
    assert atlas.meta["corpus"]["truncated"] == 1
