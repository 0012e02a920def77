"""The engine's fused route (headmap.engine.fused): sink-only sessions run one fused kernel per call.

What is proven here, on CPU (the CUDA kernels take the same route; bench/engine.py measures them):
the route runs when it should and only then, its sink values equal brute force from eager attentions
and the block route's, and the model's logits under it equal eager's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from bounds import U64, eager_bound, gamma, reorder
from tiny_models import padded_batch, tiny

import headmap
from headmap.edits import make_edits
from headmap.engine import fused
from headmap.errors import NumericalError
from headmap.probes import AttentionMapsProbe, SinkProbe

T = 12
# fused sink = exp(s_i0 - lse_i): s is a dot product of head_dim (8) terms, lse a sum of at most T terms
# inside the kernel; against eager's softmax the row's sums run in another order. Per layer the attention's
# sums (Q K^T, the row sum, P V) feed the next layer: the same chain as the block route against eager,
# tests/bounds.py's eager_bound (relative, and probabilities are at most 1).
PROB_ABS = eager_bound(T)


def brute_sink(model, ids):
    with torch.no_grad():
        atts = model(input_ids=ids, output_attentions=True).attentions
    per_input = np.stack([np.stack([a[b][:, 1:, 0].double().mean(-1).numpy() for a in atts]) for b in range(len(ids))])
    return per_input.mean(0)


def ids_for(n=3, vocab=97, seed=5):
    return torch.randint(1, vocab, (n, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_fused_sink_equals_brute_force(kind, calls):
    """Causal with grouped kv heads (llama), causal (gpt2) and bidirectional (bert)."""
    model, _ = tiny(kind)
    ids = ids_for()
    probe = SinkProbe()
    with torch.no_grad(), headmap.observe(model, probes=[probe]):
        model(input_ids=ids)
    assert calls["kernels"] == ["flash_cpu"] * 2  # one fused call per layer: no block ran
    np.testing.assert_allclose(probe.values(), brute_sink(model, ids), atol=PROB_ABS, rtol=0)


def test_fused_route_equals_block_route_in_float64(calls):
    """In float64 both routes compute the same probabilities up to float64 rounding: exp of a logit of
    8 terms minus a log-sum-exp of T terms against a softmax of T terms, two layers."""
    model, _ = tiny("llama")
    model = model.double()
    ids = ids_for()
    fused_probe, block_probe = SinkProbe(), SinkProbe()
    with torch.no_grad():
        with headmap.observe(model, probes=[fused_probe]):
            fused_out = model(input_ids=ids).logits
        assert len(calls["kernels"]) == 2
        headmap.engine_config.fused = False
        try:
            with headmap.observe(model, probes=[block_probe]):
                block_out = model(input_ids=ids).logits
        finally:
            headmap.engine_config.fused = True
    assert len(calls["kernels"]) == 2  # the switch turned the route off
    bound = reorder(T, 4 * 2, U64)
    np.testing.assert_allclose(fused_probe.values(), block_probe.values(), atol=bound, rtol=0)
    assert (fused_out - block_out).abs().max().item() <= bound * block_out.abs().max().item() * 64


def test_logits_under_the_fused_route_equal_eager(calls):
    model, _ = tiny("llama")
    ids = ids_for()
    with torch.no_grad():
        eager = model(input_ids=ids).logits
        with headmap.observe(model, probes=[SinkProbe()]):
            got = model(input_ids=ids).logits
    assert calls["kernels"]
    # the attention in another order (eager_bound), then the MLP and head: tests/bounds.py's batch bound
    # on the hidden width 64 covers the whole chain, relative to the largest logit
    bound = reorder(64, 9 * 2) * eager.abs().max().item()
    assert (got - eager).abs().max().item() <= bound


@pytest.mark.parametrize("case", ["padding", "edit", "other_probe", "gradients"])
def test_block_route_when_the_call_is_not_plain(case, calls):
    """Padding, an active edit, a probe that reads whole rows, or a gradient: the block route runs."""
    model, side = tiny("llama")
    probes = [SinkProbe()]
    edits = ()
    kwargs = {"input_ids": ids_for()}
    if case == "padding":
        ids, mask = padded_batch([9, 12, 5], side)
        kwargs = {"input_ids": ids, "attention_mask": mask}
    elif case == "edit":
        edits = make_edits("temperature:heads=[[1,0]]:tau=1.5")
    elif case == "other_probe":
        probes.append(AttentionMapsProbe())  # keeps maps of whole blocks: no fused version
    grad = case == "gradients"
    with torch.set_grad_enabled(grad), headmap.observe(model, probes=probes, edits=edits):
        out = model(**kwargs).logits
    assert out.requires_grad == grad  # a forward that takes gradients keeps its graph through the blocks
    # an edit on layer 1 leaves layer 0 plain: only that layer's call is fused
    assert calls["kernels"] == (["flash_cpu"] if case == "edit" else [])
    assert np.isfinite(probes[0].values()).all()


def test_padding_mask_of_real_tokens_only_is_plain(calls):
    """A mask of ones (every token real) is no padding: the fused route runs and agrees with no mask."""
    model, _ = tiny("llama")
    ids = ids_for()
    with_mask, without = SinkProbe(), SinkProbe()
    with torch.no_grad():
        with headmap.observe(model, probes=[with_mask]):
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
        with headmap.observe(model, probes=[without]):
            model(input_ids=ids)
    assert calls["kernels"] == ["flash_cpu"] * 4
    np.testing.assert_array_equal(with_mask.values(), without.values())


def test_bfloat16_model_takes_the_fused_route(calls):
    """bfloat16 on CPU: the kernel keeps float32 logits and lse. Against the block route, which rounds each
    logit to bfloat16 first (relative error 2^-8, times a logit of at most |s| ~ a few units), the values
    differ by that rounding only; a wrong column or normaliser would move them by far more."""
    model, _ = tiny("llama")
    model = model.to(torch.bfloat16)
    ids = ids_for()
    fused_probe, block_probe = SinkProbe(), SinkProbe()
    with torch.no_grad():
        with headmap.observe(model, probes=[fused_probe]):
            model(input_ids=ids)
        headmap.engine_config.fused = False
        try:
            with headmap.observe(model, probes=[block_probe]):
                model(input_ids=ids)
        finally:
            headmap.engine_config.fused = True
    assert calls["kernels"] == ["flash_cpu"] * 2
    got, ref = fused_probe.values(), block_probe.values()
    assert ((got >= 0) & (got <= 1)).all()
    # bfloat16 hidden states make both routes' inputs equal only up to bfloat16 rounding of each layer's
    # output (2^-8 relative) as well; two layers, each adding one such rounding and one of the logits
    np.testing.assert_allclose(got, ref, atol=4 * 2**-8 * 2, rtol=0)


def test_non_finite_output_still_names_the_head():
    """A NaN weight under a finite check: the fused call falls back to blocks, which name layer and head."""
    model, _ = tiny("llama")
    with torch.no_grad():
        model.model.layers[1].self_attn.k_proj.weight[0, 0] = float("nan")
        with pytest.raises(NumericalError, match="layer 1"):
            with headmap.observe(model, probes=[SinkProbe()], check_finite=True):
                model(input_ids=ids_for())


def test_kernel_choice():
    assert fused.kernel_for(torch.device("cpu"), torch.float32) == "flash_cpu"
    assert fused.kernel_for(torch.device("cpu"), torch.float16) is None
    assert fused.kernel_for(torch.device("cuda"), torch.bfloat16) == "flash_cuda"
    assert fused.kernel_for(torch.device("cuda"), torch.float32) == "efficient_cuda"
    assert fused.kernel_for(torch.device("meta"), torch.float32) is None


def test_gamma_bound_is_below_a_wrong_answer():
    """The bounds above stay far below the change a wrong key column makes (>= 1e-2 on these models)."""
    assert PROB_ABS < 1e-3 and gamma(T) < 1e-5
