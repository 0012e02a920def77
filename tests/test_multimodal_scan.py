"""``headmap scan`` on image inputs: rows per tower that equal brute force, image corpora, report, bad inputs.

A tiny random Llava (tests/mm_models.py) is saved with a processor built from transformers' classes and a
word-level tokenizer made in code, so the scan loads it like a real checkpoint. Its CLIP vision tower and
its Llama text model both have two layers: the hazard of keying probe sums by layer alone.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from bounds import eager_bound
from cli_runner import assert_one_line_error, run
from mm_models import IMAGE_TOKEN, save_llava

import headmap
from headmap.atlas import Atlas, main_tower
from headmap.corpus import load_corpus, pad_batch, prepare_images, shapes_items
from headmap.corpus.images import collate
from headmap.edits import select_heads
from headmap.models import position_ids
from headmap.probes import SinkProbe
from headmap.scan.distributed import merge_states

pytestmark = pytest.mark.filterwarnings("ignore:.*torchvision.*")


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory) -> Path:
    return save_llava(tmp_path_factory.mktemp("tiny-llava") / "llava")


def brute_sink(llava_dir: Path, limit: int, batch: int) -> dict[str, np.ndarray]:
    """sink per tower from eager ``output_attentions``: [layers, heads], each input weighing the same.

    Text: per input, the mean over its real query rows i >= 1 of A[i, first real token]; vision (CLIP, no
    padding): per image, the mean over rows i >= 1 of A[i, 0]. The batches are the scan's (left padding,
    positions from each input's first real token)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(llava_dir, attn_implementation="eager").eval()
    proc = AutoProcessor.from_pretrained(llava_dir)
    corpus = prepare_images(load_corpus("shapes", proc.tokenizer, 512, limit=limit), proc, 512, model)
    per_input: dict[str, list[np.ndarray]] = {"text": [], "vision": []}
    for start in range(0, limit, batch):
        samples = corpus.samples[start : start + batch]
        ids, mask = pad_batch([s.ids for s in samples], 0, left_pad=True)
        extra = collate(samples, ids.shape[1], True, "cpu")
        with torch.no_grad():
            out = model(
                input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), output_attentions=True, **extra
            )
            vis = model.model.vision_tower(extra["pixel_values"], output_attentions=True)
        width = ids.shape[1]
        for b, s in enumerate(samples):
            first = width - len(s.ids)
            per_input["text"].append(
                np.stack([a[b, :, first + 1 :, first].double().mean(dim=-1).numpy() for a in out.attentions])
            )
            per_input["vision"].append(np.stack([a[b, :, 1:, 0].double().mean(dim=-1).numpy() for a in vis.attentions]))
    return {t: np.mean(v, axis=0) for t, v in per_input.items()}


def test_scan_keeps_towers_apart_and_each_equals_brute_force(llava_dir):
    limit, batch = 4, 2
    atlas = headmap.scan(str(llava_dir), probes="sink", corpus="shapes", limit=limit, batch_size=batch, progress=False)
    heads = atlas.heads
    assert set(heads["tower"]) == {"text", "vision"}
    text, vision = heads[heads.tower == "text"], heads[heads.tower == "vision"]
    # the same layer numbers in both towers: a table keyed by layer alone would have mixed them
    assert set(text.layer) == set(vision.layer) == {0, 1}
    assert len(text) == 2 * 4 and len(vision) == 2 * 2  # text: 4 heads a layer; CLIP tower: 2
    assert (heads.n == limit).all()
    want = brute_sink(llava_dir, limit, batch)
    # the text layers read the vision tower's output: a chain of 2 + 2 layers of at most 36 keys
    bound = eager_bound(keys=64, layers=4)
    for tower, rows in (("text", text), ("vision", vision)):
        got = np.full(want[tower].shape, np.nan)
        got[rows.layer.to_numpy(), rows["head"].to_numpy()] = rows.value.to_numpy()
        assert np.abs(got - want[tower]).max() <= bound, (tower, got, want[tower])
    # the two towers' numbers differ: nothing was shared
    assert not np.allclose(want["text"][:, :2], want["vision"])
    # what reads one tower by default reads the text model: top, grid, rules
    assert main_tower(heads) == "text"
    assert set(atlas.top("sink", k=100).layer) == {0, 1} and len(atlas.top("sink", k=100)) == 8
    assert atlas.grid("sink").shape == (2, 4)
    top2 = text.sort_values("value", ascending=False).head(2)
    assert select_heads("top 2 sink", atlas) == sorted(zip(top2.layer, top2["head"], strict=True))
    assert len(atlas.top("sink", k=100, tower="vision")) == 4


def test_tower_state_saves_loads_and_merges(llava_dir):
    probe = SinkProbe()
    headmap.scan(str(llava_dir), probes=[probe], corpus="shapes", limit=2, batch_size=2, progress=False)
    state = probe.state_dict()
    assert sorted(k for k in state if ":" in k) == [
        f"{kind}.vision:{layer}:2" for kind in ("count", "total", "total_sq") for layer in (0, 1)
    ]
    again = SinkProbe()
    again.load_state_dict(state)
    assert again.head_rows() == probe.head_rows()
    twice = SinkProbe()
    twice.load_state_dict(merge_states([state, state]))  # two ranks that saw the same inputs
    rows = pd.DataFrame(twice.head_rows())
    assert (rows.n == 4).all() and set(rows.tower) == {"text", "vision"}
    one = pd.DataFrame(probe.head_rows())
    assert np.array_equal(rows.value.to_numpy(), one.value.to_numpy())  # sums doubled, means as they were


def test_shapes_scan_writes_tables_with_tower_and_a_report_with_overlays(monkeypatch, capsys, llava_dir, tmp_path):
    out = tmp_path / "run"
    code, _, err = run(
        monkeypatch, capsys, "scan", str(llava_dir), "--corpus", "shapes", "--limit", "3", "--batch-size", "2",
        "--probes", "sink,entropy,modality_mass,image_attention", "--out", str(out), "--report", "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    heads = pd.read_parquet(out / "heads.parquet")
    assert set(heads.tower) == {"text", "vision"}
    assert set(heads[heads.probe == "modality_mass"].tower) == {"text"}  # it reads the text model only
    assert set(heads[heads.probe == "entropy"].tower) == {"text", "vision"}
    images = pd.read_parquet(out / "images.parquet")
    assert set(images["sample"]) == {0, 1} and images["row"].max() == 3 and images["col"].max() == 3  # 4 x 4 grid
    per_head = images.groupby(["sample", "layer", "head"])["value"].sum()
    assert ((per_head > 0) & (per_head <= 1 + 1e-6)).all()  # a share of one probability row
    mass = heads[(heads.probe == "modality_mass") & (heads.metric == "modality_mass")]
    assert mass.value.between(0, 1).all()
    page = (out / "report.html").read_text(encoding="utf-8")
    assert 'id="towers-section"' in page and "vision tower" in page
    section = page[page.index('id="images-section"') :]
    assert section.count('<img alt="L') == 6  # one figure per chosen head
    loaded = Atlas.load(out)
    assert len(loaded.images) == len(images) and set(loaded.heads.tower) == {"text", "vision"}


def test_jsonl_image_corpus_with_one_and_two_images(llava_dir, tmp_path):
    from transformers import AutoProcessor

    pictures = shapes_items(2, seed=4, size=32)
    for i, item in enumerate(pictures):
        item["image"].save(tmp_path / f"p{i}.png")
    lines = [
        {"image": "p0.png", "text": "What colour is the square?"},
        {"image": ["p0.png", "p1.png"], "text": "How many circles are there?"},
    ]
    path = tmp_path / "images.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    proc = AutoProcessor.from_pretrained(llava_dir)
    corpus = prepare_images(load_corpus(str(path), proc.tokenizer, 512), proc, 512)
    one, two = corpus.samples
    assert one.ids.count(IMAGE_TOKEN) == 16 and two.ids.count(IMAGE_TOKEN) == 32
    a, b = two.info["spans"]["image"]
    assert b - a == 32 and all(t == IMAGE_TOKEN for t in two.ids[a:b])
    assert two.info["image_runs"] == [[a, a + 16], [a + 16, b]] and two.info["image_grid"] == [[4, 4], [4, 4]]
    assert two.info["spans"]["prompt"] == [0, a] and two.info["spans"]["text"] == [b, len(two.ids)]
    assert two.info["model_inputs"]["pixel_values"].shape == (2, 3, 16, 16)
    atlas = headmap.scan(str(llava_dir), probes="sink", corpus=str(path), batch_size=2, progress=False)
    assert set(atlas.heads.tower) == {"text", "vision"}
    assert (atlas.heads[atlas.heads.tower == "text"].n == 2).all()
    assert (atlas.heads[atlas.heads.tower == "vision"].n == 3).all()  # the vision tower sees three pictures


# -- bad inputs: one clear line, exit 2, the run already in --out untouched ---------------------------------


@pytest.fixture
def kept_run(tmp_path) -> tuple[Path, dict[str, bytes]]:
    """A finished run in a folder, and its bytes: a failed scan with --overwrite must leave it as it was."""
    folder = tmp_path / "run"
    heads = pd.DataFrame(
        [{"probe": "sink", "metric": "sink", "layer": 0, "head": 0, "kv_head": 0, "value": 0.5, "stderr": 0.1, "n": 2}]
    )
    Atlas(heads=heads, meta={"model": "before"}).save(folder)
    return folder, {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def _unchanged(kept: tuple[Path, dict[str, bytes]]) -> None:
    folder, files = kept
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == files


@pytest.mark.parametrize(
    ("line", "files", "needle"),
    [
        ({"image": "missing.png", "text": "hi"}, {}, "does not exist"),
        ({"image": "fake.png", "text": "hi"}, {"fake.png": b"this is not a picture"}, "is not an image"),
        ({"image": "ok.png"}, {}, 'has no "text"'),
        ({"image": [], "text": "hi"}, {}, '"image" must be a file name'),
    ],
    ids=["missing", "not-an-image", "no-text", "empty-list"],
)
def test_bad_image_lines(monkeypatch, capsys, llava_dir, tmp_path, kept_run, line, files, needle):
    shapes_items(1)[0]["image"].save(tmp_path / "ok.png")
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"image": "ok.png", "text": "fine"}) + "\n" + json.dumps(line) + "\n")
    code, _, err = run(
        monkeypatch, capsys, "scan", str(llava_dir), "--corpus", str(path), "--probes", "sink",
        "--out", str(kept_run[0]), "--overwrite", "--no-progress",
    )  # fmt: skip
    assert_one_line_error(code, err, needle, "line 2")
    _unchanged(kept_run)


def test_image_corpus_on_a_text_model(monkeypatch, capsys, tiny_llama_dir, kept_run):
    code, _, err = run(
        monkeypatch, capsys, "scan", str(tiny_llama_dir), "--corpus", "shapes", "--probes", "sink",
        "--out", str(kept_run[0]), "--overwrite", "--no-progress",
    )  # fmt: skip
    assert_one_line_error(code, err, "has no image processor", "text corpus")
    _unchanged(kept_run)


def test_image_probe_on_a_text_corpus(monkeypatch, capsys, llava_dir, tmp_path, kept_run):
    text = tmp_path / "plain.txt"
    text.write_text("what colour is the square\nhow many circles are there\n")
    for probe in ("modality_mass", "image_attention"):
        code, _, err = run(
            monkeypatch, capsys, "scan", str(llava_dir), "--corpus", str(text), "--probes", probe,
            "--out", str(kept_run[0]), "--overwrite", "--no-progress",
        )  # fmt: skip
        assert_one_line_error(code, err, f"probe {probe} cannot read corpus", "needs image inputs")
    _unchanged(kept_run)


def test_a_probe_keyed_by_layer_alone_is_refused_on_images(monkeypatch, capsys, llava_dir, kept_run):
    code, _, err = run(
        monkeypatch, capsys, "scan", str(llava_dir), "--corpus", "shapes", "--probes", "attention_maps",
        "--out", str(kept_run[0]), "--overwrite", "--no-progress",
    )  # fmt: skip
    assert_one_line_error(code, err, "attention_maps", "vision tower")
    _unchanged(kept_run)


def test_default_probes_on_images_skip_those_keyed_by_layer(llava_dir):
    atlas = headmap.scan(str(llava_dir), corpus="shapes", limit=2, batch_size=2, progress=False)
    skipped = atlas.meta["skipped_probes"]
    blind = {name for name, why in skipped.items() if "vision tower" in why}
    assert blind, skipped  # the default probes keyed by layer alone are left out, saying why
    assert not blind & set(atlas.heads.probe)
    assert {"sink", "entropy"} <= set(atlas.heads.probe) and set(atlas.heads.tower) == {"text", "vision"}


def test_text_model_tables_have_no_tower_column(tiny_llama_dir, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat sat on the mat\nand the dog sat on the log\n")
    atlas = headmap.scan(str(tiny_llama_dir), probes="sink", corpus=str(corpus), progress=False, out=tmp_path / "r")
    assert "tower" not in atlas.heads.columns
    assert "tower" not in pd.read_parquet(tmp_path / "r" / "heads.parquet").columns
    shutil.rmtree(tmp_path / "r")


def test_idefics3_smolvlm_family_scans_shapes_end_to_end(tmp_path):
    from mm_models import save_idefics3

    folder = save_idefics3(tmp_path / "idefics3")
    atlas = headmap.scan(
        str(folder), probes="sink,modality_mass,image_attention", corpus="shapes", limit=3, batch_size=2,
        progress=False, out=tmp_path / "run",
    )  # fmt: skip
    heads = atlas.heads
    assert set(heads.tower) == {"text", "vision"}
    assert set(heads[heads.tower == "vision"].layer) == set(heads[heads.tower == "text"].layer) == {0, 1}
    mass = heads[(heads.probe == "modality_mass") & (heads.metric == "modality_mass")]
    assert len(mass) == 8 and mass.value.between(0, 1).all() and (mass.n == 3).all()
    grid = atlas.images[(atlas.images["sample"] == 0) & (atlas.images["layer"] == 0) & (atlas.images["head"] == 0)]
    assert (grid["row"].max(), grid["col"].max()) == (1, 1)  # 4 image tokens: a 2 x 2 grid
    from headmap.report import write_report

    written = write_report(tmp_path / "run")
    assert 'id="images-section"' in written[0].read_text(encoding="utf-8")


def test_too_large_an_image(monkeypatch, capsys, llava_dir, tmp_path, kept_run):
    from PIL import Image

    shapes_items(1)[0]["image"].save(tmp_path / "big.png")  # 64 x 64 = 4096 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow refuses more than twice this: a "bomb"
    path = tmp_path / "big.jsonl"
    path.write_text(json.dumps({"image": "big.png", "text": "hi"}) + "\n")
    code, _, err = run(
        monkeypatch, capsys, "scan", str(llava_dir), "--corpus", str(path), "--probes", "sink",
        "--out", str(kept_run[0]), "--overwrite", "--no-progress",
    )  # fmt: skip
    assert_one_line_error(code, err, "too large", "line 1")
    _unchanged(kept_run)


def test_image_tokens_are_not_cut_to_max_length(monkeypatch, capsys, llava_dir, kept_run):
    code, _, err = run(
        monkeypatch, capsys, "scan", str(llava_dir), "--corpus", "shapes", "--probes", "sink", "--max-length", "24",
        "--out", str(kept_run[0]), "--overwrite", "--no-progress",
    )  # fmt: skip
    assert_one_line_error(code, err, "--max-length", "image")
    _unchanged(kept_run)


def test_a_processor_without_chat_template_puts_the_image_token_first():
    from mm_models import llava_processor

    corpus = load_corpus("shapes", llava_processor().tokenizer, 512, limit=2)
    plain = prepare_images(corpus, llava_processor(chat=False), 512)
    chat = prepare_images(corpus, llava_processor(chat=True), 512)
    for p, c in zip(plain.samples, chat.samples, strict=True):
        assert p.ids[:17] == [1] + [IMAGE_TOKEN] * 16  # BOS, the 16 image tokens, then the question
        assert p.info["spans"]["prompt"] == [0, 1] and p.info["spans"]["image"] == [1, 17]  # the prompt: BOS
        assert c.info["spans"]["prompt"] == [0, 3]  # BOS, "user", ":" before the image
        assert c.ids.count(IMAGE_TOKEN) == p.ids.count(IMAGE_TOKEN) == 16


def test_interrupted_image_scan_resumes_to_the_same_tables(monkeypatch, llava_dir, tmp_path):
    from transformers import LlavaForConditionalGeneration

    from headmap.errors import ScanInterrupted

    kwargs = dict(probes="sink,entropy,image_attention:samples=3", corpus="shapes", limit=6, batch_size=2,
                  progress=False)  # fmt: skip
    headmap.scan(str(llava_dir), out=tmp_path / "full", **kwargs)
    original, calls = LlavaForConditionalGeneration.forward, []

    def stop_at_third(self, *args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, *args, **kw)

    with monkeypatch.context() as m:
        m.setattr(LlavaForConditionalGeneration, "forward", stop_at_third)
        with pytest.raises(ScanInterrupted) as info:
            headmap.scan(str(llava_dir), out=tmp_path / "run", checkpoint_every_s=3600.0, **kwargs)
    assert info.value.inputs_done == 4
    resumed = headmap.scan(str(llava_dir), out=tmp_path / "run", resume=True, **kwargs)
    assert resumed.meta["resumed_from"] == [4]
    for table in ("heads.parquet", "images.parquet"):
        a, b = (pd.read_parquet(tmp_path / run / table) for run in ("full", "run"))
        pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert set(pd.read_parquet(tmp_path / "run" / "images.parquet")["sample"]) == {0, 1, 2}
