"""Edits: each one at its neutral setting leaves the model unchanged, and each one changes attention
exactly as docs/steering.md defines it.

The effect of every attention edit is checked against a hand computation (numpy, float64) from
eager ``output_attentions`` of the same padded batch on tiny random Llama (GQA), GPT-2 and BERT
models: the edits touch heads of the last layer only, so the attention entering them is eager's,
and a probe captures what the engine hands to P @ V. Edits that act on the output are checked on
the logits against an eager model patched by hand (a hook on the output projection). The rest:
edits do not depend on the block size (positional ones), agree with a KV cache, run under autograd,
and bad inputs raise EditError with a clear message.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pandas as pd
import pytest
import tiny_models
import torch
from bounds import TINY_EAGER

import headmap
from headmap.atlas import Atlas
from headmap.edits import (
    EDITS,
    Ablate,
    CalibrateSinks,
    Edit,
    Pai,
    RedistributeSinks,
    ReinforceLocal,
    ScaleFirstToken,
    ScaleSpan,
    Temperature,
    Var,
    Vhr,
    find_span,
    make_edits,
    parse_rule,
    select_heads,
)
from headmap.errors import EditError, HeadmapError
from headmap.probes.base import Probe

KINDS = ["llama", "gpt2", "bert"]
LENGTHS = [12, 9, 14, 7]
LAYERS, HEADS = 2, 4
EDITED = [(1, 0), (1, 3)]  # last layer only: the attention entering them is eager's
tiny = functools.cache(tiny_models.tiny)


def batch(kind: str):
    return tiny_models.padded_batch(LENGTHS, tiny(kind)[1])


def logits_of(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def run(model, ids, mask, edits=(), probes=()) -> torch.Tensor:
    with torch.no_grad(), headmap.observe(model, probes=probes, edits=edits):
        return logits_of(model(input_ids=ids, attention_mask=mask))


def real_rows(kind: str, mask: torch.Tensor) -> list[tuple[int, int]]:
    """(offset, length) of each input's real tokens in the batch."""
    out = []
    for b in range(mask.shape[0]):
        n = int(mask[b].sum())
        out.append((mask.shape[1] - n, n) if tiny(kind)[1] == "left" else (0, n))
    return out


def causal(kind: str) -> bool:
    return kind != "bert"


# -- neutral settings ---------------------------------------------------------------------------

NEUTRAL = {
    "ablate": lambda: Ablate(heads=[]),
    "scale_first_token": lambda: ScaleFirstToken(factor=1.0),
    "scale_span": lambda: ScaleSpan(span=(2, 6), factor=1.0),
    "scale_span_logits": lambda: ScaleSpan(span=(2, 6), factor=1.0, where="logits"),
    "calibrate_sinks": lambda: CalibrateSinks(factor=1.0),
    "redistribute_sinks": lambda: RedistributeSinks(span=(2, 6), p=0.0, sinks="both"),
    "temperature": lambda: Temperature(tau=1.0),
    "reinforce_local_factor": lambda: ReinforceLocal(k=3, factor=1.0),
    "reinforce_local_amount": lambda: ReinforceLocal(k=3, amount=0.0),
    "pai": lambda: Pai(alpha=1.0, image_token_id=5),
    "var": lambda: Var(p=0.0, image_token_id=5),
    "vhr": lambda: Vhr(heads=[[0, 0], [1, 1]], factor=1.0),
}


def test_every_edit_has_a_neutral_case():
    assert {name.split("_logits")[0].replace("_factor", "").replace("_amount", "") for name in NEUTRAL} == set(EDITS)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", list(NEUTRAL))
def test_neutral_setting_leaves_logits_unchanged(kind, name):
    """Every head edited at the neutral setting: the logits equal the unedited run's (and eager's)."""
    model = tiny(kind)[0]
    ids, mask = batch(kind)
    plain = run(model, ids, mask)
    edited = run(model, ids, mask, edits=[NEUTRAL[name]()])
    # the same computation twice (a neutral edit returns its input): within TINY_EAGER of the largest logit,
    # tests/bounds.py, in case the BLAS reorders a sum between calls (was atol=1e-6)
    torch.testing.assert_close(edited, plain, atol=TINY_EAGER * float(plain.abs().max()), rtol=0)
    with torch.no_grad():
        eager = logits_of(model(input_ids=ids, attention_mask=mask))
    keep = mask.bool()
    # engine vs eager: TINY_EAGER of the largest logit (tests/bounds.py; was atol=rtol=1e-5)
    torch.testing.assert_close(edited[keep], eager[keep], atol=TINY_EAGER * float(eager[keep].abs().max()), rtol=0)


# -- effects against a hand computation ---------------------------------------------------------


class Capture(Probe):
    """Keeps every block's probabilities (tests only)."""

    name = "capture"

    def __init__(self) -> None:
        self.blocks: list = []

    def update(self, block) -> None:
        self.blocks.append((block.layer, block.q_start, block.k_start, block.probs.detach().double().clone()))

    def dense(self, layer: int, shape: tuple[int, int, int, int]) -> np.ndarray:
        full = torch.zeros(shape, dtype=torch.float64)
        for lay, q0, k0, probs in self.blocks:
            if lay == layer:
                full[:, :, q0 : q0 + probs.shape[2], k0 : k0 + probs.shape[3]] = probs
        return full.numpy()


def eager_attentions(model, ids, mask) -> list[np.ndarray]:
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    return [a.double().numpy() for a in out.attentions]


def reweight(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    x = a * w
    return x / x.sum(-1, keepdims=True) * a.sum(-1, keepdims=True)


def visible(n: int, is_causal: bool) -> np.ndarray:
    return np.tril(np.ones((n, n), dtype=bool)) if is_causal else np.ones((n, n), dtype=bool)


def hand_first(a, n, is_causal, s):
    w = np.ones_like(a)
    w[..., 0] = s
    return reweight(a, w)


def hand_span(a, n, is_causal, start, end, s):
    w = np.ones_like(a)
    w[..., start:end] = s
    return reweight(a, w)


def hand_temperature(a, n, is_causal, tau):
    x = np.where(a > 0, a ** (1.0 / tau), 0.0)
    return x / x.sum(-1, keepdims=True)


def hidden_sinks(a, n, is_causal, tau):
    vis = visible(n, is_causal)
    received = (a * vis).sum(-2) / vis.sum(0)  # mean over the rows that see j, diagonal included
    sinks = received >= tau
    sinks[..., 0] = False
    return sinks, received


def hand_calibrate(a, n, is_causal, tau, s):
    out = a.copy()
    sinks, _ = hidden_sinks(a, n, is_causal, tau)
    for h in range(a.shape[0]):
        cols = sinks[h]
        for i in range(n):
            on, mass = a[h, i, cols].sum(), a[h, i].sum()
            if on > 0 and mass - on > 0:
                out[h, i, ~cols] = a[h, i, ~cols] * (mass - s * on) / (mass - on)
                out[h, i, cols] = s * a[h, i, cols]
    return out


def hand_redistribute(a, n, is_causal, start, end, p, sink_cols):
    out = a.copy()
    sink = np.zeros(n, dtype=bool)
    sink[list(sink_cols)] = True
    into = np.zeros(n, dtype=bool)
    into[start:end] = True
    into &= ~sink
    for h in range(a.shape[0]):
        for i in range(n):
            on_s, on_t = a[h, i, sink].sum(), a[h, i, into].sum()
            if on_s > 0 and on_t > 0:
                out[h, i, sink] = (1 - p) * a[h, i, sink]
                out[h, i, into] = a[h, i, into] * (1 + p * on_s / on_t)
    return out


def local_window(n, k):
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    return (i - j >= 1) & (i - j <= k)


def hand_local_factor(a, n, is_causal, k, s):
    w = np.where(local_window(n, k), s, 1.0)
    return reweight(a, w)


def hand_local_amount(a, n, is_causal, k, d):
    win = local_window(n, k)
    mass = a.sum(-1, keepdims=True)
    return (a + d * win) * mass / (mass + d * win.sum(-1, keepdims=True))


CASES = {
    "scale_first_token": (
        lambda: ScaleFirstToken(heads=EDITED, factor=0.25),
        lambda a, n, c: hand_first(a, n, c, 0.25),
    ),
    "scale_first_token_up": (
        lambda: ScaleFirstToken(heads=EDITED, factor=4.0),
        lambda a, n, c: hand_first(a, n, c, 4.0),
    ),
    "scale_span": (
        lambda: ScaleSpan(heads=EDITED, span=(2, 5), factor=3.0),
        lambda a, n, c: hand_span(a, n, c, 2, 5, 3.0),
    ),
    "scale_span_logits": (
        lambda: ScaleSpan(heads=EDITED, span=(2, 5), factor=0.5, where="logits"),
        lambda a, n, c: hand_span(a, n, c, 2, 5, 0.5),
    ),
    "temperature": (lambda: Temperature(heads=EDITED, tau=2.0), lambda a, n, c: hand_temperature(a, n, c, 2.0)),
    "temperature_sharp": (lambda: Temperature(heads=EDITED, tau=0.5), lambda a, n, c: hand_temperature(a, n, c, 0.5)),
    "calibrate_sinks": (
        lambda: CalibrateSinks(heads=EDITED, tau=0.12, factor=0.4),
        lambda a, n, c: hand_calibrate(a, n, c, 0.12, 0.4),
    ),
    "redistribute_sinks": (
        lambda: RedistributeSinks(heads=EDITED, span=(3, 6), p=0.6),
        lambda a, n, c: hand_redistribute(a, n, c, 3, 6, 0.6, [0]),
    ),
    "redistribute_sinks_positions": (
        lambda: RedistributeSinks(heads=EDITED, span=(1, 6), p=0.5, sinks=[0, 2]),
        lambda a, n, c: hand_redistribute(a, n, c, 1, 6, 0.5, [0, 2]),
    ),
    "reinforce_local_factor": (
        lambda: ReinforceLocal(heads=EDITED, k=3, factor=2.5),
        lambda a, n, c: hand_local_factor(a, n, c, 3, 2.5),
    ),
    "reinforce_local_amount": (
        lambda: ReinforceLocal(heads=EDITED, k=2, amount=0.2),
        lambda a, n, c: hand_local_amount(a, n, c, 2, 0.2),
    ),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", list(CASES))
def test_edit_changes_attention_as_defined(kind, case):
    make, hand = CASES[case]
    model = tiny(kind)[0]
    ids, mask = batch(kind)
    eager = eager_attentions(model, ids, mask)
    probe = Capture()
    run(model, ids, mask, edits=[make()], probes=[probe])
    batch_size, width = ids.shape
    changed = 0.0
    for layer in range(LAYERS):
        got = probe.dense(layer, (batch_size, HEADS, width, width))
        for b, (o, n) in enumerate(real_rows(kind, mask)):
            a = eager[layer][b, :, o : o + n, o : o + n]
            want = a.copy()
            for lay, h in EDITED:
                if lay == layer:
                    want[h] = hand(a[h : h + 1], n, causal(kind))[0]
            # The engine's probabilities are eager's within TINY_EAGER (tests/bounds.py), relative to each
            # probability (a logit error d moves p_j by at most 2 d p_j). The edits reweight by positive
            # factors and renormalise (a relative error doubles: numerator and denominator), move mass
            # between sums of positive terms (at most three such factors) or divide the logits by tau >= 0.5
            # (twice the logit error): 4 * TINY_EAGER ~ 1.2e-4 (was 1e-6, measured).
            np.testing.assert_allclose(
                got[b, :, o : o + n, o : o + n],
                want,
                atol=4 * TINY_EAGER,
                rtol=0,
                err_msg=f"{case} layer {layer} input {b}",
            )
            changed = max(changed, float(np.abs(want - a).max()))
    # an edit must move some probability well beyond the bound above, or a wrong edit could pass
    assert changed > 1e-3 > 4 * TINY_EAGER, f"{case} changed nothing measurable: the test would not see a wrong edit"


def test_calibration_threshold_is_not_on_a_knife_edge():
    """The sinks the calibration test detects are clearly above or below tau (no rounding flips)."""
    for kind in KINDS:
        model = tiny(kind)[0]
        ids, mask = batch(kind)
        a_all = eager_attentions(model, ids, mask)[1]
        found = 0
        for b, (o, n) in enumerate(real_rows(kind, mask)):
            a = a_all[b, :, o : o + n, o : o + n]
            sinks, received = hidden_sinks(a, n, causal(kind), 0.12)
            assert np.abs(received[:, 1:] - 0.12).min() > 1e-3 > 4 * TINY_EAGER  # beyond the engine's error
            found += int(sinks[[h for _, h in EDITED]].sum())
        assert found > 0, f"{kind}: no hidden sink at tau 0.12, the test checks nothing"


def out_proj(model, kind: str, layer: int):
    if kind == "llama":
        return model.model.layers[layer].self_attn.o_proj
    if kind == "gpt2":
        return model.transformer.h[layer].attn.c_proj
    return model.encoder.layer[layer].attention.output.dense


def patched_eager(model, kind, ids, mask, heads, replace):
    """Eager logits, the named heads' outputs (entering the output projection) set to ``replace(layer, head, x)``."""
    dim = model.config.hidden_size // HEADS
    hooks = []
    for layer in sorted({l for l, _ in heads}):

        def pre(module, args, _layer=layer):
            (x,) = args
            x = x.clone()
            for lay, h in heads:
                if lay == _layer:
                    x[..., h * dim : (h + 1) * dim] = replace(lay, h, x[..., h * dim : (h + 1) * dim])
            return (x,)

        hooks.append(out_proj(model, kind, layer).register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            return logits_of(model(input_ids=ids, attention_mask=mask))
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize("kind", KINDS)
def test_zero_ablation_equals_zeroing_the_head_by_hand(kind):
    model = tiny(kind)[0]
    ids, mask = batch(kind)
    heads = [(0, 1), (1, 2)]
    got = run(model, ids, mask, edits=[Ablate(heads=heads, mode="zero")])
    want = patched_eager(model, kind, ids, mask, heads, lambda l, h, x: torch.zeros_like(x))
    keep = mask.bool()
    # engine vs eager patched by hand: TINY_EAGER of the largest logit (tests/bounds.py; was atol=rtol=1e-5)
    torch.testing.assert_close(got[keep], want[keep], atol=TINY_EAGER * float(want[keep].abs().max()), rtol=0)
    assert (got[keep] - run(model, ids, mask)[keep]).abs().max() > 1e-3  # far above that bound


@pytest.mark.parametrize("kind", KINDS)
def test_mean_ablation_equals_the_mean_output_by_hand(kind):
    model = tiny(kind)[0]
    ids, mask = batch(kind)
    ref_ids, ref_mask = tiny_models.padded_batch([10, 6, 13], tiny(kind)[1], seed=7)
    heads = [(0, 2), (1, 1)]
    dim = model.config.hidden_size // HEADS
    # the means by hand: the heads' outputs entering the output projection, over real reference tokens
    seen: dict[int, torch.Tensor] = {}
    hooks = [
        out_proj(model, kind, layer).register_forward_pre_hook(
            lambda m, args, _l=layer: seen.__setitem__(_l, args[0].detach().clone())
        )
        for layer in range(LAYERS)
    ]
    with torch.no_grad():
        model(input_ids=ref_ids, attention_mask=ref_mask)
    for hook in hooks:
        hook.remove()
    keep = ref_mask.bool()
    means = {(l, h): seen[l][keep][:, h * dim : (h + 1) * dim].double().mean(0).float() for l, h in heads}
    want = patched_eager(model, kind, ids, mask, heads, lambda l, h, x: means[(l, h)].expand_as(x))

    edit = Ablate(heads=heads, mode="mean").fit_mean(model, {"input_ids": ref_ids, "attention_mask": ref_mask})
    got = run(model, ids, mask, edits=[edit])
    keep = mask.bool()  # engine vs eager: TINY_EAGER of the largest logit (tests/bounds.py; was 1e-5)
    torch.testing.assert_close(got[keep], want[keep], atol=TINY_EAGER * float(want[keep].abs().max()), rtol=0)


def test_mean_ablation_with_reference_fits_at_bind():
    model = tiny("llama")[0]
    ids, mask = batch("llama")
    ref = {"input_ids": ids, "attention_mask": mask}
    fitted = Ablate(heads=[(1, 1)], mode="mean").fit_mean(model, ref)
    lazy = Ablate(heads=[(1, 1)], mode="mean", reference=ref)
    torch.testing.assert_close(run(model, ids, mask, edits=[lazy]), run(model, ids, mask, edits=[fitted]))
    torch.testing.assert_close(lazy.means[1], fitted.means[1])


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_temperature_equals_scaling_the_queries_by_hand(kind):
    """tau on the logits = queries divided by tau: an eager model with the heads' query weights scaled by hand."""
    model = tiny(kind)[0]
    ids, mask = batch(kind)
    tau, heads = 1.7, [(0, 1), (1, 2)]
    got = run(model, ids, mask, edits=[Temperature(heads=heads, tau=tau)])
    dim = model.config.hidden_size // HEADS
    saved = {}
    try:
        for layer, h in heads:
            proj = (
                model.model.layers[layer].self_attn.q_proj
                if kind == "llama"
                else model.encoder.layer[layer].attention.self.query
            )
            saved.setdefault(
                layer, (proj, proj.weight.detach().clone(), None if proj.bias is None else proj.bias.detach().clone())
            )
            with torch.no_grad():
                proj.weight[h * dim : (h + 1) * dim] /= tau
                if proj.bias is not None:
                    proj.bias[h * dim : (h + 1) * dim] /= tau
        with torch.no_grad():
            want = logits_of(model(input_ids=ids, attention_mask=mask))
    finally:
        with torch.no_grad():
            for proj, weight, bias in saved.values():
                proj.weight.copy_(weight)
                if bias is not None:
                    proj.bias.copy_(bias)
    keep = mask.bool()  # engine vs eager: TINY_EAGER of the largest logit (tests/bounds.py; was 1e-5)
    torch.testing.assert_close(got[keep], want[keep], atol=TINY_EAGER * float(want[keep].abs().max()), rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_first_token_scaling_equals_a_logit_bonus_on_the_first_token(kind):
    """ZeroTuning's scaling = log s added to the first token's logit (the output, not only the probes)."""
    model = tiny(kind)[0]
    ids, mask = batch(kind)
    heads = [(0, 0), (1, 3)]
    a = run(model, ids, mask, edits=[ScaleFirstToken(heads=heads, factor=0.3)])
    b = run(model, ids, mask, edits=[ScaleSpan(heads=heads, span=(0, 1), factor=0.3, where="logits")])
    c = run(model, ids, mask, edits=[ScaleSpan(heads=heads, span=(0, 1), factor=0.3, where="probs")])
    keep = mask.bool()
    # the same engine, the edit computed on probabilities or on logits: rounding of the edit and of the
    # softmax carried through the layers, within TINY_EAGER of the largest logit (was atol=2e-6, rtol=1e-5)
    top = float(a[keep].abs().max())
    torch.testing.assert_close(a[keep], b[keep], atol=TINY_EAGER * top, rtol=0)
    torch.testing.assert_close(a[keep], c[keep], atol=TINY_EAGER * top, rtol=0)


POSITIONAL = {
    "ablate": lambda: Ablate(heads=[(0, 1), (1, 2)]),
    "scale_first_token": lambda: ScaleFirstToken(heads=[(0, 1), (1, 0)], factor=0.3),
    "scale_span": lambda: ScaleSpan(heads=[(0, 2), (1, 1)], span=(2, 5), factor=2.0),
    "scale_span_logits": lambda: ScaleSpan(heads=[(0, 2)], span=(2, 5), factor=2.0, where="logits"),
    "redistribute_sinks": lambda: RedistributeSinks(heads=[(0, 3), (1, 1)], span=(3, 7), p=0.6),
    "temperature": lambda: Temperature(heads=[(0, 0), (1, 1)], tau=0.7),
    "reinforce_local_factor": lambda: ReinforceLocal(heads=[(0, 0), (1, 3)], k=3, factor=3.0),
    "reinforce_local_amount": lambda: ReinforceLocal(heads=[(0, 0), (1, 3)], k=2, amount=0.3),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", list(POSITIONAL))
def test_edits_do_not_depend_on_the_block_size(kind, name):
    """One query row per block gives the same logits as one block per layer.

    (Not calibrate_sinks, whose detection reads the rows of the block by definition.)"""
    model = tiny(kind)[0]
    ids, mask = batch(kind)
    whole = run(model, ids, mask, edits=[POSITIONAL[name]()])
    headmap.engine_config.budget_bytes = 1  # one row per block
    rows = run(model, ids, mask, edits=[POSITIONAL[name]()])
    keep = mask.bool()
    # other block shapes reorder the attention's sums: TINY_EAGER of the largest logit (was atol=rtol=1e-5)
    torch.testing.assert_close(rows[keep], whole[keep], atol=TINY_EAGER * float(whole[keep].abs().max()), rtol=0)


@pytest.mark.parametrize("name", list(POSITIONAL))
def test_edits_agree_with_a_kv_cache(name):
    """Decoding token by token with a cache gives the logits of one forward over the whole sequence."""
    model = tiny("llama")[0]
    ids = torch.randint(1, 97, (1, 14), generator=torch.Generator().manual_seed(5))
    full = run(model, ids, torch.ones_like(ids), edits=[POSITIONAL[name]()])
    steps = []
    with torch.no_grad(), headmap.steer(model, [POSITIONAL[name]()]):
        out = model(input_ids=ids[:, :6], use_cache=True)
        steps.append(out.logits)
        past = out.past_key_values
        for t in range(6, ids.shape[1]):
            out = model(input_ids=ids[:, t : t + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values
            steps.append(out.logits)
    # one row per step against one block: TINY_EAGER of the largest logit (tests/bounds.py; was 1e-5)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=TINY_EAGER * float(full.abs().max()), rtol=0)


def test_edits_run_under_autograd():
    """With gradients on (blocks recomputed in checkpoints), edited logits equal the no-grad ones and backprop works."""
    model = tiny("llama")[0]
    ids, mask = batch("llama")
    edits = [
        ScaleFirstToken(heads=[(0, 1)], factor=0.5),
        ScaleSpan(heads=[(1, 2)], span=(1, 4), factor=2.0),
        CalibrateSinks(heads=[(1, 0)], tau=0.2, factor=0.5),
        RedistributeSinks(heads=[(0, 3)], span=(2, 6), p=0.5, sinks="both", tau=0.2),
        Temperature(heads=[(0, 0)], tau=1.5),
        ReinforceLocal(heads=[(1, 1)], k=2, factor=2.0),
        Ablate(heads=[(1, 3)]),
    ]
    want = run(model, ids, mask, edits=edits)
    model.zero_grad()
    with headmap.steer(model, edits):
        got = model(input_ids=ids, attention_mask=mask).logits
        got[mask.bool()].square().mean().backward()
    keep = mask.bool()
    # autograd and its per-block checkpoint run the same sums, possibly blocked otherwise: TINY_EAGER of the
    # largest logit (tests/bounds.py; was atol=rtol=1e-6)
    torch.testing.assert_close(got.detach()[keep], want[keep], atol=TINY_EAGER * float(want[keep].abs().max()), rtol=0)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.zero_grad()


def test_heads_not_named_keep_their_values_bit_for_bit():
    model = tiny("llama")[0]
    ids, mask = batch("llama")
    plain, edited = Capture(), Capture()
    run(model, ids, mask, probes=[plain])
    run(model, ids, mask, probes=[edited], edits=[Temperature(heads=[(1, 2)], tau=3.0)])
    shape = (ids.shape[0], HEADS, ids.shape[1], ids.shape[1])
    a, b = plain.dense(1, shape), edited.dense(1, shape)
    others = [0, 1, 3]
    assert np.array_equal(a[:, others], b[:, others])
    assert np.array_equal(plain.dense(0, shape), edited.dense(0, shape))
    assert not np.allclose(a[:, 2], b[:, 2])


def test_edits_compose_in_order():
    """Two sessions' edits apply in the order the sessions were entered, as one list would."""
    model = tiny("llama")[0]
    ids, mask = batch("llama")
    e1, e2 = ScaleSpan(heads=[(1, 0)], span=(0, 3), factor=3.0), ReinforceLocal(heads=[(1, 0)], k=2, factor=2.0)
    together = run(model, ids, mask, edits=[e1, e2])
    with torch.no_grad(), headmap.steer(model, [e1]), headmap.steer(model, [e2]):
        nested = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(nested, together, atol=0, rtol=0)


# -- heads rules --------------------------------------------------------------------------------


def fake_atlas(layers: int = 4, heads: int = 5) -> Atlas:
    rng = np.random.default_rng(0)
    rows = []
    for probe in ("sink", "retrieval", "induction"):
        values = rng.random((layers, heads))
        for l in range(layers):
            for h in range(heads):
                rows.append(
                    dict(probe=probe, metric=probe, layer=l, head=h, kv_head=h, value=values[l, h], stderr=0.0, n=4)
                )
    for l in range(layers):
        for h in range(heads):
            for metric in ("q_massive", "k_massive"):
                rows.append(
                    dict(
                        probe="massive_values",
                        metric=metric,
                        layer=l,
                        head=h,
                        kv_head=h,
                        value=float(l + h),
                        stderr=0.0,
                        n=4,
                    )
                )
    frame = pd.DataFrame(rows)
    frame.loc[(frame.probe == "retrieval") & (frame.layer == 0) & (frame["head"] == 0), "value"] = float("nan")
    return Atlas(heads=frame, meta={"architecture": {"layers": layers, "heads": heads}})


def grid(atlas: Atlas, probe: str) -> pd.DataFrame:
    return atlas.grid(probe)


def test_rule_top_percent_and_top_n():
    atlas = fake_atlas()
    g = grid(atlas, "retrieval").stack().dropna().sort_values(ascending=False)
    got = select_heads("top 5% retrieval", atlas)
    assert got == sorted((int(l), int(h)) for l, h in g.index[: math.ceil(0.05 * 19)])
    got = select_heads("top 3 induction", atlas)
    want = grid(atlas, "induction").stack().sort_values(ascending=False).index[:3]
    assert got == sorted((int(l), int(h)) for l, h in want)


def test_rule_comparison_layers_and_conjunction():
    atlas = fake_atlas()
    g = grid(atlas, "sink")
    got = select_heads("sink > 0.5 in layers 1 to 2", atlas)
    assert got == sorted((l, h) for l in (1, 2) for h in range(5) if g.loc[l, h] > 0.5)
    got = select_heads("retrieval >= 0.1 and sink < 0.6", atlas)
    r = grid(atlas, "retrieval")
    want = sorted((l, h) for l in range(4) for h in range(5) if r.loc[l, h] >= 0.1 and g.loc[l, h] < 0.6)
    assert got == want and (0, 0) not in got  # NaN is never a candidate
    assert select_heads("all in layer 3", atlas) == [(3, h) for h in range(5)]
    assert select_heads("top 2 sink in layers 0-1", atlas) == sorted(
        (int(l), int(h)) for l, h in g.loc[0:1].stack().sort_values(ascending=False).index[:2]
    )
    assert select_heads("q_massive >= 6", atlas) == [(l, h) for l in range(4) for h in range(5) if l + h >= 6]
    assert select_heads("massive_values.k_massive == 0", atlas) == [(0, 0)]


@pytest.mark.parametrize(
    ("rule", "needle"),
    [
        ("", "empty"),
        ("top 5% ", "cannot read"),
        ("sink >> 0.5", "cannot read"),
        ("top 0 sink", "whole number"),
        ("top 150% sink", "percentage"),
        ("top 2 sink and top 3 retrieval", "two 'top'"),
        ("sink > 0.5 in layers 5 to 2", "empty range"),
        ("in layers 1 to 2", "which heads"),
    ],
)
def test_bad_rules(rule, needle):
    with pytest.raises(EditError, match=needle):
        parse_rule(rule)


def test_rule_errors_against_the_atlas():
    atlas = fake_atlas()
    with pytest.raises(EditError, match="no head metric 'entropy'.*sink"):
        select_heads("entropy > 0.5", atlas)
    with pytest.raises(EditError, match="selects no head"):
        select_heads("sink > 2", atlas)
    with pytest.raises(EditError, match="4 layers x 5 heads.*2 layers x 4 heads"):
        select_heads("top 1 sink", atlas, shape=(2, 4))
    with pytest.raises(EditError, match="needs an atlas"):
        with headmap.steer(tiny("llama")[0], [ScaleFirstToken(heads="top 1 sink", factor=0.5)]):
            pass


def test_rule_resolves_at_bind_against_the_steer_atlas():
    model = tiny("llama")[0]
    atlas = fake_atlas(layers=2, heads=4)
    edit = Temperature(heads="top 2 induction", tau=2.0)
    with headmap.steer(model, [edit], atlas=atlas):
        pass
    want = grid(atlas, "induction").stack().sort_values(ascending=False).index[:2]
    assert edit.heads == sorted((int(l), int(h)) for l, h in want)
    assert "top 2 induction" in edit.describe()


def test_rule_reads_a_run_folder(tmp_path):
    atlas = fake_atlas(layers=2, heads=4)
    atlas.save(tmp_path / "run")
    (edit,) = make_edits('temperature:heads="sink > 0.5":tau=2', atlas=tmp_path / "run")
    g = grid(atlas, "sink")
    assert edit.heads == sorted((l, h) for l in range(2) for h in range(4) if g.loc[l, h] > 0.5)


# -- specs --------------------------------------------------------------------------------------


def test_specs_build_edits():
    edits = make_edits(
        [
            "ablate:heads=[[1,2]]:mode=zero",
            "scale_first_token:heads=[1,3]:factor=0.5",
            'scale_span:heads=[[0,1],[1,1]]:span="Question: what":factor=2:where=logits',
            "calibrate_sinks:tau=0.2:factor=0.3",
            "redistribute_sinks:span=[4,9]:p=0.5:sinks=[0,2]",
            "temperature:heads=[[0,0]]:tau=2",
            "reinforce_local:heads=[[0,0]]:k=4:amount=0.1",
        ]
    )
    assert [type(e) for e in edits] == [
        Ablate,
        ScaleFirstToken,
        ScaleSpan,
        CalibrateSinks,
        RedistributeSinks,
        Temperature,
        ReinforceLocal,
    ]
    ablate, first, span, calib, redis, temp, local = edits
    assert ablate.heads == [(1, 2)] and ablate.mode == "zero"
    assert first.heads == [(1, 3)] and first.factor == 0.5
    assert span.span == "Question: what" and span.where == "logits" and span.heads == [(0, 1), (1, 1)]
    assert calib.heads is None and (calib.tau, calib.factor) == (0.2, 0.3)
    assert redis.positions == (4, 9) and redis.sinks == (0, 2) and redis.p == 0.5
    assert temp.tau == 2.0 and (local.k, local.amount) == (4, 0.1)
    several = make_edits("temperature:heads=[[0,0],[1,1]]:tau=2,ablate:heads=[[1,0]]")
    assert [e.name for e in several] == ["temperature", "ablate"] and several[0].heads == [(0, 0), (1, 1)]
    (bare,) = make_edits("scale_first_token:heads=top 10% sink:factor=0.5", atlas=fake_atlas())
    assert bare.heads_rule == "top 10% sink" and len(bare.heads) == 2


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("nudge:heads=[[0,0]]", "unknown edit 'nudge'; choose from: ablate"),
        ("ablate:factor=2", "no parameter 'factor'; its parameters: heads, mode, reference"),
        ("ablate:heads", "not key=value"),
        ("ablate:mode=half", "mode must be 'zero' or 'mean'"),
        ("temperature:tau=0", "tau must be greater than 0"),
        ("temperature:tau=-1", "tau must be greater than 0"),
        ("scale_first_token:factor=-0.5", "factor must be at least 0"),
        ("scale_first_token:factor=NaN", "finite"),
        ("scale_first_token:factor=nan", "finite"),
        ("scale_span:span=[1,4]:factor=inf", "finite"),
        ("scale_span:span=[1,4]:factor=Infinity", "finite"),
        ("scale_span:factor=2", "span= is required"),
        ("scale_span:span=[4,1]:factor=2", "0 <= start < end"),
        ("scale_span:span=[1,4]:factor=0:where=logits", "log 0"),
        ("scale_span:span=[1,4]:factor=2:where=values", "where must be"),
        ("calibrate_sinks:factor=1.5", r"\[0, 1\]"),
        ("redistribute_sinks:span=[1,4]:p=1.2", r"\[0, 1\]"),
        ("redistribute_sinks:span=[1,4]:sinks=some", "sinks must be"),
        ("reinforce_local:factor=2", "k= .* is required"),
        ("reinforce_local:k=0:factor=2", "k must be"),
        ("reinforce_local:k=3", "exactly one of factor"),
        ("reinforce_local:k=3:factor=2:amount=0.1", "exactly one of factor"),
        ("ablate:heads=[[0]]", r"\[layer, head\] pairs"),
        ("ablate:heads=3", "list of"),
        ('ablate:heads="top five sink"', "cannot read"),
        ('ablate:heads="sink > 0.5', "unclosed quote"),
    ],
)
def test_bad_specs(spec, needle):
    with pytest.raises(EditError, match=needle):
        make_edits(spec)


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (Ablate(heads=[(2, 0)]), "layer 2 head 0, which does not exist: the model has 2 layers x 4 heads"),
        (Ablate(heads=[(1, 4)]), "layer 1 head 4, which does not exist"),
        (Temperature(heads=[(-1, 0)], tau=2), "layer -1 head 0"),
        (ScaleSpan(heads=[(0, 0)], span="the cat", factor=2), "locate it in the prompt"),
        (Ablate(heads=[(0, 0)], mode="mean"), "mode=mean needs"),
    ],
)
def test_bad_heads_and_missing_setup_fail_when_the_session_starts(edit, needle):
    model = tiny("llama")[0]
    before = model.config._attn_implementation
    with pytest.raises(EditError, match=needle):
        with headmap.steer(model, [edit]):
            pass
    assert model.config._attn_implementation == before
    assert issubclass(EditError, HeadmapError)


def test_fit_mean_refuses_to_run_inside_another_session():
    model = tiny("llama")[0]
    ids, mask = batch("llama")
    with headmap.observe(model), pytest.raises(EditError, match="outside other headmap sessions"):
        Ablate(heads=[(0, 0)], mode="mean").fit_mean(model, ids)


def test_the_base_class_still_serves_custom_edits():
    class Nothing(Edit):
        pass

    model = tiny("gpt2")[0]
    ids, mask = batch("gpt2")
    torch.testing.assert_close(run(model, ids, mask, edits=[Nothing(heads=[(0, 1)])]), run(model, ids, mask))


# -- text spans ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wordpiece(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def test_find_span_maps_text_to_token_positions(wordpiece):
    prompt = "the cat sat on the mat"
    ids = wordpiece(prompt)["input_ids"]
    start, end = find_span(wordpiece, prompt, "sat on")
    assert wordpiece.convert_ids_to_tokens(ids[start:end]) == ["sat", "on"]
    assert find_span(wordpiece, prompt, "the") == (1, 2)  # the first occurrence, after [CLS]
    start, end = find_span(wordpiece, prompt, "at on th")  # partial words: every overlapping token
    assert wordpiece.convert_ids_to_tokens(ids[start:end]) == ["sat", "on", "the"]
    with pytest.raises(EditError, match="'dog' is not in the prompt"):
        find_span(wordpiece, prompt, "dog")


def test_span_edit_locates_text_in_the_prompt(wordpiece):
    model = tiny("llama")[0]
    edit = ScaleSpan(heads=[(1, 0)], span="sat on", factor=2.0)
    with headmap.steer(model, [edit], tokenizer=wordpiece, prompt="the cat sat on the mat"):
        pass
    assert edit.positions == (3, 5)
    with pytest.raises(EditError, match="outside the prompt, which has 8 tokens"):
        headmap.steer(model, [ScaleSpan(span=(5, 12), factor=2)], tokenizer=wordpiece, prompt="the cat sat on the mat")
