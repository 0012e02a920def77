"""The engine on real pretrained weights: SmolLM2-135M-Instruct (Llama, GQA) and all-MiniLM-L6-v2 (BERT)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from bounds import eager_bound

import headmap
from headmap.models import BUILTIN_MODELS, load_model, package_path
from headmap.probes import SinkProbe
from headmap.probes.retrieval import RetrievalProbe

PROSE = [
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
    "Attention heads route information between tokens.",
    "It was the best of times, it was the worst of times, it was the age of wisdom.",
]


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2")


@pytest.fixture(scope="module")
def minilm():
    return load_model("minilm")


def encode(tokenizer, texts, side):
    tokenizer.padding_side = side
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer(texts, return_tensors="pt", padding=True)


def run(model, batch, impl, **kw):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(**batch, **kw)


def rel_err(a, b, valid):
    diff = (a - b)[valid].abs().max()
    return float(diff / b[valid].abs().max())


@pytest.mark.slow
def test_smollm2_logits_equal_eager(smollm2):
    model, tok = smollm2.model, smollm2.tokenizer
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert model.config.num_attention_heads == 9 and model.config.num_key_value_heads == 3
    batch = encode(tok, PROSE, "left")
    eager = run(model, batch, "eager", output_attentions=True)
    headmap.engine_config.budget_bytes = 2**20  # several blocks per layer
    probe = SinkProbe()
    with torch.no_grad(), headmap.observe(model, probes=[probe]):
        ours = model(**batch)
    valid = batch["attention_mask"].bool()
    # engine vs eager through 30 layers, heads of 64 dimensions, inputs under 32 tokens (tests/bounds.py):
    # eager_bound(32, 30, 64) = 2 * 4 * 30 * gamma(64) ~ 9.2e-4 of the largest logit (was 1e-5, measured)
    smol_bound = eager_bound(32, layers=30, head_dim=64)
    assert rel_err(ours.logits, eager.logits, valid) < smol_bound
    # the probe saw eager's probabilities: its sink scores equal the brute-force ones
    expected = []
    for b in range(len(PROSE)):
        real = torch.nonzero(valid[b]).flatten()
        expected.append([a[b][:, real[1:], real[0]].double().mean(-1).numpy() for a in eager.attentions])
    np.testing.assert_allclose(probe.values(), np.mean(expected, axis=0), atol=smol_bound)  # as above (was 1e-6)


@pytest.mark.slow
def test_smollm2_is_a_real_language_model(smollm2):
    """Greedy continuation under headmap equals eager's, and the model predicts English well."""
    model, tok = smollm2.model, smollm2.tokenizer
    batch = encode(tok, ["The capital of France is"], "left")
    gen = {}
    for impl in ("eager", "headmap"):
        model.set_attn_implementation("eager")
        with torch.no_grad(), headmap.observe(model) if impl == "headmap" else torch.no_grad():
            gen[impl] = model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(gen["eager"], gen["headmap"])
    assert "Paris" in tok.decode(gen["headmap"][0])
    text = tok(PROSE[2], return_tensors="pt")
    with torch.no_grad(), headmap.observe(model):
        loss = model(**text, labels=text["input_ids"]).loss
    assert float(torch.exp(loss)) < 60  # a real LM: random weights give ~49,000


@pytest.mark.slow
def test_smollm2_cache_equals_the_gguf(smollm2):
    """The safetensors cache holds exactly what transformers dequantizes from the GGUF."""
    from transformers import AutoModelForCausalLM

    gguf = package_path("smollm2") / BUILTIN_MODELS["smollm2"]["file"]
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ours = smollm2.model.state_dict()
    theirs = direct.state_dict()
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name


@pytest.mark.slow
def test_minilm_outputs_equal_eager(minilm):
    model, tok = minilm.model, minilm.tokenizer
    assert model.config.model_type == "bert" and model.config.num_hidden_layers == 6
    batch = encode(tok, PROSE, "right")
    eager = run(model, batch, "eager", output_attentions=True)
    probe = SinkProbe()
    with torch.no_grad(), headmap.observe(model, probes=[probe]):
        ours = model(**batch)
    valid = batch["attention_mask"].bool()
    # engine vs eager through 6 layers, heads of 32 dimensions, inputs under 32 tokens (tests/bounds.py):
    # eager_bound(32, 6, 32) = 2 * 4 * 6 * gamma(32) ~ 9.2e-5 of the largest value (was 1e-5, measured)
    mini_bound = eager_bound(32, layers=6, head_dim=32)
    assert rel_err(ours.last_hidden_state, eager.last_hidden_state, valid) < mini_bound
    expected = []
    for b in range(len(PROSE)):
        real = torch.nonzero(valid[b]).flatten()
        expected.append([a[b][:, real[1:], real[0]].double().mean(-1).numpy() for a in eager.attentions])
    np.testing.assert_allclose(probe.values(), np.mean(expected, axis=0), atol=mini_bound)  # as above (was 1e-6)


def test_smollm2_retrieval_heads_in_generation_mode(smollm2):
    """The paper's setting on a real model: SmolLM2 answers the built-in needle questions by copying.

    Measured at 256 tokens, depths 0 / 0.5 / 1: every needle reproduced, the top retrieval head
    (layer 18, head 6 on this build) copies 0.9-1.0 of the needle, most heads copy nothing.
    """
    probe = RetrievalProbe()
    atlas = headmap.scan(
        smollm2.model,
        tokenizer=smollm2.tokenizer,
        probes=[probe],
        corpus="needle:depths=0,0.5,1",
        max_length=256,
        batch_size=3,
        progress=False,
    )
    assert probe.reproduced >= 2, f"SmolLM2 reproduced {probe.reproduced} of {probe.instances} needles"
    top = atlas.top("retrieval", k=1).iloc[0]
    assert top.value > 0.6, atlas.top("retrieval", k=5)
    assert (atlas.heads.value < 0.05).mean() > 0.8  # retrieval heads are sparse
