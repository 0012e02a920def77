"""``headmap.scan(model_object, ...)`` on a vision encoder alone (ViT, CLIP vision, SigLIP vision).

The CLI reads such a folder with its image processor and a stand-in tokenizer (tests/test_vision_encoder_scan.py);
the API given the model object must do the same: with the image processor passed as ``tokenizer=``, or loaded
from the model's ``name_or_path`` (the folder it came from), and refused in one clear line naming what to pass
when neither is there.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from cli_runner import run
from mm_models import build_clip, build_siglip, build_vit

import headmap
from headmap.errors import OptionError

pytestmark = pytest.mark.filterwarnings("ignore:.*torchvision.*")

LAYERS, HEADS = 2, 4  # tests/mm_models.py: vision encoders of 2 layers x 4 heads


def encoder(name: str):
    """(tiny model, its image processor of 16 x 16 pictures)."""
    from transformers import CLIPImageProcessor, SiglipImageProcessor, ViTImageProcessor

    if name == "vit":
        return build_vit()[0], ViTImageProcessor(size={"height": 16, "width": 16})
    if name == "clip":
        proc = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
        return build_clip()[0], proc
    return build_siglip()[0], SiglipImageProcessor(size={"height": 16, "width": 16})


def rows_key(heads: pd.DataFrame) -> pd.DataFrame:
    return heads.sort_values(["probe", "metric", "layer", "head"]).reset_index(drop=True)


@pytest.mark.parametrize("name", ["vit", "clip", "siglip"])
def test_api_scans_a_vision_encoder_object_with_its_image_processor(name):
    model, proc = encoder(name)
    atlas = headmap.scan(model, tokenizer=proc, corpus="shapes", limit=3, batch_size=2, progress=False)
    heads = atlas.heads
    assert set(heads["tower"]) == {"vision"} and (heads.n == 3).all()
    assert {"sink", "entropy"} <= set(heads.probe)
    for probe, rows in heads.groupby("probe"):
        assert sorted(zip(rows.layer, rows["head"], strict=True)) == [
            (la, h) for la in range(LAYERS) for h in range(HEADS)
        ], probe
    assert atlas.meta["architecture"]["model_type"] == model.config.model_type


def test_api_equals_the_cli_and_finds_the_processor_in_the_model_folder(monkeypatch, capsys, tmp_path):
    from transformers import ViTModel

    model, proc = encoder("vit")
    folder = tmp_path / "vit"
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    out = tmp_path / "cli"
    code, _, err = run(
        monkeypatch, capsys, "scan", str(folder), "--corpus", "shapes", "--limit", "3", "--batch-size", "2",
        "--probes", "sink,entropy", "--out", str(out), "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    cli = rows_key(pd.read_parquet(out / "heads.parquet"))
    # the object loaded from the folder: its name_or_path is the folder, whose image processor the API loads
    loaded = ViTModel.from_pretrained(folder, attn_implementation="eager").eval()
    api = rows_key(headmap.scan(loaded, probes="sink,entropy", corpus="shapes", limit=3, batch_size=2).heads)
    given = rows_key(
        headmap.scan(loaded, tokenizer=proc, probes="sink,entropy", corpus="shapes", limit=3, batch_size=2).heads
    )
    for got in (api, given):
        assert list(zip(got.probe, got.metric, got.layer, got["head"], strict=True)) == list(
            zip(cli.probe, cli.metric, cli.layer, cli["head"], strict=True)
        )
        # the same engine on the same weights, pictures and batches: the same numbers bit for bit
        np.testing.assert_array_equal(got.value.to_numpy(), cli.value.to_numpy())
        np.testing.assert_array_equal(got.n.to_numpy(), cli.n.to_numpy())


def test_api_without_an_image_processor_says_what_to_pass(tmp_path):
    from transformers import PreTrainedTokenizerFast

    model, _ = encoder("clip")  # built from a config: no folder to load a processor from
    out = tmp_path / "run"
    with pytest.raises(OptionError) as caught:
        headmap.scan(model, corpus="shapes", limit=2, out=out, progress=False)
    message = str(caught.value)
    assert "\n" not in message
    assert "vision encoder alone" in message and "tokenizer=AutoImageProcessor.from_pretrained" in message
    assert "none was passed" in message
    assert not out.exists()  # refused before anything was written
    model.config._name_or_path = str(tmp_path / "nowhere")
    with pytest.raises(
        OptionError, match=r"tokenizer= got a \w+, not an image processor, and none could be loaded from .*nowhere"
    ):
        headmap.scan(model, tokenizer=PreTrainedTokenizerFast(tokenizer_object=_word_level()), corpus="shapes")
    with pytest.raises(OptionError, match="none could be loaded from .*nowhere"):
        headmap.scan(model, corpus="shapes", limit=2, progress=False)


def _word_level():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    return Tokenizer(WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
