"""The ``similarity:TEXT`` target of a sentence encoder, against a computation written here.

y = cos(mean_j h_j(x), mean_j h_j(ref)), h the encoder's last hidden states over the real tokens:
sentence-transformers' mean pooling, the score all-MiniLM-L6-v2 was trained to rank by. A tiny random
BertModel (no head) in float64 with eager attention; the brute force reads ``output_attentions`` and
differentiates by hand. Bounds: as tests/test_explain.py derives for its float64 models (the engine's
float32 softmax is the one difference left), 1e-6 on attributions; the target value itself is the
same float64 forward except that softmax, whose relative error (T + 2) 2^-24 <= 8.4e-7 (T <= 12)
reaches a cosine in [-1, 1] through two layers damped as there: 1e-6.
"""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertModel

import headmap.explain as E
from headmap.errors import ModelError, OptionError

LENGTHS = (7, 12, 9)  # one batch: the shorter inputs carry (right) padding
REF = [2, 5, 8, 13, 21]
SPEC = "similarity:" + ",".join(map(str, REF))


@pytest.fixture(scope="module")
def tiny_llama(tiny_llama_dir):
    from transformers import AutoTokenizer, LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(tiny_llama_dir).eval(), AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        attn_implementation="eager",
    )
    return BertModel(cfg, add_pooling_layer=False).double().eval()


def _rows():
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(1, 97, (n,), generator=gen).tolist() for n in LENGTHS]


def _embedding(model, ids=None, embeds=None):
    if embeds is None:
        out = model(input_ids=torch.tensor([ids]), output_attentions=True)
    else:
        out = model(inputs_embeds=embeds, output_attentions=True)
    return out.last_hidden_state[0].mean(dim=0), out.attentions


def _brute(model, ids):
    """(y, rollout, attn_grad, saliency) of one unpadded input, by hand."""
    with torch.no_grad():
        ref, _ = _embedding(model, REF)
    x = model.get_input_embeddings()(torch.tensor([ids])).detach().requires_grad_(True)
    emb, attns = _embedding(model, embeds=x)
    y = torch.nn.functional.cosine_similarity(emb, ref, dim=0)
    grads = torch.autograd.grad(y, [*attns, x])
    n = len(ids)
    rows = torch.full((n,), 1.0 / n, dtype=torch.float64)  # every token, weight 1/n: the mean pooling
    roll, rel = rows.clone(), torch.eye(n, dtype=torch.float64)
    for a in reversed(attns):
        roll = roll @ (0.5 * a[0].mean(0) + 0.5 * torch.eye(n, dtype=torch.float64))
    for a, g in zip(attns, grads[:-1], strict=True):
        rel = rel + (g[0] * a[0]).clamp(min=0).mean(0) @ rel
    sal = (grads[-1][0] * x[0]).norm(dim=-1)
    return y.detach(), roll.detach(), (rows @ rel).detach(), sal.detach()


def test_similarity_equals_brute_force_on_a_padded_batch(encoder):
    rows = _rows()
    frame = E.explain(encoder, None, rows, target=SPEC, methods=["rollout", "attn_grad", "saliency"], batch_size=3)
    job = E.make_job(encoder, E.parse_target(SPEC, encoder), rows, 0)
    assert not job.left_pad  # an encoder: right padding, positions from 0 as without padding
    with torch.no_grad():
        scores = job.score()
    for b, ids in enumerate(rows):
        y, roll, grad, sal = _brute(encoder, ids)
        assert abs(float(scores[b]) - float(y)) < 1e-6  # module docstring
        sub = frame[frame["sample"] == b].sort_values("position")
        for method, want in (("rollout", roll), ("attn_grad", grad), ("saliency", sal)):
            got = torch.tensor(sub[sub.method == method].value.to_numpy())
            assert got.shape == want.shape
            assert torch.allclose(got, want, rtol=0, atol=1e-6), method  # module docstring


def test_similarity_of_the_reference_to_itself_is_one(encoder):
    job = E.make_job(encoder, E.parse_target(SPEC, encoder), [REF], 0)
    with torch.no_grad():
        assert abs(float(job.score()[0]) - 1.0) < 1e-6  # the same forward up to the engine's float32 softmax


def test_similarity_integrated_gradients_is_complete(encoder):
    frame = E.explain(encoder, None, _rows(), target=SPEC, methods=[E.IntegratedGradients(steps=64)], batch_size=3)
    gaps = frame.attrs["integrated_gradients_gap"]
    assert len(gaps) == 3 and all(g == g for g in gaps)  # finite, one per input
    # the midpoint rule's error falls as 1/m^2; on this smooth tiny model 64 points leave far below
    # the cosine's range of 2 (measured ~1e-5); 1e-2 fails only if the path or the target is wrong
    assert max(gaps) < 1e-2, gaps


def test_similarity_on_a_language_model_is_refused(tiny_llama):
    model, tok = tiny_llama
    with pytest.raises(ModelError, match="needs a sentence encoder"):
        E.explain(model, tok, ["a text"], target="similarity:a cat")


def test_similarity_without_a_reference(encoder):
    with pytest.raises(OptionError, match="needs a reference text"):
        E.explain(encoder, None, [[1, 2, 3]], target="similarity: ")


def test_lm_targets_on_an_encoder_point_to_similarity(encoder):
    with pytest.raises(ModelError, match="similarity:TEXT on a sentence encoder"):
        E.explain(encoder, None, [[1, 2, 3]], target="next")
