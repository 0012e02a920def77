"""The ``var`` and ``vhr`` edits and ``scale_span`` with ``span=image`` on tiny VLMs: neutral settings are
identities, each edit changes attention (or head outputs) as its formula says against a hand computation from
eager attention, and the bad inputs are refused with one line."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from bounds import reorder
from mm_models import BY_NAME, HEAD_DIM, IMAGE_TOKEN
from test_multimodal_probes import Capture, tiny_budget  # noqa: F401 - a fixture
from test_multimodal_probes2 import (
    SINK_AT,
    SINK_HEAD,
    brute_phi,
    planted_sink_llava,
    planted_vision_heads,
    prob_tol,
)

import headmap
from headmap.atlas import Atlas
from headmap.edits import Var, make_edits
from headmap.errors import EditError, HeadmapError
from headmap.probes import Needs, Probe, VisionAwareProbe


def logits(model, inputs, edits=()):
    with torch.no_grad(), headmap.observe(model, edits=list(edits)):
        return model(**inputs).logits


# --------------------------------------------------------------------------------------------
# neutral settings
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        "var:p=0",
        "var:p=0:rho=0:tau=0.5:lam=1.5",
        "vhr:heads=[[0,1],[1,3]]:factor=1",
        "scale_span:span=image:factor=1",
        "scale_span:span=image:factor=1:where=logits",
        "redistribute_sinks:span=image:p=0",
    ],
)
@pytest.mark.parametrize("name", ["llava", "qwen2_vl", "paligemma"])
def test_neutral_settings_leave_the_logits_unchanged(name, spec):
    """At the neutral setting each edit returns its input tensor itself: the same computation twice, bit for bit."""
    model, inputs = BY_NAME[name].build()
    plain = logits(model, inputs)
    edited = logits(model, inputs, make_edits(spec))
    assert torch.equal(plain, edited)


# --------------------------------------------------------------------------------------------
# var
# --------------------------------------------------------------------------------------------


def eager_layer0(model, inputs):
    with torch.no_grad():
        ref = model(**inputs, output_attentions=True, output_hidden_states=True)
    return ref.attentions[0].double(), ref.hidden_states[0]


def test_var_moves_sink_attention_to_the_other_image_tokens_as_the_formula_says(tiny_budget):  # noqa: F811
    """Layer 0 only, whose inputs are unedited: with S the visual sinks found from eager's hidden state entering
    layer 0 and I the image tokens, each text row i with s = A[i, S], o = A[i, I \\ S] and o / (s + o) >= rho gets
    A'[i, S] = (1 - p) A[i, S] and A'[i, k] = A[i, k] (1 + p s / o) on I \\ S; other rows stay."""
    model, inputs = planted_sink_llava()
    p, rho, tau = 0.6, 0.5, 4.0
    ids = inputs["input_ids"]
    image = ids == IMAGE_TOKEN
    real = inputs["attention_mask"].bool()
    first = real.long().argmax(-1)
    ref, hidden0 = eager_layer0(model, inputs)
    phi, _ = brute_phi(hidden0, first, 5.0)
    sinks = image & (phi >= tau)
    sinks[torch.arange(3), first] = False
    want = [[int(f) + 1 + SINK_AT] for f in first]  # one text token, then the image: its token 3
    assert [torch.nonzero(sinks[b]).flatten().tolist() for b in range(3)] == want
    cap = Capture()
    edit = Var(p=p, rho=rho, tau=tau, layers=[0])
    with torch.no_grad(), headmap.observe(model, probes=[cap], edits=[edit]):
        model(**inputs)
    got = cap.dense(0, tuple(ref.shape))
    other = image & ~sinks
    s = (ref * sinks[:, None, None, :]).sum(-1, keepdim=True)
    o = (ref * other[:, None, None, :]).sum(-1, keepdim=True)
    text_rows = (real & ~image)[:, None, :, None]
    ok = text_rows & (s > 0) & (o > 0) & (o >= rho * (s + o))
    hand = torch.where(
        sinks[:, None, None, :], ref * (1 - p), torch.where(other[:, None, None, :], ref * (1 + p * s / o), ref)
    )
    hand = torch.where(ok, hand, ref)
    keys = ids.shape[1]
    n_image = int(image.sum(-1).max())
    delta = prob_tol(keys)
    # Each engine probability is within delta of eager's (tests/test_multimodal_probes2.prob_tol); s and o sum at
    # most n_image of them and s / o <= (1 - rho) / rho = 1 on the rows edited, so an entry moves by at most
    # delta (1 + p) + p n_image delta (A[i, k] <= o), plus the edit's own float32 sums and products.
    tol = delta * (1 + p + p * n_image) + reorder(max(keys, HEAD_DIM), 2)
    # The decision o / (s + o) >= rho: the engine's ratio is within n_image delta / (s + o) of eager's, so rows
    # closer than that to rho may go either way; there the edited row must equal one of the two branches.
    seen = (s + o) > 0
    ratio = torch.where(seen, o / torch.where(seen, s + o, 1.0), 0.0)
    close = seen & ((ratio - rho).abs() <= 2 * n_image * delta / torch.where(seen, s + o, 1.0))
    rows = (real[:, None, :, None] & ~close).expand_as(ref)
    assert float((got - hand).abs()[rows].max()) <= tol
    either = torch.minimum((got - hand).abs().amax(-1, keepdim=True), (got - ref).abs().amax(-1, keepdim=True))
    if bool(close.any()):
        assert float(either[close].max()) <= tol
    # both branches ran: the planted head spends nearly all its image attention on the sink (not image-centric),
    # other heads are image-centric on many rows
    assert not bool(ok[:, SINK_HEAD[1]].any())
    assert int(ok.sum()) > 10
    moved = torch.where(real[:, None, :, None], (got - ref).abs(), 0.0).amax(dim=(0, 2, 3))  # padding rows differ
    assert float(moved[SINK_HEAD[1]]) <= delta and float(moved.max()) > 1e-3
    assert edit.applies_to_layer(0) and not edit.applies_to_layer(1)


def test_var_generates_with_a_kv_cache():
    """Sinks are found on the prompt's forward and kept for the decoding steps (generated tokens are text)."""
    model, inputs = planted_sink_llava()
    with torch.no_grad():
        with headmap.observe(model, edits=[Var(p=0.0)]):
            plain = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        edit = Var(tau=4.0)
        with headmap.observe(model, edits=[edit]):
            edited = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert plain.shape == edited.shape
    assert set(edit._sinks) == {0, 1} and all(v.shape == inputs["input_ids"].shape for v in edit._sinks.values())


def test_var_bad_settings_and_text_models():
    from tiny_models import tiny

    for spec in ("var:p=1.5", "var:p=-0.1", "var:rho=2", "var:tau=0", "var:lam=1", "var:layers=x", "var:p=nan"):
        with pytest.raises(EditError):
            make_edits(spec)
    model, _ = tiny("llama")
    with pytest.raises(EditError, match="image token id"), headmap.observe(model, edits=make_edits("var")):
        pytest.fail("the body must not run")


# --------------------------------------------------------------------------------------------
# vhr
# --------------------------------------------------------------------------------------------


class Outputs(Probe):
    """Per-head attention outputs of every text-tower call (tests only)."""

    name = "capture_outputs"
    needs = Needs(qk=True)

    def __init__(self) -> None:
        self.views = []

    def update_qk(self, view) -> None:
        self.views.append(view)

    def update(self, block) -> None:
        pass


def test_vhr_scales_the_vision_aware_heads_chosen_by_an_atlas_rule():
    model, inputs = planted_vision_heads()
    probe = VisionAwareProbe()
    probe.measure(model, inputs)
    atlas = Atlas(heads=pd.DataFrame(probe.head_rows()), meta={})
    (edit,) = make_edits('vhr:heads="top 1 vision_aware":factor=2', atlas=atlas)
    assert edit.heads == [(0, 1)]
    outs = []
    for edits in ((), (edit,)):
        cap = Outputs()
        with torch.no_grad(), headmap.observe(model, probes=[cap], edits=list(edits)):
            model(**inputs)
        text = [v for v in cap.views if v.layer == 0 and v.query.shape[1] == 4]  # the language model's layer 0
        outs.append(text[-1].output)
    plain, edited = outs  # [B, T, H, Dv]
    # Layer 0's inputs are unedited: its outputs are the same computation, and the chosen head's is multiplied by
    # a power of two, which is exact in float32.
    assert torch.equal(edited[:, :, 1], 2 * plain[:, :, 1])
    for head in (0, 2, 3):
        assert torch.equal(edited[:, :, head], plain[:, :, head])
    assert "top 1 vision_aware" in edit.describe()


def test_vhr_needs_heads():
    with pytest.raises(EditError, match="heads= is required"):
        make_edits("vhr:factor=2")
    with pytest.raises(EditError):
        make_edits("vhr:heads=[[0,1]]:factor=-1")


# --------------------------------------------------------------------------------------------
# scale_span with span=image
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("factor", [3.0, 0.25])
def test_scale_span_image_reweights_image_keys_as_the_formula_says(factor, tiny_budget):  # noqa: F811
    """Layer 0 (unedited inputs): A'[i, j] = A[i, j] w_j / sum_k A[i, k] w_k, w = factor on image keys, else 1."""
    model, inputs = BY_NAME["llava"].build()
    image = inputs["input_ids"] == IMAGE_TOKEN
    real = inputs["attention_mask"].bool()
    ref, _ = eager_layer0(model, inputs)
    cap = Capture()
    with (
        torch.no_grad(),
        headmap.observe(model, probes=[cap], edits=make_edits(f"scale_span:span=image:factor={factor}")),
    ):
        model(**inputs)
    got = cap.dense(0, tuple(ref.shape))
    w = torch.where(image, factor, 1.0).double()[:, None, None, :]
    hand = ref * w / (ref * w).sum(-1, keepdim=True)
    keys = inputs["input_ids"].shape[1]
    # the engine-vs-eager bound of one probability, scaled by the reweighting's largest gain, plus its own float32
    # rounding (the product and the row sum of at most T terms)
    gain = max(factor, 1.0) / min(factor, 1.0)
    tol = gain * prob_tol(keys) + reorder(max(keys, HEAD_DIM), 2)
    rows = real[:, None, :, None].expand_as(ref)
    assert float((got - hand).abs()[rows].max()) <= tol
    assert float((got - ref).abs()[rows].max()) > 1e-2  # it did move


def test_span_image_on_an_input_without_an_image_is_one_clear_line():
    model, inputs = BY_NAME["llava"].build()
    text = {"input_ids": inputs["input_ids"].clamp(max=IMAGE_TOKEN - 1), "attention_mask": inputs["attention_mask"]}
    (edit,) = make_edits("scale_span:span=image:factor=2")
    with pytest.raises(EditError) as err, torch.no_grad(), headmap.observe(model, edits=[edit]):
        model(**text)
    message = str(err.value)
    assert "\n" not in message and "no image token" in message and "span=image" in message
    assert isinstance(err.value, HeadmapError)  # the CLI turns it into one line on stderr and exit code 2


def test_span_image_on_a_text_model_says_it_needs_a_vlm():
    from tiny_models import tiny

    model, _ = tiny("llama")
    (edit,) = make_edits("scale_span:span=image:factor=2")
    assert edit.params() == {"span": "image", "factor": 2.0, "where": "probs"}
    edit.prepare(None, "an image of a cat")  # no text to locate: the image tokens come from the ids
    with pytest.raises(EditError, match="vision-language model"), headmap.observe(model, edits=[edit]):
        pytest.fail("the body must not run")


@pytest.mark.parametrize("edit", ["scale_span:span=image:factor=2", "var:p=0.5", "vhr:factor=2"])
def test_multimodal_edits_in_the_cli_on_a_text_model_exit_2(monkeypatch, capsys, tiny_llama_dir, edit):
    """``headmap steer`` on a text model: one line on stderr, exit code 2."""
    from test_cli import assert_one_line_error, run

    code, out, err = run(monkeypatch, capsys, "steer", str(tiny_llama_dir), "--edit", edit, "--prompt", "an image")
    assert_one_line_error(code, err)
    assert "without edits" not in out
