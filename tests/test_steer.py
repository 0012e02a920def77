"""Steering: ``headmap.steer`` as a context manager around ``generate``, its composition with
observing (an atlas measured while edits are on measures the edited attention), ``compare`` and the
``headmap steer`` command (a side-by-side table; one line and exit code 2 for every bad edit)."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import tiny_models
import torch
from bounds import TINY_EAGER
from cli_runner import assert_only_error_line as assert_one_line_error
from cli_runner import run

import headmap
from headmap.corpus import Corpus, Sample
from headmap.edits import Ablate, ScaleFirstToken, Temperature
from headmap.errors import EditError
from headmap.probes import SinkProbe
from headmap.steer import compare

tiny = functools.cache(tiny_models.tiny)


def test_steer_is_a_context_manager_around_generate():
    """Greedy generation with a head ablated equals generation of an eager model with the head zeroed by hand."""
    model = tiny("llama")[0]
    ids, mask = tiny_models.padded_batch([7, 10], "left", seed=4)
    settings = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    dim = model.config.hidden_size // model.config.num_attention_heads

    def zero_head(module, args):
        (x,) = args
        x = x.clone()
        x[..., 2 * dim : 3 * dim] = 0
        return (x,)

    hook = model.model.layers[1].self_attn.o_proj.register_forward_pre_hook(zero_head)
    try:
        with torch.no_grad():
            want = model.generate(input_ids=ids, attention_mask=mask, **settings)
    finally:
        hook.remove()
    with torch.no_grad():
        plain = model.generate(input_ids=ids, attention_mask=mask, **settings)
        with headmap.steer(model, edits=["ablate:heads=[[1,2]]"]):
            assert model.config._attn_implementation == "headmap"
            got = model.generate(input_ids=ids, attention_mask=mask, **settings)
    assert model.config._attn_implementation == "eager"
    assert torch.equal(got, want)
    assert not torch.equal(got, plain), "ablating the head should change this generation (pick another head)"


def test_an_atlas_measured_while_steering_shows_the_edited_attention():
    """The sink probe of a scan run inside ``steer`` equals ZeroTuning's edit computed by hand from eager attentions."""
    model = tiny("llama")[0]
    gen = torch.Generator().manual_seed(11)
    inputs = [torch.randint(1, 97, (n,), generator=gen).tolist() for n in (9, 13, 11)]
    corpus = Corpus("steer-test", [Sample(x, {}) for x in inputs], {"name": "steer-test", "inputs": len(inputs)})
    s, edited = 0.2, [(1, 1), (1, 2)]
    with headmap.steer(model, [ScaleFirstToken(heads=edited, factor=s)]):
        atlas = headmap.scan(model, probes=[SinkProbe()], corpus=corpus, batch_size=2, progress=False)
    assert model.config._attn_implementation == "eager"
    want = np.zeros((2, 4))
    unedited = np.zeros((2, 4))
    for x in inputs:
        with torch.no_grad():
            atts = model(input_ids=torch.tensor([x]), output_attentions=True).attentions
        for layer, a in enumerate(atts):
            first = a[0, :, 1:, 0].double().numpy()  # [heads, rows i >= 1]
            unedited[layer] += first.mean(-1) / len(inputs)
            for h in range(4):
                if (layer, h) in edited:
                    first[h] = s * first[h] / (s * first[h] + 1 - first[h])
            want[layer] += first.mean(-1) / len(inputs)
    got = atlas.grid("sink").to_numpy()
    # engine vs eager (TINY_EAGER relative to each probability, tests/bounds.py), through s p / (s p + 1 - p),
    # which at most doubles a relative error (numerator and denominator): 2 * TINY_EAGER (was 1e-6)
    np.testing.assert_allclose(got, want, atol=2 * TINY_EAGER, rtol=0)
    assert np.abs(want - unedited).max() > 0.01


def test_observing_while_steering_sees_each_edit_once():
    """Edits of a steering session apply once when an observing session on the same model is nested inside."""
    model = tiny("gpt2")[0]
    ids, mask = tiny_models.padded_batch([8, 12], "left", seed=2)
    edit = Temperature(heads=[(0, 1), (1, 3)], tau=0.5)
    with torch.no_grad():
        with headmap.observe(model, edits=[edit]):
            alone = model(input_ids=ids, attention_mask=mask).logits
        with headmap.steer(model, [edit]), headmap.observe(model, probes=[SinkProbe()]):
            nested = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(nested, alone, atol=0, rtol=0)


# -- compare and the command line ----------------------------------------------------------------


def test_compare_neutral_edit_gives_the_same_generation(tiny_llama_dir):
    result = compare(str(tiny_llama_dir), ["temperature:tau=1"], "the cat sat on the mat", max_new_tokens=5)
    assert result.identical and result.without == result.steered
    assert len(result.without_ids) == 5
    assert result.edits == ["temperature(tau=1.0) on every head"]


def test_compare_equals_steer_around_generate(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    prompt = "birds fly south in winter and"
    result = compare(model, ["temperature:heads=[[0,0],[1,3]]:tau=0.05"], prompt, max_new_tokens=8, tokenizer=tok)
    enc = tok(prompt, return_tensors="pt")
    enc = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    with torch.no_grad(), headmap.steer(model, [Temperature(heads=[(0, 0), (1, 3)], tau=0.05)]):
        out = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out[0, enc["input_ids"].shape[1] :].tolist() == result.steered_ids


def test_cli_prints_both_generations(monkeypatch, capsys, tiny_llama_dir):
    code, out, err = run(
        monkeypatch,
        capsys,
        "steer",
        str(tiny_llama_dir),
        "--edit",
        "ablate:heads=[[1,0]]",
        "--edit",
        'scale_span:heads=[[0,1],[1,2]]:span="sat on":factor=3',
        "--prompt",
        "the cat sat on the mat",
        "--max-new-tokens",
        "4",
    )
    assert code == 0, err
    assert "without edits" in out and "with edits" in out
    assert "ablate(mode=zero) on 1 head: L1H0" in out
    assert "span='sat on'->[3, 5]" in out and "L0H1, L1H2" in out
    assert "prompt: the cat sat on the mat" in out


def test_cli_heads_rule_reads_the_atlas(monkeypatch, capsys, tiny_llama_dir, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat\nand the dog sat on the log\n")
    atlas = headmap.scan(str(tiny_llama_dir), probes="sink", corpus=str(corpus), out=tmp_path / "run", progress=False)
    top = atlas.top("sink", k=2)
    code, out, err = run(
        monkeypatch,
        capsys,
        "steer",
        str(tiny_llama_dir),
        "--edit",
        'scale_first_token:heads="top 2 sink":factor=0.5',
        "--atlas",
        str(tmp_path / "run"),
        "--prompt",
        "the cat sat",
        "--max-new-tokens",
        "3",
    )
    assert code == 0, err
    names = sorted(f"L{int(r.layer)}H{int(r.head)}" for r in top.itertuples())
    assert f"2 heads (top 2 sink): {', '.join(names)}" in out


@pytest.mark.parametrize(
    ("edit", "needles"),
    [
        ("ablate:heads=[[5,0]]", ("layer 5 head 0, which does not exist", "2 layers x 4 heads")),
        ("ablate:heads=[[0,9]]", ("layer 0 head 9",)),
        ("scale_first_token:factor=-1", ("factor must be at least 0", "-1")),
        ("scale_first_token:factor=nan", ("finite",)),
        ("temperature:tau=inf", ("finite",)),
        ('scale_span:span="dog":factor=2', ("'dog' is not in the prompt",)),
        ("scale_span:span=[3,40]:factor=2", ("outside the prompt",)),
        ("shrink:factor=2", ("unknown edit 'shrink'",)),
        ("temperature:heads=[[0,0]]:temp=2", ("no parameter 'temp'",)),
        ('temperature:heads="top 2 sink":tau=2', ("needs an atlas",)),
        ("ablate:heads=[[0,0]]:mode=mean", ("mode=mean needs",)),
        ("ablate:heads=[[0,0]]:mode=mean:reference=/no/such/file.txt", ("reference file",)),
    ],
)
def test_cli_bad_edits_exit_2(monkeypatch, capsys, tiny_llama_dir, edit, needles):
    code, out, err = run(
        monkeypatch, capsys, "steer", str(tiny_llama_dir), "--edit", edit, "--prompt", "the cat sat on the mat"
    )
    assert_one_line_error(code, err, *needles)
    assert "without edits" not in out


def test_cli_mean_ablation_reads_a_reference_file(monkeypatch, capsys, tiny_llama_dir, tmp_path):
    ref = tmp_path / "ref.txt"
    ref.write_text("a quiet evening by the river\nthe market opens at nine\n")
    code, out, err = run(
        monkeypatch,
        capsys,
        "steer",
        str(tiny_llama_dir),
        "--edit",
        f"ablate:heads=[[1,1]]:mode=mean:reference={ref}",
        "--prompt",
        "the cat sat",
        "--max-new-tokens",
        "3",
    )
    assert code == 0, err
    assert "ablate(mode=mean) on 1 head: L1H1" in out


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--max-new-tokens", "0"), "--max-new-tokens must be at least 1"),
        (("--prompt", "  "), "--prompt is empty"),
    ],
)
def test_cli_bad_options_exit_2(monkeypatch, capsys, tiny_llama_dir, args, needle):
    base = ["steer", str(tiny_llama_dir), "--edit", "temperature:tau=2"]
    if "--prompt" not in args:
        base += ["--prompt", "the cat"]
    code, _, err = run(monkeypatch, capsys, *base, *args)
    assert_one_line_error(code, err, needle)


def test_cli_refuses_an_encoder(monkeypatch, capsys):
    code, _, err = run(monkeypatch, capsys, "steer", "minilm", "--edit", "temperature:tau=2", "--prompt", "the cat")
    assert_one_line_error(code, err, "not a causal language model")


def test_steering_docs_document_every_edit():
    text = (Path(__file__).parents[1] / "docs" / "steering.md").read_text()
    for name in headmap.edits.EDITS:
        assert f"## `{name}`" in text, name
    assert "NAME:key=value" in text


def test_steer_accepts_edit_objects_and_specs_together():
    model = tiny("llama")[0]
    with headmap.steer(model, [Ablate(heads=[(0, 0)]), "temperature:heads=[[1,1]]:tau=2"]) as session:
        assert [e.name for e in session.edits] == ["ablate", "temperature"]
    with pytest.raises(EditError, match="an edit is a spec string or an Edit object"):
        headmap.steer(model, [3])


def test_cli_nan_from_an_edit_is_an_error_naming_it(monkeypatch, capsys, tiny_llama_dir):
    """tau = 1e-45 turns the logits of head 1 of layer 0 into inf, its softmax into NaN: exit 2 naming edit and head."""
    code, out, err = run(
        monkeypatch,
        capsys,
        "steer",
        str(tiny_llama_dir),
        "--edit",
        "temperature:heads=[[0,1]]:tau=1e-45",
        "--prompt",
        "the cat sat on the mat",
        "--max-new-tokens",
        "3",
    )
    assert_one_line_error(code, err, "layer 0 head 1 is NaN or infinite", "temperature(tau=1e-45) on 1 head: L0H1")
    assert "with edits" not in out


def test_steer_session_raises_on_nan_naming_the_edit():
    from headmap.errors import NumericalError

    model = tiny("llama")[0]
    ids = torch.tensor([[3, 5, 7, 9]])
    with headmap.steer(model, "temperature:heads=[[1,2]]:tau=1e-45"), torch.no_grad():
        with pytest.raises(NumericalError, match=r"layer 1 head 2 is NaN.*temperature\(tau=1e-45\) on 1 head: L1H2"):
            model(input_ids=ids)


def test_every_method_page_is_listed_in_the_methods_index():
    """docs/methods/README.md links every page of docs/methods (and of its presses/ folder), and only pages
    that exist; every edit and probe has a page of its own name."""
    root = Path(__file__).parents[1] / "docs" / "methods"
    index = (root / "README.md").read_text()
    import re

    linked = set(re.findall(r"\]\(([a-z0-9_/]+\.md)\)", index))
    pages = {p.relative_to(root).as_posix() for p in root.rglob("*.md")} - {"README.md"}
    assert pages - linked == set(), "pages missing from docs/methods/README.md"
    assert linked - pages == set(), "links to pages that do not exist"
    from headmap.probes import PROBES

    for name in [*headmap.edits.EDITS, *PROBES]:
        assert f"{name}.md" in pages, name
