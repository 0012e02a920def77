"""Head importance: gate gradients against finite differences, ablation deltas against the Ablate edit,
AttentionInfluence per document. (The planted-model checks are in test_planted_heads.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from bounds import batch_bound, gamma, reorder

from headmap.corpus import Sample
from headmap.edits import Ablate
from headmap.engine import observe
from headmap.errors import OptionError
from headmap.evaluation.importance import attention_influence, gate_gradients, gated_losses, head_importance
from headmap.models import load_model

DOCS = [
    "the cat sat on the mat and looked at the door",
    "a river runs through the old town under three bridges",
    "numbers one two three four five six seven",
    "short one",
]


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load_model(str(tiny_llama_dir))


def _samples(tiny) -> list[Sample]:
    return [Sample(tiny.tokenizer(d)["input_ids"]) for d in DOCS]


def test_gate_gradient_equals_finite_differences(tiny):
    """d L(x) / d xi_h from one backward pass per batch equals (L(1 + e) - L(1 - e)) / 2e, input by input."""
    samples = _samples(tiny)
    pad = tiny.tokenizer.pad_token_id
    grads, base = gate_gradients(tiny.model, samples, pad, batch_size=3)
    assert grads.shape == (len(samples), 2, 4)
    # the tiny Llama's logits are below 1, so a mean cross-entropy moves by at most twice the largest logit
    # change, batch_bound(64) (tests/bounds.py) under other batch sizes; the vocabulary's sum runs in the same
    # order on both sides (was rtol=1e-5 on losses near 10)
    loss_bound = 2 * batch_bound(64)
    np.testing.assert_allclose(base, gated_losses(tiny.model, samples, None, pad), rtol=0, atol=loss_bound)
    eps = 1e-2
    for layer, head in [(0, 0), (0, 3), (1, 1), (1, 2)]:
        plus, minus = torch.ones(2, 1, 4), torch.ones(2, 1, 4)
        plus[layer, 0, head] += eps
        minus[layer, 0, head] -= eps
        fd = (gated_losses(tiny.model, samples, plus, pad) - gated_losses(tiny.model, samples, minus, pad)) / (2 * eps)
        # Not a rounding bound but a finite difference's own error: rtol 2e-2 covers the truncation
        # eps^2 / 6 * |L'''| at eps = 1e-2; atol 2e-4 covers the rounding of the two losses divided by 2 eps,
        # to first order (they differ only through the gates, on the same shapes and summation order). A worst
        # case would not help here: a loss's float32 rounding over a 30522-token vocabulary, / 2 eps, reaches 0.1.
        np.testing.assert_allclose(grads[:, layer, head], fd, rtol=2e-2, atol=2e-4, err_msg=f"L{layer}H{head}")
    assert np.abs(grads).max() > 1e-3  # a real signal, not all zeros
    assert not any(p.grad is not None for p in tiny.model.parameters())
    assert all(p.requires_grad for p in tiny.model.parameters())  # restored


def test_gradients_do_not_depend_on_the_batch(tiny):
    samples = _samples(tiny)
    pad = tiny.tokenizer.pad_token_id
    together, _ = gate_gradients(tiny.model, samples, pad, batch_size=4)
    alone, _ = gate_gradients(tiny.model, samples, pad, batch_size=1)
    # other batch sizes: the forward chain and its backward, 2 * LAYER_STAGES sums per layer of at most 64 terms:
    # reorder(64, 4 * 9 * 2) ~ 5.5e-4 of the largest gradient (tests/bounds.py; was rtol=1e-4, atol=1e-6)
    grad_bound = reorder(64, 4 * 9 * 2) * np.abs(alone).max()
    np.testing.assert_allclose(together, alone, rtol=0, atol=grad_bound)


def test_head_importance_table(tiny):
    samples = _samples(tiny)
    frame = head_importance(tiny.model, tiny.tokenizer, samples, batch_size=2)
    assert list(frame.columns) == [
        "layer", "head", "kv_head", "grad_importance", "grad_stderr", "ablation_delta", "ablation_stderr", "n",
    ]  # fmt: skip
    assert len(frame) == 8 and (frame.n == len(samples)).all()
    assert list(frame.kv_head) == [0, 0, 1, 1] * 2  # 4 query heads share 2 kv heads
    grads, _ = gate_gradients(tiny.model, samples, tiny.tokenizer.pad_token_id)
    # the same gradients, recomputed: as above, reorder(64, 4 * 9 * 2) of the largest (was rtol=1e-6)
    want = np.abs(grads).mean(axis=0).reshape(-1)
    np.testing.assert_allclose(frame.grad_importance, want, rtol=0, atol=reorder(64, 4 * 9 * 2) * want.max())
    # the ablation delta of a head is the loss under the Ablate edit (zero mode) minus the base loss
    row = frame[(frame["layer"] == 1) & (frame["head"] == 3)].iloc[0]
    base = gated_losses(tiny.model, samples, None, tiny.tokenizer.pad_token_id)
    ablated = gated_losses(
        tiny.model, samples, None, tiny.tokenizer.pad_token_id, edits=[Ablate(heads=[[1, 3]], mode="zero")]
    )
    # two losses, each within 2 * batch_bound(64) (logits below 1; tests/bounds.py); was abs=1e-5
    assert row.ablation_delta == pytest.approx((ablated - base).mean(), abs=2 * 2 * batch_bound(64))
    assert frame.attrs["base_loss"] == pytest.approx(base.mean(), abs=2 * batch_bound(64))  # one loss, as above
    only = head_importance(tiny.model, tiny.tokenizer, samples, gradients=False, heads=[(0, 2)])
    assert only.grad_importance.isna().all() and only.ablation_delta.notna().sum() == 1


def test_head_importance_reads_a_corpus_spec(tiny):
    frame = head_importance(tiny.model, tiny.tokenizer, "text", max_length=32, limit=2, ablation=False)
    assert (frame.n == 2).all() and frame.ablation_delta.isna().all() and frame.grad_importance.notna().all()


def test_loss_span_limits_the_targets(tiny):
    ids = tiny.tokenizer(DOCS[0])["input_ids"]
    full = gated_losses(tiny.model, [Sample(ids)], None)
    tail = gated_losses(tiny.model, [Sample(ids, {"loss_span": [5, len(ids)]})], None)
    with torch.no_grad(), observe(tiny.model):
        logits = tiny.model(input_ids=torch.tensor([ids])).logits[0].double()
    nll = -torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
    # the same logits; the loss takes log-softmax in float32, the reference in float64: a float32 sum of
    # V = vocab_size positive terms is within gamma(V) of its value, and its log within gamma(V) + u (was rel=1e-5)
    vocab_bound = gamma(tiny.model.config.vocab_size + 2)
    assert full[0] == pytest.approx(float(nll.mean()), abs=vocab_bound)
    assert tail[0] == pytest.approx(float(nll[4:].mean()), abs=vocab_bound)


def test_attention_influence(tiny):
    frame = attention_influence(tiny.model, tiny.tokenizer, DOCS, heads=[(0, 1), (1, 0)])
    assert list(frame.doc) == [0, 1, 2, 3] and (frame.tokens > 2).all()
    # the same float64 operations on the same columns: exact
    np.testing.assert_array_equal(frame.influence, frame.loss_masked - frame.loss_base)
    np.testing.assert_array_equal(frame.relative, frame.influence / frame.loss_base)
    same = attention_influence(tiny.model, tiny.tokenizer, DOCS, edits=[Ablate(heads=[[0, 1], [1, 0]], mode="zero")])
    # zeroed by a gate or by the ablation edit: the same sums, within 2 * batch_bound(64) (was rtol=1e-6)
    np.testing.assert_allclose(same.loss_masked, frame.loss_masked, rtol=0, atol=2 * batch_bound(64))
    assert (frame.influence.abs() > 0).any()
    with pytest.raises(OptionError):
        attention_influence(tiny.model, tiny.tokenizer, DOCS)
    with pytest.raises(OptionError, match="does not exist"):
        attention_influence(tiny.model, tiny.tokenizer, DOCS, heads=[(5, 0)])
