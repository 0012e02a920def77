"""The sink probe equals a brute-force computation from eager attentions, and merges exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import padded_batch, tiny

import headmap
from headmap.errors import ProbeError
from headmap.probes import SinkProbe, make_probes


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
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
    stats = probe.result()
    np.testing.assert_allclose(np.stack([stats[l].stderr() for l in sorted(stats)]), expected_se, atol=1e-6)
    assert all((s.count == 4).all() for s in stats.values())


def test_sink_rows_are_inputs_not_blocks():
    """Each input weighs the same whatever its length (docs/methods/README.md: average within, then across)."""
    model, side = tiny("llama")
    ids, mask = padded_batch([3, 15], side)
    probe = SinkProbe()
    with torch.no_grad(), headmap.observe(model, probes=[probe]):
        model(input_ids=ids, attention_mask=mask)
    expected, _ = brute_force_sink(model, ids, mask)
    np.testing.assert_allclose(probe.values(), expected, atol=1e-6)


@settings(max_examples=8, deadline=None)
@given(split=st.integers(min_value=1, max_value=5), seed=st.integers(min_value=0, max_value=1000))
def test_merge_of_partial_scans_equals_one_scan(split, seed):
    model, side = tiny("llama")
    ids, mask = padded_batch([4, 7, 11, 6, 9, 13], side, seed=seed)
    whole = SinkProbe()
    with torch.no_grad(), headmap.observe(model, probes=[whole]):
        model(input_ids=ids, attention_mask=mask)
    first, second = SinkProbe(), SinkProbe()
    with torch.no_grad():
        with headmap.observe(model, probes=[first]):
            model(input_ids=ids[:split], attention_mask=mask[:split])
        with headmap.observe(model, probes=[second]):
            model(input_ids=ids[split:], attention_mask=mask[split:])
    first.merge(second)
    a, b = whole.result(), first.result()
    for layer in a:
        np.testing.assert_allclose(a[layer].total, b[layer].total, rtol=1e-12)
        np.testing.assert_allclose(a[layer].total_sq, b[layer].total_sq, rtol=1e-12)
        np.testing.assert_array_equal(a[layer].count, b[layer].count)


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
