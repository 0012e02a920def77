"""The report's maps cover every input up to ``--map-inputs`` (docs/multimodal.md), not only the first.

Image overlays (probe ``image_attention``) on the tiny random Llava and Idefics3 of tests/mm_models.py scanning
``shapes``; cross-attention alignment maps on the tiny random T5 and BART scanning three source/target pairs.
Each figure is one head with a panel per input, titled with the input's index; the alignment maps of every
input equal eager ``cross_attentions`` of that input alone.
"""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from bounds import eager_bound
from cli_runner import assert_one_line_error, run
from mm_models import save_idefics3, save_llava, save_seq2seq

import headmap
from headmap.report.images import PANEL_IN, drawn_pictures
from headmap.report.towers import HEATMAP_DPI

pytestmark = pytest.mark.filterwarnings("ignore:.*torchvision.*")

PAIRS = [
    {"source": "translate : the cat sat on the mat .", "target": "le chat est assis sur le tapis ."},
    {"source": "the dog ran", "target": "le chien a couru"},
    {"source": "translate : the cat", "target": "le chat"},
]


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory) -> Path:
    return save_llava(tmp_path_factory.mktemp("llava") / "llava")


def section(page: str, name: str) -> str:
    return page[page.index(f'id="{name}"') :].split("</section>")[0]


def figures(part: str, attribute: str) -> list[tuple[str, str, str]]:
    """(the figure's attribute, its image's data URI, its caption) of every figure of an HTML part."""
    found = re.findall(rf'<figure {attribute}="([^"]*)"><img alt="[^"]*" src="([^"]*)"><figcaption>([^<]*)<', part)
    assert len(found) == part.count("<figure"), part[:400]
    return found


def png_size(uri: str) -> tuple[int, int]:
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).size


def test_overlays_cover_every_input_of_a_shapes_scan(monkeypatch, capsys, llava_dir, tmp_path):
    out = tmp_path / "run"
    code, _, err = run(
        monkeypatch, capsys, "scan", str(llava_dir), "--corpus", "shapes", "--limit", "3", "--batch-size", "2",
        "--probes", "sink,image_attention", "--map-inputs", "3", "--out", str(out), "--report", "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    images = pd.read_parquet(out / "images.parquet")
    assert set(images["sample"]) == {0, 1, 2}  # the probe kept the 3 inputs --map-inputs asked for
    meta = json.loads((out / "meta.json").read_text())
    assert meta["options"]["map_inputs"] == 3 and meta["probes"]["image_attention"] == {"samples": 3}
    part = section((out / "report.html").read_text(encoding="utf-8"), "images-section")
    drawn = figures(part, "data-pictures")
    assert len(drawn) == 6  # the six heads with the most attention on the images
    for pictures, uri, caption in drawn:
        assert pictures == "0:0 1:0 2:0"
        assert all(f"input {i} " in caption for i in range(3))
        # three panels side by side: the figure is three panels wide
        assert png_size(uri)[0] == round(3 * PANEL_IN[0] * HEATMAP_DPI)
    assert "Inputs 0, 1, 2:" in part
    # each caption's share of a panel is the sum of that input's grid in images.parquet
    pictures, _, caption = drawn[0]
    layer, head = (int(x) for x in re.match(r"L(\d+) H(\d+)", caption).groups())
    for i in range(3):
        share = images[(images["sample"] == i) & (images["layer"] == layer) & (images["head"] == head)]["value"].sum()
        assert f"input {i} {share:.2f}" in caption


def test_map_inputs_caps_what_the_report_draws(llava_dir, tmp_path):
    from headmap.report import write_report

    atlas = headmap.scan(
        str(llava_dir), probes="image_attention:samples=3", corpus="shapes", limit=3, batch_size=3, progress=False,
        out=tmp_path / "run",
    )  # fmt: skip
    assert atlas.meta["options"]["map_inputs"] == 3  # the probe's samples, given, is the count
    assert drawn_pictures(atlas) == [(0, 0), (1, 0), (2, 0)]
    atlas.meta["options"]["map_inputs"] = 1  # a run that asked for one input: one panel, as before this change
    assert drawn_pictures(atlas) == [(0, 0)]
    atlas.meta["options"].pop("map_inputs")  # a run of an older headmap: every input the table holds
    assert drawn_pictures(atlas) == [(0, 0), (1, 0), (2, 0)]
    page = write_report(tmp_path / "run")[0].read_text(encoding="utf-8")
    assert all(p == "0:0 1:0 2:0" for p, _, _ in figures(section(page, "images-section"), "data-pictures"))


def test_idefics3_overlays_for_each_input(tmp_path):
    folder = save_idefics3(tmp_path / "idefics3")
    atlas = headmap.scan(
        str(folder), probes="sink,image_attention", corpus="shapes", limit=3, batch_size=2, map_inputs=3,
        progress=False, out=tmp_path / "run",
    )  # fmt: skip
    assert set(atlas.images["sample"]) == {0, 1, 2}
    from headmap.report import write_report

    part = section(write_report(tmp_path / "run")[0].read_text(encoding="utf-8"), "images-section")
    drawn = figures(part, "data-pictures")
    assert len(drawn) == 6 and all(p == "0:0 1:0 2:0" for p, _, _ in drawn)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--map-inputs", "0"], "--map-inputs must be a whole number >= 1 (got 0)"),
        (
            ["--map-inputs", "2", "--probes", "image_attention:samples=3"],
            "--map-inputs 2 and image_attention:samples=3 disagree",
        ),
    ],
)
def test_bad_map_inputs(monkeypatch, capsys, llava_dir, tmp_path, args, needle):
    out = tmp_path / "run"
    code, _, err = run(
        monkeypatch, capsys, "scan", str(llava_dir), "--corpus", "shapes", "--limit", "2", *args, "--out", str(out),
        "--no-progress",
    )  # fmt: skip
    assert_one_line_error(code, err, needle)
    assert not out.exists()


# -- encoder-decoder alignment maps ---------------------------------------------------------------


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    return path


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_alignment_maps_cover_every_input_and_equal_eager(name, monkeypatch, capsys, pairs_file, tmp_path):
    from headmap.corpus.pairs import collate_seq2seq
    from headmap.report.alignment import alignment_maps, run_inputs

    folder = save_seq2seq(name, tmp_path / name)
    out = tmp_path / "run"
    code, _, err = run(
        monkeypatch, capsys, "scan", str(folder), "--corpus", str(pairs_file), "--probes", "sink,cross_alignment",
        "--batch-size", "2", "--map-inputs", "3", "--out", str(out), "--report", "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    meta = json.loads((out / "meta.json").read_text())
    assert meta["options"]["map_inputs"] == 3
    part = section((out / "report.html").read_text(encoding="utf-8"), "alignment-section")
    assert "No maps" not in part and "Left out" not in part
    drawn = figures(part, "data-inputs")
    assert len(drawn) == 6  # two cross layers of four heads: the six most monotonic
    for inputs, _, caption in drawn:
        assert inputs == "0 1 2" and caption.endswith("(input 0, input 1, input 2)")
    # the maps of every input, each against eager cross_attentions of that input alone
    loaded, samples, why = run_inputs(meta)
    assert why is None and len(samples) == 3
    ref = loaded.model.__class__.from_pretrained(folder, attn_implementation="eager").eval()
    for sample in samples:
        maps = alignment_maps(loaded, sample)
        inputs = collate_seq2seq([sample], 1, "cpu")
        inputs["input_ids"] = torch.tensor([list(sample.ids)])
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        with torch.no_grad():
            eager = ref(**inputs, output_attentions=True).cross_attentions
        assert sorted(maps) == list(range(len(eager)))
        # the last cross layer reads 2 encoder, 2 decoder self and 2 cross attention calls; keys: the longer side
        bound = eager_bound(keys=max(len(sample.ids), len(sample.info["decoder_ids"])), layers=6)
        for layer, attn in enumerate(eager):
            assert maps[layer].shape == tuple(attn[0].shape)
            assert np.abs(maps[layer] - attn[0].double().numpy()).max() <= bound
