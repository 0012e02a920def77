"""Fused versions of entropy, prev_token, mean_distance and waad (headmap.engine.fused).

Each fused value must be the block route's definition (docs/methods/<name>.md): the same rows counted,
the same weights. Proven on CPU against brute force from eager ``output_attentions`` (float32) and
against the block route (``engine_config.fused = False``) in float64, on a causal model with grouped kv
heads (llama), a causal one (gpt2) and an encoder (bert).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from bounds import U64, eager_bound, gamma, reorder
from tiny_models import tiny

import headmap
from headmap.engine import fused
from headmap.probes import EntropyProbe, SinkProbe
from headmap.probes.base import Needs, Probe
from headmap.probes.mean_distance import MeanDistanceProbe
from headmap.probes.prev_token import PrevTokenProbe
from headmap.probes.waad import WaadProbe

T = 12
KINDS = ["llama", "gpt2", "bert"]
#: A probability of the fused route against eager's: tests/test_fused.py's bound (two layers, T keys).
PROB = eager_bound(T)
#: The same comparison in float64 (fused against the block route): the chain of eager_bound at U64.
PROB64 = reorder(T, 4 * 2, U64)


class LogitSize(Probe):
    """Largest |s_ij| and |lse_i| of any call (float64, from the queries and keys): the magnitudes the
    entropy's difference lse - sum A s rounds against. Not fused, so the session runs blocks."""

    name = "logit_size"
    needs = Needs(qk=True)

    def __init__(self) -> None:
        self.largest = 0.0

    def update_qk(self, view) -> None:
        q, k = view.query.double(), view.key.double()
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        s = torch.matmul(q, k.transpose(-1, -2)) * view.scaling
        if getattr(view.module, "is_causal", True):
            s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool).tril(), -math.inf)
        lse = torch.logsumexp(s, dim=-1)
        finite = s[torch.isfinite(s)]
        self.largest = max(self.largest, float(finite.abs().max()), float(lse.abs().max()))

    def update(self, block) -> None:
        pass

    def commit(self) -> None:
        pass


def ids_for(n=3, vocab=97, seed=5):
    return torch.randint(1, vocab, (n, T), generator=torch.Generator().manual_seed(seed))


def eager_attentions(model, ids):
    with torch.no_grad():
        return [a.double().numpy() for a in model(input_ids=ids, output_attentions=True).attentions]


def causal_of(kind):
    return kind != "bert"


def brute(kind, model, ids, name, window=10):
    """[layers, heads] from the definitions in docs/methods/ (no probe code), each input weighing the same."""
    causal = causal_of(kind)
    atts = eager_attentions(model, ids)
    visible = np.tril(np.ones((T, T), bool)) if causal else np.ones((T, T), bool)
    dist = np.abs(np.arange(T)[:, None] - np.arange(T)[None, :]).astype(np.float64)
    per_input = []
    for b in range(len(ids)):
        layers = []
        for a in atts:
            a = a[b]  # [H, T, T]
            if name == "prev_token":
                v = a[:, np.arange(1, T), np.arange(0, T - 1)].mean(-1)
            elif name == "mean_distance":
                v = (a * dist).sum(-1).mean(-1)
            elif name == "waad":
                v = (a * np.minimum(dist, window)).sum(-1).mean(-1)
            else:  # entropy
                keys = visible.sum(-1)
                rows = [
                    -np.sum(np.where(a[:, i] > 0, a[:, i] * np.log(np.where(a[:, i] > 0, a[:, i], 1.0)), 0.0), -1)
                    / math.log(keys[i])
                    for i in range(T)
                    if keys[i] > 1
                ]
                v = np.mean(rows, axis=0)
            layers.append(v)
        per_input.append(np.stack(layers))
    return np.mean(per_input, axis=0)


def make(name, window=10):
    return {
        "entropy": EntropyProbe,
        "prev_token": PrevTokenProbe,
        "mean_distance": MeanDistanceProbe,
        "waad": lambda: WaadProbe(window=window),
    }[name]()


def products_per_call(name, causal):
    """Fused kernel calls per attention call for a session of ``name`` alone: the call's own, plus keys
    (entropy) or positions (mean_distance: one part for a causal call, before and after for an encoder)."""
    return 1 + {"entropy": 1, "mean_distance": 1 if causal else 2}.get(name, 0)


def bound(name, size, prob=PROB, window=10):
    """The largest difference of a fused value from a reference whose probabilities differ by ``prob`` each.

    prev_token: one probability. waad: W minus a band of at most 2W - 1 probabilities weighted at most W,
    whose sum is at most W (relative ``prob``), plus the weighted sum's own rounding (gamma(2W)).
    mean_distance: a sum of probabilities times distances below T; the fused value reads a channel of
    size at most C + d < 2T (tests on T = 12 keys, head size 8: C = 2), so relative ``prob`` of 2T.
    entropy: lse_i - sum_j A_ij s_ij rounds against |lse| and |s| (at most ``size``), and eager's
    probabilities carry relative errors of ``prob`` into sum A log A, which is at most 1 + size; each
    row is divided by log |K(i)| >= log 2.
    """
    if name == "prev_token":
        return prob
    if name == "waad":
        return window * prob + window * gamma(2 * window)
    if name == "mean_distance":
        return 2 * T * prob
    return 2 * (1 + size) * prob / math.log(2)


def logit_size(model, ids):
    probe = LogitSize()
    with torch.no_grad(), headmap.observe(model, probes=[probe]):
        model(input_ids=ids)
    return probe.largest


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["entropy", "prev_token", "mean_distance", "waad"])
def test_fused_probe_equals_brute_force(kind, name, calls):
    model, _ = tiny(kind)
    ids = ids_for()
    probe = make(name)
    with torch.no_grad(), headmap.observe(model, probes=[probe]):
        model(input_ids=ids)
    assert calls["blocks"] == 0  # no block ran
    assert calls["kernels"] == ["flash_cpu"] * 2 * products_per_call(name, causal_of(kind))
    size = logit_size(model, ids) if name == "entropy" else 0.0
    np.testing.assert_allclose(probe.values(), brute(kind, model, ids, name), atol=bound(name, size), rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_fused_route_equals_block_route_in_float64(kind, calls):
    """Every fused probe at once, in float64, against the same session on the block route."""
    model, _ = tiny(kind)
    model = model.double()
    ids = ids_for()
    names = ["entropy", "prev_token", "mean_distance", "waad"]
    fused_probes = [make(n) for n in names] + [make("waad", window=3)]
    block_probes = [make(n) for n in names] + [make("waad", window=3)]
    with torch.no_grad():
        with headmap.observe(model, probes=fused_probes + [SinkProbe()]):
            model(input_ids=ids)
        # one call per layer plus the shared products: keys once, positions once (twice for an encoder)
        per_call = 1 + 1 + (1 if causal_of(kind) else 2)
        assert calls["kernels"] == ["flash_cpu"] * 2 * per_call and calls["blocks"] == 0
        headmap.engine_config.fused = False
        try:
            with headmap.observe(model, probes=block_probes):
                model(input_ids=ids)
        finally:
            headmap.engine_config.fused = True
    assert calls["blocks"] > 0 and len(calls["kernels"]) == 2 * per_call
    size = logit_size(model, ids)
    for name, f, b in zip(names + ["waad"], fused_probes, block_probes, strict=True):
        window = getattr(f, "window", 10)
        np.testing.assert_allclose(
            f.values(), b.values(), atol=bound(name, size, PROB64, window), rtol=0, err_msg=f"{name} {window}"
        )


def test_distance_chunks_keep_positions_exact_and_small():
    """The position channels are whole numbers below 2^24 (exact in float32) for any length up to 2^24 / 2,
    and the channel each row reads holds values below C + the row's distance: at 128K keys and heads of
    64, C = 2048, so a float32 sum has an absolute error near 2^-24 * 2048 where a plain position channel
    would carry 2^-24 * 131072 (2^-7 of a token)."""
    k_len, dim = 131072, 64
    chunk = -(-k_len // dim)
    assert chunk == 2048
    pos = torch.arange(k_len, dtype=torch.float64)
    values = pos[:, None] - torch.arange(dim, dtype=torch.float64)[None, :] * chunk
    assert torch.equal(values.float().double(), values)  # exact in float32
    rows = torch.arange(k_len)
    own = values[rows, rows // chunk]
    assert 0 <= float(own.min()) and float(own.max()) < chunk  # the row's own position in its channel


def test_mean_distance_fused_on_a_long_planted_head():
    """A previous-token head over 4096 keys with heads of 8: the rows fall in 8 chunks of C = 512, each row
    reading its own channel. Against float64 from the same logits within the a priori bound below; a row
    reading a wrong channel would be off by a multiple of C (512 tokens), a wrong sign by twice the position."""
    from headmap.engine.block import QKView
    from headmap.probes.mean_distance import one_sided_distance

    t, dim = 4096, 8
    big = 40.0  # the logit of the previous token; the others are at most big * cos(2 pi / t * 2) < big
    angle = torch.arange(t, dtype=torch.float64) * (2 * math.pi / t)
    q = torch.zeros(1, 1, t, dim)
    k = torch.zeros(1, 1, t, dim)
    # q_i . k_j = big cos(2 pi (i - 1 - j) / t): largest at j = i - 1
    q[0, 0, :, 0] = (big * torch.cos(angle - 2 * math.pi / t)).float()
    q[0, 0, :, 1] = (big * torch.sin(angle - 2 * math.pi / t)).float()
    k[0, 0, :, 0], k[0, 0, :, 1] = torch.cos(angle).float(), torch.sin(angle).float()
    ones = torch.ones(1, t, dtype=torch.bool)
    view = QKView(0, None, q, k, ones, ones, torch.arange(t), torch.arange(t), torch.zeros(1, dtype=torch.long))
    view.scaling, view.is_causal = 1.0, True
    _, view.lse = fused.attend("flash_cpu", q, k, k, True, 1.0)
    got = one_sided_distance(view, "before")[0, 0]
    s = (q.double()[0, 0] @ k.double()[0, 0].T).masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), -math.inf)
    dist = (torch.arange(t)[:, None] - torch.arange(t)[None, :]).clamp(min=0).double()
    ref = (torch.softmax(s, dim=-1) * dist).sum(-1)
    # The kernel's probabilities carry relative errors of the logits' rounding (2 * big * u, the dot product
    # gamma(dim) of terms up to big) and its weighted sum gamma(t) of the magnitudes summed: at most the
    # channel's size C + the row's distance, both below C + t = 4608 (worst case, every row's mass far back).
    tol = (2 * big * 2**-24 + gamma(dim) * big + gamma(t)) * (512 + t)
    assert tol < 512 / 4  # a wrong channel moves a row by at least C = 512
    assert (got - ref).abs().max().item() <= tol


def test_bfloat16_model_fused_probes_match_the_block_route(calls):
    """bfloat16 on CPU: the call's kernel keeps float32 logits and the products run in float32, where the
    block route rounds each logit to bfloat16 first. tests/test_fused.py bounds a probability by
    4 * 2^-8 * 2 (a logit's and a layer output's rounding, two layers); the other quantities scale it as
    :func:`bound` says (size: the largest logit or log-sum-exp, measured in float32 on the same inputs)."""
    model, _ = tiny("llama")
    size = logit_size(model, ids_for())
    calls["blocks"] = 0  # logit_size ran the block route
    model = model.to(torch.bfloat16)
    ids = ids_for()
    names = ["entropy", "prev_token", "mean_distance", "waad"]
    got, ref = [make(n) for n in names], [make(n) for n in names]
    with torch.no_grad():
        with headmap.observe(model, probes=got):
            model(input_ids=ids)
        assert calls["blocks"] == 0 and len(calls["kernels"]) == 2 * 3
        headmap.engine_config.fused = False
        try:
            with headmap.observe(model, probes=ref):
                model(input_ids=ids)
        finally:
            headmap.engine_config.fused = True
    for name, f, b in zip(names, got, ref, strict=True):
        atol = bound(name, size, prob=4 * 2**-8 * 2) + (gamma(20) * 10 if name == "waad" else 0)
        np.testing.assert_allclose(f.values(), b.values(), atol=atol, rtol=0, err_msg=name)


def brute_received(kind, model, ids):
    """{input: [L, T]} from docs/methods/received.md: the mean over heads of sum_{i in Q(j)} A[i, j] / |Q(j)|."""
    causal = causal_of(kind)
    atts = eager_attentions(model, ids)
    out = {}
    for b in range(len(ids)):
        rows = []
        for a in atts:
            a = a[b]  # [H, T, T]
            sees = (np.tril(np.ones((T, T)), -1) if causal else 1 - np.eye(T)).astype(bool)  # i != j sees j
            count = sees.sum(0)
            mass = (a * sees).sum(1).mean(0)  # [T]
            rows.append(np.where(count > 0, mass / np.maximum(count, 1), np.nan))
        out[b] = np.stack(rows)
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_fused_received_equals_brute_force_and_the_block_route(kind, calls):
    """The column sums by the swapped call, less the diagonal, over |Q(j)|: against eager in float32 and
    against the block route in float64. A column sum adds at most T probabilities (relative ``prob`` each,
    so at most T prob absolute), the diagonal one more; divided by |Q(j)| >= 1 and averaged over heads."""
    from headmap.probes import ReceivedProbe

    model, _ = tiny(kind)
    ids = ids_for()
    probe = ReceivedProbe()
    with torch.no_grad(), headmap.observe(model, probes=[probe]):
        model(input_ids=ids)
    assert calls["blocks"] == 0 and calls["kernels"] == ["flash_cpu"] * 2 * 2  # the call and the swapped call
    got, ref = probe.values(), brute_received(kind, model, ids)
    for b in ref:
        np.testing.assert_allclose(got[b], ref[b], atol=(T + 1) * PROB, rtol=0)
    model = model.double()
    fused_probe, block_probe = ReceivedProbe(), ReceivedProbe()
    with torch.no_grad():
        with headmap.observe(model, probes=[fused_probe]):
            model(input_ids=ids)
        headmap.engine_config.fused = False
        try:
            with headmap.observe(model, probes=[block_probe]):
                model(input_ids=ids)
        finally:
            headmap.engine_config.fused = True
    got, ref = fused_probe.values(), block_probe.values()
    for b in ref:
        assert np.array_equal(np.isnan(got[b]), np.isnan(ref[b]))  # the same tokens have no value
        np.testing.assert_allclose(got[b], ref[b], atol=(T + 1) * PROB64, rtol=0)


def test_received_per_modality_keeps_the_block_route():
    from headmap.probes import ReceivedProbe

    assert ReceivedProbe().fused and not ReceivedProbe(modality=True).fused


def test_products_are_shared_by_tag_only(calls):
    """Two probes asking for the keys' product share one call; a product without a tag is never reused."""
    model, _ = tiny("llama")
    seen = []

    class Asker(SinkProbe):
        def update_fused(self, view):
            super().update_fused(view)
            a, _ = fused.product(view, view.key, tag="keys")
            b, _ = fused.product(view, view.key, tag="keys")
            c, _ = fused.product(view, torch.zeros_like(view.key))
            seen.append((a is b, bool(c.abs().max() == 0)))

    with torch.no_grad(), headmap.observe(model, probes=[Asker(), EntropyProbe()]):
        model(input_ids=ids_for())
    assert seen == [(True, True)] * 2
    assert calls["kernels"] == ["flash_cpu"] * 2 * 3  # per layer: the call, the keys' product, the untagged one
