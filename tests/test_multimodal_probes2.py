"""``visual_sinks``, ``vision_aware`` and ``received`` per modality against brute force from eager attention and
hidden states, and planted heads (tiny random VLMs of tests/mm_models.py)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from bounds import ATTENTION_STAGES, U64, reorder
from mm_models import BY_NAME, HEAD_DIM, IMAGE_TOKEN
from test_architectures import float64_eager_softmax
from test_multimodal_probes import planted_llava, tiny_budget, visible_text_mask  # noqa: F401 - a fixture

import headmap
from headmap.corpus import Batch
from headmap.errors import ProbeError
from headmap.probes import ReceivedProbe, VisionAwareProbe, VisualSinksProbe, make_probes

#: engine-vs-eager bound of one probability on the tiny VLMs: two vision and two text layers, rows of at most
#: T keys (tests/test_multimodal.py derives it); a sum of n probabilities moves by at most n times this
PROB_STAGES = (ATTENTION_STAGES + 1) * 4


def prob_tol(keys: int, u: float = 2.0**-24) -> float:
    return reorder(max(keys, HEAD_DIM), PROB_STAGES, u=u)


def in_float64(model, inputs):
    """The model and its inputs in float64 (eager then needs float64_eager_softmax for a float64 reference)."""
    model = copy.deepcopy(model).double()
    return model, {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}


# --------------------------------------------------------------------------------------------
# visual_sinks
# --------------------------------------------------------------------------------------------


def brute_phi(hidden: torch.Tensor, first: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(phi [B, T], the first token's |x| over lam x median margin [B]) in float64, written from the definition."""
    h = hidden.double()
    phis, margins = [], []
    for b in range(h.shape[0]):
        xf = h[b, first[b]].abs()
        thr = lam * float(np.median(xf.numpy()))
        dims = xf > thr
        margins.append(float((xf - thr).abs().min()))
        rms = h[b].pow(2).mean(-1).sqrt()
        phi = (h[b][:, dims].abs().max(-1).values / rms) if dims.any() else torch.zeros(h.shape[1], dtype=h.dtype)
        phis.append(phi)
    return torch.stack(phis), torch.tensor(margins)


def brute_visual_sinks(attn, hidden, inputs, name, lam, tau):
    """Per layer: (sinks [B, T] bool, visual_sink_mass [H] mean over inputs, phi margin to tau)."""
    ids, real = inputs["input_ids"], inputs["attention_mask"].bool()
    image = ids == IMAGE_TOKEN
    first = real.long().argmax(-1)
    allowed = visible_text_mask(name, inputs)
    rows = real & ~image & (allowed & image[:, None, :]).any(-1)
    out = []
    for layer, a in enumerate(attn):
        phi, dim_margin = brute_phi(hidden[layer], first, lam)
        sinks = image & (phi >= tau)
        sinks[torch.arange(ids.shape[0]), first] = False
        mass = (a.double() * sinks[:, None, None, :]).sum(-1)  # [B, H, T]
        per_input = [mass[b][:, rows[b]].mean(-1).numpy() for b in range(ids.shape[0])]
        margin = float((phi[image] - tau).abs().min())
        out.append((sinks, np.mean(per_input, axis=0), min(margin, float(dim_margin.min()))))
    return out


def run_visual_sinks(model, inputs, probe):
    with torch.no_grad():
        ref = model(**inputs, output_attentions=True, output_hidden_states=True)
        probe.begin(Batch(corpus="t", first=0, samples=[], input_ids=inputs["input_ids"]))
        with headmap.observe(model, probes=[probe]):
            out = model(**inputs, output_hidden_states=True)
        probe.end(None, out)
    return ref, out


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("which, lam", [("llava", 2.0), ("planted", 5.0)])
def test_visual_sinks_equal_brute_force(which, lam, dtype, tiny_budget):  # noqa: F811
    """float32: within the engine-vs-eager bound; float64 (eager with a float64 softmax): within the same chain at
    float64 rounding, far below 1e-6."""
    model, inputs = BY_NAME["llava"].build() if which == "llava" else planted_sink_llava()
    u = 2.0**-24
    if dtype == "float64":
        model, inputs = in_float64(model, inputs)
        u = U64
    with torch.no_grad(), float64_eager_softmax():
        ref = model(**inputs, output_attentions=True, output_hidden_states=True)
    # tau in the widest gap between image tokens' phi at layer 1 (in the middle half for the random model, which
    # has no sink by the paper's tau), so that some image tokens are sinks and others are not
    first = inputs["attention_mask"].argmax(-1)
    phi, _ = brute_phi(ref.hidden_states[1], first, lam)
    vals = np.sort(phi[inputs["input_ids"] == IMAGE_TOKEN].numpy())
    gaps = np.diff(vals)
    lo, hi = (len(vals) // 4, 3 * len(vals) // 4) if which == "llava" else (0, len(gaps))
    k = int(np.argmax(gaps[lo:hi])) + lo
    tau = float(vals[k] + vals[k + 1]) / 2
    probe = VisualSinksProbe(tau=tau, lam=lam)
    _, out = run_visual_sinks(model, inputs, probe)
    brute = brute_visual_sinks(ref.attentions, ref.hidden_states, inputs, "llava", lam, tau)  # a causal mask
    # The engine's hidden states are within a float32 chain bound of eager's (~1e-5 relative, tests/test_multimodal.py);
    # the sink decisions are compared only where phi and the first token's dimensions are further than that from
    # their thresholds, which the test checks rather than assumes.
    real = inputs["attention_mask"].bool()  # padding rows differ (the engine gives them zero attention output)
    drift = max(
        float((a - b)[real].abs().max() / b[real].abs().max())
        for a, b in zip(out.hidden_states, ref.hidden_states, strict=True)
    )
    assert drift < 1e-4
    keys = inputs["input_ids"].shape[1]
    n_image = int((inputs["input_ids"] == IMAGE_TOKEN).sum(-1).max())
    tol = n_image * prob_tol(keys, u)
    if dtype == "float64":
        assert tol < 1e-10
    got = probe.values()
    sinks = probe.sinks()
    total = 0
    for layer, (want_sinks, want_mass, margin) in enumerate(brute):
        assert margin > 100 * drift * max(tau, lam, 1.0)
        start = first
        for b in range(want_sinks.shape[0]):
            want_pos = (torch.nonzero(want_sinks[b]).squeeze(-1) - start[b]).numpy()
            assert np.array_equal(sinks[b][layer], want_pos)
        total += int(want_sinks.sum())
        assert np.abs(got[layer] - want_mass).max() <= tol
    assert total > 0  # some sinks were found and their mass compared
    assert probe.sink_counts()[1] == pytest.approx(float(brute[1][0].sum()) / 3, abs=1e-12)
    rows = probe.head_rows()
    assert {r["metric"] for r in rows} == {"visual_sink_mass"} and all(r["n"] == 3 for r in rows)
    frame = probe.token_frame()
    assert set(frame.metric) == {"sink_dim_value"} and len(frame) == 2 * n_image * 3
    other = VisualSinksProbe(tau=tau, lam=lam)
    other.load_state_dict(probe.state_dict())
    assert np.array_equal(other.values(), got) and other.sink_counts() == probe.sink_counts()


SINK_DIM, SINK_AT, FIRST_ID = 5, 3, 1
SINK_HEAD = (0, 1)


def planted_sink_llava():
    """Tiny Llava (text attention with biases) with a planted visual sink and a head that reads it.

    The first token's embedding holds -30 in hidden dimension 5, and a forward hook on the projector adds +30
    there to image token 3 of every image: both dominate their hidden states, so dimension 5 is the first token's
    massive dimension and phi(image token 3) ~ sqrt(32) ~ 5.6 at layer 0, while other image tokens stay near 1.
    Head 1 of layer 0 gets q = 4 e_3 (a bias) and its kv head k_3 = 4 x_5 (after the RMS norm): the logit of the
    sink is about 4 * 4 * 5.6 / sqrt(8) ~ 32, of the first token about -32, of the others a few units.
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
    torch.manual_seed(43)
    cfg._attn_implementation = "eager"
    model = LlavaForConditionalGeneration(cfg).eval()
    layer, head = SINK_HEAD
    attn = model.model.language_model.layers[layer].self_attn
    kv = head // (attn.config.num_attention_heads // attn.config.num_key_value_heads)
    with torch.no_grad():
        model.model.language_model.embed_tokens.weight[FIRST_ID, SINK_DIM] = -30.0
        q_rows = slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)
        attn.q_proj.weight[q_rows] = 0.0
        attn.q_proj.bias[q_rows] = 0.0
        attn.q_proj.bias[head * HEAD_DIM + 3] = 4.0
        k_rows = slice(kv * HEAD_DIM, (kv + 1) * HEAD_DIM)
        attn.k_proj.weight[k_rows] = 0.0
        attn.k_proj.bias[k_rows] = 0.0
        attn.k_proj.weight[kv * HEAD_DIM + 3, SINK_DIM] = 4.0

    def push(module, args, out):
        out = out.clone()
        out[:, SINK_AT, SINK_DIM] += 30.0
        return out

    model.model.multi_modal_projector.register_forward_hook(push)
    ids, mask = vlm_ids((24, 20, 18), 16, seed=4)
    first = mask.long().argmax(-1)
    ids[torch.arange(3), first] = FIRST_ID
    return model, dict(input_ids=ids, attention_mask=mask, pixel_values=_pixels(3, 3, 16, 16, seed=6))


def test_planted_visual_sink_is_found_and_draws_its_head():
    model, inputs = planted_sink_llava()
    probe = VisualSinksProbe(tau=4.0)  # phi <= sqrt(hidden size) = 5.7 here; the paper's 20 assumes 4096 dims
    ref, _ = run_visual_sinks(model, inputs, probe)
    first = inputs["attention_mask"].argmax(-1)
    phi, _ = brute_phi(ref.hidden_states[0], first, 5.0)
    image = inputs["input_ids"] == IMAGE_TOKEN
    assert float(phi[image].max()) > 5.0 and float(phi[image].sort().values[-4]) < 3.0  # the margin of tau = 4
    for layers in probe.sinks().values():
        assert layers[0].tolist() == [1 + SINK_AT]  # one text token, then the image: its token 3
    values = probe.values()
    assert values[SINK_HEAD] > 0.99
    assert values[SINK_HEAD] > np.delete(values[0], SINK_HEAD[1]).max()  # head 0 shares the planted keys


def test_visual_sinks_bad_settings_and_inputs():
    for spec in ("visual_sinks:tau=0", "visual_sinks:lam=1", "visual_sinks:tau=nan", "visual_sinks:lam=x"):
        with pytest.raises(ProbeError):
            make_probes(spec)
    model, inputs = BY_NAME["llava"].build()
    probe = VisualSinksProbe(tau=3.0)
    probe.set_inputs(inputs["input_ids"])
    with torch.no_grad(), headmap.observe(model, probes=[probe]):
        out = model(**inputs)
    with pytest.raises(ProbeError, match="output_hidden_states"):
        probe.end(None, out)


# --------------------------------------------------------------------------------------------
# vision_aware
# --------------------------------------------------------------------------------------------

IGNORING = (0, 2)


def planted_vision_heads():
    """tests/test_multimodal_probes.planted_llava (layer 0 head 1 reads the image; image features carry +50 in
    hidden dimension 0), with head 0 made uniform (its q zero: it reads the image's values as head 1 does, diluted
    by the text) and head 2 planted to ignore the image: q = 4 e_3 and its kv head's k_3 = -4 x_0, an image logit
    of about -32 (attention ~1e-14 on the image). The values of kv head 0 (heads 0 and 1) are scaled by 20 and the
    output projection's columns of heads 0 and 1 by 1/20: the model computes the same function, but the outputs of
    heads 0 and 1, which the score measures in the units of their values, are 20 times larger (the +50 in dimension
    0 dominates the normalised image states, so the image's content moves them little)."""
    model, inputs = planted_llava()
    attn = model.model.language_model.layers[0].self_attn
    with torch.no_grad():
        attn.v_proj.weight[0:HEAD_DIM] *= 20.0
        attn.v_proj.bias[0:HEAD_DIM] *= 20.0
        attn.o_proj.weight[:, 0 : 2 * HEAD_DIM] /= 20.0
        attn.q_proj.weight[0:HEAD_DIM] = 0.0
        attn.q_proj.bias[0:HEAD_DIM] = 0.0
        head, kv = IGNORING[1], 1
        q_rows = slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)
        attn.q_proj.weight[q_rows] = 0.0
        attn.q_proj.bias[q_rows] = 0.0
        attn.q_proj.bias[head * HEAD_DIM + 3] = 4.0
        k_rows = slice(kv * HEAD_DIM, (kv + 1) * HEAD_DIM)
        attn.k_proj.weight[k_rows] = 0.0
        attn.k_proj.bias[k_rows] = 0.0
        attn.k_proj.weight[kv * HEAD_DIM + 3, 0] = -4.0
    return model, inputs


def test_vision_aware_ranks_the_planted_head_first_and_the_ignoring_head_near_zero():
    from headmap.probes.vision_aware import blank_inputs

    model, inputs = planted_vision_heads()
    probe = VisionAwareProbe()
    per_input = probe.measure(model, inputs)
    values = probe.values()
    assert per_input.shape == (3, 2, 4) and values.shape == (2, 4)
    order = np.dstack(np.unravel_index(np.argsort(-values, axis=None), values.shape))[0]
    assert tuple(order[0]) == (0, 1)
    # The ignoring head, from eager: in layer 0 the text keys and values are the same in both forwards (text
    # embeddings do not depend on the image), so with m, m' its image mass in the two forwards and V the largest
    # value norm of its kv head, ||o - o'|| <= (m + m') V (the text weights move by at most that share) + (m + m') V
    # (the image terms), in exact arithmetic; each float32 output adds its own rounding, at most
    # reorder(T, ATTENTION_STAGES) V (Q K^T, the softmax row sum and P V of at most T terms).
    attn = model.model.language_model.layers[0]
    masses, vmax = [], 0.0
    with torch.no_grad():
        for feed in (inputs, blank_inputs(inputs)):
            ref = model(**feed, output_attentions=True, output_hidden_states=True)
            image = feed["input_ids"] == IMAGE_TOKEN
            a = ref.attentions[0][:, IGNORING[1]].double()  # [B, T, T]
            counted = feed["attention_mask"].bool() & ~image  # real text rows (the probe's rows are among them)
            masses.append(torch.where(counted, (a * image[:, None, :]).sum(-1), 0.0))
            v = attn.self_attn.v_proj(attn.input_layernorm(ref.hidden_states[0]))[..., HEAD_DIM : 2 * HEAD_DIM]
            vmax = max(vmax, float(v.norm(dim=-1).max()))
    m = float((masses[0] + masses[1]).max())
    keys = inputs["input_ids"].shape[1]
    # the engine's image mass is within a relative reorder bound of eager's: at most twice it
    bound = 2 * 2 * m * vmax + 2 * reorder(max(keys, HEAD_DIM), ATTENTION_STAGES) * vmax
    assert m < 1e-10
    assert values[IGNORING] <= bound
    assert values[0, 1] > 1e3 * bound
    rows = probe.head_rows()
    assert {r["metric"] for r in rows} == {"vision_aware"} and all(r["n"] == 3 for r in rows)
    other = VisionAwareProbe()
    other.load_state_dict(probe.state_dict())
    assert np.array_equal(other.values(), values)


def test_vision_aware_bad_inputs():
    from headmap.corpus import Sample

    model, inputs = BY_NAME["llava"].build()
    probe = VisionAwareProbe()
    with pytest.raises(ProbeError, match="no image"):
        probe.measure(model, {k: v for k, v in inputs.items() if k != "pixel_values"})
    text = {"input_ids": inputs["input_ids"].clamp(max=IMAGE_TOKEN - 1), "pixel_values": inputs["pixel_values"]}
    with pytest.raises(ProbeError, match="no image token"):
        probe.measure(model, text)
    assert "image corpus" in probe.applies_to([Sample(ids=[1, 2, 3], info={})])
    with pytest.raises(ProbeError, match="measure"):
        probe.run(model, None, None)


# --------------------------------------------------------------------------------------------
# received per modality
# --------------------------------------------------------------------------------------------


def brute_received_by_modality(attn, inputs, name):
    """Per layer: ([H] image, [H] text) means over inputs of the per-head received attention, from eager."""
    ids, real = inputs["input_ids"], inputs["attention_mask"].bool()
    image = ids == IMAGE_TOKEN
    allowed = visible_text_mask(name, inputs)
    t = ids.shape[1]
    eye = torch.eye(t, dtype=torch.bool)
    out = []
    for a in attn:
        sees = allowed & real[:, :, None] & ~eye[None]  # [B, i, j]: real query i != j sees key j
        mass = (a.double() * sees[:, None]).sum(2)  # [B, H, j]
        count = sees.sum(1)  # [B, j]
        r = mass / count.clamp(min=1)[:, None, :]
        per = []
        for flags in (image, ~image & real):
            vals = [r[b][:, flags[b] & (count[b] > 0)].mean(-1).numpy() for b in range(ids.shape[0])]
            per.append(np.mean(vals, axis=0))
        out.append(per)
    return out


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", ["llava", "paligemma"])
def test_received_by_modality_equals_brute_force(name, dtype, tiny_budget):  # noqa: F811
    model, inputs = BY_NAME[name].build()
    u = 2.0**-24
    if dtype == "float64":
        model, inputs = in_float64(model, inputs)
        u = U64
    probe = ReceivedProbe(modality=True)
    with torch.no_grad():
        with float64_eager_softmax():
            ref = model(**inputs, output_attentions=True).attentions
        probe.set_inputs(inputs["input_ids"])
        with headmap.observe(model, probes=[probe]):
            model(**inputs)
    assert probe.image_token_id == IMAGE_TOKEN
    keys = inputs["input_ids"].shape[1]
    tol = prob_tol(keys, u)  # a mean of probabilities, each within the bound
    rows = probe.head_rows()
    got = {(r["metric"], r["layer"], r["head"]): r["value"] for r in rows}
    assert all(r["n"] == 3 for r in rows)
    for layer, (image, text) in enumerate(brute_received_by_modality(ref, inputs, name)):
        for head in range(4):
            assert abs(got[("received_image", layer, head)] - image[head]) <= tol
            assert abs(got[("received_text", layer, head)] - text[head]) <= tol
    # the per-token rows are still those of received (text tower only), and the state round-trips
    assert set(probe.token_frame().metric) == {"received"}
    other = ReceivedProbe(modality=True)
    other.load_state_dict(probe.state_dict())
    restored = other.head_rows()
    assert len(restored) == len(rows)
    for a, b in zip(restored, rows, strict=True):
        assert {k: v for k, v in a.items() if k not in ("value", "stderr")} == {
            k: v for k, v in b.items() if k not in ("value", "stderr")
        }
        assert a["value"] == b["value"] and (
            a["stderr"] == b["stderr"] or (np.isnan(a["stderr"]) and np.isnan(b["stderr"]))
        )
    plain = ReceivedProbe()
    assert plain.head_rows() == [] and plain.params() == {}


def test_received_by_modality_on_a_text_model_names_the_missing_image_token():
    from tiny_models import padded_batch, tiny

    model, side = tiny("llama")
    ids, mask = padded_batch([6, 4], side)
    probe = ReceivedProbe(modality=True)
    probe.set_inputs(ids)
    with pytest.raises(ProbeError, match="image token id"), torch.no_grad(), headmap.observe(model, probes=[probe]):
        model(input_ids=ids, attention_mask=mask)
    with pytest.raises(ProbeError):
        make_probes("received:modality=3")
