"""Probes that read per-input structure: ``span`` (named or fixed token spans) and ``position_profile`` (items).

Both equal an independent brute-force computation from eager ``output_attentions`` on tiny
random Llama (GQA), GPT-2 and BERT models (``position_profile``: causal models only) with left-
and right-padded batches of different lengths, two forward calls and several blocks per layer,
values, standard errors and counts included; hand-made blocks give the closed-form answers; what
the probes cannot read raises ProbeError naming the input.
"""

from __future__ import annotations

import functools
import io

import numpy as np
import pytest
import tiny_models
import torch
from bounds import TINY_EAGER, gamma
from torch import nn

import headmap
from headmap.corpus import Batch, Corpus, Sample
from headmap.engine.block import Block
from headmap.errors import ProbeError
from headmap.probes.position_profile import PositionProfileProbe, metric_names
from headmap.probes.span import SpanProbe

tiny = functools.cache(tiny_models.tiny)
CAUSAL = ["llama", "gpt2"]


# -- inputs ---------------------------------------------------------------------------------


def random_ids(n: int, gen: torch.Generator) -> list[int]:
    return torch.randint(2, 97, (n,), generator=gen).tolist()


def span_samples() -> list[Sample]:
    """Four inputs of 11, 16, 7 and 13 tokens with spans 'query', 'key', 'doc' and 'q2'.

    Input 2's query overlaps its key; input 3's query starts before its key (a causal query
    there sees none of it).
    """
    gen = torch.Generator().manual_seed(5)
    spans = [
        ({"key": [1, 5], "query": [6, 11], "doc": [0, 2], "q2": [3, 9]}, 11),
        ({"key": [2, 9], "query": [9, 16], "doc": [4, 12], "q2": [12, 16]}, 16),
        ({"key": [0, 3], "query": [2, 7], "doc": [1, 2], "q2": [6, 7]}, 7),
        ({"key": [8, 12], "query": [3, 9], "doc": [0, 13], "q2": [0, 13]}, 13),
    ]
    return [Sample(random_ids(t, gen), {"spans": s}) for s, t in spans]


def key_only_samples() -> list[Sample]:
    """Inputs with a 'key' span and no 'query' span: the query is every token after the key."""
    gen = torch.Generator().manual_seed(6)
    return [Sample(random_ids(t, gen), {"spans": {"key": [s, e]}}) for t, s, e in [(9, 1, 4), (14, 2, 12), (6, 0, 5)]]


def item_samples(k: int = 4, seed: int = 7) -> list[Sample]:
    """BOS, k items of 2 to 4 tokens, then a question of 0 to 3 tokens (0: the last token ends the last item)."""
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for tail in (2, 0, 3, 1, 2):
        ids, items = [1], []
        for _ in range(k):
            n = int(torch.randint(2, 5, (1,), generator=gen))
            items.append([len(ids), len(ids) + n])
            ids += random_ids(n, gen)
        ids += random_ids(tail, gen)
        samples.append(Sample(ids, {"items": items, "k": k}))
    return samples


def pad(samples: list[Sample], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s.ids) for s in samples)
    ids = torch.zeros(len(samples), width, dtype=torch.long)
    mask = torch.zeros(len(samples), width, dtype=torch.long)
    for i, s in enumerate(samples):
        cols = slice(width - len(s.ids), width) if side == "left" else slice(0, len(s.ids))
        ids[i, cols] = torch.tensor(s.ids)
        mask[i, cols] = 1
    return ids, mask


CHUNKS = ((0, 2), (2, None))  # two forward calls, two commits


def run(
    kind: str, side: str, samples: list[Sample], probes: list, announce: bool = True, chunks=CHUNKS
) -> list[list[np.ndarray]]:
    """Run ``probes`` over ``samples`` in two forward calls of a few rows per block.

    Returns, per input and per layer, the eager attention among the input's real tokens
    ([H, T, T] float64), taken from the very same padded batches.
    """
    model, _ = tiny(kind)
    eager = []
    budget = headmap.engine_config.budget_bytes
    try:
        for first, last in chunks:
            chunk = samples[first:last]
            ids, mask = pad(chunk, side)
            headmap.engine_config.budget_bytes = 2 * 4 * ids.shape[1] * 4 * 3 * 3  # about 3 rows per block
            with torch.no_grad():
                atts = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
                if announce:
                    for p in probes:
                        p.begin(Batch("test", first, chunk, ids, mask, left_pad=side == "left"))
                with headmap.observe(model, probes=probes):
                    model(input_ids=ids, attention_mask=mask)
            for b in range(ids.shape[0]):
                real = torch.nonzero(mask[b]).flatten()
                eager.append([a[b][:, real][:, :, real].double().numpy() for a in atts])
    finally:
        headmap.engine_config.budget_bytes = budget
    return eager


def mean_and_stderr(per_input: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """per_input [inputs, ...] -> mean over inputs and its standard error."""
    return per_input.mean(0), per_input.std(0, ddof=1) / np.sqrt(len(per_input))


# -- span: brute force ------------------------------------------------------------------------


def bf_span(eager, bounds) -> tuple[np.ndarray, np.ndarray]:
    """bounds[i] = ((qs, qe), (ks, ke)) of input i; returns [layers, heads] mean and stderr."""
    per_input = []
    for layers, ((qs, qe), (ks, ke)) in zip(eager, bounds, strict=True):
        per_input.append(np.stack([a[:, qs:qe, ks:ke].sum(-1).mean(-1) for a in layers]))
    return mean_and_stderr(np.stack(per_input))


def check_span(probe: SpanProbe, eager, bounds) -> None:
    expected, expected_se = bf_span(eager, bounds)
    assert np.isfinite(expected).all() and np.isfinite(expected_se).all()
    stats = probe.result()
    # engine vs eager on the tiny models: TINY_EAGER (tests/bounds.py; was 1e-6, measured), stderr likewise
    np.testing.assert_allclose(probe.values(), expected, atol=TINY_EAGER, rtol=0)
    np.testing.assert_allclose(
        np.stack([stats[layer].stderr() for layer in sorted(stats)]), expected_se, atol=TINY_EAGER, rtol=0
    )
    assert all((s.count == len(bounds)).all() for s in stats.values())
    rows = probe.head_rows()
    assert {r["metric"] for r in rows} == {"span"} and {r["n"] for r in rows} == {len(bounds)}


SIDES = [("llama", "left"), ("llama", "right"), ("gpt2", "left"), ("gpt2", "right"), ("bert", "right")]


@pytest.mark.parametrize(("kind", "side"), SIDES)
def test_span_equals_brute_force(kind, side):
    samples = span_samples()
    named = SpanProbe()
    renamed = SpanProbe(query="q2", key="doc")
    mixed = SpanProbe(query="q2", key=(0, 3))  # a name and a fixed span
    eager = run(kind, side, samples, [named, renamed, mixed])
    spans = [s.info["spans"] for s in samples]
    check_span(named, eager, [(s["query"], s["key"]) for s in spans])
    check_span(renamed, eager, [(s["q2"], s["doc"]) for s in spans])
    check_span(mixed, eager, [(s["q2"], (0, 3)) for s in spans])


@pytest.mark.parametrize(("kind", "side"), SIDES)
def test_span_without_a_query_span_reads_the_tokens_after_the_key(kind, side):
    samples = key_only_samples()
    probe = SpanProbe()
    eager = run(kind, side, samples, [probe])
    check_span(probe, eager, [((s.info["spans"]["key"][1], len(s.ids)), s.info["spans"]["key"]) for s in samples])


@pytest.mark.parametrize(("kind", "side"), SIDES)
def test_fixed_spans_need_no_announced_batch(kind, side):
    """SpanProbe(query=(a, b), key=(c, d)) under plain observe(), no begin(): the same spans in every input."""
    samples = span_samples()
    probe = SpanProbe(query=(3, 7), key=(0, 3))
    eager = run(kind, side, samples, [probe], announce=False)
    check_span(probe, eager, [((3, 7), (0, 3))] * len(samples))


# -- position_profile: brute force ------------------------------------------------------------


def bf_profile(eager, samples) -> tuple[np.ndarray, np.ndarray]:
    """[metrics, layers, heads] mean and stderr: item masses from the last token, then the basin depth."""
    per_input = []
    for layers, sample in zip(eager, samples, strict=True):
        metrics = []
        for a in layers:
            last = a[:, -1, :]  # [H, T]: the last real token's row
            items = np.stack([last[:, s:e].sum(-1) for s, e in sample.info["items"]])  # [k, H]
            k = len(items)
            rows = list(items)
            if k >= 3:
                rows.append((items[0] + items[-1]) / 2 - items[1:-1].mean(0))
            metrics.append(np.stack(rows))
        per_input.append(np.stack(metrics, axis=1))  # [metrics, layers, H]
    return mean_and_stderr(np.stack(per_input))


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("kind", CAUSAL)
@pytest.mark.parametrize("k", [4, 2])
def test_position_profile_equals_brute_force(kind, side, k):
    samples = item_samples(k)
    probe = PositionProfileProbe()
    eager = run(kind, side, samples, [probe])
    expected, expected_se = bf_profile(eager, samples)
    assert np.isfinite(expected).all() and np.isfinite(expected_se).all()
    names = metric_names(k)
    assert names == [f"item_{m}" for m in range(k)] + (["position_profile"] if k >= 3 else [])
    rows = probe.head_rows()
    layers, heads = expected.shape[1:]
    assert len(rows) == len(names) * layers * heads
    for r in rows:
        m = names.index(r["metric"])
        assert r["probe"] == "position_profile" and r["n"] == len(samples)
        # engine vs eager: TINY_EAGER (tests/bounds.py; was 1e-6), for the value and its standard error
        assert abs(r["value"] - expected[m, r["layer"], r["head"]]) <= TINY_EAGER
        assert abs(r["stderr"] - expected_se[m, r["layer"], r["head"]]) <= TINY_EAGER
    for m, name in enumerate(names):
        np.testing.assert_allclose(probe.values(name), expected[m], atol=TINY_EAGER, rtol=0)
    # item masses from one row sum to at most 1: a float32 softmax row of at most 32 keys sums to 1 within
    # gamma(32 + 2) (each term rounded twice, then the sum), and the k item sums add gamma(k)
    assert (sum(probe.values(f"item_{m}") for m in range(k)) <= 1 + gamma(32 + 2) + gamma(k)).all()
    if kind == "llama":  # GQA: query heads 2 and 3 read kv head 1
        assert {r["kv_head"] for r in rows if r["head"] in (2, 3)} == {1}


def test_position_profile_reads_only_the_last_row():
    """Mass planted on rows other than the last token's changes nothing."""
    t = 9
    items = [[1, 3], [3, 5], [5, 7]]
    base = np.zeros((1, t, t))
    base[0, :, 0] = 1.0
    base[0, t - 1] = [0, 0.5, 0, 0.25, 0, 0, 0.25, 0, 0]  # last row: items 0.5, 0.25, 0.25
    other = base.copy()
    other[0, 3:8] = 0.0
    other[0, 3:8, 2] = 1.0  # every other row now on item 0
    got = []
    for pattern in (base, other):
        probe = PositionProfileProbe()
        feed(probe, [pattern], [Sample([5] * t, {"items": items, "k": 3})], rows=2)
        got.append([probe.values(n)[0, 0] for n in metric_names(3)])
    # 0.5 and 0.25 are exact in float32 and so are their sums: any error is a bug
    np.testing.assert_allclose(got[0], [0.5, 0.25, 0.25, (0.5 + 0.25) / 2 - 0.25], atol=0)
    assert got[0] == got[1]


# -- planted: hand-made blocks ---------------------------------------------------------------


def feed(probe, patterns, samples, rows=3, causal=True, first=0):
    """Announce ``samples`` and feed ``probe`` their [H, T, T] patterns as one padded batch in row blocks.

    Causal inputs are left-padded, encoder inputs right-padded; hidden entries must be 0.
    """
    heads = patterns[0].shape[0]
    width = max(p.shape[-1] for p in patterns)
    probs = torch.zeros(len(patterns), heads, width, width)
    real = torch.zeros(len(patterns), width, dtype=torch.bool)
    starts = []
    for b, pattern in enumerate(patterns):
        t = pattern.shape[-1]
        s = width - t if causal else 0
        starts.append(s)
        probs[b, :, s : s + t, s : s + t] = torch.as_tensor(pattern, dtype=torch.float32)
        real[b, s : s + t] = True
    idx = torch.arange(width)
    visible = real[:, None, :, None] & real[:, None, None, :]
    if causal:
        visible = visible & (idx[:, None] >= idx[None, :])
    assert not (probs * ~visible).any(), "planted pattern puts mass on a hidden key"
    probe.begin(Batch("planted", first, samples))
    for q0 in range(0, width, rows):
        q1 = min(width, q0 + rows)
        probe.update(
            Block(
                layer=0,
                module=nn.Identity(),
                num_heads=heads,
                num_kv_heads=heads,
                q_start=q0,
                q_end=q1,
                k_start=0,
                k_end=width,
                q_pos=torch.arange(q0, q1),
                k_pos=torch.arange(width),
                mask=visible[:, :, q0:q1],
                query_valid=real[:, q0:q1],
                item_start=torch.tensor(starts),
                probs=probs[:, :, q0:q1].contiguous(),
                is_causal=causal,
            )
        )
    probe.commit()
    return probe


def span_pattern(t: int, key: tuple[int, int], query: tuple[int, int]) -> np.ndarray:
    """Head 0: every query of S spreads its attention over R; head 1: all on token 0 (outside R); others: self."""
    a = np.zeros((2, t, t))
    a[:] = np.eye(t)
    for i in range(*query):
        a[0, i] = 0.0
        a[0, i, key[0] : key[1]] = 1.0 / (key[1] - key[0])
        a[1, i] = 0.0
        a[1, i, 0] = 1.0
    return a


@pytest.mark.parametrize("rows", [1, 3, 100])
@pytest.mark.parametrize("causal", [True, False])
def test_planted_span_all_mass_on_the_key_gives_one(rows, causal):
    shapes = [(12, (2, 6), (7, 12)), (8, (1, 3), (4, 7))]
    patterns = [span_pattern(t, key, query) for t, key, query in shapes]
    samples = [Sample([5] * t, {"spans": {"key": list(key), "query": list(q)}}) for t, key, q in shapes]
    probe = feed(SpanProbe(), patterns, samples, rows=rows, causal=causal)
    # planted probabilities rounded once to float32, summed over at most 12 keys: gamma(12 + 1) (was 1e-7)
    np.testing.assert_allclose(probe.values()[0], [1.0, 0.0], atol=gamma(12 + 1))
    # the same inputs with the default query (the tokens after the key: [6, 12) and [3, 8)) mix in self-attention
    no_query = [Sample([5] * t, {"spans": {"key": list(key)}}) for t, key, _ in shapes]
    probe = feed(SpanProbe(), patterns, no_query, rows=rows, causal=causal)
    np.testing.assert_allclose(
        probe.values()[0], [np.mean([5 / 6, 3 / 5]), np.mean([0.0, 0.0])], atol=gamma(12 + 1)
    )  # as above


def test_planted_basin():
    """Head 0: a basin (0.4, 0.1, 0.1, 0.4); head 1: all on item 1; head 2: on the BOS (no item)."""
    t, items = 11, [[1, 3], [3, 5], [5, 7], [7, 9]]
    a = np.zeros((3, t, t))
    a[:, :, 0] = 1.0
    a[0, t - 1] = 0.0
    for (s, e), w in zip(items, (0.4, 0.1, 0.1, 0.4), strict=True):
        a[0, t - 1, s:e] = w / (e - s)
    a[1, t - 1] = 0.0
    a[1, t - 1, 3:5] = 0.5
    samples = [Sample([5] * t, {"items": items, "k": 4})]
    probe = feed(PositionProfileProbe(), [a, a], samples * 2, rows=4)
    want = {
        "item_0": [0.4, 0.0, 0.0],
        "item_1": [0.1, 1.0, 0.0],
        "item_2": [0.1, 0.0, 0.0],
        "item_3": [0.4, 0.0, 0.0],
        "position_profile": [0.3, -0.5, 0.0],
    }
    # planted 0.2, 0.05 rounded to float32 and summed over at most 11 keys: gamma(11 + 1) per item mass;
    # the profile metric combines two item masses: twice that (was 1e-7)
    for name, values in want.items():
        np.testing.assert_allclose(probe.values(name)[0], values, atol=2 * gamma(11 + 1))
    assert {r["n"] for r in probe.head_rows()} == {2}


# -- state ------------------------------------------------------------------------------------


def through_npz(state: dict) -> dict:
    buf = io.BytesIO()
    np.savez(buf, **state)
    buf.seek(0)
    with np.load(buf) as data:
        return {key: data[key] for key in data.files}


@pytest.mark.parametrize("make", [SpanProbe, PositionProfileProbe])
def test_state_round_trips_exactly(make):
    """Stop after the first batch, save, load into a fresh probe, go on: the same rows, bit for bit."""
    side = tiny("llama")[1]
    samples = span_samples() if make is SpanProbe else item_samples(4)
    whole, first_half, resumed = make(), make(), make()
    run("llama", side, samples, [whole])
    run("llama", side, samples, [first_half], chunks=CHUNKS[:1])
    resumed.load_state_dict(through_npz(first_half.state_dict()))
    saved = first_half.state_dict()
    assert resumed.state_dict().keys() == saved.keys()
    assert all(np.array_equal(v, saved[key]) and v.dtype == saved[key].dtype for key, v in resumed.state_dict().items())
    run("llama", side, samples, [resumed], chunks=CHUNKS[1:])
    assert resumed.head_rows() == whole.head_rows()  # every value finite: exact equality


def test_position_profile_state_keeps_k():
    probe = feed(PositionProfileProbe(), [np.eye(6)[None]], [Sample([5] * 6, {"items": [[1, 3], [3, 5]]})])
    state = probe.state_dict()
    assert int(state["k"][0]) == 2 and state["total.0"].shape == (2, 1)
    fresh = PositionProfileProbe()
    fresh.load_state_dict(state)
    assert fresh.k == 2
    with pytest.raises(ProbeError, match="input 0 has 3 items but the run has 2"):
        fresh.begin(Batch("c", 0, [Sample([5] * 8, {"items": [[1, 3], [3, 5], [5, 7]]})]))
    with pytest.raises(ValueError, match="not a state of probe position_profile"):
        fresh.load_state_dict({**state, "total.0": np.zeros((3, 1))})
    empty = PositionProfileProbe().state_dict()
    assert int(empty["k"][0]) == 0 and len(empty["layers"]) == 0


# -- errors -----------------------------------------------------------------------------------


def batch_of(samples, first=4):
    return Batch("c", first, samples)


def test_span_errors_name_the_input_and_the_span():
    ok = Sample([5] * 10, {"spans": {"key": [1, 4], "query": [5, 10]}})
    with pytest.raises(ProbeError, match=r"input 5 has no named spans \(no 'spans' in its info\).*key span 'key'"):
        SpanProbe().begin(batch_of([ok, Sample([5] * 10, {"line": 2})]))
    with pytest.raises(ProbeError, match=r"input 4 has no key span named 'doc' \(its spans: 'key', 'query'\)"):
        SpanProbe(key="doc").begin(batch_of([ok]))
    with pytest.raises(ProbeError, match="input 4 has no query span named 'q2'"):
        SpanProbe(query="q2").begin(batch_of([ok]))
    at_end = Sample([5] * 10, {"spans": {"key": [3, 10]}})
    with pytest.raises(ProbeError, match=r"input 4 has no 'query' span and its key span 'key' \[3, 10\) ends at its"):
        SpanProbe().begin(batch_of([at_end]))
    outside = Sample([5] * 10, {"spans": {"key": [3, 12], "query": [0, 2]}})
    with pytest.raises(ProbeError, match=r"key span 'key' of input 4 is \[3, 12\).*inside its 10 tokens"):
        SpanProbe().begin(batch_of([outside]))
    with pytest.raises(ProbeError, match=r"query span \[8, 12\) does not fit input 4, which has 10 tokens"):
        SpanProbe(query=(8, 12), key=(0, 2)).begin(batch_of([ok]))
    with pytest.raises(ProbeError, match="span 'key' of input 4 is 'x', not a \\[start, end\\] pair"):
        SpanProbe().begin(batch_of([Sample([5] * 10, {"spans": {"key": "x"}})]))
    assert SpanProbe().applies_to([ok, at_end]).startswith("span: input 1 has no 'query' span")
    assert SpanProbe().applies_to(Corpus("c", [ok], {})) is None
    assert SpanProbe(query=(0, 1), key=(1, 2)).applies_to([Sample([1], {})]) is None


@pytest.mark.parametrize("value", ["", (3, 3), (-1, 2), (1.0, 2), (True, 2), (1, 2, 3), 7, None])
def test_span_rejects_bad_parameters(value):
    with pytest.raises(ProbeError, match="must be the name of a span in the inputs' info"):
        SpanProbe(key=value)
    with pytest.raises(ProbeError, match="span query must be"):
        SpanProbe(query=value)


def test_span_needs_the_batch_and_fitting_spans():
    model, _ = tiny("llama")
    ids, mask = pad([Sample([5] * 9), Sample([6] * 6)], "left")
    with pytest.raises(ProbeError, match="no batch was announced: call probe.begin"):
        with torch.no_grad(), headmap.observe(model, probes=[SpanProbe()]):
            model(input_ids=ids, attention_mask=mask)
    fixed = SpanProbe(query=(4, 8), key=(0, 2))
    with pytest.raises(ProbeError, match=r"query span \[4, 8\) does not fit batch row 1, which has 6 tokens"):
        with torch.no_grad(), headmap.observe(model, probes=[fixed]):
            model(input_ids=ids, attention_mask=mask)
    assert fixed.result() == {}  # the refused batch left nothing behind
    named = SpanProbe()
    named.begin(batch_of([Sample([5] * 9, {"spans": {"key": [0, 2]}})]))
    with pytest.raises(ProbeError, match="begin\\(\\) announced 1 inputs but the forward pass has 2 batch rows"):
        with torch.no_grad(), headmap.observe(model, probes=[named]):
            model(input_ids=ids, attention_mask=mask)


def test_position_profile_errors_name_the_input():
    good = Sample([5] * 9, {"items": [[1, 3], [3, 5], [5, 7]], "k": 3})
    with pytest.raises(ProbeError, match=r"input 5 says nothing about items.*--corpus items"):
        PositionProfileProbe().begin(batch_of([good, Sample([5] * 9, {"line": 1})]))
    two = Sample([5] * 9, {"items": [[1, 3], [3, 5]], "k": 2})
    with pytest.raises(ProbeError, match="input 5 has 2 items but input 4 has 3"):
        PositionProfileProbe().begin(batch_of([good, two]))
    probe = PositionProfileProbe()
    probe.begin(batch_of([good]))
    with pytest.raises(ProbeError, match="input 9 has 2 items but the run has 3"):
        probe.begin(batch_of([two], first=9))
    with pytest.raises(ProbeError, match="input 4 says k = 4 but lists 3 item spans"):
        PositionProfileProbe().begin(batch_of([Sample([5] * 9, {"items": good.info["items"], "k": 4})]))
    for items in ([[3, 5], [1, 3]], [[1, 4], [3, 5]], [[1, 1]], [[1, 10]]):
        with pytest.raises(ProbeError, match="items must be non-empty, in order, not overlapping and inside"):
            PositionProfileProbe().begin(batch_of([Sample([5] * 9, {"items": items})]))
    with pytest.raises(ProbeError, match="must be a non-empty list of \\[start, end\\] token spans"):
        PositionProfileProbe().begin(batch_of([Sample([5] * 9, {"items": []})]))
    assert "input 1 has 2 items but input 0 has 3" in PositionProfileProbe().applies_to([good, two])
    assert PositionProfileProbe().applies_to(Corpus("c", [good, good], {})) is None
    model, _ = tiny("llama")
    ids, mask = pad([good], "left")
    with pytest.raises(ProbeError, match="no batch was announced: call probe.begin"):
        with torch.no_grad(), headmap.observe(model, probes=[PositionProfileProbe()]):
            model(input_ids=ids, attention_mask=mask)
    wrong = PositionProfileProbe()
    wrong.begin(batch_of([Sample([5] * 7, {"items": [[1, 3], [3, 5], [5, 7]]})]))
    with pytest.raises(ProbeError, match="said input 4 has 7 tokens but batch row 0 of the forward pass had 9"):
        with torch.no_grad(), headmap.observe(model, probes=[wrong]):
            model(input_ids=ids, attention_mask=mask)
    assert wrong.result() == {}


def test_params_and_flags():
    assert SpanProbe().params() == {"query": "query", "key": "key"}
    assert SpanProbe(query=(2, 5), key="doc").params() == {"query": [2, 5], "key": "doc"}
    assert (SpanProbe.name, SpanProbe.requires, SpanProbe.default, SpanProbe.causal_only) == (
        "span",
        "spans",
        False,
        False,
    )
    p = PositionProfileProbe
    assert (p.name, p.requires, p.default_corpus, p.causal_only, p.default) == (
        "position_profile",
        "items",
        "items",
        True,
        True,
    )
    assert PositionProfileProbe().params() == {}
    assert metric_names(2) == ["item_0", "item_1"]


# -- through a scan ---------------------------------------------------------------------------


def test_scan_announces_each_batch():
    """headmap.scan calls begin(batch) before every forward: both probes match the brute force there too."""
    model, side = tiny("llama")
    samples = item_samples(4)
    for s in samples:
        s.info["spans"] = {"key": s.info["items"][1]}  # no 'query': the tokens after document 1
    corpus = Corpus("items-with-spans", samples, {"name": "items-with-spans", "inputs": len(samples)})
    atlas = headmap.scan(
        model, probes=[SpanProbe(), PositionProfileProbe()], corpus=corpus, batch_size=2, progress=False
    )
    eager = run("llama", side, samples, [], chunks=((0, 2), (2, 4), (4, None)))  # the scan's batches
    heads = atlas.heads.set_index(["probe", "metric", "layer", "head"]).sort_index()

    def table(probe: str, metric: str, column: str) -> np.ndarray:
        return heads.loc[(probe, metric)][column].unstack("head").to_numpy()

    span, span_se = bf_span(eager, [((s.info["items"][1][1], len(s.ids)), s.info["items"][1]) for s in samples])
    # a scan against eager on the tiny models: TINY_EAGER (tests/bounds.py; was 1e-6), values and stderr
    np.testing.assert_allclose(table("span", "span", "value"), span, atol=TINY_EAGER, rtol=0)
    np.testing.assert_allclose(table("span", "span", "stderr"), span_se, atol=TINY_EAGER, rtol=0)
    profile, profile_se = bf_profile(eager, samples)
    for m, name in enumerate(metric_names(4)):
        np.testing.assert_allclose(table("position_profile", name, "value"), profile[m], atol=TINY_EAGER, rtol=0)
        np.testing.assert_allclose(
            table("position_profile", name, "stderr"), profile_se[m], atol=TINY_EAGER, rtol=0
        )  # TINY_EAGER as above
    assert set(atlas.heads.n) == {len(samples)}
