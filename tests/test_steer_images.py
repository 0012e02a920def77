"""``headmap steer`` on vision-language models: --image pictures and image --corpus inputs, prepared by the
model's own processor with its chat template (as a scan prepares image corpora), generated without and with
the VLM edits; bad inputs get one line and exit code 2.

The tiny random Llava and Idefics3 (SmolVLM's family) of tests/mm_models.py are saved with processors built
from transformers' classes, so they load like real checkpoints (as in tests/test_multimodal_scan.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_runner import assert_one_line_error, run
from mm_models import IMAGE_TOKEN, save_idefics3, save_llava

import headmap
from headmap.corpus import shapes_items
from headmap.steer import compare, compare_corpus

pytestmark = pytest.mark.filterwarnings("ignore:.*torchvision.*")

PROMPT = "What colour is the square?"


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory) -> Path:
    return save_llava(tmp_path_factory.mktemp("tiny-llava") / "llava")


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("pictures")
    paths = []
    for i, item in enumerate(shapes_items(2, seed=3)):
        paths.append(folder / f"p{i}.png")
        item["image"].save(paths[-1])
    return paths


def test_neutral_edit_on_an_image_gives_the_base_generation(monkeypatch, capsys, llava_dir, pictures):
    code, out, err = run(
        monkeypatch, capsys, "steer", str(llava_dir), "--edit", "pai:alpha=1", "--prompt", PROMPT,
        "--image", str(pictures[0]), "--max-new-tokens", "5",
    )  # fmt: skip
    assert code == 0, err
    assert "edit: pai(alpha=1.0, layers=None) on every head" in out
    assert f"image: {pictures[0]}" in out and f"prompt: {PROMPT}" in out
    assert "without edits" in out and "with edits" in out
    assert "the edits did not change the greedy generation" in out
    result = compare(str(llava_dir), ["pai:alpha=1"], PROMPT, max_new_tokens=5, images=[pictures[0]])
    assert result.identical and result.without == result.steered and len(result.without_ids) == 5
    assert result.images == [str(pictures[0])] and result.item is None


def test_compare_with_images_equals_steer_around_generate_on_the_processor_inputs(llava_dir, pictures):
    """The steered ids of ``compare(images=)`` are those of ``headmap.steer`` around ``generate`` on the inputs the
    model's processor makes from its chat template (a user turn of the pictures, then the text), built here by
    hand; both images of the input reach the model (its ids hold 2 x 16 image tokens)."""
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
    proc = AutoProcessor.from_pretrained(llava_dir)
    result = compare(model, ["pai:alpha=3"], PROMPT, max_new_tokens=6, tokenizer=proc, images=pictures)
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": PROMPT}]
    text = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    images = [Image.open(p).convert("RGB") for p in pictures]
    enc = proc(text=[text], images=images, return_tensors="pt")
    assert enc["input_ids"][0].tolist().count(IMAGE_TOKEN) == 32
    settings = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad(), headmap.steer(model, ["pai:alpha=3"]):
        out = model.generate(**enc, **settings)
    assert out[0, enc["input_ids"].shape[1] :].tolist() == result.steered_ids
    assert result.images == [str(p) for p in pictures]


def test_pai_on_the_shapes_corpus_runs_and_prints_each_input(monkeypatch, capsys, llava_dir):
    code, out, err = run(
        monkeypatch, capsys, "steer", str(llava_dir), "--edit", "pai:alpha=3", "--corpus", "shapes",
        "--limit", "3", "--max-new-tokens", "4",
    )  # fmt: skip
    assert code == 0, err
    assert out.count("edit: pai(alpha=3.0") == 1  # the edits once, then each input
    items = shapes_items(3)
    for i, item in enumerate(items):
        assert f"input: shapes input {i} (known answer: {item['answer']})" in out
        assert f"prompt: {item['text']}" in out
    assert out.count("without edits") == 3
    results = compare_corpus(str(llava_dir), ["pai:alpha=3"], "shapes", limit=3, max_new_tokens=4)
    assert [r.item for r in results] == [f"shapes input {i}" for i in range(3)]
    assert all(len(r.without_ids) == len(r.steered_ids) == 4 for r in results)
    # alpha = 3 triples the odds of every image key for text queries: on this random model it changes the
    # greedy tokens of the inputs (each of the three here), so the edit reached the model
    assert not any(r.identical for r in results)


@pytest.mark.parametrize(
    "edit",
    [
        "var:p=0.9:tau=1",
        "vhr:heads=[[1,2]]:factor=2",
        "scale_span:span=image:factor=3",
        "ablate:heads=[[1,0]]",
        "scale_span:span=[2,6]:factor=2",
    ],
)
def test_vlm_edits_run_on_an_image(monkeypatch, capsys, llava_dir, pictures, edit):
    code, out, err = run(
        monkeypatch, capsys, "steer", str(llava_dir), "--edit", edit, "--prompt", PROMPT,
        "--image", str(pictures[1]), "--max-new-tokens", "3",
    )  # fmt: skip
    assert code == 0, err
    assert "without edits" in out and f"image: {pictures[1]}" in out


def test_idefics3_steers_the_shapes_corpus_and_a_neutral_edit_changes_nothing(monkeypatch, capsys, tmp_path):
    folder = save_idefics3(tmp_path / "idefics3")
    code, out, err = run(
        monkeypatch, capsys, "steer", str(folder), "--edit", "pai:alpha=1", "--edit", "scale_span:span=image:factor=1",
        "--corpus", "shapes", "--limit", "2", "--max-new-tokens", "4",
    )  # fmt: skip
    assert code == 0, err
    assert out.count("the edits did not change the greedy generation") == 2
    assert "input: shapes input 1" in out
    code, out, err = run(
        monkeypatch, capsys, "steer", str(folder), "--edit", "pai:alpha=3", "--corpus", "shapes", "--limit", "2",
        "--max-new-tokens", "4",
    )  # fmt: skip
    assert code == 0, err
    assert out.count("without edits") == 2


def test_jsonl_image_corpus_names_its_lines(monkeypatch, capsys, llava_dir, pictures, tmp_path):
    path = tmp_path / "images.jsonl"
    lines = [
        {"image": str(pictures[0]), "text": "What colour is the circle?"},
        {"image": [str(pictures[0]), str(pictures[1])], "text": "How many squares are there?"},
        {"image": str(pictures[1]), "text": "Where is the red square?"},
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    code, out, err = run(
        monkeypatch, capsys, "steer", str(llava_dir), "--edit", "pai:alpha=2", "--corpus", str(path),
        "--limit", "2", "--max-new-tokens", "3",
    )  # fmt: skip
    assert code == 0, err
    assert "input: images.jsonl line 1" in out and "input: images.jsonl line 2" in out
    assert "line 3" not in out and out.count("without edits") == 2
    assert "prompt: How many squares are there?" in out


# -- bad inputs: one line, exit 2, nothing generated -------------------------------------------------------


def test_image_edits_on_a_prompt_without_an_image(monkeypatch, capsys, llava_dir):
    for edit, needles in (
        ("pai:alpha=3", ("pai", "has no image token (id 90)", "--image")),
        ("var", ("var", "has no image token")),
        ("scale_span:span=image:factor=2", ("scale_span", "has no image token")),
    ):
        code, out, err = run(monkeypatch, capsys, "steer", str(llava_dir), "--edit", edit, "--prompt", PROMPT)
        assert_one_line_error(code, err, *needles)
        assert "without edits" not in out


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (("--image", "{missing}"), ("--image", "does not exist")),
        (("--image", "{fake}"), ("--image", "is not an image Pillow can read")),
        (("--corpus", "shapes"), ("either --corpus or --prompt",)),
        (("--edit", 'scale_span:span="square":factor=2', "--image", "{ok}"), ("span 'square' is text", "span=image")),
        (("--edit", "scale_span:span=[0,400]:factor=2", "--image", "{ok}"), ("outside input 0", "image tokens")),
    ],
    ids=["missing", "not-an-image", "prompt-and-corpus", "text-span", "span-too-long"],
)
def test_bad_image_inputs(monkeypatch, capsys, llava_dir, pictures, tmp_path, args, needles):
    (tmp_path / "fake.png").write_bytes(b"this is not a picture")
    names = {"missing": tmp_path / "missing.png", "fake": tmp_path / "fake.png", "ok": pictures[0]}
    filled = [a.format(**names) for a in args]
    if "--edit" not in filled:
        filled = ["--edit", "pai:alpha=3", *filled]
    code, out, err = run(monkeypatch, capsys, "steer", str(llava_dir), "--prompt", PROMPT, *filled)
    assert_one_line_error(code, err, *needles)
    assert "without edits" not in out


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (("--corpus", "shapes", "--image", "x.png"), ("either --corpus or --prompt",)),
        (("--limit", "2", "--prompt", "hi"), ("--limit counts the inputs of --corpus",)),
        (("--corpus", "shapes", "--limit", "0"), ("--limit must be at least 1",)),
    ],
)
def test_bad_options(monkeypatch, capsys, llava_dir, args, needles):
    code, _, err = run(monkeypatch, capsys, "steer", str(llava_dir), "--edit", "pai:alpha=3", *args)
    assert_one_line_error(code, err, *needles)


def test_a_text_corpus_is_refused(monkeypatch, capsys, llava_dir, tmp_path):
    text = tmp_path / "plain.txt"
    text.write_text("what colour is the square\n")
    code, _, err = run(monkeypatch, capsys, "steer", str(llava_dir), "--edit", "pai:alpha=3", "--corpus", str(text))
    assert_one_line_error(code, err, "holds no images", "--prompt")


@pytest.mark.parametrize("args", [("--prompt", "the cat sat", "--image", "{ok}"), ("--corpus", "shapes")])
def test_images_on_a_text_model(monkeypatch, capsys, tiny_llama_dir, pictures, args):
    filled = [a.format(ok=pictures[0]) for a in args]
    code, out, err = run(monkeypatch, capsys, "steer", str(tiny_llama_dir), "--edit", "ablate:heads=[[0,0]]", *filled)
    assert_one_line_error(code, err, "has no image processor", "--prompt alone")
    assert "without edits" not in out


def test_a_model_object_without_its_processor(llava_dir, pictures):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from headmap.errors import CorpusError

    model = LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
    tok = AutoProcessor.from_pretrained(llava_dir).tokenizer
    with pytest.raises(CorpusError, match="has no image processor.*pass its processor as tokenizer="):
        compare(model, ["pai:alpha=3"], PROMPT, tokenizer=tok, images=pictures[0])


def test_scan_report_and_steer_end_to_end_on_shapes(monkeypatch, capsys, llava_dir, tmp_path):
    """Issue 14, point 6: on the shapes corpus, a scan with its report, then steer with a heads rule read from
    that scan (the most vision-aware heads, reinforced as VHR does)."""
    out = tmp_path / "run"
    code, _, err = run(
        monkeypatch, capsys, "scan", str(llava_dir), "--corpus", "shapes", "--limit", "3", "--batch-size", "3",
        "--probes", "sink,modality_mass,vision_aware", "--out", str(out), "--report", "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    assert (out / "report.html").is_file()
    code, text, err = run(
        monkeypatch, capsys, "steer", str(llava_dir), "--edit", 'vhr:heads="top 25% vision_aware":factor=2',
        "--atlas", str(out), "--corpus", "shapes", "--limit", "2", "--max-new-tokens", "3",
    )  # fmt: skip
    assert code == 0, err
    top = headmap.Atlas.load(out).top("vision_aware", k=2)
    names = ", ".join(sorted(f"L{int(r.layer)}H{int(r.head)}" for r in top.itertuples()))
    assert f"vhr(factor=2.0) on 2 heads (top 25% vision_aware): {names}" in text
    assert text.count("without edits") == 2


def test_neither_prompt_nor_corpus_gets_the_usage_message(monkeypatch, capsys, llava_dir):
    code, _, err = run(monkeypatch, capsys, "steer", str(llava_dir), "--edit", "pai:alpha=3")
    assert code == 2 and err.startswith("Usage: headmap steer ") and "Missing option '--prompt'" in err, err
    assert "Traceback" not in err
