"""The fused-kernel route of saliency, integrated_gradients and occlusion (headmap/explain/_flash.py, plain_forward).

A batch without padding whose attention calls are plain (causal or bidirectional) runs each call through
the fused kernel of the device and dtype (``headmap.engine.fused.attend``), forward and backward; any
other batch takes the engine's block route as before. Which route ran is counted (the fused kernel's
calls, the engine's blocks), and the two routes' values are compared on the same batch.

Bounds (tests/bounds.py). The routes run the same model code except the attention calls, whose sums run
in another order: per layer the forward's ATTENTION_STAGES sums plus one stage of elementwise steps, and,
for a gradient, the attention backward's BACKWARD_STAGES (dP = dO V^T, the row sums of dP ⊙ P, dQ = dS K,
dK = dS^T Q, dV = P^T dO), each of at most max(T, head_dim) terms: ``reorder(n, stages)`` relative to the
largest magnitude of the compared quantity (the tiny models pass a relative error on with a gain of at
most one, the module's stated assumption). From that, with G the largest |dy/dx| of the engine's route:
saliency's |Δ value_j| <= ||Δg_j ⊙ x_j||_2 <= rel G ||x_j||_2; integrated gradients' |Δ IG_j| <=
sum_e |x - x'|_je max |Δg| <= rel G ||x_j - x'_j||_1 (the sum over e and the mean over steps run in float64
on both routes: their own rounding, gamma(d m, U64) of the same magnitudes, is added); occlusion's
|Δ(y(x) - y(x_j))| <= rel (|y(x)| + |y(x_j)|) with the forward's stages only. float32 models use
u = 2^-24, float64 models u = 2^-53 (the kernel's arithmetic is the model's dtype on the CPU).
"""

from __future__ import annotations

import pytest
import torch
from bounds import ATTENTION_STAGES, U32, U64, gamma, reorder
from test_explain import _model

import headmap.explain as E
from headmap.engine import fused, observe
from headmap.explain import _flash

#: the sums of one attention call's backward whose order depends on the route (see the module docstring)
BACKWARD_STAGES = 5
LAYERS, HEAD_DIM = 2, 8  # every model of test_explain._model
KINDS = [("llama", "token:5"), ("gpt2", "token:11"), ("bert", "class:1")]
T = 40


def route_bound(keys: int, u: float, backward: bool) -> float:
    """Relative difference of the two routes' values (module docstring)."""
    stages = (ATTENTION_STAGES + 1 + (BACKWARD_STAGES if backward else 0)) * LAYERS
    return reorder(max(keys, HEAD_DIM), stages, u)


def _rows(n: int, count: int = 2, seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 97, (n,), generator=gen).tolist() for _ in range(count)]


def _job(model, target, rows):
    return E.make_job(model, E.parse_target(target, model, None), rows, pad=0)


def _engine_grads(job, points):
    """dy/dx at each of ``points`` on the engine's route (Job.score), for the bounds' G."""
    out = []
    for p in points:
        p = p.detach().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(job.score(embeds=p).sum(), p)
        out.append(g)
    return out


def _method(name: str, steps: int = 3):
    return {"saliency": E.Saliency(), "integrated_gradients": E.IntegratedGradients(steps=steps)}.get(
        name, E.Occlusion()
    )


@pytest.mark.parametrize("kind,target", KINDS, ids=[k for k, _ in KINDS])
@pytest.mark.parametrize("name", ["saliency", "integrated_gradients", "occlusion"])
def test_unpadded_batch_runs_the_kernel(kind, target, name, calls):
    model = _model(kind)
    job = _job(model, target, _rows(12))
    assert _flash.plain_usable(job)
    _method(name, steps=3).attribute(job)
    forwards = {"saliency": 1, "integrated_gradients": 3 + 2, "occlusion": 1 + 12}[name]
    assert calls["kernels"] == ["flash_cpu"] * forwards * LAYERS  # every attention call, forward and backward
    assert calls["blocks"] == 0  # no block of the engine ran
    assert model.config._attn_implementation == "eager"  # put back


@pytest.mark.parametrize("name", ["saliency", "integrated_gradients", "occlusion"])
def test_padded_batch_takes_the_engine_route(name, calls):
    model = _model("llama")
    job = _job(model, "token:5", [_rows(12)[0], _rows(7)[0]])  # the shorter input is padded
    assert not _flash.plain_usable(job)
    _method(name).attribute(job)
    assert calls["kernels"] == [] and calls["blocks"] > 0


@pytest.mark.parametrize("kind", ["mistral", "gemma2"])
def test_calls_the_kernel_cannot_run_take_the_engine_function(kind, calls, monkeypatch):
    """Unpadded, but a sliding window shorter than the input (and Gemma 2's softcap): every call runs the
    engine's function inside plain_forward, with the engine route's numbers (float64, the same code)."""
    model = _model(kind).double()
    rows = _rows(12)
    job = _job(model, "token:5", rows)
    assert _flash.plain_usable(job)
    fast = E.Saliency().attribute(job)
    assert calls["kernels"] == [] and calls["blocks"] > 0
    monkeypatch.setattr(_flash, "plain_usable", lambda job: False)
    slow = E.Saliency().attribute(_job(model, "token:5", rows))
    assert torch.equal(fast, slow)  # the same function on the same numbers, only outside a session


def test_a_session_on_the_model_takes_the_engine_route():
    model = _model("llama")
    job = _job(model, "token:5", _rows(12))
    with observe(model, probes=[]):
        assert not _flash.plain_usable(job)
    assert _flash.plain_usable(job)


@pytest.mark.parametrize("kind,target", KINDS, ids=[k for k, _ in KINDS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_kernel_route_equals_engine_route(kind, target, dtype, calls, monkeypatch):
    model = _model(kind).to(dtype)
    rows = _rows(T)
    u = U32 if dtype == torch.float32 else U64
    steps = 3
    fast_job = _job(model, target, rows)
    fast = {n: _method(n, steps).attribute(fast_job) for n in ("saliency", "integrated_gradients", "occlusion")}
    assert calls["blocks"] == 0 and len(calls["kernels"]) == (1 + steps + 2 + 1 + T) * LAYERS - LAYERS
    # (saliency kept y(x): integrated gradients ran one end, occlusion its own y(x) and T forwards)

    monkeypatch.setattr(_flash, "plain_usable", lambda job: False)
    job = _job(model, target, rows)
    slow = {n: _method(n, steps).attribute(job) for n in ("saliency", "integrated_gradients", "occlusion")}
    assert len(calls["kernels"]) == (1 + steps + 2 + T) * LAYERS and calls["blocks"] > 0  # no kernel call more

    rel = route_bound(T, u, backward=True)
    x = job.embed().double()
    (g,) = _engine_grads(job, [job.embed()])
    bound = rel * g.abs().max().double() * x.norm(dim=-1)  # saliency, per token
    assert ((fast["saliency"] - slow["saliency"]).abs() <= bound).all()

    x0 = torch.zeros_like(x)  # the zero baseline, no padding
    points = [job.embed() * ((k + 0.5) / steps) for k in range(steps)]
    big = max(float(p.abs().max()) for p in _engine_grads(job, points))
    d = x.shape[-1]
    bound = rel * big * (x - x0).abs().sum(dim=-1) + gamma(d * steps, U64) * big * (x - x0).abs().sum(dim=-1)
    assert ((fast["integrated_gradients"] - slow["integrated_gradients"]).abs() <= bound).all()
    gap_fast, gap_slow = (j.notes["integrated_gradients_gap"] for j in (fast_job, job))
    y = job.known["x"].double().abs()
    assert ((gap_fast - gap_slow).abs() <= bound.sum(dim=-1) + 2 * route_bound(T, u, False) * (y + 5)).all()
    # (|y(x')| <= |y(x)| + 5 on these models: a log-probability near log(1/97) ~ -4.6 or a logit near 0)

    y_j = y[:, None] + slow["occlusion"].abs()  # |y(x_j)| <= |y(x)| + |y(x) - y(x_j)|
    bound = route_bound(T, u, backward=False) * (y[:, None] + y_j)
    assert ((fast["occlusion"] - slow["occlusion"]).abs() <= bound).all()


def test_integrated_gradients_reads_the_ends_other_methods_computed(calls):
    """After saliency (y(x)) only the baseline's end is run; a second IG with the same baseline runs neither."""
    model = _model("llama").double()
    job = _job(model, "token:5", _rows(12))
    E.Saliency().attribute(job)
    assert len(calls["kernels"]) == LAYERS
    E.IntegratedGradients(steps=2).attribute(job)
    assert len(calls["kernels"]) == LAYERS + (2 + 1) * LAYERS
    gap = job.notes["integrated_gradients_gap"].clone()
    E.IntegratedGradients(steps=2).attribute(job)
    assert len(calls["kernels"]) == LAYERS + (2 + 1 + 2) * LAYERS
    assert torch.equal(job.notes["integrated_gradients_gap"], gap)  # the same ends, the same steps

    alone = _job(model, "token:5", _rows(12))
    E.IntegratedGradients(steps=2).attribute(alone)  # its own two ends
    # y(x) with and without a graph: the same kernel on the same numbers, so the same gap
    assert torch.equal(alone.notes["integrated_gradients_gap"], gap)


def test_no_tensor_kept_for_the_backward_is_t_by_t():
    """Memory linear in T: the kernel's backward keeps its inputs, output and log-sum-exp, no T x T matrix.
    Eager attention, for contrast, keeps each layer's probabilities ([B, H, T, T])."""
    n = 256
    model = _model("llama")
    job = _job(model, "token:5", _rows(n, count=1))

    def largest(run) -> int:
        sizes = [0]

        def pack(t):
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run()
        return max(sizes)

    def through(score):
        x = job.embed().requires_grad_(True)
        with torch.enable_grad():
            torch.autograd.grad(score(x).sum(), x)

    assert largest(lambda: through(lambda x: _flash.score(job, embeds=x))) < n * n
    eager = lambda x: model(inputs_embeds=x).logits[:, -1].log_softmax(-1)[:, 5]  # noqa: E731
    assert largest(lambda: through(eager)) >= n * n


def test_implementation_put_back_when_the_forward_raises(monkeypatch):
    model = _model("gpt2")
    job = _job(model, "token:5", _rows(12))

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(fused, "attend", boom)
    with pytest.raises(RuntimeError, match="boom"):
        E.Saliency().attribute(job)
    assert model.config._attn_implementation == "eager"
