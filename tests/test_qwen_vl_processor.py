"""Qwen2-VL and Qwen2.5-VL image scans with their real processors (``Qwen2VLProcessor``, ``Qwen2_5_VLProcessor``).

Their processors hold a video processor that needs torchvision, which does not import beside the project's
torch 2.13.0 CPU: in the normal suite this module is skipped. ``python3 bench/qwen_vl_processor.py`` builds
``.venv-torchvision/`` (torch 2.14.1, torchvision 0.29.1, headmap editable) and runs it there.

The tiny random Qwen2-VL and Qwen2.5-VL of tests/mm_models.py are saved with a processor assembled offline:
the image processor from its class (patches of 4, merged 2 x 2; the 64 x 64 ``shapes`` pictures resized to
32 x 32 by ``max_pixels``: an 8 x 8 grid of patches, 16 image tokens in a 4 x 4 grid), the video processor
from its class, and a word-level tokenizer made in code with the vision special tokens at the ids of the
models' configs and a Qwen-style chat template (``<|im_start|>user <|vision_start|><|image_pad|><|vision_end|>
text<|im_end|>``). ``headmap scan`` (the CLI, in process) reads ``shapes`` with the default probes that read
image inputs, ``modality_mass`` and ``image_attention``; the test checks the towers of the rows, the image
spans against the processor's token ids, ``modality_mass`` against brute force from eager
``output_attentions`` on batches the processor itself pads, the report's overlays, and ``headmap steer``
with ``pai`` on one picture.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

SKIP = (
    "Qwen2-VL's processor needs torchvision, not importable beside torch 2.13.0: run "
    "python3 bench/qwen_vl_processor.py (its own venv, .venv-torchvision/)"
)
pytest.importorskip("torchvision", reason=SKIP)  # not installed
try:  # PyPI's torchvision beside torch 2.13.0 raises RuntimeError ("operator torchvision::nms does not exist")
    import torchvision  # noqa: F401
except Exception as exc:  # noqa: BLE001
    pytest.skip(f"{SKIP} ({type(exc).__name__}: {str(exc)[:80]})", allow_module_level=True)

import torch  # noqa: E402
from bounds import eager_bound  # noqa: E402
from cli_runner import run  # noqa: E402
from mm_models import BY_NAME, IMAGE_TOKEN, VISION_END, VISION_START, WORDS  # noqa: E402

import headmap  # noqa: E402
from headmap.corpus import load_corpus, prepare_images, shapes_items  # noqa: E402
from headmap.probes import PROBES, default_probe_names  # noqa: E402
from headmap.steer import compare  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

VIDEO_TOKEN = 91
SPECIALS = {
    "<|vision_start|>": VISION_START,
    "<|vision_end|>": VISION_END,
    "<|image_pad|>": IMAGE_TOKEN,
    "<|video_pad|>": VIDEO_TOKEN,
}
#: Qwen2-VL's chat template reduced to what a user turn of images then text needs (the real one also
#: numbers pictures and handles videos and a system turn).
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {% for c in m['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)
LIMIT, BATCH = 4, 2
TEXT_LAYERS, TEXT_HEADS, VISION_LAYERS, VISION_HEADS = 2, 4, 2, 2
IMAGE_TOKENS, GRID = 16, (4, 4)  # 32 x 32 pixels, patches of 4: 8 x 8 patches, merged 2 x 2
PROMPT = "What colour is the square?"
ARCH = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}


def qwen_tokenizer():
    """A word-level fast tokenizer of the tiny models' 97 ids (pad 0, ``</s>`` 2, unknown 3, no BOS) holding
    Qwen's vision tokens at the ids of mm_models' configs, lower-casing, built in code."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "<|im_start|>": 4, "<|im_end|>": 5}
    for word in WORDS:
        if not word.startswith("<"):
            vocab.setdefault(word, len(vocab))
    assert len(vocab) < VISION_START
    vocab.update(SPECIALS)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", *SPECIALS]})
    return fast


def qwen_processor(name: str):
    """The model's real processor class with its real image and video processor classes (torchvision)."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    sizes = dict(patch_size=4, temporal_patch_size=2, merge_size=2)
    images = Qwen2VLImageProcessor(min_pixels=16 * 16, max_pixels=32 * 32, **sizes)
    videos = Qwen2VLVideoProcessor(min_pixels=16 * 16, max_pixels=32 * 32, **sizes)
    cls = Qwen2VLProcessor if name == "qwen2_vl" else Qwen2_5_VLProcessor
    return cls(image_processor=images, tokenizer=qwen_tokenizer(), video_processor=videos, chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def saved(request, tmp_path_factory) -> tuple[str, Path]:
    name = request.param
    folder = tmp_path_factory.mktemp(name) / "model"
    model, _ = BY_NAME[name].build()
    model.config.architectures = [ARCH[name]]
    model.save_pretrained(folder)
    qwen_processor(name).save_pretrained(folder)
    return name, folder


def image_defaults() -> list[str]:
    """The default probes a scan of image inputs runs: those keyed by tower that read any corpus (the others
    are skipped with a reason, tests/test_multimodal_scan.py)."""
    return [n for n in default_probe_names(True) if PROBES[n].tower_aware and PROBES[n].needs.corpus is None]


def user_turn(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


# -- the processor's inputs and headmap's spans --------------------------------------------------------------


def test_spans_come_from_the_processor_token_ids(saved):
    from transformers import AutoProcessor

    name, folder = saved
    proc = AutoProcessor.from_pretrained(folder)
    assert type(proc).__name__ == ("Qwen2VLProcessor" if name == "qwen2_vl" else "Qwen2_5_VLProcessor")
    assert type(proc.image_processor).__name__ == "Qwen2VLImageProcessor"
    assert type(proc.video_processor).__name__ == "Qwen2VLVideoProcessor"
    assert proc.image_token_id == IMAGE_TOKEN
    corpus = prepare_images(load_corpus("shapes", proc.tokenizer, 512, limit=LIMIT), proc, 512)
    items = shapes_items(LIMIT)
    for sample, item in zip(corpus.samples, items, strict=True):
        # the ids are the processor's own on its chat template's prompt (written here, not headmap's)
        text = proc.apply_chat_template(user_turn(item["text"]), add_generation_prompt=True)
        assert text.startswith("<|im_start|>user <|vision_start|><|image_pad|><|vision_end|>")
        made = proc(text=[text], images=[item["image"]], return_tensors="pt")
        ids = made["input_ids"][0].tolist()
        assert sample.ids == ids
        where = [i for i, t in enumerate(ids) if t == IMAGE_TOKEN]
        a, b = where[0], where[-1] + 1
        assert b - a == len(where) == IMAGE_TOKENS  # one contiguous run
        assert ids[a - 1] == VISION_START and ids[b] == VISION_END
        info = sample.info
        assert info["spans"] == {"prompt": [0, a], "image": [a, b], "text": [b, len(ids)]}
        assert info["image_runs"] == [[a, b]] and info["image_grid"] == [list(GRID)]
        extra = info["model_inputs"]
        assert extra["image_grid_thw"].tolist() == [[1, 2 * GRID[0], 2 * GRID[1]]]
        assert extra["pixel_values"].shape == (4 * IMAGE_TOKENS, 3 * 2 * 4 * 4)
        # the multimodal rotary positions read mm_token_type_ids: 1 exactly on the image tokens
        kinds = extra["mm_token_type_ids"][0].tolist()
        assert kinds == [int(t == IMAGE_TOKEN) for t in ids]


# -- the scan through the CLI ----------------------------------------------------------------------------------


def brute_modality_mass(folder: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """modality_mass and image_to_image [layers, heads] from eager ``output_attentions``, on the scan's batches
    (inputs in order, BATCH at a time) padded on the left by the processor itself; the model computes its
    multimodal positions from mm_token_type_ids and the mask. Per input: the mean over its real text rows that
    see an image token (causal: after the image) of the attention summed over the image tokens, and the same
    over its image rows; then the mean over inputs."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    proc = AutoProcessor.from_pretrained(folder)
    proc.tokenizer.padding_side = "left"
    model = AutoModelForImageTextToText.from_pretrained(folder, attn_implementation="eager").eval()
    assert type(model).__name__ == ARCH[name]
    items = shapes_items(LIMIT)
    per_input: list[list[np.ndarray]] = [[], []]
    for start in range(0, LIMIT, BATCH):
        chunk = items[start : start + BATCH]
        texts = [proc.apply_chat_template(user_turn(it["text"]), add_generation_prompt=True) for it in chunk]
        enc = proc(text=texts, images=[it["image"] for it in chunk], padding=True, return_tensors="pt")
        with torch.no_grad():
            attn = model(**enc, output_attentions=True).attentions
        assert len(attn) == TEXT_LAYERS
        ids, real = enc["input_ids"], enc["attention_mask"].bool()
        image = ids == IMAGE_TOKEN
        for b in range(len(chunk)):
            first_image = int(image[b].nonzero()[0])
            text_rows = real[b] & ~image[b] & (torch.arange(ids.shape[1]) > first_image)
            for kind, rows in enumerate((text_rows, real[b] & image[b])):
                mass = [(a[b].double() * image[b]).sum(-1)[:, rows].mean(-1).numpy() for a in attn]  # [H] per layer
                per_input[kind].append(np.stack(mass))
    return np.mean(per_input[0], axis=0), np.mean(per_input[1], axis=0)


def test_scan_shapes_end_to_end(saved, monkeypatch, capsys, tmp_path):
    """``headmap scan DIR --corpus shapes`` with the default image probes, modality_mass and image_attention:
    rows per tower, modality_mass equal to brute force, and a report with the image overlays."""
    name, folder = saved
    out = tmp_path / "run"
    probes = ",".join([*image_defaults(), "modality_mass", "image_attention"])
    code, _, err = run(
        monkeypatch, capsys, "scan", str(folder), "--corpus", "shapes", "--limit", str(LIMIT), "--batch-size",
        str(BATCH), "--probes", probes, "--out", str(out), "--report", "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    heads = pd.read_parquet(out / "heads.parquet")
    defaults = image_defaults()
    assert set(defaults) | {"modality_mass"} <= set(heads.probe)
    assert set(heads.tower) == {"text", "vision"}
    for probe in defaults:  # every default image probe read both towers, every layer and head
        rows = heads[heads.probe == probe]
        for tower, layers, n_heads in (("text", TEXT_LAYERS, TEXT_HEADS), ("vision", VISION_LAYERS, VISION_HEADS)):
            part = rows[rows.tower == tower]
            got = set(zip(part["layer"], part["head"], strict=True))
            assert got == {(l, h) for l in range(layers) for h in range(n_heads)}, (probe, tower)
            assert (part["n"] > 0).all()
    mm = heads[heads.probe == "modality_mass"]
    assert set(mm.tower) == {"text"} and (mm.n == LIMIT).all()
    want_t2i, want_i2i = brute_modality_mass(folder, name)
    # Each probability is within the engine-vs-eager bound of a model of 4 layers (2 vision, 2 text: the
    # image's embeddings come through the vision tower, run by the engine too) over at most 64 keys (the
    # 8 x 8 patches of one picture in the vision tower; the text rows are shorter); a share sums
    # IMAGE_TOKENS of them, and a mean over inputs and rows of such shares stays within the same bound.
    tol = IMAGE_TOKENS * eager_bound(keys=64, layers=4)
    for metric, want in (("modality_mass", want_t2i), ("image_to_image", want_i2i)):
        got = mm[mm.metric == metric].pivot(index="layer", columns="head", values="value").to_numpy()
        assert got.shape == (TEXT_LAYERS, TEXT_HEADS)
        assert np.abs(got - want).max() <= tol, (metric, np.abs(got - want).max(), tol)
    assert (want_t2i > 0).all() and (want_t2i < 1).all()  # the brute force is not vacuous
    # the report: image_attention's overlays on the pictures
    images = pd.read_parquet(out / "images.parquet")
    assert set(images["sample"]) == {0, 1}  # image_attention's default samples
    assert (images["row"].max() + 1, images["col"].max() + 1) == GRID
    per_head = images.groupby(["sample", "layer", "head"])["value"].sum()
    assert ((per_head > 0) & (per_head <= 1 + 1e-6)).all()  # a share of one probability row
    page = (out / "report.html").read_text(encoding="utf-8")
    assert 'id="towers-section"' in page and "vision tower" in page
    section = page[page.index('id="images-section"') :]
    assert section.count('<img alt="L') >= 1  # overlays of the chosen heads on the pictures


# -- steer ------------------------------------------------------------------------------------------------------


def test_steer_pai_on_one_picture(saved, monkeypatch, capsys, tmp_path):
    name, folder = saved
    picture = tmp_path / "p.png"
    shapes_items(1, seed=3)[0]["image"].save(picture)
    code, out, err = run(
        monkeypatch, capsys, "steer", str(folder), "--edit", "pai:alpha=1", "--prompt", PROMPT,
        "--image", str(picture), "--max-new-tokens", "4",
    )  # fmt: skip
    assert code == 0, err
    assert "the edits did not change the greedy generation" in out  # alpha = 1: the identity
    code, out, err = run(
        monkeypatch, capsys, "steer", str(folder), "--edit", "pai:alpha=3", "--prompt", PROMPT,
        "--image", str(picture), "--max-new-tokens", "4",
    )  # fmt: skip
    assert code == 0, err
    assert f"image: {picture}" in out and "without edits" in out and "with edits" in out
    # the steered ids are those of headmap.steer around generate on the processor's own inputs
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    proc = AutoProcessor.from_pretrained(folder)
    result = compare(model, ["pai:alpha=3"], PROMPT, max_new_tokens=4, tokenizer=proc, images=[picture])
    text = proc.apply_chat_template(user_turn(PROMPT), add_generation_prompt=True)
    from PIL import Image

    enc = proc(text=[text], images=[Image.open(picture).convert("RGB")], return_tensors="pt")
    settings = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad(), headmap.steer(model, ["pai:alpha=3"]):
        steered = model.generate(**enc, **settings)
    assert steered[0, enc["input_ids"].shape[1] :].tolist() == result.steered_ids
    assert len(result.without_ids) == 4
    # the edit reached the model: the next-token logits under alpha = 3 move away from those under the
    # neutral alpha = 1 (the same engine route) by more than float32 rounding of this 4-layer model
    # (eager_bound(64, 4) ~ 1.2e-4 relative; the logits are of order one)
    with torch.no_grad():
        with headmap.steer(model, ["pai:alpha=1"]):
            neutral = model(**enc).logits[0, -1]
        with headmap.steer(model, ["pai:alpha=3"]):
            strong = model(**enc).logits[0, -1]
    assert (strong - neutral).abs().max() > 10 * eager_bound(keys=64, layers=4) * neutral.abs().max()
