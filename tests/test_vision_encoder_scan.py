"""``headmap scan`` on a vision encoder alone (ViT, CLIP vision) saved as a folder with its image processor.

The tiny random encoders of tests/mm_models.py are saved with an image processor built in code (no
tokenizer files, no downloads). The built-in ``shapes`` corpus then feeds ``pixel_values`` only, the
default probes that read a bidirectional tower by tower run, every heads.parquet row says tower ``vision``,
and sink equals a brute force from eager ``output_attentions`` on the same pixel values (the first token
is the class token). A text corpus is refused in one line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from bounds import eager_bound
from cli_runner import assert_one_line_error, run
from mm_models import build_clip, build_vit

from headmap.corpus import shapes_items

pytestmark = pytest.mark.filterwarnings("ignore:.*torchvision.*")

LAYERS, HEADS = 2, 4  # tests/mm_models.py: _vision(num_hidden_layers=2), num_attention_heads=4


def _save(name: str, folder: Path) -> Path:
    """The tiny encoder ``name`` saved with an image processor of 16 x 16 pictures (its image_size)."""
    from transformers import CLIPImageProcessor, ViTImageProcessor

    if name == "vit":
        model, _ = build_vit()
        proc = ViTImageProcessor(size={"height": 16, "width": 16})
    else:
        model, _ = build_clip()
        proc = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["vit", "clip"])
def encoder_dir(request, tmp_path_factory) -> tuple[str, Path]:
    return request.param, _save(request.param, tmp_path_factory.mktemp(f"tiny-{request.param}") / request.param)


def brute_sink(folder: Path, limit: int) -> np.ndarray:
    """[layers, heads]: per picture, the mean over query rows i >= 1 of eager A[i, 0] (no padding in a
    vision tower), then the mean over pictures, each weighing the same."""
    from transformers import AutoImageProcessor, AutoModel

    model = AutoModel.from_pretrained(folder, attn_implementation="eager").eval()
    proc = AutoImageProcessor.from_pretrained(folder)
    pixels = proc(images=[item["image"] for item in shapes_items(limit)], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        attentions = model(pixel_values=pixels, output_attentions=True).attentions
    per_layer = [a[:, :, 1:, 0].double().mean(dim=-1).mean(dim=0).numpy() for a in attentions]
    return np.stack(per_layer)


def test_scan_of_a_vision_encoder_has_vision_rows_equal_to_brute_force(encoder_dir, tmp_path, monkeypatch, capsys):
    name, folder = encoder_dir
    out = tmp_path / "out"
    code, stdout, err = run(
        monkeypatch, capsys, "scan", str(folder), "--corpus", "shapes", "--limit", "3", "--out", str(out), "--report"
    )
    assert code == 0, err
    assert (out / "report.html").is_file() and (out / "meta.json").is_file()
    heads = pd.read_parquet(out / "heads.parquet")
    assert set(heads["tower"]) == {"vision"}
    assert (heads.n == 3).all()
    # every tower-aware default probe ran on every layer and head; no text-only or causal-only probe did
    for probe, rows in heads.groupby("probe"):
        assert sorted(zip(rows.layer, rows["head"], strict=True)) == [
            (layer, head) for layer in range(LAYERS) for head in range(HEADS)
        ], probe
    assert {"sink", "entropy"} <= set(heads.probe)
    assert not {"induction", "duplicate_token", "modality_mass"} & set(heads.probe)
    sink = heads[heads.probe == "sink"]
    got = np.full((LAYERS, HEADS), np.nan)
    got[sink.layer.to_numpy(), sink["head"].to_numpy()] = sink.value.to_numpy()
    want = brute_sink(folder, 3)
    # 17 keys (16 patches and the class token), heads of 8 dimensions, two layers (tests/bounds.py)
    bound = eager_bound(keys=17, layers=LAYERS)
    assert np.abs(got - want).max() <= bound, (name, got, want)


def test_text_corpus_on_a_vision_encoder_is_one_line(encoder_dir, tmp_path, monkeypatch, capsys):
    _, folder = encoder_dir
    out = tmp_path / "out"
    code, _, err = run(monkeypatch, capsys, "scan", str(folder), "--corpus", "text", "--limit", "2", "--out", str(out))
    assert_one_line_error(code, err, "vision encoder", "--corpus shapes")
    assert not out.exists()


def test_image_jsonl_on_a_vision_encoder_reads_pixels_and_refuses_two_images(
    encoder_dir, tmp_path, monkeypatch, capsys
):
    _, folder = encoder_dir
    for i, item in enumerate(shapes_items(2)):
        item["image"].save(tmp_path / f"p{i}.png")
    good = tmp_path / "good.jsonl"
    good.write_text('{"image": "p0.png", "text": "a"}\n{"image": "p1.png", "text": "b"}\n')
    code, _, err = run(monkeypatch, capsys, "scan", str(folder), "--corpus", str(good), "--out", str(tmp_path / "a"))
    assert code == 0, err
    heads = pd.read_parquet(tmp_path / "a" / "heads.parquet")
    assert set(heads.tower) == {"vision"} and (heads.n == 2).all()
    two = tmp_path / "two.jsonl"
    two.write_text('{"image": ["p0.png", "p1.png"], "text": "a"}\n')
    code, _, err = run(monkeypatch, capsys, "scan", str(folder), "--corpus", str(two), "--out", str(tmp_path / "b"))
    assert_one_line_error(code, err, "one image per input")
    assert not (tmp_path / "b").exists()
