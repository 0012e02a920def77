"""The composition press: budgets from one press, scores from another, and presses beside observe and steer.

See docs/methods/presses/compose.md. Models and references are those of tests/test_presses.py.
"""

from __future__ import annotations

import pytest
import torch
from test_presses import atlas, build, ids_of, pressed_next_logits, small  # noqa: F401  (atlas: a fixture)

import headmap
from headmap.edits import Edit
from headmap.edits.temperature import Temperature
from headmap.presses import ComposePress, PressError, RaggedLayer, compress, make_press, parse_press


def same_kept(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- composing a press with itself ------------------------------------------------------------------
@pytest.mark.parametrize("name", ["streaming", "knorm", "h2o", "snapkv", "pyramidkv"])
def test_a_press_composed_with_itself_is_that_press(name):
    model = build("llama")
    ids = ids_of(25)
    alone = small(name, 0.5)
    both = ComposePress(ratio=0.5, budget=small(name, 0.5), scores=small(name, 0.5))
    want, run_alone = pressed_next_logits(model, alone, ids)
    got, run_both = pressed_next_logits(model, both, ids)
    assert same_kept(run_both.kept, run_alone.kept)
    assert not all(bool(k.all()) for k in run_both.kept.values())  # something was dropped
    assert torch.equal(got, want)  # the same kept entries, the same attention path: bit identity


def test_head_wise_budgets_composed_with_their_own_scores_are_that_press():
    model = build("llama")
    ids = ids_of(25)
    alone = make_press("adakv", ratio=0.5, scorer="knorm")
    both = parse_press("compose:budget='adakv:scorer=knorm':scores=knorm", ratio=0.5)
    _, run_alone = pressed_next_logits(model, alone, ids)
    _, run_both = pressed_next_logits(model, both, ids)
    # adakv keeps the layer's best entries across heads: within a head those are its best count entries
    assert same_kept(run_both.kept, run_alone.kept)
    assert any(isinstance(layer, RaggedLayer) for layer in run_both.cache.layers)  # heads keep different counts


# -- pyramidkv budgets, knorm scores: by hand -----------------------------------------------------------
def test_pyramidkv_budgets_with_knorm_scores_by_hand():
    model = build("llama", num_hidden_layers=4, vocab_size=512)
    t, ratio, window = 200, 0.5, 8
    # distinct tokens: a repeated token has the same key norm at every position (RoPE is a rotation), a tie
    ids = torch.randperm(511, generator=torch.Generator().manual_seed(1))[None, :t] + 1
    with torch.no_grad():
        full = model(ids, use_cache=True).past_key_values
    keys = [full.layers[layer].keys.clone() for layer in range(4)]
    # PyramidKV's budgets (Cai et al. 2024, as kvpress computes them), by hand for T = 200, ratio 0.5, window 8:
    # capacity C = 8 + 100 = 108; min = (C - 8) / 20 = 5, max = 2 (C - 8) - 5 = 195 > T - window = 192, so
    # max = 192, min = 2 (C - 8) - 192 = 8; the line from 192 (layer 0) to 8 (layer 3): steps of 184 / 3.
    budgets = [round(192 - layer * 184 / 3) for layer in range(4)]
    assert budgets == [192, 131, 69, 8] and sum(budgets) == 4 * int(t * (1 - ratio))
    press = parse_press(f"compose:budget='pyramidkv:window={window}':scores=knorm", ratio=ratio)
    with compress(model, press) as run, torch.no_grad():
        model(ids, use_cache=True)
    for layer, n in enumerate(budgets):
        norms = keys[layer].double().norm(dim=-1)  # [1, Hkv, T]; lowest norms are kept (Devoto et al. 2024)
        ranked = norms.sort(dim=-1).values
        if n < t:  # the boundary is clear: the n-th and next norms differ by far more than float32 rounding
            assert bool(((ranked[..., n] - ranked[..., n - 1]) > 1e-4 * ranked[..., n]).all())
        want = torch.zeros_like(norms, dtype=torch.bool)
        want.scatter_(-1, norms.argsort(dim=-1)[..., :n], True)
        assert torch.equal(run.kept[layer], want), layer
        assert run.cache.layers[layer].keys.shape[2] == n  # stored, not masked
        kept_keys = keys[layer][0][want[0]].view(2, n, -1)
        assert torch.equal(run.cache.layers[layer].keys[0], kept_keys)  # the very tensors, in position order


@pytest.mark.parametrize(
    "spec",
    [
        "compose:budget=pyramidkv:scores=knorm",
        "compose:budget=adakv:scores=h2o",
        "compose:budget=head_aware:scores=h2o",
    ],
)
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_cache_bytes_follow_the_ratio(spec, ratio, atlas):  # noqa: F811
    model = build("llama")
    t = 200
    ids = ids_of(t)
    if "head_aware" in spec:
        press = ComposePress(ratio=ratio, budget=small("head_aware", ratio, atlas), scores="h2o")
    else:
        press = parse_press(spec.replace("pyramidkv", "'pyramidkv:window=8'"), ratio=ratio)
    with compress(model, press) as run, torch.no_grad():
        model(ids)
    full, now = run.full_bytes, run.cache_bytes()
    assert full == 2 * 2 * 2 * t * 8 * 4  # layers x (K, V) x kv heads x T x D x float32
    # the budget press's counts: within a few entries of (1 - ratio) T per head (plus 8 bytes of counts
    # per head in a ragged cache), all within 2 %
    assert abs(now - (1 - ratio) * full) <= 0.02 * full, (now, (1 - ratio) * full)


# -- beside observe and steer ---------------------------------------------------------------------------
class _ColumnSums:
    """A probe: per layer, the attention each key receives summed over the queries of every forward."""

    reads_qk = False

    def __init__(self) -> None:
        self.sums: dict[int, torch.Tensor] = {}

    def update(self, block) -> None:
        mass, _ = block.column_sums(exclude_self=False)
        acc = self.sums.setdefault(block.layer, mass.new_zeros(mass.shape[0], mass.shape[1], block.k_end))
        if acc.shape[-1] < block.k_end:
            acc = self.sums[block.layer] = torch.nn.functional.pad(acc, (0, block.k_end - acc.shape[-1]))
        acc[..., block.k_start : block.k_end] += mass

    def commit(self) -> None:
        pass


def test_a_probe_under_compress_sees_the_prefill_attention_unchanged():
    model = build("llama")
    ids = ids_of(30)
    press = parse_press("compose:budget='pyramidkv:window=4':scores=h2o", ratio=0.5)
    alone, under = _ColumnSums(), _ColumnSums()
    with torch.no_grad():
        with headmap.observe(model, probes=[alone]):
            model(ids, use_cache=True)
        with headmap.observe(model, probes=[under]), compress(model, press) as run:
            model(ids, use_cache=True)
    assert run.kept and not all(bool(k.all()) for k in run.kept.values())  # the press pressed
    assert alone.sums.keys() == under.sums.keys() == {0, 1}
    for layer in alone.sums:
        assert torch.equal(under.sums[layer], alone.sums[layer])  # the same forward: bit identity


def test_ratio_zero_and_a_neutral_edit_leave_the_model_as_it_is():
    model = build("llama")
    ids = ids_of(24)
    press = parse_press("compose:budget='pyramidkv:window=4':scores=h2o", ratio=0.0)
    neutral = Temperature(heads=[(0, 1), (1, 2)], tau=1.0)
    with torch.no_grad():
        with headmap.observe(model):  # the press reads attention: the model under the engine is the reference
            want = model(ids).logits
            want_gen = model.generate(ids, max_new_tokens=6, do_sample=False)
        with headmap.steer(model, [neutral]), compress(model, press) as run:
            got = model(ids).logits
            got_gen = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want) and torch.equal(got_gen, want_gen)
    assert run.kept and all(bool(k.all()) for k in run.kept.values())


class _HideDropped(Edit):
    """The press by hand: the query at ``row`` sees only the kept keys of each kv head (``kept[layer]``)."""

    name = "hide_dropped"

    def __init__(self, kept: dict[int, torch.Tensor], row: int) -> None:
        super().__init__(heads=None)
        self.kept, self.row = kept, row

    def applies_to_layer(self, layer: int) -> bool:
        return layer in self.kept

    def edit_logits(self, block, logits):
        keep = self.kept.get(block.layer)
        k1 = min(block.k_end, keep.shape[-1])
        if not block.q_start <= self.row < block.q_end or block.k_start >= k1:
            return logits
        hide = ~keep[..., block.k_start : k1].repeat_interleave(block.group_size, dim=1)  # [B, H, cols]
        logits = logits.clone()
        logits[:, :, self.row - block.q_start, : k1 - block.k_start].masked_fill_(hide, torch.finfo(logits.dtype).min)
        return logits


@pytest.mark.parametrize(
    "spec", ["compose:budget='pyramidkv:window=4':scores=h2o", "compose:budget='adakv:scorer=h2o':scores=knorm"]
)
def test_an_edit_and_a_press_in_one_forward_equal_the_press_applied_by_hand(spec):
    model = build("llama")
    ids = ids_of(25)
    press = parse_press(spec, ratio=0.5)
    hot = None  # every head
    with headmap.steer(model, [Temperature(heads=hot, tau=0.2)]):
        got, run = pressed_next_logits(model, press, ids)  # prefill pressed under the edit, then one step
    assert run.kept and not all(bool(k.all()) for k in run.kept.values())
    # reference: the whole sequence in one forward with the same edit, the last query hiding the dropped keys
    by_hand = _HideDropped(run.kept, row=ids.shape[1] - 1)
    with torch.no_grad(), headmap.steer(model, [Temperature(heads=hot, tau=0.2), by_hand]):
        want = model(ids, use_cache=False).logits[:, -1].double()
    # as in test_presses.py: both routes round each probability within (D + T) eps32 relative through
    # 2 layers of O(1) logits (about 60 * 1.2e-7 per layer); 1e-5 is above that and far below a changed
    # set of keys or a missing edit (> 1e-2 here, checked below)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    with torch.no_grad(), headmap.steer(model, [by_hand]):
        unedited = model(ids, use_cache=False).logits[:, -1].double()
    assert (got - unedited).abs().max() > 1e-3  # the edit did act in the pressed run


# -- specs and bad input -----------------------------------------------------------------------------
def test_spec_syntax_and_description():
    press = parse_press("compose:budget='pyramidkv:window=32':scores='snapkv:window=32'", ratio=0.25)
    assert isinstance(press, ComposePress) and press.ratio == 0.25
    assert press._budget.name == "pyramidkv" and press._budget.window == 32 and press._budget.ratio == 0.25
    assert press._scores.name == "snapkv" and press._scores.ratio == 0.25
    assert press.reads_window and not press.reads_received and not press.head_wise
    assert "budget=pyramidkv(" in press.describe() and "scores=snapkv(" in press.describe()
    assert parse_press("compose:budget=adakv:scores=knorm", ratio=0.5).head_wise


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("compose:budget=zip", "unknown budget press 'zip'"),
        ("compose:scores=adakv", "scores must come from a press that scores entries"),
        ("compose:scores=head_aware", "got head_aware, which selects entries itself"),
        ("compose:budget='pyramidkv:ratio=0.5'", "set ratio on the composition"),
        ("compose:budget='snapkv:windw=3'", "snapkv has no parameter 'windw'"),
        ("compose:budget=compose", "unknown budget press 'compose'"),
        ("compose:budget='adakv:scorer=\"snapkv:window=8\"':scores='snapkv:window=16'", "different sizes (8 and 16"),
        ("compose:budget=1", "budget must be a press spec"),
    ],
)
def test_bad_specs_are_one_press_error(spec, needle):
    with pytest.raises(PressError) as info:
        parse_press(spec, ratio=0.5)
    assert needle in str(info.value), str(info.value)
    assert "\n" not in str(info.value)
