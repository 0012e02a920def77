"""The fused-kernel route of rollout, attn_grad and last_layer_attention (headmap/explain/_flash.py).

Checked against brute force and against the block route.

Unpadded inputs on the CPU run their forward through PyTorch's flash attention kernel, which returns
each row's log-sum-exp (lse); rows are then rebuilt as A = exp(s - lse), and rollout's dense passes
are one kernel call with queries and keys exchanged. tests/test_explain.py's padded batches take the
engine's block route; here unpadded inputs take the kernel's, checked against the same brute force
(eager ``output_attentions`` + autograd, float64) at the issue's 1e-6.

Bounds. float64 throughout: the kernel's softmax is float64 (the engine's is float32), so the error
budget of tests/test_explain.py's docstring (|Δr| <~ 4e-7 from the engine's float32 softmax) shrinks to
float64 rounding; 1e-6 holds a fortiori. Kernel route against block route, both float64: every entry of
A differs by a few float64 roundings of terms of size |s| + |lse| <= 10 here, i.e. <= 10 x 2^-52 x T
(T <= 40 summed terms per column) ~ 1e-13 per layer relative, over L = 2 layers: 1e-12 is a safe bound.
"""

from __future__ import annotations

import pytest
import torch
from test_explain import _brute_target, _model, brute_attn_grad, brute_rollout

import headmap.explain as E
from headmap.engine import observe
from headmap.explain import _flash
from headmap.explain.capture import Capture, row_product

KINDS = [("llama", "next"), ("gpt2", "token:11"), ("bert", "class:1")]


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(1, 97, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _views(model, rows, target="token:5"):
    """The views of one forward through _flash.forward (or the engine when not usable)."""
    job = E.make_job(model, E.parse_target(target, model, None), rows, pad=0)
    capture = Capture()
    with torch.no_grad():
        if _flash.usable(job):
            _flash.forward(job, capture)
        else:
            job.outputs(probes=[capture])
    return job, capture.layers()


@pytest.mark.parametrize("kind,target", KINDS, ids=[k for k, _ in KINDS])
def test_kernel_route_equals_brute_force(kind, target):
    model = _model(kind).double()
    for seed, n in ((1, 12), (2, 40)):
        ids = _ids(n, seed)
        _, views = _views(model, [ids], target if kind == "bert" else "token:5")
        assert views and all(v.lse is not None for v in views)  # the route under test is the one taken
        frame = E.explain(model, None, [ids], target=target, methods=["rollout", "attn_grad"])
        got_roll = torch.tensor(frame[frame.method == "rollout"].sort_values("position").value.to_numpy())
        got_ag = torch.tensor(frame[frame.method == "attn_grad"].sort_values("position").value.to_numpy())
        assert torch.allclose(got_roll, brute_rollout(model, ids, target), rtol=0, atol=1e-6)  # see docstring
        assert torch.allclose(got_ag, brute_attn_grad(model, ids, target), rtol=0, atol=1e-6)
        assert abs(float(got_roll.sum()) - 1.0) < 1e-12  # a product of row-stochastic matrices
        assert model.config._attn_implementation == "eager"  # put back after each forward


@pytest.mark.parametrize("kind,target", [("gemma2", "token:5"), ("mistral", "contrast:3,7")])
def test_calls_the_kernel_cannot_run_still_equal_brute_force(kind, target):
    """Unpadded inputs go through _flash.forward; a softcap or a sliding window sends each call to the engine,
    whose view must carry the same logit settings (the bound of tests/test_explain.py's docstring)."""
    model = _model(kind).double()
    ids = _ids(12, 1)
    _, views = _views(model, [ids])
    assert views and all(v.lse is None for v in views)
    frame = E.explain(model, None, [ids], target=target, methods=["rollout", "attn_grad"])
    got_roll = torch.tensor(frame[frame.method == "rollout"].sort_values("position").value.to_numpy())
    got_ag = torch.tensor(frame[frame.method == "attn_grad"].sort_values("position").value.to_numpy())
    assert torch.allclose(got_roll, brute_rollout(model, ids, target), rtol=0, atol=1e-6)
    assert torch.allclose(got_ag, brute_attn_grad(model, ids, target), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_kernel_route_equals_block_route(kind, monkeypatch):
    model = _model(kind).double()
    rows = [_ids(40, 3), _ids(40, 4)]  # two inputs of one length: a batch without padding
    methods = ["rollout", "attn_grad", "last_layer_attention"]
    fast = E.explain(model, None, rows, methods=methods, batch_size=2)
    monkeypatch.setattr(_flash, "usable", lambda job: False)
    slow = E.explain(model, None, rows, methods=methods, batch_size=2)
    assert set(fast.method) == set(methods)
    assert float((fast.value - slow.value).abs().max()) < 1e-12  # see docstring


def test_swapped_call_equals_blocks_for_any_weights():
    """r with zeros before and after its live rows: the exchanged kernel call equals the block sums."""
    model = _model("llama").double()
    _, views = _views(model, [_ids(40, 5)])
    gen = torch.Generator().manual_seed(9)
    for lo, hi in ((0, 40), (5, 31), (12, 13)):
        r = torch.zeros(1, 40, dtype=torch.float64)
        r[:, lo:hi] = torch.rand(hi - lo, generator=gen, dtype=torch.float64)
        for view in views:
            swapped = _flash.swapped_product(view, r)
            blocks = _flash.lse_product(view, r, None, step=7)
            assert float((swapped - blocks).abs().max()) < 1e-12  # see docstring
            assert float(swapped[:, hi:].abs().sum()) == 0.0  # no live row sees these keys
            assert abs(float(swapped.sum()) - float(r.sum())) < 1e-12  # rows of A sum to 1
            assert float((row_product(view, r) - swapped).abs().max()) < 1e-12


def test_float32_kernel_route_is_float32_exact():
    """A float32 model (the benchmark's dtype): the kernel route within float32 rounding of float64 brute force.

    Bound: each probability carries a relative error of a few float32 roundings of terms of size
    |s| + |lse| <= 10, plus the T-term sums of the row products (T = 40): (10 + 40) x 2^-24 ~ 3e-6 per
    layer, over L = 2 layers and 2 passes (forward, rollout): 1.2e-5 on values <= 1; 3e-5 is safe.
    """
    model = _model("llama")
    ids = _ids(40, 6)
    _, views = _views(model, [ids])
    assert all(v.lse is not None for v in views)
    frame = E.explain(model, None, [ids], target="token:5", methods=["rollout"])
    got = torch.tensor(frame.sort_values("position").value.to_numpy())
    want = brute_rollout(model.double(), ids, "token:5")
    assert torch.allclose(got, want, rtol=0, atol=3e-5)


def test_block_route_where_the_kernel_does_not_apply():
    # padding, a sliding window: the engine's route, as before
    llama = _model("llama").double()
    _, views = _views(llama, [_ids(12, 1), _ids(7, 2)])
    assert all(v.lse is None for v in views)
    mistral = _model("mistral").double()  # sliding_window=4 < length
    _, views = _views(mistral, [_ids(12, 1)])
    assert views and all(v.lse is None for v in views)
    # a headmap session already active on the model (edits, probes): the engine's route for the whole forward
    job = E.make_job(llama, E.parse_target("token:5", llama, None), [_ids(12, 1)], pad=0)
    with observe(llama, probes=[]):
        assert not _flash.usable(job)
    assert _flash.usable(job)


def test_implementation_put_back_when_the_forward_raises(monkeypatch):
    model = _model("gpt2").double()
    job = E.make_job(model, E.parse_target("token:5", model, None), [_ids(12, 1)], pad=0)
    before = model.config._attn_implementation

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(_flash, "_kernel", lambda: boom)
    with pytest.raises(RuntimeError, match="boom"):
        _flash.forward(job, Capture())
    assert model.config._attn_implementation == before


def test_gradient_through_the_kernel_route():
    """attn_grad's dO comes from the kernel's backward: equal to eager autograd's dy/dO (via dy/dx)."""
    model = _model("gpt2").double()
    ids = _ids(20, 7)
    job = E.make_job(model, E.parse_target("token:5", model, None), [ids], pad=0)
    embeds = job.embed().requires_grad_(True)
    y = _flash.forward(job, Capture(), embeds=embeds, score=True)
    (g_fast,) = torch.autograd.grad(y.sum(), embeds)
    y_ref, _, x = _brute_target(model, ids, "token:5")
    (g_ref,) = torch.autograd.grad(y_ref, x)
    assert torch.allclose(g_fast, g_ref, rtol=0, atol=1e-10)  # float64 end to end; a few roundings per layer
