"""Token-level probes (received, fai, sinks, massive_values).

Each probe equals an independent brute-force computation from eager ``output_attentions`` and
``output_hidden_states`` (massive values: Q and K recomputed from forward hooks on the
projections, plus RoPE) on tiny random Llama (GQA), GPT-2 and BERT models, with left- or
right-padded batches, two batches and several blocks per layer. Planted sinks (an edit that makes
a middle token collect the attention of two layers, and hand-built blocks with a sink hidden in
one head) and planted massive dimensions are found; states round-trip exactly; bad parameters
raise ProbeError.
"""

from __future__ import annotations

import functools
import io
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import tiny_models
import torch
from bounds import TINY_EAGER, U64, batch_bound, eager_bound, gamma, reorder
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import headmap
from headmap.corpus import Batch, Sample
from headmap.edits.base import Edit
from headmap.engine.block import Block
from headmap.errors import ProbeError
from headmap.probes.fai import FaiProbe
from headmap.probes.massive_values import MassiveValuesProbe
from headmap.probes.received import ReceivedProbe
from headmap.probes.sinks import SinksProbe

KINDS = ["llama", "gpt2", "bert"]
CAUSAL = ["llama", "gpt2"]
LENGTHS = [9, 14, 5, 12]
tiny = functools.cache(tiny_models.tiny)


# -- running probes -----------------------------------------------------------------------------


def padded(kind: str):
    return tiny_models.padded_batch(LENGTHS, tiny(kind)[1])


def make_batch(ids: torch.Tensor, mask: torch.Tensor, first: int, left: bool) -> Batch:
    samples = [Sample(ids[r][mask[r].bool()].tolist(), {}) for r in range(ids.shape[0])]
    return Batch("test", first, samples, ids, mask, left_pad=left)


def run(model, ids, mask, probes, split=2, left=True, budget_rows=3, edits=()):
    """begin / forward (with hidden states) / end per batch of ``split`` rows, a few rows per block."""
    headmap.engine_config.budget_bytes = split * 4 * ids.shape[1] * 4 * 3 * budget_rows
    with torch.no_grad(), headmap.observe(model, probes=probes, edits=edits):
        for first in range(0, ids.shape[0], split):
            b_ids, b_mask = ids[first : first + split], mask[first : first + split]
            batch = make_batch(b_ids, b_mask, first, left)
            for p in probes:
                p.begin(batch)
            out = model(input_ids=b_ids, attention_mask=b_mask, output_hidden_states=True)
            for p in probes:
                p.end(batch, out)
    return probes


@functools.cache
def eager(kind: str):
    """Per input: ([L] of [H, T, T] attention, [L + 1] of [T, d] hidden states, token ids), float64."""
    model, _ = tiny(kind)
    ids, mask = padded(kind)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
    per_input = []
    for b in range(ids.shape[0]):
        real = torch.nonzero(mask[b]).flatten()
        atts = [a[b][:, real][:, :, real].double().numpy() for a in out.attentions]
        states = [h[b, real].double().numpy() for h in out.hidden_states]
        per_input.append((atts, states, ids[b, real].tolist()))
    return per_input


def rows_of(df: pd.DataFrame) -> dict:
    return {(int(r.sample), int(r.position), r.metric, int(r.layer)): float(r.value) for r in df.itertuples()}


#: Engine against eager on the tiny models (tests/bounds.py): TINY_EAGER absolute for shares of attention,
#: and relative for hidden-state norms (the same chain, in units of the norm). Was atol=1e-6, measured.
def assert_rows(df: pd.DataFrame, expected: dict, atol=TINY_EAGER, rtol=TINY_EAGER):
    assert list(df.columns) == ["sample", "position", "token_id", "metric", "layer", "value"]
    assert not df["value"].isna().any()
    got = rows_of(df)
    assert set(got) == set(expected), (sorted(set(got) - set(expected))[:5], sorted(set(expected) - set(got))[:5])
    keys = sorted(expected)
    np.testing.assert_allclose([got[k] for k in keys], [expected[k] for k in keys], atol=atol, rtol=rtol)


def assert_token_ids(df: pd.DataFrame, kind: str):
    ids = {b: e[2] for b, e in enumerate(eager(kind))}
    assert [ids[s][p] for s, p in zip(df["sample"], df["position"], strict=True)] == df["token_id"].tolist()


# -- brute force, from the definitions (no probe code) ------------------------------------------


def bf_received(atts, causal):
    """([L, T] received, [L, H, T] per head); NaN where no other query sees the token."""
    n_layers, (heads, t, _) = len(atts), atts[0].shape
    avg, per_head = np.full((n_layers, t), np.nan), np.full((n_layers, heads, t), np.nan)
    for layer, a in enumerate(atts):
        for j in range(t):
            queries = [i for i in range(t) if i != j and (i > j or not causal)]
            if queries:
                per_head[layer, :, j] = a[:, queries, j].mean(axis=1)
                avg[layer, j] = per_head[layer, :, j].mean()
    return avg, per_head


def bf_fai(atts, group, horizon=None):
    lo, hi = horizon or (1, None)
    t = atts[0].shape[-1]
    out = np.full(t, np.nan)
    for j in range(t):
        future = [i for i in range(t) if i - j >= lo and (hi is None or i - j <= hi)]
        if future:
            out[j] = np.mean([atts[layer][head, future, j].mean() for layer, head in group])
    return out


def bf_anchors(fai, k):
    order = sorted((j for j in range(1, len(fai)) if np.isfinite(fai[j])), key=lambda j: (-fai[j], j))
    count = k if isinstance(k, int) else math.ceil(k * len(order))
    return set(order[:count])


def bf_sinks(atts, states, causal, tau, ratio):
    """Expected sinks rows of one input: {(position, metric, layer): value}."""
    avg, per_head = bf_received(atts, causal)
    t = avg.shape[1]
    threshold = max(tau, ratio / t)
    rows, flagged = {}, set()
    sink = np.nan_to_num(avg, nan=-1) >= threshold
    for layer in range(avg.shape[0]):
        for j in range(t):
            head_max = np.nanmax(per_head[layer, :, j]) if np.isfinite(per_head[layer, :, j]).any() else -1
            if sink[layer, j]:
                rows[(j, "primary_sink" if j == 0 else "secondary_sink", layer)] = avg[layer, j]
                flagged.add(j)
            elif j != 0 and head_max >= threshold:
                rows[(j, "hidden_sink", layer)] = head_max
                flagged.add(j)
    for j in range(t):
        best = run_ = 0
        for layer in range(avg.shape[0]):
            run_ = run_ + 1 if sink[layer, j] else 0
            best = max(best, run_)
        if best:
            rows[(j, "sink_lifetime", -1)] = float(best)
    for layer in range(avg.shape[0]):
        norms = np.linalg.norm(states[layer], axis=-1)
        median = np.median(norms)
        for j in flagged:
            rows[(j, "sink_norm", layer)] = norms[j]
            rows[(j, "sink_norm_ratio", layer)] = norms[j] / median
    return rows, avg, per_head, threshold


# -- received ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_received_equals_brute_force(kind):
    model, side = tiny(kind)
    ids, mask = padded(kind)
    (probe,) = run(model, ids, mask, [ReceivedProbe()], left=side == "left")
    expected = {}
    for b, (atts, _, _) in enumerate(eager(kind)):
        avg, _ = bf_received(atts, kind != "bert")
        for layer in range(avg.shape[0]):
            for j in np.flatnonzero(np.isfinite(avg[layer])):
                expected[(b, int(j), "received", layer)] = avg[layer, j]
        for j in np.flatnonzero(np.isfinite(avg).any(axis=0)):
            expected[(b, int(j), "received", -1)] = np.nanmean(avg[:, j])
    df = probe.token_frame()
    assert_rows(df, expected)
    assert_token_ids(df, kind)
    if kind != "bert":  # the last token of a causal input is seen by no other query: no row, no NaN
        last = {(b, n - 1) for b, n in enumerate(LENGTHS)}
        assert not any((s, p) in last for s, p in zip(df["sample"], df["position"], strict=True))
    else:
        assert len(df) == sum(LENGTHS) * 3


def test_received_without_begin_numbers_inputs_in_order():
    model, _ = tiny("llama")
    ids, mask = padded("llama")
    probe = ReceivedProbe()
    with torch.no_grad(), headmap.observe(model, probes=[probe]):
        model(input_ids=ids[:2], attention_mask=mask[:2])
        model(input_ids=ids[2:], attention_mask=mask[2:])
    df = probe.token_frame()
    assert sorted(df["sample"].unique()) == [0, 1, 2, 3]
    assert (df["token_id"] == -1).all()
    assert df.groupby("sample")["position"].max().tolist() == [n - 2 for n in LENGTHS]


# -- fai -------------------------------------------------------------------------------------------


FAI_CASES = {
    "default": (lambda: FaiProbe(), lambda n_layers: [(1, h) for h in range(4)], None, 5),
    "all_layers_k2": (
        lambda: FaiProbe(layers="all", anchors=2),
        lambda n: [(l, h) for l in range(2) for h in range(4)],
        None,
        2,
    ),
    "layer_list": (lambda: FaiProbe(layers=[-2], anchors=0.4), lambda n: [(0, h) for h in range(4)], None, 0.4),
    "heads_horizon": (
        lambda: FaiProbe(heads=[(0, 1), (1, 3)], horizon=(2, 4)),
        lambda n: [(0, 1), (1, 3)],
        (2, 4),
        5,
    ),
    "open_horizon": (lambda: FaiProbe(horizon=(3, None)), lambda n: [(1, h) for h in range(4)], (3, None), 5),
}


@pytest.mark.parametrize("kind", CAUSAL)
@pytest.mark.parametrize("case", list(FAI_CASES))
def test_fai_equals_brute_force(kind, case):
    make, group, horizon, k = FAI_CASES[case]
    model, _ = tiny(kind)
    ids, mask = padded(kind)
    (probe,) = run(model, ids, mask, [make()])
    expected = {}
    for b, (atts, _, _) in enumerate(eager(kind)):
        fai = bf_fai(atts, group(len(atts)), horizon)
        for j in np.flatnonzero(np.isfinite(fai)):
            expected[(b, int(j), "fai", -1)] = fai[j]
        for j in bf_anchors(fai, k):
            expected[(b, int(j), "anchor", -1)] = 1.0
    df = probe.token_frame()
    assert_rows(df, expected)
    assert_token_ids(df, kind)


def test_fai_planted_anchor():
    """Hand-built blocks: every later query of one head puts half its mass on token 3."""
    t, heads = 9, 2
    a = np.zeros((heads, t, t))
    for i in range(t):
        a[:, i, : i + 1] = 1.0 / (i + 1)
        if i > 3:
            a[0, i] = 0.0
            a[0, i, 3] = 0.5
            a[0, i, i] = 0.5
    probe = FaiProbe(layers="all", anchors=1)
    feed(probe, [[a, a]], causal=True)
    fai = probe.values()[0]
    uniform = [np.mean([1.0 / (i + 1) for i in range(j + 1, t)]) for j in range(t - 1)]
    # planted probabilities rounded once to float32 (u each), averaged over at most 9 queries: gamma(9 + 1)
    np.testing.assert_allclose(fai[3], (0.5 + uniform[3]) / 2, atol=gamma(9 + 1))
    np.testing.assert_allclose(fai[5], uniform[5] / 2, atol=gamma(9 + 1))  # head 0 never looks at 5
    assert np.isnan(fai[-1])
    anchors = probe.token_frame().query("metric == 'anchor'")
    assert anchors["position"].tolist() == [3]


def test_fai_refuses_encoders_and_missing_layers():
    model, _ = tiny("bert")
    ids, mask = padded("bert")
    with pytest.raises(ProbeError, match="causal"):
        run(model, ids, mask, [FaiProbe()], left=False)
    model, _ = tiny("llama")
    ids, mask = padded("llama")
    with pytest.raises(ProbeError, match="has 2 layers"):
        run(model, ids[:2], mask[:2], [FaiProbe(layers=[5])])
    with pytest.raises(ProbeError, match="has 4 heads"):
        run(model, ids[:2], mask[:2], [FaiProbe(heads=[(1, 4)])])


# -- sinks -----------------------------------------------------------------------------------------


#: thresholds low enough for random tiny models to have primary, secondary and hidden sinks, with
#: no received value within rounding of the threshold (float32 rounding cannot flip a decision)
SINK_PARAMS = {"llama": (0.11, 0.5), "gpt2": (0.12, 0.5), "bert": (0.12, 1.0)}


@pytest.mark.parametrize("kind", KINDS)
def test_sinks_equal_brute_force(kind):
    tau, ratio = SINK_PARAMS[kind]
    model, side = tiny(kind)
    ids, mask = padded(kind)
    (probe,) = run(model, ids, mask, [SinksProbe(tau=tau, ratio=ratio)], left=side == "left")
    expected = {}
    for b, (atts, states, _) in enumerate(eager(kind)):
        rows, avg, per_head, threshold = bf_sinks(atts, states, kind != "bert", tau, ratio)
        # No decision sits on the threshold (float rounding cannot flip it): engine and eager differ by at most
        # eager_bound(t) on an input of t real tokens (tests/bounds.py; masked keys add exact zeros, no
        # rounding). BERT's 5-token input has a received share 1.0e-5 from its threshold 1/5: eager_bound(5)
        # = 7.6e-6 covers it, the bound of longer inputs would not (was 5e-6, measured).
        t = atts[0].shape[-1]
        for value in (avg, per_head):
            assert (np.abs(value[np.isfinite(value)] - threshold) > eager_bound(t)).all()
        expected.update({(b, *key): v for key, v in rows.items()})
    df = probe.token_frame()
    metrics = {m for _, _, m, _ in expected}
    assert {"primary_sink", "secondary_sink", "hidden_sink", "sink_lifetime", "sink_norm", "sink_norm_ratio"} <= metrics
    assert_rows(df, expected)
    assert_token_ids(df, kind)
    medians = probe.medians()
    for b, (_, states, _) in enumerate(eager(kind)):
        want = [np.median(np.linalg.norm(s, axis=-1)) for s in states[:-1]]
        # hidden states as in assert_rows (TINY_EAGER relative), plus the norm's sum of 32 squares: gamma(32)
        np.testing.assert_allclose(medians.query(f"sample == {b}")["median_norm"], want, rtol=TINY_EAGER + gamma(32))


class BoostKey(Edit):
    """Test edit: adds ``bonus`` to the logits of key position ``pos`` (inside each input) in ``layers``."""

    def __init__(self, pos, layers, bonus=12.0):
        super().__init__(heads=[(layer, h) for layer in layers for h in range(4)])
        self.pos, self.bonus = pos, bonus

    def edit_logits(self, block, logits):
        hit = (block.rel_k() == self.pos).to(logits.dtype)[:, None, None, :]  # [B, 1, 1, bk]
        return logits + self.bonus * hit * self.head_mask(block, logits).to(logits.dtype)


def test_planted_secondary_sink_in_a_model():
    """A middle token that takes the attention of layers 1 and 2 of 4 is a secondary sink, lifetime 2."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(cfg).eval()
    ids, mask = tiny_models.padded_batch([20, 16, 18], "left", seed=3)
    captured = []

    class Keep(SinksProbe):
        def end(self, batch, outputs):
            captured.append(outputs.hidden_states)
            super().end(batch, outputs)

    probe = Keep()
    run(model, ids, mask, [probe], split=3, edits=[BoostKey(pos=3, layers=[1, 2])])
    df = probe.token_frame()
    sinks = df[df["metric"].str.endswith("_sink")]
    assert set(sinks["metric"]) == {"secondary_sink"}
    assert set(zip(sinks["sample"], sinks["position"], sinks["layer"], strict=True)) == {
        (s, 3, layer) for s in range(3) for layer in (1, 2)
    }
    assert (sinks["value"] > 0.9).all()
    life = df[df["metric"] == "sink_lifetime"]
    assert life[["sample", "position", "value"]].values.tolist() == [[s, 3, 2.0] for s in range(3)]
    (states,) = captured
    norms = df[df["metric"] == "sink_norm"]
    assert len(norms) == 3 * 4  # every layer, for the one sink token of each input
    for r in norms.itertuples():
        col = ids.shape[1] - [20, 16, 18][r.sample] + r.position  # left padding
        want = torch.linalg.vector_norm(states[r.layer][r.sample, col].double()).item()
        # the same float32 states, their norm in float64 both times: sums of 32 squares in another order and a
        # square root, reorder(33, u=U64) ~ 7e-15 (was 1e-12)
        np.testing.assert_allclose(r.value, want, rtol=reorder(33, u=U64))


def causal_uniform(t, heads):
    a = np.zeros((heads, t, t))
    for i in range(t):
        a[:, i, : i + 1] = 1.0 / (i + 1)
    return a


def planted_sink_layers(t=10, heads=8):
    """Five layers: uniform; sinks at 0 (primary) and 6 (secondary) in layers 1, 2 and 4 (not 3);
    in layer 2 head 0 sends every query after 4 to token 4 (a sink hidden in one head)."""
    uniform = causal_uniform(t, heads)
    sink = np.zeros((heads, t, t))
    sink[:, 0, 0] = 1.0
    for i in range(1, t):
        if i > 6:
            sink[:, i, 0] = sink[:, i, 6] = 0.5
        else:
            sink[:, i, 0] = 1.0
    hidden = sink.copy()
    hidden[0] = 0.0
    for i in range(t):
        hidden[0, i, 4 if i > 4 else i] = 1.0
    return [uniform, sink, hidden, uniform, sink]


def feed(probe, layers_per_input, causal=True, rows=3):
    """Feed ``probe`` hand-made attention ([L] of [H, T, T] per input) as a padded batch cut into row blocks."""
    n_layers = len(layers_per_input[0])
    heads = layers_per_input[0][0].shape[0]
    width = max(p[0].shape[-1] for p in layers_per_input)
    batch = len(layers_per_input)
    idx = torch.arange(width)
    real = torch.zeros(batch, width, dtype=torch.bool)
    starts = []
    for b, pats in enumerate(layers_per_input):
        t = pats[0].shape[-1]
        s = width - t if causal else 0
        starts.append(s)
        real[b, s : s + t] = True
    vis = real[:, None, :, None] & real[:, None, None, :]
    if causal:
        vis &= idx[:, None] >= idx[None, :]
    for layer in range(n_layers):
        probs = torch.zeros(batch, heads, width, width, dtype=torch.float32)
        for b, pats in enumerate(layers_per_input):
            t = pats[layer].shape[-1]
            probs[b, :, starts[b] : starts[b] + t, starts[b] : starts[b] + t] = torch.as_tensor(pats[layer])
        assert not (probs * ~vis).any()
        for q0 in range(0, width, rows):
            q1 = min(width, q0 + rows)
            blk = vis[:, :, q0:q1]
            cols = torch.nonzero(blk.any(dim=2).any(dim=1).any(dim=0)).flatten()
            if cols.numel() == 0:
                continue
            k0, k1 = int(cols[0]), int(cols[-1]) + 1
            m = blk[..., k0:k1]
            probe.update(
                Block(
                    layer=layer,
                    module=nn.Identity(),
                    num_heads=heads,
                    num_kv_heads=heads,
                    q_start=q0,
                    q_end=q1,
                    k_start=k0,
                    k_end=k1,
                    q_pos=torch.arange(q0, q1),
                    k_pos=torch.arange(k0, k1),
                    mask=None if bool(m.all()) else m,
                    query_valid=m.any(dim=-1)[:, 0] & real[:, q0:q1],
                    item_start=torch.tensor(starts),
                    probs=probs[:, :, q0:q1, k0:k1].contiguous(),
                    is_causal=causal,
                )
            )
    probe.commit()
    return starts, width


@pytest.mark.parametrize("rows", [1, 3, 100])
def test_planted_sinks_hidden_sink_and_lifetime(rows):
    t, heads = 10, 8
    layers = planted_sink_layers(t, heads)
    short = [causal_uniform(7, heads)] * 5  # a second, shorter input without sinks
    probe = SinksProbe(tau=0.3, ratio=1.0)
    starts, width = feed(probe, [layers, short], rows=rows)
    gen = torch.Generator().manual_seed(0)
    states = [torch.randn(2, width, 16, generator=gen) for _ in range(6)]
    for s in states:
        s[0, starts[0] + 6] *= 40.0  # the secondary sink carries a massive activation
    probe.end(None, SimpleNamespace(hidden_states=tuple(states)))
    df = probe.token_frame()
    got = {
        (m, p, layer)
        for m, p, layer in zip(df["metric"], df["position"], df["layer"], strict=True)
        if m.endswith("sink")
    }
    assert got == {
        ("primary_sink", 0, 1),
        ("primary_sink", 0, 2),
        ("primary_sink", 0, 4),
        ("secondary_sink", 6, 1),
        ("secondary_sink", 6, 2),
        ("secondary_sink", 6, 4),
        ("hidden_sink", 4, 2),
    }
    assert (df["sample"][df["metric"].str.endswith("sink")] == 0).all()
    life = df[df["metric"] == "sink_lifetime"].set_index("position")["value"].to_dict()
    assert life == {0: 2.0, 6: 2.0}  # layers 1-2, then 4: layer 3 breaks the run
    hidden = df.query("metric == 'hidden_sink'")["value"].tolist()
    # planted shares rounded once to float32, averaged over at most 8 queries: gamma(8 + 1) (was 1e-7)
    np.testing.assert_allclose(hidden, [1.0], atol=gamma(8 + 1))
    second = df.query("metric == 'secondary_sink' and layer == 2")["value"].item()
    np.testing.assert_allclose(second, 7 / 8 * 0.5, atol=gamma(8 + 1))
    ratio = df.query("metric == 'sink_norm_ratio' and position == 6")["value"]
    assert len(ratio) == 5 and (ratio > 10).all()
    assert set(df.query("metric == 'sink_norm'")["position"]) == {0, 4, 6}
    # expected rows from the brute force on the same patterns
    expected, *_ = bf_sinks(layers, [s[0, starts[0] :].double().numpy() for s in states], True, 0.3, 1.0)
    assert_rows(df[df["sample"] == 0], {(0, *k): v for k, v in expected.items()})


def test_sinks_need_hidden_states():
    model, _ = tiny("llama")
    ids, mask = padded("llama")
    probe = SinksProbe()
    batch = make_batch(ids[:2], mask[:2], 0, True)
    with torch.no_grad(), headmap.observe(model, probes=[probe]):
        probe.begin(batch)
        out = model(input_ids=ids[:2], attention_mask=mask[:2])
        with pytest.raises(ProbeError, match="output_hidden_states=True"):
            probe.end(batch, out)
    assert SinksProbe.needs_hidden_norms and not ReceivedProbe.needs_hidden_states


# -- massive values --------------------------------------------------------------------------------


def qk_from_projections(kind, model, ids, mask):
    """Per layer: (Q [B, H, T, D], K [B, Hkv, T, D]) recomputed from hooks on the projections."""
    cfg = model.config
    caps: dict[int, dict[str, torch.Tensor]] = {}
    hooks = []

    def keep(layer, name):
        return lambda _m, _i, out: caps.setdefault(layer, {}).__setitem__(name, out.detach())

    if kind == "llama":
        for layer, block in enumerate(model.model.layers):
            hooks.append(block.self_attn.q_proj.register_forward_hook(keep(layer, "q")))
            hooks.append(block.self_attn.k_proj.register_forward_hook(keep(layer, "k")))
    elif kind == "gpt2":
        for layer, block in enumerate(model.transformer.h):
            hooks.append(block.attn.c_attn.register_forward_hook(keep(layer, "qkv")))
    else:
        for layer, block in enumerate(model.encoder.layer):
            hooks.append(block.attention.self.query.register_forward_hook(keep(layer, "q")))
            hooks.append(block.attention.self.key.register_forward_hook(keep(layer, "k")))
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    bsz, width = ids.shape
    heads = cfg.num_attention_heads
    dim = cfg.hidden_size // heads
    for layer, c in caps.items():
        if kind == "gpt2":
            c["q"], c["k"], _ = c["qkv"].split(cfg.hidden_size, dim=-1)
        kv = c["k"].shape[-1] // dim
        q = c["q"].view(bsz, width, heads, dim).transpose(1, 2)
        k = c["k"].view(bsz, width, kv, dim).transpose(1, 2)
        if kind == "llama":
            from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

            pos = torch.arange(width)[None].expand(bsz, -1)
            cos, sin = model.model.rotary_emb(q, pos)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
        out[layer] = (q.double(), k.double())
    return out


#: Q and K recomputed from eager's hidden states against the engine's: the hidden states entering a layer
#: differ by the engine-vs-eager chain (TINY_EAGER, relative), the projection sums 32 terms in another
#: order (reorder(32)); relative to the magnitudes summed, so also absolute in units of the largest mean.
MASSIVE_REL = TINY_EAGER + reorder(32)


def bf_massive(kind, model, ids, mask, lam):
    """Per layer: (m_q [H, D], m_k [Hkv, D], q flags, k flags) from recomputed Q and K."""
    out = {}
    for layer, (q, k) in qk_from_projections(kind, model, ids, mask).items():
        means = []
        for x in (q, k):
            per_input = [x[b][:, mask[b].bool()].abs().mean(dim=1).numpy() for b in range(ids.shape[0])]
            means.append(np.mean(per_input, axis=0))
        flags = [m > lam * np.median(m) for m in means]
        for m in means:
            # no value within rounding of the threshold: m and its median are each within MASSIVE_REL
            assert (np.abs(m - lam * np.median(m)) > 2 * MASSIVE_REL * lam * np.median(m)).all()
        out[layer] = (*means, *flags)
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("lam", [5.0, 1.5])
def test_massive_values_equal_brute_force(kind, lam):
    model, side = tiny(kind)
    ids, mask = padded(kind)
    (probe,) = run(model, ids, mask, [MassiveValuesProbe(lam=lam)], left=side == "left")
    expected = bf_massive(kind, model, ids, mask, lam)
    dims = probe.dims()
    rows = pd.DataFrame(probe.head_rows())
    for layer, (mq, mk, fq, fk) in expected.items():
        for tensor, m, f in (("q", mq, fq), ("k", mk, fk)):
            got = dims.query(f"tensor == '{tensor}' and layer == {layer}").sort_values(["head", "dim"])
            np.testing.assert_allclose(
                got["value"].to_numpy(), m.reshape(-1), atol=MASSIVE_REL * m.max(), rtol=MASSIVE_REL
            )  # MASSIVE_REL: see bf_massive (was atol=rtol=1e-6)
            assert got["massive"].tolist() == f.reshape(-1).tolist()
            group = mq.shape[0] // mk.shape[0]
            for metric, want in ((f"{tensor}_massive", f.sum(1)), (f"{tensor}_peak_ratio", m.max(1) / np.median(m))):
                sel = rows.query(f"metric == '{metric}' and layer == {layer}").sort_values("head")
                assert sel["head"].tolist() == list(range(mq.shape[0]))
                assert sel["kv_head"].tolist() == [h // group for h in range(mq.shape[0])]
                # counts are exact; a peak ratio divides two values within MASSIVE_REL each
                np.testing.assert_allclose(
                    sel["value"], np.repeat(want, mq.shape[0] // len(want)), rtol=2 * MASSIVE_REL
                )
                assert (sel["n"] == len(LENGTHS)).all()
    if lam == 1.5:
        assert dims["massive"].any()


def test_planted_massive_dimensions():
    """Scaling one output row of q_proj (head 1, dim 3) and of k_proj (kv head 0, dim 2) plants them."""
    model, _ = tiny_models.tiny("llama")  # a fresh copy: weights are edited
    dim = 8
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[1 * dim + 3] *= 60.0
        model.model.layers[0].self_attn.k_proj.weight[0 * dim + 2] *= 60.0
    ids, mask = padded("llama")
    (probe,) = run(model, ids, mask, [MassiveValuesProbe()])
    dims = probe.dims().query("layer == 0 and massive")
    assert set(zip(dims["tensor"], dims["head"], dims["dim"], strict=True)) >= {("q", 1, 3), ("k", 0, 2)}
    assert set(dims.query("tensor == 'q'")["head"]) == {1}
    assert set(dims.query("tensor == 'k'")["head"]) == {0}
    rows = pd.DataFrame(probe.head_rows()).query("layer == 0")
    q = rows.query("metric == 'q_massive'").set_index("head")["value"]
    k = rows.query("metric == 'k_massive'").set_index("head")["value"]
    assert q[1] >= 1 and q[[0, 2, 3]].eq(0).all()
    assert k[0] == k[1] >= 1 and k[[2, 3]].eq(0).all()  # query heads 0 and 1 read kv head 0
    assert rows.query("metric == 'q_peak_ratio' and head == 1")["value"].item() > 20


# -- state, parameters --------------------------------------------------------------------------------


def savez_round_trip(state):
    buf = io.BytesIO()
    np.savez(buf, **state)
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


STATE_CASES = {
    "received": lambda: ReceivedProbe(),
    "fai": lambda: FaiProbe(anchors=2),
    "sinks": lambda: SinksProbe(tau=0.11, ratio=0.5),
    "massive_values": lambda: MassiveValuesProbe(lam=1.5),
}


@pytest.mark.parametrize("case", list(STATE_CASES))
def test_state_round_trip_gives_identical_tables(case):
    model, _ = tiny("llama")
    ids, mask = padded("llama")
    make = STATE_CASES[case]
    (whole,) = run(model, ids, mask, [make()])
    (first,) = run(model, ids[:2], mask[:2], [make()])
    resumed = make()
    resumed.load_state_dict(savez_round_trip(first.state_dict()))
    headmap.engine_config.budget_bytes = 2 * 4 * ids.shape[1] * 4 * 3 * 3
    with torch.no_grad(), headmap.observe(model, probes=[resumed]):
        batch = make_batch(ids[2:], mask[2:], 2, True)
        resumed.begin(batch)
        out = model(input_ids=ids[2:], attention_mask=mask[2:], output_hidden_states=True)
        resumed.end(batch, out)
    if case == "massive_values":
        assert resumed.head_rows() == whole.head_rows()
        pd.testing.assert_frame_equal(resumed.dims(), whole.dims(), check_exact=True)
    else:
        pd.testing.assert_frame_equal(resumed.token_frame(), whole.token_frame(), check_exact=True)
        assert len(whole.token_frame())
    with pytest.raises(ValueError, match=f"not a state of probe {resumed.name}"):
        make().load_state_dict({"layers": np.array([0])} if case != "massive_values" else {"chunks": np.array(1)})


def test_state_holds_committed_inputs_only():
    model, _ = tiny("llama")
    ids, mask = padded("llama")
    probe = ReceivedProbe()
    (probe,) = run(model, ids[:2], mask[:2], [probe])
    state = probe.state_dict()
    assert int(state["chunks"]) == 1 and int(state["next_sample"]) == 2
    assert all(isinstance(v, np.ndarray) for v in state.values())


def test_begin_must_match_the_forward():
    model, _ = tiny("llama")
    ids, mask = padded("llama")
    probe = ReceivedProbe()
    with torch.no_grad(), headmap.observe(model, probes=[probe]):
        probe.begin(make_batch(ids[2:], mask[2:], 2, True))  # the other two inputs
        with pytest.raises(ProbeError, match="call begin"):
            model(input_ids=ids[:2], attention_mask=mask[:2])


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: SinksProbe(tau=0), "tau must be"),
        (lambda: SinksProbe(tau=1.5), "tau must be"),
        (lambda: SinksProbe(tau="0.2"), "tau must be"),
        (lambda: SinksProbe(ratio=-1), "ratio must be"),
        (lambda: SinksProbe(ratio=float("nan")), "ratio must be"),
        (lambda: SinksProbe(ratio=True), "ratio must be"),
        (lambda: FaiProbe(layers="middle"), "layers must be"),
        (lambda: FaiProbe(layers=[]), "layers must be"),
        (lambda: FaiProbe(layers=[1, 1]), "layers must be"),
        (lambda: FaiProbe(layers=[0.5]), "layers must be"),
        (lambda: FaiProbe(layers="all", heads=[(0, 1)]), "either layers or heads"),
        (lambda: FaiProbe(heads=[(0, -1)]), "heads must be"),
        (lambda: FaiProbe(heads=[(0,)]), "heads must be"),
        (lambda: FaiProbe(horizon=(0, 5)), "horizon must be"),
        (lambda: FaiProbe(horizon=(5, 2)), "horizon must be"),
        (lambda: FaiProbe(horizon=10), "horizon must be"),
        (lambda: FaiProbe(anchors=-1), "anchors must be"),
        (lambda: FaiProbe(anchors=1.5), "anchors must be"),
        (lambda: FaiProbe(anchors=True), "anchors must be"),
        (lambda: MassiveValuesProbe(lam=1.0), "lam must be"),
        (lambda: MassiveValuesProbe(lam=float("inf")), "lam must be"),
        (lambda: MassiveValuesProbe(lam="5"), "lam must be"),
    ],
)
def test_bad_parameters_raise(make, match):
    with pytest.raises(ProbeError, match=match):
        make()


def test_params_and_flags():
    assert ReceivedProbe().params() == {}
    assert FaiProbe().params() == {"layers": "upper", "heads": None, "horizon": None, "anchors": 5}
    assert FaiProbe(heads=[(2, 1), [0, 3]], horizon=(10, 50)).params() == {
        "layers": "upper",
        "heads": [[0, 3], [2, 1]],
        "horizon": [10, 50],
        "anchors": 5,
    }
    assert SinksProbe().params() == {"tau": 0.2, "ratio": 10.0}
    assert MassiveValuesProbe().params() == {"lam": 5.0}
    names = [c.name for c in (ReceivedProbe, FaiProbe, SinksProbe, MassiveValuesProbe)]
    assert names == ["received", "fai", "sinks", "massive_values"]
    assert FaiProbe.causal_only and not SinksProbe.causal_only and not ReceivedProbe.causal_only
    assert MassiveValuesProbe.reads_qk and SinksProbe.needs_hidden_norms


# -- through headmap.scan ------------------------------------------------------------------------------


SCAN_LENGTHS = (9, 14, 5, 12, 7)


def pad_rows(rows):
    """Left-padded batch (pad id 0) of token id lists."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids, mask


def scan_probes():
    return [ReceivedProbe(), FaiProbe(anchors=2), SinksProbe(tau=0.11, ratio=0.5), MassiveValuesProbe(lam=1.5)]


def scan_corpus():
    gen = torch.Generator().manual_seed(5)
    samples = [Sample(torch.randint(2, 97, (n,), generator=gen).tolist(), {}) for n in SCAN_LENGTHS]
    return headmap.corpus.Corpus("mine", samples, {"name": "mine"})


def test_scan_writes_the_rows_of_a_direct_run(tmp_path):
    model, _ = tiny("llama")
    atlas = headmap.scan(
        model, tokenizer=None, probes=scan_probes(), corpus=scan_corpus(), batch_size=2, progress=False, out=tmp_path
    )
    # the scan's batches: two inputs each, left-padded to the longest of the two, with position ids
    # counted from each input's first real token (as the scan and generate() pass them)
    direct = scan_probes()
    samples = scan_corpus().samples
    with torch.no_grad(), headmap.observe(model, probes=direct):
        for first in range(0, len(samples), 2):
            ids, mask = pad_rows([s.ids for s in samples[first : first + 2]])
            batch = make_batch(ids, mask, first, True)
            for p in direct:
                p.begin(batch)
            positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, output_hidden_states=True)
            for p in direct:
                p.end(batch, out)
    tokens = pd.read_parquet(tmp_path / "tokens.parquet")
    pd.testing.assert_frame_equal(tokens, atlas.tokens, check_dtype=False)
    assert (tokens["token"] == tokens["token_id"].astype(str)).all()
    want = pd.concat([p.token_frame() for p in direct[:3]], ignore_index=True)
    got = tokens.drop(columns="token")
    key = ["metric", "sample", "layer", "position"]
    want, got = (f.sort_values(key).reset_index(drop=True) for f in (want, got))
    pd.testing.assert_frame_equal(got.drop(columns="value"), want.drop(columns="value"), check_dtype=False)
    # the scan batches inputs otherwise than the direct run: batch_bound(64) (tests/bounds.py), absolute for
    # shares of attention, relative for norms (was atol=1e-6)
    np.testing.assert_allclose(got["value"], want["value"], atol=batch_bound(64), rtol=batch_bound(64))
    assert {"received", "fai", "anchor", "secondary_sink", "sink_lifetime", "sink_norm"} <= set(got["metric"])
    heads = atlas.heads.query("probe == 'massive_values'").sort_values(["metric", "layer", "head"])
    expected = pd.DataFrame(direct[3].head_rows()).sort_values(["metric", "layer", "head"])
    # counts exact; peak ratios: two Q/K means within batch_bound(64) each (was rtol=1e-6)
    np.testing.assert_allclose(heads["value"], expected["value"], rtol=2 * batch_bound(64))
    assert set(heads["metric"]) == {"q_massive", "k_massive", "q_peak_ratio", "k_peak_ratio"}


def test_scan_interrupted_then_resumed_writes_identical_token_tables(tmp_path, monkeypatch):
    model, _ = tiny("llama")
    kwargs = dict(tokenizer=None, corpus=scan_corpus(), batch_size=2, progress=False)
    full = tmp_path / "full"
    headmap.scan(model, probes=scan_probes(), out=full, **kwargs)
    out = tmp_path / "run"
    calls = {"n": 0}
    forward = type(model).forward

    def stop_third(self, *args, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return forward(self, *args, **kw)

    with monkeypatch.context() as m:
        m.setattr(type(model), "forward", stop_third)
        with pytest.raises(KeyboardInterrupt) as info:
            headmap.scan(model, probes=scan_probes(), out=out, **kwargs)
    assert info.value.inputs_done == 4
    headmap.scan(model, probes=scan_probes(), out=out, resume=True, **kwargs)
    for table in ("tokens.parquet", "heads.parquet"):
        a, b = pd.read_parquet(full / table), pd.read_parquet(out / table)
        pd.testing.assert_frame_equal(a, b, check_exact=True)
        assert a["value"].to_numpy().tobytes() == b["value"].to_numpy().tobytes()
