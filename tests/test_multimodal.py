"""The engine against eager attention on vision-language models, vision encoders and encoder-decoders.

Tiny random-initialised configurations built in code (tests/mm_models.py; no hub, no files), images as
``pixel_values`` tensors drawn by code. For each architecture of docs/multimodal.md's table:

1. float32 logits (last hidden states for the vision encoders) equal eager's on a padded batch, where
   the model takes an attention mask, within a derived float32 bound;
2. the probabilities probes see equal eager's ``output_attentions`` (text layers of a VLM; encoder,
   decoder and cross-attention of an encoder-decoder; the layers of a vision encoder);
3. float64: the same model in float64 equals eager with a float64 softmax within a float64 bound;
4. generation with a KV cache gives eager's tokens and scores (the generative ones);
5. every block says its tower and whether it is cross-attention (engine/towers.py);

plus a model whose vision tower bypasses AttentionInterface refused by name, and checks that the tiny
configurations exercise what they are meant to (prefix-LM and bidirectional image masks, T5's bias).
"""

from __future__ import annotations

import copy

import pytest
import torch
from bounds import ATTENTION_STAGES, U64, reorder
from mm_models import BY_NAME, HEAD_DIM, MODELS, build_got_ocr2

import headmap
from headmap.engine import registry
from headmap.errors import UnsupportedModelError
from headmap.probes import Probe

# A budget of a few query rows per block at these sizes (several blocks per layer).
TINY_BUDGET = 3000


class Capture(Probe):
    """Every block's tower, layer, rows, keys and probabilities."""

    name = "capture"

    def __init__(self) -> None:
        self.blocks: list[dict] = []

    def update(self, block) -> None:
        self.blocks.append(
            dict(
                tower=block.tower,
                cross=block.is_cross,
                layer=block.layer,
                q=(block.q_start, block.q_end),
                k=(block.k_start, block.k_end),
                probs=block.probs.detach().clone(),
                query_valid=block.query_valid.clone(),
                module=block.module,
            )
        )

    def calls(self) -> set:
        return {(b["tower"], b["layer"]) for b in self.blocks}

    def longest_row(self) -> int:
        return max(b["k"][1] - b["k"][0] for b in self.blocks)

    def dense(self, towers, layer, shape, dtype=torch.float32):
        out = torch.zeros(shape, dtype=dtype)
        rows = torch.zeros(shape[2], dtype=torch.long)
        for b in self.blocks:
            if b["tower"] in towers and b["layer"] == layer:
                (q0, q1), (k0, k1) = b["q"], b["k"]
                out[:, :, q0:q1, k0:k1] = b["probs"]
                rows[q0:q1] += 1
        return out, rows


def bound(cap: Capture, u: float = 2.0**-24) -> float:
    """Engine against eager: per attention call on the path to the output, the ATTENTION_STAGES sums plus one
    elementwise stage (tests/bounds.py), each of at most max(longest row, head dim) terms; the calls are the
    (tower, layer) pairs the engine saw (vision layers, then text layers; encoder, decoder and cross)."""
    return reorder(max(cap.longest_row(), HEAD_DIM), (ATTENTION_STAGES + 1) * len(cap.calls()), u=u)


def main_output(out) -> torch.Tensor:
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state


def output_rows(entry, inputs) -> torch.Tensor | None:
    """[B, T] bool: the output rows that hold real tokens (None: every row)."""
    if entry.kind == "seq2seq":
        return inputs["decoder_attention_mask"].bool()
    if entry.kind == "vlm":
        return inputs["attention_mask"].bool()
    return None


def rel_err(a, b, rows) -> float:
    if rows is not None:
        a, b = a[rows], b[rows]
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def built():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = BY_NAME[name].build()
        return cache[name]

    return get


@pytest.fixture
def tiny_budget():
    old = headmap.engine_config.budget_bytes
    headmap.engine_config.budget_bytes = TINY_BUDGET
    try:
        yield
    finally:
        headmap.engine_config.budget_bytes = old


NAMES = [pytest.param(m.name, id=m.name) for m in MODELS]
GENERATIVE = [pytest.param(m.name, id=m.name) for m in MODELS if m.kind != "vision"]


@pytest.mark.parametrize("name", NAMES)
def test_fp32_outputs_match_eager(name, built, tiny_budget):
    entry = BY_NAME[name]
    model, inputs = built(name)
    with torch.no_grad():
        ref = main_output(model(**inputs))
        cap = Capture()
        with headmap.observe(model, probes=[cap]):
            assert model.config._attn_implementation == "headmap"
            out = main_output(model(**inputs))
    assert model.config._attn_implementation == "eager" and registry.active() == ()
    assert len(cap.blocks) > 2 * len(cap.calls())  # the engine ran, in several blocks per call
    rows = output_rows(entry, inputs)
    assert torch.isfinite(out if rows is None else out[rows]).all()
    assert rel_err(out, ref, rows) <= bound(cap)


def _reference_families(entry, ref) -> list[tuple[tuple[str, ...], tuple, str]]:
    """(towers, eager attentions per layer, which rows are real) for each family eager returns."""
    if entry.kind == "seq2seq":
        return [
            (("encoder",), ref.encoder_attentions, "encoder"),
            (("decoder",), ref.decoder_attentions, "decoder"),
            (("cross",), ref.cross_attentions, "decoder"),
        ]
    if entry.kind == "vision":
        return [(("vision",), ref.attentions, "all")]
    return [(("text", "cross"), ref.attentions, "text")]  # Mllama's cross-attention layers are text layers


@pytest.mark.parametrize("name", NAMES)
def test_probabilities_match_eager(name, built, tiny_budget):
    entry = BY_NAME[name]
    model, inputs = built(name)
    with torch.no_grad():
        ref = model(**inputs, output_attentions=True)
        cap = Capture()
        with headmap.observe(model, probes=[cap]):
            model(**inputs)
    tol = bound(cap)
    for towers, attentions, rows_of in _reference_families(entry, ref):
        assert attentions is not None and len(attentions) >= 1
        for layer, expected in enumerate(attentions):
            got, rows = cap.dense(towers, layer, tuple(expected.shape))
            assert torch.equal(rows, torch.ones_like(rows)), f"{towers} layer {layer}: rows not covered once"
            if rows_of == "encoder" and "attention_mask" in inputs:
                valid = inputs["attention_mask"].bool()
            elif rows_of == "decoder":
                valid = inputs["decoder_attention_mask"].bool()
            elif rows_of == "text":
                valid = inputs["attention_mask"].bool()
            else:
                valid = torch.ones(expected.shape[0], expected.shape[2], dtype=torch.bool)
            sel = valid[:, None, :, None].expand_as(expected)
            diff = float((got - expected.float()).abs()[sel].max())
            assert diff <= tol, f"{towers} layer {layer}: max |p - p_eager| = {diff:.3g} > {tol:.3g}"


@pytest.mark.parametrize("name", NAMES)
def test_fp64_matches_eager_with_float64_softmax(name, built, tiny_budget):
    from test_architectures import float64_eager_softmax

    entry = BY_NAME[name]
    model, inputs = built(name)
    model = copy.deepcopy(model).double()
    inputs = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    with torch.no_grad():
        with float64_eager_softmax():
            ref = main_output(model(**inputs))
        cap = Capture()
        with headmap.observe(model, probes=[cap]):
            out = main_output(model(**inputs))
    assert out.dtype == torch.float64 and cap.blocks[0]["probs"].dtype == torch.float64
    # The same chain as the float32 bound, at float64 rounding (~1e-13): a wrong mask, bias or position
    # moves the output by 1e-2 or more.
    assert rel_err(out, ref, output_rows(entry, inputs)) <= bound(cap, u=U64)


@pytest.mark.parametrize("name", GENERATIVE)
def test_generate_matches_eager(name, built, tiny_budget):
    model, inputs = built(name)
    kw = dict(
        max_new_tokens=4,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
        return_dict_in_generate=True,
        output_logits=True,  # the raw logits: scores hold -inf where a processor forces a token (BART)
    )
    with torch.no_grad():
        ref = model.generate(**inputs, **kw)
        cap = Capture()
        with headmap.observe(model, probes=[cap], commit="manual"):
            out = model.generate(**inputs, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    assert len(out.logits) == 4
    # Decoding steps are single-row blocks with the cache's keys.
    assert any(b["q"] == (0, 1) and b["k"][1] > 1 and not b["cross"] for b in cap.blocks)
    tol = bound(cap)
    for got, exp in zip(out.logits, ref.logits, strict=True):
        assert float((got - exp).abs().max() / exp.abs().max()) <= tol


# --------------------------------------------------------------------------------------------
# Towers
# --------------------------------------------------------------------------------------------

EXPECTED_TOWERS = {
    "llava": {"text", "vision"},
    "qwen2_vl": {"text", "vision"},
    "qwen2_5_vl": {"text", "vision"},
    "gemma3": {"text", "vision"},
    "idefics3": {"text", "vision"},
    "paligemma": {"text", "vision"},
    "mllama": {"text", "vision", "cross"},
    "vit": {"vision"},
    "clip": {"vision"},
    "siglip": {"vision"},
    "t5": {"encoder", "decoder", "cross"},
    "bart": {"encoder", "decoder", "cross"},
    "whisper": {"encoder", "decoder", "cross"},
}


@pytest.mark.parametrize("name", NAMES)
def test_blocks_name_their_tower(name, built):
    model, inputs = built(name)
    cap = Capture()
    with torch.no_grad(), headmap.observe(model, probes=[cap]):
        model(**inputs)
    assert {b["tower"] for b in cap.blocks} == EXPECTED_TOWERS[name]
    paths = {id(m): p for p, m in model.named_modules()}
    for b in cap.blocks:
        assert b["cross"] == (b["tower"] == "cross")
        path = paths[id(b["module"])]
        if b["tower"] == "vision" and BY_NAME[name].kind == "vlm":
            assert any(part in path for part in ("vision", "visual")), path
        if b["tower"] in ("encoder", "decoder"):
            assert f"{b['tower']}." in path, path
    if "cross" in EXPECTED_TOWERS[name]:
        # A cross-attention call reads keys of another sequence: its rows are as long as the source.
        cross = [b for b in cap.blocks if b["cross"]]
        source = inputs["input_ids"].shape[1] if "input_ids" in inputs and BY_NAME[name].kind == "seq2seq" else None
        if source is not None:
            assert all(b["k"] == (0, source) for b in cross)
        assert all(b["probs"].shape[-1] == b["k"][1] - b["k"][0] for b in cross)


def test_text_models_are_the_text_tower():
    from tiny_models import padded_batch, tiny

    from headmap.engine.towers import tower_of

    assert tower_of(torch.nn.Linear(1, 1), None) == ("text", False)  # a module no session owns
    for kind in ("llama", "gpt2", "bert"):  # BERT's "encoder" is no encoder-decoder's encoder
        model, side = tiny(kind)
        ids, mask = padded_batch([6, 4], side)
        cap = Capture()
        with torch.no_grad(), headmap.observe(model, probes=[cap]):
            model(input_ids=ids, attention_mask=mask)
        assert cap.blocks and {(b["tower"], b["cross"]) for b in cap.blocks} == {("text", False)}


# --------------------------------------------------------------------------------------------
# The tiny configurations exercise what the tests claim
# --------------------------------------------------------------------------------------------


def _logits(model, inputs):
    with torch.no_grad():
        return main_output(model(**inputs))


def test_paligemma_prefix_is_bidirectional(built, tiny_budget):
    """Prefix rows see later prefix keys under the engine, and making the prefix causal changes the logits."""
    model, inputs = built("paligemma")
    cap = Capture()
    with torch.no_grad(), headmap.observe(model, probes=[cap]):
        model(**inputs)
    text = [b for b in cap.blocks if b["tower"] == "text"]
    assert any(b["k"][1] > b["q"][1] for b in text)  # keys after the block's last row: not causal
    causal = dict(inputs, token_type_ids=torch.ones_like(inputs["token_type_ids"]))
    rows = inputs["attention_mask"].bool()
    assert rel_err(_logits(model, causal), _logits(model, inputs), rows) > 0.05


def test_gemma3_image_tokens_see_each_other(built):
    model, inputs = built("gemma3")
    causal = dict(inputs, token_type_ids=torch.zeros_like(inputs["token_type_ids"]))
    rows = inputs["attention_mask"].bool()
    assert rel_err(_logits(model, causal), _logits(model, inputs), rows) > 0.05


def test_t5_relative_bias_matters(built):
    model, inputs = built("t5")
    other = copy.deepcopy(model)
    with torch.no_grad():
        for m in other.modules():
            if getattr(m, "has_relative_attention_bias", False):
                m.relative_attention_bias.weight.zero_()
    rows = inputs["decoder_attention_mask"].bool()
    assert rel_err(_logits(other, inputs), _logits(model, inputs), rows) > 0.01  # 100 times the bounds above


def test_qwen2_vl_rotary_positions_are_multimodal(built):
    """Without mm_token_type_ids the model falls back to 1D positions: the logits change."""
    model, inputs = built("qwen2_vl")
    flat = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
    rows = inputs["attention_mask"].bool()
    try:
        changed = rel_err(_logits(model, flat), _logits(model, inputs), rows)
    except ValueError:  # this transformers refuses images without the token types outright
        changed = 1.0
    assert changed > 0.01


# --------------------------------------------------------------------------------------------
# A tower outside AttentionInterface
# --------------------------------------------------------------------------------------------


def test_tower_bypassing_attention_interface_is_refused_by_name(monkeypatch):
    model, _ = build_got_ocr2()
    with pytest.raises(UnsupportedModelError) as err, headmap.observe(model):
        pytest.fail("the body must not run")
    assert "'got_ocr2'" in str(err.value)
    # Even where transformers lets the implementation be set, the vision tower is named.
    monkeypatch.setattr(type(model), "_can_set_attn_implementation", classmethod(lambda cls: True))
    with pytest.raises(UnsupportedModelError) as err, headmap.observe(model):
        pytest.fail("the body must not run")
    msg = str(err.value)
    assert "'got_ocr2'" in msg and "vision tower" in msg and "GotOcr2VisionAttention" in msg
    assert model.config._attn_implementation == "eager" and registry.active() == ()
