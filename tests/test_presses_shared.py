"""One shared prefill for every press (headmap.presses.shared) against one prefill per press.

For every press at several ratios the shared path must keep the same entries, hold the same cache
bytes (the same tensors, compared bit for bit) and generate the same greedy tokens as the press's own
prefill with :func:`headmap.presses.compress`. Where the arithmetic is the same (the press runs
under the engine in both paths, or no press of the list needs the engine) the comparison is exact;
knorm beside engine presses reads the engine's forward instead of eager attention, and is compared
with a bound derived in tests/bounds.py. See docs/compress.md.
"""

from __future__ import annotations

import pytest
import torch
from bounds import eager_bound
from test_presses import atlas, build, ids_of, small  # noqa: F401  (atlas is a fixture)

import headmap
from headmap.models import greedy_decode
from headmap.presses import PressedLayer, RaggedLayer, cache_bytes, compress, make_press
from headmap.presses.shared import greedy_continue, press_prefill, shared_prefill, uses_engine
from headmap.probes import SinkProbe

ALL = ["streaming", "knorm", "h2o", "snapkv", "pyramidkv", "adakv", "head_aware"]
RATIOS = [0.25, 0.5, 0.75]
STEPS = 5


def layer_tensors(layer) -> list[torch.Tensor]:
    if isinstance(layer, RaggedLayer):
        return [layer.packed_keys, layer.packed_values, layer.lengths, layer.pads, layer.keys, layer.values]
    return [t for t in (layer.keys, layer.values) if t is not None]


def per_press(model, press, ids, mask, prefill_session=None):
    """The path of one prefill per press: greedy_decode under compress; the cache as it was after the prefill.

    ``prefill_session``: an entered engine session that is closed once the prefill has returned (the
    prefill runs under it, the decoding steps do not)."""
    after: dict = {}

    with compress(model, press) as run, torch.no_grad():

        def before(k: int) -> None:
            if k == 1 and prefill_session is not None:
                prefill_session.__exit__(None, None, None)
            if k == 1:  # the prefill has returned and was pressed; the first decoding step has not run
                after["bytes"] = run.cache_bytes()
                after["layers"] = [[t.clone() for t in layer_tensors(x)] for x in run.cache.layers]
                after["types"] = [type(x) for x in run.cache.layers]

        tokens = greedy_decode(model, ids, mask, STEPS, before_forward=before)
    return tokens, run, after


def shared(model, prefill, press):
    pressed = press_prefill(prefill, press, model)
    after = {
        "bytes": pressed.cache_bytes(),
        "layers": [[t.clone() for t in layer_tensors(x)] for x in pressed.cache.layers],
        "types": [type(x) for x in pressed.cache.layers],
    }
    tokens = greedy_continue(model, prefill, pressed, STEPS)
    return tokens, pressed, after


def assert_same(want, got):
    (w_tokens, w_run, w_after), (g_tokens, g_run, g_after) = want, got
    assert sorted(g_run.kept) == sorted(w_run.kept)
    for layer, keep in w_run.kept.items():
        assert torch.equal(g_run.kept[layer], keep), layer  # the same entries, exactly
    assert g_after["types"] == w_after["types"]
    assert g_after["bytes"] == w_after["bytes"]
    for w_layer, g_layer in zip(w_after["layers"], g_after["layers"], strict=True):
        assert len(w_layer) == len(g_layer)
        for w, g in zip(w_layer, g_layer, strict=True):
            assert torch.equal(g, w)  # the same arithmetic: the same bits
    assert torch.equal(g_tokens, w_tokens)
    assert g_run.notes == w_run.notes


@pytest.fixture(scope="module")
def presses(atlas):  # noqa: F811
    return [small(name, ratio, atlas) for name in ALL for ratio in RATIOS]


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
def test_shared_prefill_equals_one_prefill_per_press(kind, presses):
    # gemma2's sliding layer is left as it is by every press, in both paths
    model = build(kind)
    ids = ids_of(40)
    mask = torch.ones_like(ids)
    prefill = shared_prefill(model, presses, ids, mask)
    assert prefill.engine
    for press in presses:
        # knorm and streaming run without the engine on their own: beside engine presses the shared
        # forward is the engine's (its fused route: every collector is a fused probe), so the reference
        # is their own prefill under a session with a fused probe (the same arithmetic), closed before
        # the decoding steps, which run the model's own attention in both paths; their comparison with
        # eager attention is the next test
        outer = headmap.observe(model, probes=[SinkProbe()]) if not uses_engine(press) else None
        if outer is not None:
            outer.__enter__()
        want = per_press(model, press, ids, mask, prefill_session=outer)
        got = shared(model, prefill, press)
        assert_same(want, got)
    # the full cache of the shared prefill is left as it was: every layer still holds all 40 entries
    assert all(layer.keys.shape[2] == 40 for layer in prefill.cache.layers if not getattr(layer, "is_sliding", False))
    assert cache_bytes(prefill.cache) == prefill.full_bytes


def test_padded_batch(presses):
    model = build("llama")
    ids = ids_of(36, batch=2, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding
    chosen = [p for p in presses if p.name in ("h2o", "snapkv", "adakv", "head_aware")]
    prefill = shared_prefill(model, chosen, ids, mask)
    for press in chosen:
        assert_same(per_press(model, press, ids, mask), shared(model, prefill, press))


def test_without_engine_presses_the_prefill_is_the_models_own():
    model = build("llama")
    ids = ids_of(40)
    mask = torch.ones_like(ids)
    chosen = [make_press(name, ratio=r) for name in ("knorm", "streaming") for r in RATIOS]
    prefill = shared_prefill(model, chosen, ids, mask)
    assert not prefill.engine
    for press in chosen:  # no observing session: eager attention in both paths, exactly
        assert_same(per_press(model, press, ids, mask), shared(model, prefill, press))


def test_knorm_beside_engine_presses_within_the_engine_bound():
    """knorm reads the keys of the engine's forward; its own prefill reads eager attention's."""
    model = build("llama")
    t = 40
    ids = ids_of(t)
    mask = torch.ones_like(ids)
    knorm = make_press("knorm", ratio=0.5)
    prefill = shared_prefill(model, [knorm, make_press("h2o", ratio=0.5)], ids, mask)
    want_tokens, want_run, _ = per_press(model, knorm, ids, mask)
    with torch.no_grad():
        plain = model(ids, use_cache=True).past_key_values
    for index, layer in enumerate(plain.layers):
        keys = layer.keys
        # the keys of layer l come after l attention layers: eager_bound (engine against eager, derived in
        # tests/bounds.py) relative to the largest magnitude of the hidden states, carried with a gain of one
        bound = eager_bound(t, layers=max(index, 1)) * float(keys.abs().max())
        diff = float((prefill.cache.layers[index].keys - keys).abs().max())
        assert diff <= bound, (index, diff, bound)
        # then the kept entries are the same wherever the norms at the budget's edge are further apart
        # than two bounds on a norm (a norm is 1-Lipschitz: it moves by at most sqrt(D) * bound)
        norms = keys.double().norm(dim=-1)  # [1, Hkv, T]
        n = int(t * 0.5)
        ranked = norms.sort(dim=-1).values
        gap = float((ranked[..., n] - ranked[..., n - 1]).min())
        if gap > 2 * keys.shape[-1] ** 0.5 * bound:
            got = press_prefill(prefill, knorm, model)
            assert torch.equal(got.kept[index], want_run.kept[index])
    # the first token comes from the prefill's logits: the same wherever their top two are further apart
    # than two bounds (the logits are sums over the hidden units carried with a gain of one, as above)
    with torch.no_grad():
        logits = model(ids).logits[:, -1].double()
    bound = eager_bound(t) * float(logits.abs().max())
    assert float((prefill.logits.double() - logits).abs().max()) <= bound
    top2 = logits.topk(2, dim=-1).values
    if float(top2[0, 0] - top2[0, 1]) > 2 * bound:
        got_tokens = greedy_continue(model, prefill, press_prefill(prefill, knorm, model), STEPS)
        assert torch.equal(got_tokens[:, 0], want_tokens[:, 0])


@pytest.mark.parametrize("spec", [{"name": "streaming", "sinks": 2, "window": 6}, {"name": "h2o", "ratio": 0.5}])
def test_presses_that_evict_while_decoding_keep_doing_so(spec):
    model = build("llama")
    ids = ids_of(24)
    mask = torch.ones_like(ids)
    params = dict(spec)
    press = make_press(params.pop("name"), decode=True, **params)
    want_tokens, want_run, _ = per_press(model, press, ids, mask)
    prefill = shared_prefill(model, [press], ids, mask)
    pressed = press_prefill(prefill, press, model)
    got_tokens = greedy_continue(model, prefill, pressed, STEPS)
    assert torch.equal(got_tokens, want_tokens)
    for w, g in zip(want_run.cache.layers, pressed.cache.layers, strict=True):
        assert isinstance(g, PressedLayer) and g.budget == w.budget
        assert g.keys.shape[2] == w.budget  # still at its budget after the decoding steps
        assert torch.equal(g.positions, w.positions) and torch.equal(g.keys, w.keys)
        if w.scores is not None:
            assert torch.equal(g.scores, w.scores)


def test_a_press_the_prefill_did_not_record_for_is_refused():
    from headmap.presses import PressError

    model = build("llama")
    ids = ids_of(20)
    prefill = shared_prefill(model, [make_press("knorm", ratio=0.5)], ids)
    with pytest.raises(PressError, match="did not record"):
        press_prefill(prefill, make_press("h2o", ratio=0.5), model)
    with pytest.raises(PressError, match="last 4 queries"):
        press_prefill(prefill, make_press("snapkv", ratio=0.5, window=4), model)
