"""bench/engine.py's VLM shape (`qwen2vl2b`): its hand-built inputs make a valid Qwen2-VL forward.

The benchmark builds input_ids, pixel_values and image_grid_thw by hand (Qwen2-VL's processor needs
torchvision, not installed here). Checked on a tiny shape of the same family, built by the bench's own
config and input builders: the layout of the placeholders, the pixel rows the grid implies, a forward under
sdpa and under the engine (both towers observed), and the 2B shape's config without building its weights.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from bounds import eager_bound

BENCH = Path(__file__).resolve().parents[1] / "bench" / "engine.py"


@pytest.fixture(scope="module")
def eng():
    spec = importlib.util.spec_from_file_location("headmap_bench_engine", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


def tiny(eng):
    # Qwen2-VL's vocabulary (its special ids sit at 151643..151656), tiny widths: text head dim 32 / 4 = 8,
    # mrope sections summing to 8 / 2; a 16-wide vision tower of 2 heads on 14 x 14 x 2 patches.
    return eng.VLMShape(
        "qwen2_vl", 1, 4, 2, 32, 64, 151936, "float32", tied=True,
        vision_layers=1, vision_d=16, vision_heads=2, mrope_section=(2, 1, 1), image_tokens=4,
    )  # fmt: skip


def test_vlm_inputs_layout(eng):
    shape = tiny(eng)
    inputs = eng.vlm_inputs(shape, 40, 4)
    ids = inputs["input_ids"][0]
    assert ids.shape == (40,)
    image = (ids == eng.QWEN_IMAGE).nonzero().flatten().tolist()
    assert image == list(range(9, 13))  # 8 text tokens, the start marker, then the run of 4 placeholders
    assert ids[8] == eng.QWEN_VISION_START and ids[13] == eng.QWEN_VISION_END
    text = torch.cat([ids[:8], ids[14:]])
    assert bool((text < eng.QWEN_TEXT_IDS).all())  # no special id drawn as text
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 4]]  # 4 tokens = (4 x 4 patches) / (merge 2)^2
    assert inputs["pixel_values"].shape == (16, 3 * 2 * 14 * 14)
    assert inputs["mm_token_type_ids"].sum() == 4
    assert torch.equal(eng.vlm_inputs(shape, 40, 4)["pixel_values"], inputs["pixel_values"])  # seeded
    with pytest.raises(ValueError, match="square"):
        eng.vlm_inputs(shape, 40, 5)


def test_vlm_forward_sdpa_and_engine(eng):
    import headmap

    shape = tiny(eng)
    args = eng.parse_args(["--_child", "--mode", "headmap", "--T", "40", "--shape", "qwen2vl2b", "--image-tokens", "4"])
    model, inputs, warm = eng.build_vlm(shape, args, "sdpa", torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    # the estimate's weight count: exact but for the q/k/v biases of the text layers
    assert n_params - shape.params(0) == shape.d_model + 2 * shape.kv_heads * shape.head_dim
    with torch.no_grad():
        ref = model(**inputs, use_cache=False).logits
        assert ref.shape == (1, 40, shape.vocab) and bool(torch.isfinite(ref).all())
        probe = headmap.SinkProbe()
        with headmap.observe(model, probes=[probe]) as session:
            model(**warm, use_cache=False)
            out = model(**inputs, use_cache=False).logits
    assert ("vision", 0) in session.layers and 0 in session.layers  # both towers ran through the engine
    assert probe.values().shape[0] == 1
    # engine vs sdpa: the same arithmetic but for the attention sums' order; one text and one vision
    # attention call on the path, at most 40 keys (tests/bounds.py), relative to the logits' magnitude
    bound = eager_bound(keys=40, layers=2, head_dim=8) * float(ref.abs().max())
    assert float((out - ref).abs().max()) <= bound


def test_qwen2vl2b_config_and_args(eng):
    shape = eng.SHAPES["qwen2vl2b"]
    cfg = eng.build_vlm_config(shape, 4096, "float32")  # a config only: no 2.2B weights built
    t, v = cfg.text_config, cfg.vision_config
    assert (t.num_hidden_layers, t.hidden_size, t.num_attention_heads, t.num_key_value_heads) == (28, 1536, 12, 2)
    assert (t.intermediate_size, t.vocab_size) == (8960, 151936)
    assert sum(t.rope_parameters["mrope_section"]) * 2 == 1536 // 12  # sections cover half the head dim
    assert (v.depth, v.embed_dim, v.num_heads, v.patch_size, v.spatial_merge_size) == (32, 1280, 16, 14, 2)
    assert v.hidden_size == t.hidden_size  # the merger projects into the text model
    assert 2.1e9 < shape.params(0) < 2.3e9  # Qwen2-VL-2B: 2.2B parameters
    args = eng.parse_args(["--shape", "qwen2vl2b", "--layers", "8", "--vision-layers", "8", "--lengths", "4096"])
    small = eng.resolve_shape(args)
    assert (small.layers, small.vision_layers, small.image_tokens, small.d_model) == (8, 8, 1024, 1536)
    for bad in (["--image-tokens", "1000"], ["--lengths", "1024"], ["--shape", "gpt2", "--vision-layers", "2"]):
        argv = ["--shape", "qwen2vl2b", *bad] if bad[0] != "--shape" else bad
        with pytest.raises(SystemExit) as err:
            eng.parse_args(argv)
        assert err.value.code == 2
