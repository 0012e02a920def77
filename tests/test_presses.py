"""KV-cache presses on tiny random models: exact scores, exact attention over the kept keys, real savings.

See docs/compress.md. The references are eager attention (``output_attentions``) and eager attention
with the dropped keys masked per head; no test compares a press with itself.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

import headmap
from headmap.presses import (
    PRESSES,
    PressedLayer,
    PressError,
    RaggedLayer,
    compress,
    make_press,
    parse_press,
)
from headmap.probes import SinkProbe

EPS32 = torch.finfo(torch.float32).eps
VOCAB = 97


def _common(**o):
    kw = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        attn_implementation="eager",
        pad_token_id=0,
    )
    kw.update(o)
    return kw


def build(kind: str, **o):
    torch.manual_seed(0)
    if kind == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(**_common(**o))).eval()
    if kind == "mistral":
        from transformers import MistralConfig, MistralForCausalLM

        return MistralForCausalLM(MistralConfig(**_common(**{"sliding_window": 64, **o}))).eval()
    if kind == "gemma2":
        from transformers import Gemma2Config, Gemma2ForCausalLM

        kw = _common(
            head_dim=8,
            query_pre_attn_scalar=8,
            attn_logit_softcapping=1.0,
            final_logit_softcapping=None,
            sliding_window=64,
            layer_types=["sliding_attention", "full_attention"],
        )
        kw.update(o)
        return Gemma2ForCausalLM(Gemma2Config(**kw)).eval()
    raise ValueError(kind)


def ids_of(length: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, length), generator=gen)


def small(name: str, ratio: float, atlas=None) -> object:
    """A press with parameters that fit 24-token inputs."""
    extra = {"window": 4} if name in ("snapkv", "pyramidkv") else {}
    if name == "adakv":
        extra = {"scorer": "snapkv:window=4"}
    if name == "head_aware":
        extra = {"atlas": atlas, "rule": "top 25% retrieval", "sinks": 2}
    return make_press(name, ratio=ratio, **extra)


@pytest.fixture(scope="module")
def atlas():
    """An atlas of the tiny Llama (2 layers x 4 heads, 2 kv heads) with planted retrieval scores."""
    import pandas as pd

    from headmap.atlas import HEADS_SCHEMA, Atlas, empty_frame

    rows = []
    for layer in range(2):
        for head in range(4):
            value = 0.9 if (layer, head) in ((0, 1), (1, 3)) else 0.01
            rows.append(("retrieval", "retrieval", layer, head, head // 2, value, 0.01, 8))
    heads = pd.DataFrame(rows, columns=HEADS_SCHEMA.names)
    from headmap.atlas import MAPS_SCHEMA, TOKENS_SCHEMA

    meta = {"architecture": {"layers": 2, "heads": 4, "kv_heads": 2}}
    return Atlas(heads=heads, tokens=empty_frame(TOKENS_SCHEMA), maps=empty_frame(MAPS_SCHEMA), meta=meta)


# -- references ----------------------------------------------------------------------------------
def eager_attentions(model, ids, mask=None):
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_attentions=True, use_cache=False)
    return [a.double() for a in out.attentions]


def brute_h2o(att, heads, kv_heads, mask=None):
    """sum_i A[i, j] over real query rows, mean over each kv head's query heads."""
    if mask is not None:
        att = att * mask[:, None, :, None].double()
    s = att.sum(dim=2)
    b, _, t = s.shape
    return s.view(b, kv_heads, heads // kv_heads, t).mean(2)


def brute_snapkv(att, heads, kv_heads, window, kernel):
    t = att.shape[-1]
    s = att[..., -window:, : t - window].mean(dim=-2)
    b, h, n = s.shape
    s = F.avg_pool1d(s.reshape(b * h, 1, n), kernel, stride=1, padding=kernel // 2).view(b, h, n)
    s = s.view(b, kv_heads, heads // kv_heads, n).mean(2)
    return F.pad(s, (0, window), value=float(s.max()) + 1.0)  # the window above every earlier key


def masked_eager_logits(model, ids, kept, mask=None):
    """Logits of the last token of ``ids`` with eager attention, its row seeing only the kept keys per head.

    ``kept[layer]`` [B, Hkv, T] bool covers the first T = len(ids) - 1 positions (the pressed prefill);
    every other row is full causal attention, as during the prefill that was pressed.
    """
    module = sys.modules[type(model).__module__]
    original = module.eager_attention_forward
    heads = model.config.num_attention_heads

    def patched(mod, query, key, value, attention_mask, **kw):
        keep = kept.get(mod.layer_idx)
        if keep is not None:
            b, hkv, t = keep.shape
            hide = torch.zeros(b, heads, query.shape[2], key.shape[2], dtype=torch.bool)
            hide[:, :, -1, :t] = ~keep.repeat_interleave(heads // hkv, dim=1)
            if attention_mask is None:
                attention_mask = torch.zeros(b, 1, query.shape[2], key.shape[2])
            if attention_mask.dtype == torch.bool:
                attention_mask = attention_mask & ~hide
            else:
                attention_mask = attention_mask.masked_fill(hide, torch.finfo(attention_mask.dtype).min)
        return original(mod, query, key, value, attention_mask, **kw)

    module.eager_attention_forward = patched
    try:
        with torch.no_grad():
            return (
                model(ids, attention_mask=mask, position_ids=positions(ids, mask), use_cache=False)
                .logits[:, -1]
                .double()
            )
    finally:
        module.eager_attention_forward = original


def positions(ids, mask):
    """Position ids as generate makes them: 0 at each row's first real token."""
    if mask is None:
        return torch.arange(ids.shape[1])[None, :].expand_as(ids)
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def pressed_next_logits(model, press, ids, mask=None):
    """Prefill ids[:, :-1] under the press, then one decoding step with the last token."""
    pos = positions(ids, mask)
    with compress(model, press) as run, torch.no_grad():
        pre_mask = None if mask is None else mask[:, :-1]
        pre = model(ids[:, :-1], attention_mask=pre_mask, position_ids=pos[:, :-1], use_cache=True)
        cache = pre.past_key_values
        step = model(ids[:, -1:], attention_mask=mask, past_key_values=cache, position_ids=pos[:, -1:], use_cache=True)
    return step.logits[:, -1].double(), run


# -- ratio 0 and identities -----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["streaming", "knorm", "h2o", "snapkv", "pyramidkv", "adakv", "head_aware"])
def test_ratio_zero_is_the_identity(name, atlas):
    model = build("llama")
    ids = ids_of(24)
    press = small(name, 0.0, atlas)
    reads_engine = press.reads_received or press.reads_window or press.head_wise
    with torch.no_grad():
        if reads_engine:
            # The press runs the engine, whose plain prefill calls take the fused route (one fused kernel,
            # its probes read the log-sum-exps) and whose decoding calls take blocks: the same model under
            # the engine with a fused probe (sink) routes every call the same way and is the reference.
            with headmap.observe(model, probes=[SinkProbe()]):
                want = model(ids).logits
                want_gen = model.generate(ids, max_new_tokens=6, do_sample=False)
        else:
            want = model(ids).logits
            want_gen = model.generate(ids, max_new_tokens=6, do_sample=False)
        with compress(model, press) as run:
            got = model(ids).logits
            got_gen = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)  # bit identity: nothing is dropped, nothing recomputed
    assert torch.equal(got_gen, want_gen)
    assert all(bool(k.all()) for k in run.kept.values())


def test_streaming_window_covering_the_input_is_the_identity_with_a_note():
    model = build("llama")
    ids = ids_of(20)
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=5, do_sample=False)
        with pytest.warns(UserWarning, match="cover the whole input"):
            with compress(model, make_press("streaming", ratio=0.5, sinks=4, window=16)) as run:
                got = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(got, want)
    assert any("cover the whole input" in n for n in run.notes)
    assert not any(isinstance(layer, PressedLayer) for layer in run.cache.layers)


# -- exact scores ---------------------------------------------------------------------------------
def _scores(model, ids, press):
    with compress(model, press, record_scores=True) as run, torch.no_grad():
        model(ids)
    return run.scores


@pytest.mark.parametrize("kind", ["llama", "mistral", "gemma2"])
def test_h2o_and_snapkv_scores_equal_eager_attention_on_the_block_route(kind):
    # mistral: a 16-token window over 24 tokens, so the sliding pattern shapes the scores
    model = build(kind, **({"sliding_window": 16} if kind == "mistral" else {}))
    t, window, kernel = 24, 6, 3
    ids = ids_of(t)
    att = eager_attentions(model, ids)
    heads, kv = model.config.num_attention_heads, model.config.num_key_value_heads
    headmap.engine_config.fused = False  # llama's plain prefill would take the fused route (tested below)
    try:
        for press in (make_press("h2o", ratio=0.5), make_press("snapkv", ratio=0.5, window=window, kernel=kernel)):
            scores = _scores(model, ids, press)
            assert sorted(scores) == [0, 1]
            for layer, got in scores.items():
                if press.name == "h2o":
                    want = brute_h2o(att[layer], heads, kv)
                    # Each probability comes from a float32 softmax in both routes; they differ by at most
                    # (D + T) eps relative (the D-term dot product and the T-term normalising sum, each
                    # rounding once per term). A key's sum over T rows is at most its mass m, so the sums
                    # differ by at most m (D + T) eps; the engine sums in float64 (no further error).
                    bound = (want.clamp(min=1.0)) * (8 + t) * EPS32
                else:
                    want = brute_snapkv(att[layer], heads, kv, window, kernel)
                    # a mean of probabilities (each within (D + T) eps relative, all <= 1)
                    bound = torch.full_like(want, (8 + t) * EPS32)
                assert got.shape == want.shape
                assert bool(((got - want).abs() <= bound).all()), float((got - want).abs().max())
    finally:
        headmap.engine_config.fused = True


def test_h2o_and_snapkv_scores_on_the_fused_route_equal_eager_attention(calls):
    """A plain prefill (no padding, causal, no soft cap) runs one fused kernel per layer; h2o's column sums
    come from one more fused call with queries and keys exchanged, snapkv's rows from exp(s - lse).

    float32, against eager: tests/test_fused.py bounds each fused probability against eager's by
    tests/bounds.py's eager_bound(T); a column sum adds at most T of them, a snapkv score is a mean of them.
    float64, against the block route in float64 (eager's softmax is float32 even for a float64 model, so
    it cannot judge float64): the same chains at float64 rounding."""
    from bounds import U64, eager_bound, reorder

    kernels = calls["kernels"]
    model = build("llama")
    t, window, kernel = 24, 6, 3
    ids = ids_of(t)
    att = eager_attentions(model, ids)
    heads, kv = model.config.num_attention_heads, model.config.num_key_value_heads
    presses = (make_press("h2o", ratio=0.5), make_press("snapkv", ratio=0.5, window=window, kernel=kernel))
    for press in presses:
        kernels.clear()
        scores = _scores(model, ids, press)
        # per layer the call's own kernel, and for h2o the swapped call
        assert kernels == ["flash_cpu"] * (2 if press.name == "snapkv" else 4)
        for layer, got in scores.items():
            if press.name == "h2o":
                want, bound = brute_h2o(att[layer], heads, kv), t * eager_bound(t)
            else:
                want, bound = brute_snapkv(att[layer], heads, kv, window, kernel), eager_bound(t)
            assert got.shape == want.shape
            assert float((got - want).abs().max()) <= bound
    model = model.double()
    for press in presses:
        kernels.clear()
        got = _scores(model, ids, press)
        assert kernels and set(kernels) == {"flash_cpu"}
        headmap.engine_config.fused = False
        try:
            want = _scores(model, ids, press)
        finally:
            headmap.engine_config.fused = True
        for layer in want:
            bound = (t if press.name == "h2o" else 1) * reorder(t, 8, U64)
            assert float((got[layer] - want[layer]).abs().max()) <= bound, press.name


def test_h2o_counts_only_real_queries_of_a_padded_batch():
    model = build("llama")
    ids = ids_of(20, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    att = eager_attentions(model, ids, mask)
    with compress(model, make_press("h2o", ratio=0.5), record_scores=True) as run, torch.no_grad():
        model(ids, attention_mask=mask)
    for layer, got in run.scores.items():
        want = brute_h2o(att[layer], 4, 2, mask)
        real = mask.bool()[:, None, :].expand_as(want)
        bound = want.clamp(min=1.0) * (8 + 20) * EPS32  # as in the test above
        assert bool(((got - want).abs() <= bound)[real].all())


# -- exact attention over the kept keys -------------------------------------------------------------
ALL = ["streaming", "knorm", "h2o", "snapkv", "pyramidkv", "adakv", "head_aware"]


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("kind", ["llama", "gemma2"])
def test_next_token_logits_equal_eager_with_dropped_keys_masked(name, kind, atlas):
    model = build(kind)
    ids = ids_of(25)
    press = small(name, 0.5, atlas)
    got, run = pressed_next_logits(model, press, ids)
    assert run.kept and all(not bool(k.all()) for k in run.kept.values())  # something was dropped
    want = masked_eager_logits(model, ids, run.kept)
    # Logits are O(1) sums over 32 hidden units of products of O(1) terms: both routes round each
    # attention probability within (D + T) eps relative and carry it through 2 layers; 1e-5 is far
    # above that (about 60 * 1.2e-7 per layer) and far below a changed set of keys (> 1e-2 here).
    assert torch.allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["snapkv", "adakv"])
def test_padded_batch_attends_only_to_kept_real_keys(name, atlas):
    model = build("llama")
    ids = ids_of(25, batch=2, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    got, run = pressed_next_logits(model, small(name, 0.5, atlas), ids, mask)
    want = masked_eager_logits(model, ids, run.kept, mask)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)  # bound: as in the test above
    for keep in run.kept.values():
        assert not bool(keep[1, :, :6].any())  # padding is dropped before any real token


def test_positions_of_later_tokens_are_those_of_the_full_sequence():
    model = build("llama")
    ids = ids_of(25)
    with compress(model, make_press("knorm", ratio=0.75)) as run, torch.no_grad():
        model(ids)
    layer = run.cache.layers[0]
    assert isinstance(layer, PressedLayer)
    assert run.cache.get_seq_length() == 25  # the next token sits at position 25
    assert layer.keys.shape[2] == int(25 * 0.25)
    assert layer.get_mask_sizes(1) == (int(25 * 0.25) + 1, 25 - int(25 * 0.25))


# -- real savings -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_cache_bytes_follow_the_ratio(name, ratio, atlas):
    model = build("llama")
    t = 200
    ids = ids_of(t)
    press = small(name, ratio, atlas)
    with compress(model, press) as run, torch.no_grad():
        model(ids)
    full, now = run.full_bytes, run.cache_bytes()
    assert full == 2 * 2 * 2 * t * 8 * 4  # layers x (K, V) x kv heads x T x D x float32
    # each head keeps int(T (1 - ratio)) or a pyramid / shared budget whose mean is within a few entries
    # of it; ragged caches add 8 bytes of counts per head: all within 2 %
    assert abs(now - (1 - ratio) * full) <= 0.02 * full, (now, (1 - ratio) * full)
    layer_types = {type(layer) for layer in run.cache.layers}
    # head-wise presses keep a ragged cache (or a uniform one where every head's budget came out equal)
    assert layer_types <= ({RaggedLayer, PressedLayer} if press.head_wise else {PressedLayer})


def test_head_aware_keeps_the_named_heads_whole(atlas):
    model = build("llama")
    t = 60
    with compress(model, small("head_aware", 0.5, atlas)) as run, torch.no_grad():
        model(ids_of(t))
    # heads (0, 1) and (1, 3) are named: kv heads 0 of layer 0 and 1 of layer 1
    assert bool(run.kept[0][:, 0].all()) and bool(run.kept[1][:, 1].all())
    assert not bool(run.kept[0][:, 1].all()) and not bool(run.kept[1][:, 0].all())
    other = run.kept[0][0, 1]
    assert bool(other[:2].all())  # the sinks


def test_generate_runs_with_a_ragged_cache(atlas):
    model = build("llama")
    ids = ids_of(30)
    with compress(model, small("adakv", 0.5)) as run, torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 34)
    assert any(isinstance(layer, RaggedLayer) for layer in run.cache.layers)  # layer 0: heads keep 19 and 11


# -- bad input ----------------------------------------------------------------------------------------
def test_unknown_press_and_parameter():
    with pytest.raises(PressError, match="unknown press 'zip'.*streaming"):
        make_press("zip")
    with pytest.raises(PressError, match="snapkv has no parameter 'windw'"):
        parse_press("snapkv:windw=4")
    assert set(PRESSES) == {"streaming", "h2o", "snapkv", "pyramidkv", "knorm", "adakv", "head_aware", "compose"}
    assert parse_press("snapkv:window=8", ratio=0.5).ratio == 0.5


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan"), "half", True])
def test_ratio_outside_zero_one(ratio):
    with pytest.raises(PressError, match="ratio"):
        make_press("knorm", ratio=ratio)


def test_head_aware_without_atlas():
    with pytest.raises(PressError, match="head_aware needs an atlas"):
        make_press("head_aware", ratio=0.5)


def test_head_aware_with_an_atlas_of_another_model(atlas):
    model = build("llama", num_hidden_layers=3)
    with pytest.raises(PressError, match="2 layers x 4 heads.*3 layers x 4 heads"):
        with compress(model, small("head_aware", 0.5, atlas)):
            pass


def test_head_aware_with_an_atlas_of_other_kv_heads(atlas):
    model = build("llama", num_key_value_heads=4)
    with pytest.raises(PressError, match="2 key/value heads per layer, but this model has 4"):
        with compress(model, small("head_aware", 0.5, atlas)):
            pass


def test_encoder_has_no_kv_cache():
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4))
    with pytest.raises(PressError, match="encoder without a KV cache"):
        with compress(model, make_press("knorm", ratio=0.5)):
            pass


def test_snapkv_window_larger_than_the_context_is_the_identity_with_a_note():
    model = build("llama")
    ids = ids_of(10)
    with torch.no_grad():
        with headmap.observe(model):
            want = model.generate(ids, max_new_tokens=3, do_sample=False)
        with pytest.warns(UserWarning, match="covers the whole input"):
            with compress(model, make_press("snapkv", ratio=0.5, window=64)):
                got = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert torch.equal(got, want)


def test_press_composes_with_an_observing_session():
    from headmap.probes import SinkProbe

    model = build("llama")
    ids = ids_of(30)
    press = make_press("h2o", ratio=0.5)
    with torch.no_grad():
        with compress(model, press):
            alone = model.generate(ids, max_new_tokens=4, do_sample=False)
        probe = SinkProbe()
        with headmap.observe(model, probes=[probe]), compress(model, press) as run:
            both = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(both, alone)  # observing changes nothing
    assert run.kept and probe.head_rows()  # the press pressed and the probe measured


def test_two_generations_in_one_block_are_independent():
    model = build("llama")
    a, b = ids_of(30, seed=4), ids_of(26, seed=5)
    press = small("adakv", 0.5)
    with torch.no_grad():
        with compress(model, press):
            want_b = model.generate(b, max_new_tokens=4, do_sample=False)
        with compress(model, press):
            model.generate(a, max_new_tokens=4, do_sample=False)  # leaves a ragged cache behind
            got_b = model.generate(b, max_new_tokens=4, do_sample=False)
    assert torch.equal(got_b, want_b)


# -- decoding with a fixed budget -------------------------------------------------------------------
def masked_eager_all(model, ids, visible):
    """Logits [B, P, V] of eager attention where row p sees key j iff ``visible[b, h, p, j]`` (every layer)."""
    module = sys.modules[type(model).__module__]
    original = module.eager_attention_forward

    def patched(mod, query, key, value, attention_mask, **kw):
        hide = ~visible[mod.layer_idx] if isinstance(visible, dict) else ~visible
        attention_mask = torch.zeros(hide.shape).masked_fill(hide, torch.finfo(torch.float32).min)
        return original(mod, query, key, value, attention_mask, **kw)

    module.eager_attention_forward = patched
    try:
        with torch.no_grad():
            return model(ids, use_cache=False).logits.double()
    finally:
        module.eager_attention_forward = original


def decode_steps(model, press, prompt, steps, record=False):
    """Greedy steps after a pressed prefill of ``prompt``: (tokens [1, P], logits of each step, run)."""
    with compress(model, press, record_scores=record) as run, torch.no_grad():
        out = model(prompt, use_cache=True)
        ids, logits = prompt, []
        for _ in range(steps):
            token = out.logits[:, -1:].argmax(-1)
            ids = torch.cat([ids, token], dim=1)
            out = model(token, past_key_values=out.past_key_values, use_cache=True)
            logits.append(out.logits[:, -1].double())
    return ids, torch.stack(logits, dim=1), run


def test_streaming_keeps_its_budget_while_decoding():
    model = build("llama")
    t, sinks, window, steps = 20, 2, 6, 8
    ids, got, run = decode_steps(
        model, make_press("streaming", sinks=sinks, window=window, decode=True), ids_of(t), steps
    )
    for layer in run.cache.layers:
        assert layer.keys.shape[2] == sinks + window  # one entry out for every token in
    p = ids.shape[1]
    visible = torch.ones(p, p).tril().bool()
    for row in range(t, p):  # a decoding query sees the sinks, the `window` tokens before it, and itself
        visible[row] = False
        visible[row, :sinks] = True
        visible[row, row - window : row + 1] = True
    want = masked_eager_all(model, ids, visible[None, None])[:, t:p]  # step k's query sits at position t + k
    assert torch.allclose(got, want, atol=1e-5, rtol=0)  # bound: as in the next-token test above


def test_h2o_keeps_its_budget_while_decoding_with_running_sums():
    model = build("llama")
    t, steps = 20, 6
    press = make_press("h2o", ratio=0.5, decode=True)
    ids, got, run = decode_steps(model, press, ids_of(t), steps, record=True)
    assert len(run.history) == steps
    for layer in run.cache.layers:
        assert layer.keys.shape[2] == int(t * 0.5)
    p = ids.shape[1]
    visible = {}
    for layer in range(2):
        vis = torch.ones(1, 4, p, p).tril().bool()
        for k, step in enumerate(run.history):  # what the query of step k saw, per kv head
            row = t + k
            seen = torch.zeros(1, 2, p, dtype=torch.bool)
            seen.scatter_(2, step[layer].long(), True)
            vis[:, :, row] = seen.repeat_interleave(2, dim=1)
        visible[layer] = vis
    logits = masked_eager_all(model, ids, visible)
    assert torch.allclose(got, logits[:, t:p], atol=1e-5, rtol=0)  # bound: as above
    # the running sums are the attention each kept key received from every query so far
    module = sys.modules[type(model).__module__]
    original = module.eager_attention_forward
    attn = {}

    def keep_weights(mod, query, key, value, attention_mask, **kw):
        hide = ~visible[mod.layer_idx]
        mask = torch.zeros(hide.shape).masked_fill(hide, torch.finfo(torch.float32).min)
        out, weights = original(mod, query, key, value, mask, **kw)
        attn[mod.layer_idx] = weights.double()
        return out, weights

    module.eager_attention_forward = keep_weights
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
    finally:
        module.eager_attention_forward = original
    for index, layer in enumerate(run.cache.layers):
        total = attn[index].sum(dim=2).view(1, 2, 2, p).mean(2)  # over every query, prefill and decoding
        want = total.gather(2, layer.positions.long())
        # float32 running sums over at most p terms each below 1: within p eps32 of the float64 sums
        assert torch.allclose(layer.scores.double(), want, atol=p * EPS32 * 4, rtol=0)


@pytest.mark.parametrize(
    "name, decodes_in_engine",
    [("snapkv", False), ("h2o", False), ("knorm", False), ("pyramidkv", True), ("adakv", True)],
)
def test_decoding_leaves_the_engine_after_a_uniform_press(name, decodes_in_engine, atlas, calls):
    """A press whose layers all keep as many entries decodes with the model's own attention; pyramidkv
    (budgets by layer) and adakv (a ragged cache) keep the engine for the decoding steps. The tokens
    equal those of the model fed only the kept keys, which the masked-eager tests check step by step."""
    model = build("llama")
    ids = ids_of(24)
    with compress(model, small(name, 0.5, atlas)) as run, torch.no_grad():
        model(ids)  # the prefill: the fused route (or none, for knorm)
        after_prefill = calls["blocks"]
        assert model.config._attn_implementation == ("headmap" if decodes_in_engine else "eager")
        model.generate(ids, max_new_tokens=4, do_sample=False)
    assert after_prefill == 0
    assert (calls["blocks"] > 0) == decodes_in_engine
    assert run.cache_bytes() < run.full_bytes  # half of 24 entries kept, 3 decoded since
    assert model.config._attn_implementation == "eager"
