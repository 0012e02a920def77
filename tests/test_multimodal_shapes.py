"""The built-in image corpus ``shapes``: drawn by code, seeded, questions whose answers the pixels show."""

from __future__ import annotations

import pytest
from conftest import minilm_dir
from PIL import Image

from headmap.corpus import ALL_CORPORA, load_corpus, shapes_items
from headmap.corpus.shapes import BACKGROUNDS, CELLS, COLOURS, KINDS, NUMBERS, PLURAL, cell_box
from headmap.errors import CorpusError


def centre(box):
    left, top, right, bottom = box
    return (left + right) // 2, (top + bottom) // 2 + (bottom - top) // 4  # low in the box: inside a triangle too


def test_pixels_show_the_objects_and_the_answers_follow_from_them():
    items = shapes_items(60, seed=3, size=64)
    assert [it["kind"] for it in items[:6]] == ["colour", "count", "position"] * 2
    for it in items:
        image = it["image"]
        assert isinstance(image, Image.Image) and image.size == (64, 64) and image.mode == "RGB"
        background = tuple(it["background"])
        assert background in BACKGROUNDS
        assert image.getpixel((0, 0)) == background  # the corner is background (cells have margins)
        objects = it["objects"]
        assert 1 <= len(objects) <= 4 and len({o["cell"] for o in objects}) == len(objects)
        for o in objects:
            assert o["colour"] in COLOURS and o["shape"] in KINDS and o["cell"] in CELLS
            assert tuple(o["box"]) == cell_box(o["cell"], 64)
            assert image.getpixel(centre(o["box"])) == COLOURS[o["colour"]]
        for cell in set(CELLS) - {o["cell"] for o in objects}:  # empty cells are plain background
            assert image.getpixel(centre(cell_box(cell, 64))) == background
        kinds = [o["shape"] for o in objects]
        q, a = it["question"], it["answer"]
        assert q in it["text"]
        if it["kind"] == "count":
            shape = next(k for k in KINDS if PLURAL[k] in q)
            assert a == NUMBERS[kinds.count(shape)]
        elif it["kind"] == "colour":
            shape = next(k for k in KINDS if f"the {k}?" in q)
            assert kinds.count(shape) == 1
            assert a == next(o["colour"] for o in objects if o["shape"] == shape)
        else:
            match = [o for o in objects if f"the {o['colour']} {o['shape']}?" in q]
            assert len(match) == 1 and a == match[0]["cell"]
    assert {it["answer"] for it in items if it["kind"] == "count"} >= {"zero", "one"}


def test_seeded_and_sized():
    a, b = shapes_items(6, seed=1), shapes_items(6, seed=1)
    c = shapes_items(6, seed=2)
    assert [x["image"].tobytes() for x in a] == [x["image"].tobytes() for x in b]
    assert [x["question"] for x in a] == [x["question"] for x in b]
    assert [x["image"].tobytes() for x in a] != [x["image"].tobytes() for x in c]
    assert shapes_items(1, size=32)[0]["image"].size == (32, 32)
    with pytest.raises(CorpusError, match="size"):
        shapes_items(1, size=8)


def test_registered_and_loaded_with_a_tokenizer():
    from transformers import AutoTokenizer

    assert "shapes" in ALL_CORPORA and list(ALL_CORPORA)[:4] == ["text", "repeats", "needle", "items"]
    tok = AutoTokenizer.from_pretrained(minilm_dir())
    corpus = load_corpus("shapes:size=48", tok, max_length=64, limit=5, seed=4)
    assert len(corpus) == 5
    for sample, item in zip(corpus.samples, shapes_items(5, seed=4, size=48), strict=True):
        assert sample.ids == list(tok(item["text"])["input_ids"])
        assert sample.info["answer"] == item["answer"] and sample.info["image"].size == (48, 48)
    assert corpus.description["options"] == {"size": 48}
    with pytest.raises(CorpusError, match="max-length"):
        load_corpus("shapes", tok, max_length=4, limit=2)


def test_shapes_pictures_through_an_image_processor_into_a_tiny_vlm():
    """The PIL path end to end, offline: shapes pictures prepared by a CLIP image processor (built in code), a tiny
    Llava under the engine equal to eager, and modality_mass read on them."""
    import numpy as np
    import torch
    from bounds import ATTENTION_STAGES, reorder
    from mm_models import HEAD_DIM, build_llava
    from transformers import CLIPImageProcessorPil

    import headmap
    from headmap.probes import ModalityMassProbe

    model, inputs = build_llava()
    processor = CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    pictures = [item["image"] for item in shapes_items(3, seed=5)]
    pixels = processor(images=pictures, return_tensors="pt")["pixel_values"]
    assert pixels.shape == inputs["pixel_values"].shape
    inputs = dict(inputs, pixel_values=pixels)
    probe = ModalityMassProbe()
    probe.set_inputs(inputs["input_ids"])
    with torch.no_grad():
        ref = model(**inputs).logits
        with headmap.observe(model, probes=[probe]):
            out = model(**inputs).logits
    rows = inputs["attention_mask"].bool()
    # Two CLIP layers and two text layers of at most 24 keys (tests/test_multimodal.py's bound).
    bound = reorder(max(inputs["input_ids"].shape[1], HEAD_DIM), (ATTENTION_STAGES + 1) * 4)
    assert float((out[rows] - ref[rows]).abs().max() / ref[rows].abs().max()) <= bound
    values = probe.values()
    assert values.shape == (2, 4) and np.all((values > 0) & (values < 1))
