"""``modality_mass`` and ``cross_alignment`` against brute force from eager ``output_attentions``, the planted
image head, and the ``pai`` edit against a hand computation (tiny random models of tests/mm_models.py)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from bounds import ATTENTION_STAGES, U64, reorder
from mm_models import BY_NAME, HEAD_DIM, IMAGE_TOKEN
from test_architectures import float64_eager_softmax

import headmap
from headmap.corpus import Batch
from headmap.errors import ProbeError
from headmap.probes import CrossAlignmentProbe, ModalityMassProbe, make_probes

TINY_BUDGET = 3000


@pytest.fixture
def tiny_budget():
    old = headmap.engine_config.budget_bytes
    headmap.engine_config.budget_bytes = TINY_BUDGET
    try:
        yield
    finally:
        headmap.engine_config.budget_bytes = old


def visible_text_mask(name: str, inputs: dict) -> torch.Tensor:
    """[B, T, T] bool: the language model's mask, written here from its definition (not from the engine)."""
    real = inputs["attention_mask"].bool()
    t = real.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    allowed = causal[None] & real[:, None, :]
    if name == "paligemma":  # prefix-LM: the image and prompt (token type 0) see each other both ways
        prefix = (inputs["token_type_ids"] == 0) & real
        allowed |= prefix[:, :, None] & prefix[:, None, :]
    return allowed


def brute_modality_mass(attn: torch.Tensor, ids, allowed, real) -> tuple[np.ndarray, np.ndarray]:
    """Per head (text-to-image, image-to-image) from one layer's eager probabilities [B, H, T, T]."""
    image = ids == IMAGE_TOKEN
    mass = (attn.double() * image[:, None, None, :]).sum(-1)  # [B, H, T]
    sees = (allowed & image[:, None, :]).any(-1)
    out = []
    for rows in (real & ~image & sees, real & image):
        per_input = [mass[b][:, rows[b]].mean(-1).numpy() for b in range(ids.shape[0]) if rows[b].any()]
        out.append(np.mean(per_input, axis=0))
    return out[0], out[1]


@pytest.mark.parametrize("name", ["llava", "paligemma", "idefics3"])
def test_modality_mass_equals_brute_force(name, tiny_budget):
    model, inputs = BY_NAME[name].build()
    probe = ModalityMassProbe()  # the image token id comes from the model's config
    with torch.no_grad():
        ref = model(**inputs, output_attentions=True).attentions
        probe.begin(Batch(corpus="t", first=0, samples=[], input_ids=inputs["input_ids"]))
        with headmap.observe(model, probes=[probe]):
            model(**inputs)
    assert probe.image_token_id == IMAGE_TOKEN
    allowed = visible_text_mask(name, inputs)
    real = inputs["attention_mask"].bool()
    n_image = int((inputs["input_ids"] == IMAGE_TOKEN).sum(-1).max())
    # Each probability is within the engine-vs-eager bound of tests/test_multimodal.py (two vision and two text
    # layers, rows of at most T keys); a share sums at most n_image of them.
    keys = inputs["input_ids"].shape[1]
    tol = n_image * reorder(max(keys, HEAD_DIM), (ATTENTION_STAGES + 1) * 4)
    got_t2i, got_i2i = probe.values(), probe.image_to_image()
    assert got_t2i.shape == (len(ref), 4)
    for layer, attn in enumerate(ref):
        t2i, i2i = brute_modality_mass(attn, inputs["input_ids"], allowed, real)
        assert np.abs(got_t2i[layer] - t2i).max() <= tol
        assert np.abs(got_i2i[layer] - i2i).max() <= tol
    rows = probe.head_rows()
    assert {r["metric"] for r in rows} == {"modality_mass", "image_to_image"}
    assert all(r["n"] == 3 for r in rows)
    # state round trip
    other = ModalityMassProbe(image_token_id=IMAGE_TOKEN)
    other.load_state_dict(probe.state_dict())
    assert np.array_equal(other.values(), got_t2i) and np.array_equal(other.image_to_image(), got_i2i, equal_nan=True)


def test_modality_mass_is_registered_and_needs_ids():
    (probe,) = make_probes("modality_mass:image_token_id=90")
    assert isinstance(probe, ModalityMassProbe) and probe.image_token_id == 90
    model, inputs = BY_NAME["llava"].build()
    with pytest.raises(ProbeError, match="input ids"), torch.no_grad(), headmap.observe(model, probes=[probe]):
        model(**inputs)


def test_modality_mass_on_a_text_model_names_the_missing_image_token():
    from tiny_models import padded_batch, tiny

    model, side = tiny("llama")
    ids, mask = padded_batch([6, 4], side)
    probe = ModalityMassProbe()
    probe.set_inputs(ids)
    with pytest.raises(ProbeError, match="image token id"), torch.no_grad(), headmap.observe(model, probes=[probe]):
        model(input_ids=ids, attention_mask=mask)


# --------------------------------------------------------------------------------------------
# The planted image head
# --------------------------------------------------------------------------------------------

PLANTED = (0, 1)  # layer 0, head 1


def planted_llava():
    """Tiny Llava (text attention with biases) whose layer 0 head 1 is set by hand to attend to image tokens.

    Image features carry +50 in hidden dimension 0 (the projector's last bias) and text embeddings 0 there.
    Head 1 gets q = 4 e_3 (weights 0, a bias) and its kv head k = 4 x_0 e_3: the logit of an image key is
    about 4 * 4 * 5.6 / sqrt(8) ~ 32, of a text key 0. Dimension 3 of an 8-dimensional head turns with the
    slowest rotary frequency (10000^-0.75 = 1e-3 rad per position), so positions barely change it.
    """
    from mm_models import _pixels, _text, _vision, vlm_ids
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    cfg = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", **_vision()),
        text_config=dict(model_type="llama", **_text(attention_bias=True)),
        image_token_index=IMAGE_TOKEN,
        image_seq_length=16,
        vision_feature_layer=-1,
    )
    torch.manual_seed(41)
    cfg._attn_implementation = "eager"
    model = LlavaForConditionalGeneration(cfg).eval()
    layer, head = PLANTED
    attn = model.model.language_model.layers[layer].self_attn
    kv = head // (attn.config.num_attention_heads // attn.config.num_key_value_heads)
    with torch.no_grad():
        model.model.multi_modal_projector.linear_2.bias[0] += 50.0
        model.model.language_model.embed_tokens.weight[:, 0] = 0.0
        q_rows = slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)
        attn.q_proj.weight[q_rows] = 0.0
        attn.q_proj.bias[q_rows] = 0.0
        attn.q_proj.bias[head * HEAD_DIM + 3] = 4.0
        k_rows = slice(kv * HEAD_DIM, (kv + 1) * HEAD_DIM)
        attn.k_proj.weight[k_rows] = 0.0
        attn.k_proj.bias[k_rows] = 0.0
        attn.k_proj.weight[kv * HEAD_DIM + 3, 0] = 4.0
    ids, mask = vlm_ids((24, 20, 18), 16, seed=4)
    return model, dict(input_ids=ids, attention_mask=mask, pixel_values=_pixels(3, 3, 16, 16, seed=6))


def test_planted_image_head_ranks_first():
    model, inputs = planted_llava()
    probe = ModalityMassProbe()
    probe.set_inputs(inputs["input_ids"])
    with torch.no_grad(), headmap.observe(model, probes=[probe]):
        model(**inputs)
    values = probe.values()
    order = np.dstack(np.unravel_index(np.argsort(-values, axis=None), values.shape))[0]
    assert tuple(order[0]) == PLANTED
    assert values[PLANTED] > 0.99  # nearly all of its text queries' attention is on the image
    others = np.delete(values.reshape(-1), PLANTED[0] * values.shape[1] + PLANTED[1])
    assert values[PLANTED] > others.max() + 0.1


# --------------------------------------------------------------------------------------------
# cross_alignment
# --------------------------------------------------------------------------------------------


def brute_cross(attn: torch.Tensor, dec_real: torch.Tensor, src_real: torch.Tensor, delta: float):
    """Per head (entropy, monotonicity, entropy bound) from eager cross-attention [B, H, Tdec, S] in float64."""
    from scipy.stats import spearmanr

    batch, heads = attn.shape[:2]
    ent, mono, tol = [], [], 0.0
    for b in range(batch):
        p = attn[b][:, dec_real[b]][:, :, src_real[b]]  # [H, R, S_b]
        n = p.shape[-1]
        h = -(torch.where(p > 0, p * torch.log(p), torch.zeros_like(p))).sum(-1) / math.log(n)  # [H, R]
        ent.append(h.mean(-1).numpy())
        # |d(p log p)| <= delta (1 + |log p|) for p >= delta, and p log p itself is within delta (1 + |log delta|)
        # below: the row's entropy moves at most delta * sum_j (1 + |log max(p_j, delta)|), over log n.
        grow = (delta * (1 + torch.log(p.clamp_min(delta)).abs())).sum(-1) / math.log(n)
        tol = max(tol, float(grow.max()))
        rows = torch.nonzero(dec_real[b]).squeeze(-1).numpy()
        arg = attn[b][:, dec_real[b]].argmax(-1).numpy()  # [H, R]
        mono.append([spearmanr(rows, arg[h_]).statistic if len(set(arg[h_])) > 1 else np.nan for h_ in range(heads)])
    return np.mean(ent, axis=0), np.nanmean(np.array(mono, dtype=float), axis=0), tol


@pytest.mark.parametrize("name", ["t5", "bart", "whisper"])
def test_cross_alignment_equals_brute_force(name, tiny_budget):
    model, inputs = BY_NAME[name].build()
    # Float64, against eager with a float64 softmax: probabilities within the float64 chain bound, so that no
    # near tie between two source keys can flip an argmax (tests/test_multimodal.py derives the chain).
    model = copy.deepcopy(model).double()
    inputs = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    probe = CrossAlignmentProbe()
    with torch.no_grad():
        with float64_eager_softmax():
            ref = model(**inputs, output_attentions=True)
        with headmap.observe(model, probes=[probe]):
            model(**inputs)
    dec_real = inputs["decoder_attention_mask"].bool()
    src = ref.cross_attentions[0].shape[-1]
    src_real = inputs["attention_mask"].bool() if "attention_mask" in inputs else torch.ones(3, src, dtype=torch.bool)
    delta = reorder(max(src, HEAD_DIM), (ATTENTION_STAGES + 1) * 6, u=U64)  # six attention calls on the path
    ent, mono = probe.values("cross_entropy"), probe.values("cross_monotonicity")
    assert ent.shape == (len(ref.cross_attentions), 4)
    for layer, attn in enumerate(ref.cross_attentions):
        e, m, tol = brute_cross(attn, dec_real, src_real, delta)
        assert np.abs(ent[layer] - e).max() <= tol
        assert np.all((ent[layer] >= 0) & (ent[layer] <= 1 + tol))
        # Spearman is a function of the argmax ranks alone: with the same argmaxes it is the same number up to
        # float64 rounding of a correlation of at most Tdec terms.
        np.testing.assert_allclose(mono[layer], m, rtol=0, atol=1e-12)
    metrics = {r["metric"] for r in probe.head_rows()}
    assert metrics == {"cross_entropy", "cross_monotonicity"}
    other = CrossAlignmentProbe()
    other.load_state_dict(probe.state_dict())
    assert np.array_equal(other.values("cross_entropy"), ent)


def test_cross_alignment_of_a_planted_diagonal_head():
    """A cross head that reads source position i at output row i has monotonicity 1 and entropy near 0."""
    from headmap.probes.cross_alignment import spearman

    assert spearman(np.arange(5.0), np.array([0.0, 1, 1, 3, 4])) == pytest.approx(0.9746794344808963, abs=1e-15)
    assert math.isnan(spearman(np.arange(3.0), np.zeros(3)))
    assert spearman(np.arange(4.0), np.arange(4.0)[::-1].copy()) == pytest.approx(-1.0, abs=1e-15)


# --------------------------------------------------------------------------------------------
# pai
# --------------------------------------------------------------------------------------------


class Capture(headmap.probes.Probe):
    name = "capture_pai"

    def __init__(self) -> None:
        self.blocks = []

    def update(self, block) -> None:
        if block.tower == "text":
            b = block
            self.blocks.append((b.layer, b.q_start, b.q_end, b.k_start, b.k_end, b.probs.clone()))

    def dense(self, layer, shape):
        out = torch.zeros(shape, dtype=torch.float64)
        for lay, q0, q1, k0, k1, p in self.blocks:
            if lay == layer:
                out[:, :, q0:q1, k0:k1] = p.double()
        return out


def test_pai_neutral_is_the_identity():
    from headmap.edits import make_edits

    model, inputs = BY_NAME["llava"].build()
    (edit,) = make_edits("pai:alpha=1")
    with torch.no_grad():
        with headmap.observe(model):
            plain = model(**inputs).logits
        with headmap.observe(model, edits=[edit]):
            edited = model(**inputs).logits
    assert torch.equal(plain, edited)


@pytest.mark.parametrize("alpha", [2.0, 0.5])
def test_pai_moves_image_mass_as_the_formula_says(alpha, tiny_budget):
    """Layer 0 only: its inputs are unedited, so eager's layer-0 attention A gives the hand computation
    A'[i, j] = alpha^[j image, i text] A[i, j] / (1 + (alpha - 1) m_i), and the image mass
    m' = alpha m / (1 + (alpha - 1) m)."""
    from headmap.edits import Pai

    model, inputs = BY_NAME["llava"].build()
    ids = inputs["input_ids"]
    image = ids == IMAGE_TOKEN
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        ref = model(**inputs, output_attentions=True).attentions[0].double()  # [B, H, T, T]
        cap, probe = Capture(), ModalityMassProbe()
        probe.set_inputs(ids)
        edit = Pai(alpha=alpha, layers=[0])
        with headmap.observe(model, probes=[cap, probe], edits=[edit]):
            model(**inputs)
    got = cap.dense(0, tuple(ref.shape))
    text_q = real & ~image  # [B, T]
    m = (ref * image[:, None, None, :]).sum(-1)  # [B, H, T]
    boost = torch.where(text_q[:, None, :, None] & image[:, None, None, :], alpha, 1.0)
    hand = ref * boost / torch.where(text_q[:, None, :], 1 + (alpha - 1) * m, torch.ones_like(m))[..., None]
    rows = real[:, None, :, None].expand_as(ref)
    # float32 engine (two vision layers, then layer 0) against the float64 hand computation from float32 eager:
    # the engine-vs-eager bound of one probability, scaled by at most max(alpha, 1) / min(1, alpha) (the
    # reweighting's largest gain), plus its own float32 rounding (exp and the division: gamma(4)).
    keys = ids.shape[1]
    gain = max(alpha, 1.0) / min(alpha, 1.0)
    tol = gain * reorder(max(keys, HEAD_DIM), (ATTENTION_STAGES + 1) * 3) + 4 * 2.0**-24
    assert float((got - hand).abs()[rows].max()) <= tol
    # The image mass of every text row that sees the image, and modality_mass with it.
    sees = text_q & (torch.ones(keys, keys, dtype=torch.bool).tril()[None] & image[:, None, :]).any(-1)
    new_m = (got * image[:, None, None, :]).sum(-1)
    formula = alpha * m / (1 + (alpha - 1) * m)
    sel = sees[:, None, :].expand_as(m)
    n_image = int(image.sum(-1).max())
    assert float((new_m - formula).abs()[sel].max()) <= n_image * tol
    assert bool(((new_m > m) if alpha > 1 else (new_m < m))[sel].all())
    per_input = [formula[b][:, sees[b]].mean(-1).numpy() for b in range(ids.shape[0])]
    assert np.abs(probe.values()[0] - np.mean(per_input, axis=0)).max() <= n_image * tol
    # Layer 1 is not edited: its image mass moves only through its (edited) inputs, not by the formula.
    assert edit.applies_to_layer(0) and not edit.applies_to_layer(1)


def test_pai_bad_settings_and_text_models():
    from tiny_models import tiny

    from headmap.edits import make_edits
    from headmap.errors import EditError

    for spec in ("pai:alpha=0", "pai:alpha=-1", "pai:layers=x", "pai:alpha=nan"):
        with pytest.raises(EditError):
            make_edits(spec)
    model, _ = tiny("llama")
    (edit,) = make_edits("pai:alpha=2")
    with pytest.raises(EditError, match="image token id"), headmap.observe(model, edits=[edit]):
        pytest.fail("the body must not run")
