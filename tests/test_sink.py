"""The sink probe equals a brute-force computation from eager attentions, and merges exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from bounds import ATTENTION_STAGES, LAYER_STAGES, reorder
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import padded_batch, tiny

import headmap
from headmap.errors import ProbeError
from headmap.probes import SinkProbe, make_probes

# Engine against eager on tiny(): the attention's sums (Q K^T over 8 dimensions, the softmax row and P V over
# at most 16 keys) in another order, two layers, plus one stage for the elementwise steps: tests/bounds.py,
# 2 * 4 * 2 * gamma(16) ~ 1.1e-5 on probabilities and their per-input means (was 1e-6, measured). The
# standard error is a difference of such means over sqrt(n): no larger. A wrong position or weight moves
# a value by 1e-2 or more.
PROB_ABS = reorder(16, (ATTENTION_STAGES + 1) * 2)


def brute_force_sink(model, ids, mask):
    """mean over inputs of mean over real queries i >= 1 of A[i, first real token] (from eager)."""
    with torch.no_grad():
        atts = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    per_input = []
    for b in range(ids.shape[0]):
        real = torch.nonzero(mask[b]).flatten()
        first, rows = real[0], real[1:]
        per_input.append(np.stack([a[b][:, rows, first].double().mean(-1).numpy() for a in atts]))
    per_input = np.stack(per_input)  # [inputs, layers, heads]
    return per_input.mean(0), per_input.std(0, ddof=1) / np.sqrt(len(per_input))


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_sink_equals_brute_force(kind):
    model, side = tiny(kind)
    ids, mask = padded_batch([9, 14, 5, 12], side)
    expected, expected_se = brute_force_sink(model, ids, mask)
    headmap.engine_config.budget_bytes = 4 * 4 * 14 * 4 * 3 * 3  # a few rows per block
    probe = SinkProbe()
    with torch.no_grad(), headmap.observe(model, probes=[probe]):
        model(input_ids=ids[:2], attention_mask=mask[:2])  # two batches, two commits
        model(input_ids=ids[2:], attention_mask=mask[2:])
    got = probe.values()
    np.testing.assert_allclose(got, expected, atol=PROB_ABS, rtol=0)
    stats = probe.result()
    np.testing.assert_allclose(np.stack([stats[l].stderr() for l in sorted(stats)]), expected_se, atol=PROB_ABS)
    assert all((s.count == 4).all() for s in stats.values())


def test_sink_rows_are_inputs_not_blocks():
    """Each input weighs the same whatever its length (docs/methods/README.md: average within, then across)."""
    model, side = tiny("llama")
    ids, mask = padded_batch([3, 15], side)
    probe = SinkProbe()
    with torch.no_grad(), headmap.observe(model, probes=[probe]):
        model(input_ids=ids, attention_mask=mask)
    expected, _ = brute_force_sink(model, ids, mask)
    np.testing.assert_allclose(probe.values(), expected, atol=PROB_ABS)  # PROB_ABS: see above


@settings(max_examples=8, deadline=None)
@given(split=st.integers(min_value=1, max_value=5), seed=st.integers(min_value=0, max_value=1000))
def test_merge_of_partial_scans_equals_one_scan(split, seed):
    model, side = tiny("llama")
    ids, mask = padded_batch([4, 7, 11, 6, 9, 13], side, seed=seed)
    parts = [(ids[:split], mask[:split]), (ids[split:], mask[split:])]
    # One probe through both forward passes, against one probe per pass merged: the same float32
    # probabilities, and float64 totals added in the same order (0 + a) + b, so merging is exact.
    whole = SinkProbe()
    with torch.no_grad(), headmap.observe(model, probes=[whole]):
        for part_ids, part_mask in parts:
            model(input_ids=part_ids, attention_mask=part_mask)
    first, second = SinkProbe(), SinkProbe()
    with torch.no_grad():
        for probe, (part_ids, part_mask) in zip((first, second), parts, strict=True):
            with headmap.observe(model, probes=[probe]):
                model(input_ids=part_ids, attention_mask=part_mask)
    first.merge(second)
    a, b = whole.result(), first.result()
    assert a.keys() == b.keys()
    for layer in a:
        np.testing.assert_array_equal(a[layer].total, b[layer].total)
        np.testing.assert_array_equal(a[layer].total_sq, b[layer].total_sq)
        np.testing.assert_array_equal(a[layer].count, b[layer].count)
    # And one scan of all six inputs at once: other batch sizes block every matmul differently
    # (tests/bounds.py: LAYER_STAGES sums of at most 64 terms per layer, two layers, 2 * 18 * gamma(64)
    # = 1.4e-4 per probability and per-input mean). Over six inputs: totals within 6 times that,
    # totals of squares within 2 * 6 times (|a^2 - b^2| <= 2 |a - b| for a, b in [0, 1]). This was
    # rtol=1e-12, which only one BLAS summation order met.
    once = SinkProbe()
    with torch.no_grad(), headmap.observe(model, probes=[once]):
        model(input_ids=ids, attention_mask=mask)
    per_input = reorder(64, LAYER_STAGES * 2)
    c = once.result()
    for layer in a:
        np.testing.assert_allclose(c[layer].total, a[layer].total, rtol=0, atol=6 * per_input)
        np.testing.assert_allclose(c[layer].total_sq, a[layer].total_sq, rtol=0, atol=2 * 6 * per_input)
        np.testing.assert_array_equal(c[layer].count, a[layer].count)


def test_sink_rows_follow_the_contract():
    model, side = tiny("llama")
    ids, mask = padded_batch([6, 8], side)
    probe = SinkProbe()
    with torch.no_grad(), headmap.observe(model, probes=[probe]):
        model(input_ids=ids, attention_mask=mask)
    rows = probe.head_rows()
    assert len(rows) == 2 * 4
    assert {r["kv_head"] for r in rows if r["head"] in (2, 3)} == {1}
    assert all(r["n"] == 2 and r["probe"] == r["metric"] == "sink" for r in rows)


def test_make_probes_rejects_unknown_names():
    with pytest.raises(ProbeError, match="unknown probe 'bogus'"):
        make_probes("sink,bogus")
    with pytest.raises(ProbeError, match="no probe named"):
        make_probes(" , ")
    assert [p.name for p in make_probes("sink, sink")] == ["sink"]
