"""Towers kept apart everywhere a layer number is read (docs/multimodal.md, issue 14):

1. every head table names its tower: ``cross_alignment``'s rows say ``cross``, an encoder-decoder's
   self-attention rows ``encoder`` and ``decoder`` (a tiny random BART and T5 of tests/mm_models.py);
2. an edit's layers are those of the model's language tower unless it names another (``tower=vision``):
   on a tiny Llava and Idefics3 an edit of layer L changes the text tower's layer L only (the vision
   tower's outputs bit for bit the same), with ``tower=vision`` the vision tower's only; a session's
   ``layers`` are keyed by (tower, layer) where towers collide, a text model's by layer as ever;
3. ``headmap scan MODEL --probes vision_aware --corpus shapes`` runs end to end through the CLI and its
   rows equal the probe's own paired forward on the same batches.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from cli_runner import run
from mm_models import BY_NAME, save_llava

import headmap
from headmap.atlas import Atlas, towers_of
from headmap.edits import Ablate, Edit, make_edits, parse_edit, spec_parameters
from headmap.engine.towers import language_tower, model_towers
from headmap.errors import EditError, HeadmapError
from headmap.probes import CrossAlignmentProbe, SinkProbe, VisionAwareProbe
from headmap.scan.resume import layer_name, layer_of
from headmap.scan.tables import head_table

pytestmark = pytest.mark.filterwarnings("ignore:.*torchvision.*")


class Seen(Edit):
    """Records the (tower, layer, is_cross) of every block its hooks are handed; changes nothing (tests only)."""

    name = "seen"

    def __init__(self, heads=None, atlas=None) -> None:
        super().__init__(heads=heads, atlas=atlas)
        self.blocks: set[tuple[str, int, bool]] = set()

    def edit_output(self, block, out):
        self.blocks.add((block.tower, block.layer, block.is_cross))
        return out


# --------------------------------------------------------------------------------------------
# 1. the tower column of every head table (encoder-decoders)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["bart", "t5"])
def test_encoder_decoder_head_tables_name_encoder_decoder_and_cross(name, tmp_path):
    model, inputs = BY_NAME[name].build()
    probes = [SinkProbe(), CrossAlignmentProbe()]
    with torch.no_grad(), headmap.observe(model, probes=probes) as session:
        model(**inputs)
    table = head_table(probes)
    sink = table[table.probe == "sink"]
    cross = table[table.probe == "cross_alignment"]
    assert set(sink.tower) == {"encoder", "decoder", "cross"}  # sink reads every tower, each keyed apart
    assert len(cross) and set(cross.tower) == {"cross"}
    assert set(cross.metric) == {"cross_entropy", "cross_monotonicity"}
    # two layers of four heads in each tower: the layer numbers collide, the tower tells them apart
    for tower in ("encoder", "decoder", "cross"):
        rows = sink[sink.tower == tower]
        assert sorted(zip(rows.layer, rows["head"], strict=True)) == [(l, h) for l in (0, 1) for h in range(4)]
    assert sorted(zip(cross.layer, cross["head"], strict=True)) == sorted(
        [(l, h) for l in (0, 1) for h in range(4)] * 2
    )
    # the cross rows of the two probes are the same heads: cross_alignment's layer l is sink's cross layer l
    assert not np.array_equal(  # and they are not the decoder's self-attention numbers
        sink[sink.tower == "cross"].value.to_numpy(), sink[sink.tower == "decoder"].value.to_numpy()
    )
    # the column survives saving and loading
    Atlas(heads=table, meta={}).save(tmp_path / "run")
    on_disk = pd.read_parquet(tmp_path / "run" / "heads.parquet")
    assert set(on_disk[on_disk.probe == "cross_alignment"].tower) == {"cross"}
    # the session's layers are keyed by (tower, layer): no text tower here, three towers of two layers each
    assert set(session.layers) == {(t, l) for t in ("encoder", "decoder", "cross") for l in (0, 1)}
    assert language_tower(model) == "decoder" and session.tower_layers() == {0: (4, 4), 1: (4, 4)}
    assert model_towers(model) == {"encoder", "decoder", "cross"}


def test_cross_alignment_rows_say_cross_in_its_state_round_trip():
    model, inputs = BY_NAME["bart"].build()
    probe = CrossAlignmentProbe()
    with torch.no_grad(), headmap.observe(model, probes=[probe]):
        model(**inputs)
    again = CrossAlignmentProbe()
    again.load_state_dict(probe.state_dict())
    assert again.head_rows() == probe.head_rows()
    assert {r["tower"] for r in again.head_rows()} == {"cross"}


# --------------------------------------------------------------------------------------------
# 2. edits act on one tower; session.layers keyed by (tower, layer)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "tower", "want"),
    [
        ("llava", None, {("text", 1, False)}),
        ("llava", "vision", {("vision", 1, False)}),
        ("idefics3", None, {("text", 1, False)}),
        ("idefics3", "vision", {("vision", 1, False)}),
        ("bart", None, {("decoder", 1, False)}),
        ("bart", "encoder", {("encoder", 1, False)}),
        ("bart", "cross", {("cross", 1, True)}),
        ("t5", "cross", {("cross", 1, True)}),
        ("mllama", None, {("text", 1, False)}),  # not the cross layer that sits at text layer 1
        ("mllama", "cross", {("cross", 1, True)}),
    ],
)
def test_an_edit_is_handed_the_blocks_of_its_tower_only(name, tower, want):
    model, inputs = BY_NAME[name].build()
    layer = 2 if (name, tower) == ("mllama", None) else 1  # Mllama's text layers 0 and 2 are self-attention
    want = {(t, layer, c) for t, _, c in want}
    edit = Seen(heads=[[layer, 0]]) if tower is None else Seen(heads=[[layer, 0]], tower=tower)
    with torch.no_grad(), headmap.observe(model, edits=[edit]):
        model(**inputs)
    assert edit.blocks == want


def _layer_outputs(model, inputs, edits, tower_layers):
    """The output hidden states of every layer of each named layer stack, [B, T, D] each, from forward hooks."""
    seen: dict[tuple[str, int], torch.Tensor] = {}
    hooks = []
    for tower, layers in tower_layers.items():
        for i, layer in enumerate(layers):

            def hook(module, args, out, _key=(tower, i)):
                seen[_key] = (out[0] if isinstance(out, tuple) else out).detach().clone()

            hooks.append(layer.register_forward_hook(hook))
    try:
        with torch.no_grad(), headmap.observe(model, edits=list(edits)):
            model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _stacks(name, model):
    if name == "llava":
        return {"text": model.model.language_model.layers, "vision": model.model.vision_tower.encoder.layers}
    return {"text": model.model.text_model.layers, "vision": model.model.vision_model.encoder.layers}


@pytest.mark.parametrize("name", ["llava", "idefics3"])
def test_an_edit_of_layer_l_changes_only_that_towers_layer_l(name):
    model, inputs = BY_NAME[name].build()
    stacks = _stacks(name, model)
    plain = _layer_outputs(model, inputs, (), stacks)
    # ablating head 0 of layer 1: the text tower's layer 1 by default
    text = _layer_outputs(model, inputs, make_edits("ablate:heads=[[1,0]]:mode=zero"), stacks)
    for key in (("vision", 0), ("vision", 1), ("text", 0)):
        assert torch.equal(text[key], plain[key]), key  # the same computation: bit for bit
    assert not torch.equal(text[("text", 1)], plain[("text", 1)])
    # tower=vision: the vision tower's layer 1, and the text tower only through the image features it reads
    vision = _layer_outputs(model, inputs, make_edits("ablate:heads=[[1,0]]:mode=zero:tower=vision"), stacks)
    assert torch.equal(vision[("vision", 0)], plain[("vision", 0)])
    assert not torch.equal(vision[("vision", 1)], plain[("vision", 1)])
    # without an image the vision tower does not run: an edit of it leaves the text model bit for bit as it was
    text_only = {k: v for k, v in inputs.items() if not k.startswith("pixel")}
    text_only["input_ids"] = text_only["input_ids"].clamp(max=BY_NAME[name].image_token - 1)
    bare = _layer_outputs(model, text_only, (), {"text": stacks["text"]})
    edited = _layer_outputs(model, text_only, make_edits("ablate:heads=[[1,0]]:tower=vision"), {"text": stacks["text"]})
    assert all(torch.equal(edited[k], bare[k]) for k in bare) and len(bare) == 2


def test_session_layers_are_keyed_by_tower_and_layer_where_towers_collide():
    model, inputs = BY_NAME["llava"].build()
    with torch.no_grad(), headmap.observe(model) as session:
        model(**inputs)
    # the text tower keeps plain layer numbers (as a text model's session always had); CLIP's layers are keyed apart
    assert session.layers == {0: (4, 2), 1: (4, 2), ("vision", 0): (2, 2), ("vision", 1): (2, 2)}
    assert session.tower_layers() == {0: (4, 2), 1: (4, 2)}
    assert session.tower_layers("vision") == {0: (2, 2), 1: (2, 2)}
    from tiny_models import tiny

    text_model, _ = tiny("llama")
    with torch.no_grad(), headmap.observe(text_model) as session:
        text_model(input_ids=torch.tensor([[5, 6, 7, 8]]))
    assert session.layers == {0: (4, 2), 1: (4, 2)}  # a text model's layers: by number, as ever
    assert session.tower_layers() == session.layers
    # a checkpoint writes the keys as it always did for text ("3") and names the tower for the others
    for key in (3, ("vision", 3), ("cross", 0)):
        assert layer_of(layer_name(key)) == key
    assert layer_name(3) == "3" and layer_name(("vision", 3)) == "vision:3"


def test_tower_in_specs_and_its_bad_values():
    assert "tower" in spec_parameters(Ablate) and "tower" in spec_parameters(type(parse_edit("temperature:tau=2")))
    edit = parse_edit("ablate:heads=[[1,0]]:tower=vision")
    assert edit.tower == "vision" and "vision tower" in edit.describe()
    assert Ablate(heads=[[1, 0]], tower="vision").tower == "vision"  # also as a keyword in Python
    assert parse_edit("ablate:heads=[[1,0]]").tower is None  # the model's language tower, decided at run time
    with pytest.raises(EditError, match="tower must be one of text, vision, encoder, decoder, cross"):
        parse_edit("ablate:heads=[[1,0]]:tower=audio")
    for spec in ("pai:alpha=2:tower=vision", "var:p=0.5:tower=vision", "scale_span:span=image:factor=2:tower=vision"):
        with pytest.raises(EditError, match="text tower only"):
            parse_edit(spec)
    # a tower the model lacks, and a head the tower lacks: refused when a session binds the edit
    from tiny_models import tiny

    text_model, _ = tiny("llama")
    with pytest.raises(EditError, match="has no vision tower"), headmap.observe(text_model, edits=[edit]):
        pytest.fail("the body must not run")
    model, _ = BY_NAME["llava"].build()
    wide = parse_edit("ablate:heads=[[1,3]]:tower=vision")  # CLIP's tower has 2 heads a layer, the text model 4
    with pytest.raises(EditError, match="vision tower has 2 layers x 2 heads"), headmap.observe(model, edits=[wide]):
        pytest.fail("the body must not run")
    assert isinstance(EditError("x"), HeadmapError)  # the CLI turns it into one line and exit code 2


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory) -> Path:
    return save_llava(tmp_path_factory.mktemp("tiny-llava-towers") / "llava")


def test_a_heads_rule_reads_the_rows_of_the_edits_tower(llava_dir):
    atlas = headmap.scan(str(llava_dir), probes="sink", corpus="shapes", limit=2, batch_size=2, progress=False)
    # the meta names the language tower's counts, and each tower's
    arch = atlas.meta["architecture"]
    assert (arch["layers"], arch["heads"], arch["kv_heads"]) == (2, 4, 2)
    assert arch["towers"]["vision"] == {"layers": 2, "heads": 2, "kv_heads": 2}
    text = Ablate(heads="top 2 sink", atlas=atlas)
    vision = Ablate(heads="top 2 sink", atlas=atlas, tower="vision")
    top = atlas.top("sink", k=2)
    top_vision = atlas.top("sink", k=2, tower="vision")
    assert text.heads == sorted(zip(top.layer, top["head"], strict=True))
    assert vision.heads == sorted(zip(top_vision.layer, top_vision["head"], strict=True))
    assert all(h < 2 for _, h in vision.heads)
    model, inputs = BY_NAME["llava"].build()  # the same configuration as the saved model
    with torch.no_grad(), headmap.observe(model, edits=[vision]):
        model(**inputs)  # binds against the vision tower's 2 x 2 heads
    with pytest.raises(EditError, match="no head rows of the cross tower"):
        Ablate(heads="top 2 sink", atlas=atlas, tower="cross")
    # a metric measured in the vision tower only: the rule is read there from the start (in Python and in a spec)
    rows = [
        dict(probe=p, metric=p, tower=t, layer=l, head=h, kv_head=h, value=float(l + h), stderr=0.0, n=1)
        for p, t in (("sink", "text"), ("patchy", "vision"))
        for l in (0, 1)
        for h in range(2)
    ]
    only = Atlas(heads=pd.DataFrame(rows), meta={})
    assert Ablate(heads="top 1 patchy", atlas=only, tower="vision").heads == [(1, 1)]
    assert make_edits('ablate:heads="top 1 patchy":tower=vision', atlas=only)[0].heads == [(1, 1)]
    with pytest.raises(EditError, match="no head metric 'patchy'"):
        Ablate(heads="top 1 patchy", atlas=only)  # the language tower has no such rows


# --------------------------------------------------------------------------------------------
# 3. vision_aware inside headmap scan
# --------------------------------------------------------------------------------------------


def _direct_vision_aware(llava_dir: Path, limit: int, batch: int) -> pd.DataFrame:
    """vision_aware from the probe's own paired forward on the scan's batches (left padding, positions from each
    input's first real token, the processor's pixel tensors)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from headmap.corpus import load_corpus, pad_batch, prepare_images
    from headmap.corpus.images import collate
    from headmap.models import position_ids

    model = LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
    proc = AutoProcessor.from_pretrained(llava_dir)
    corpus = prepare_images(load_corpus("shapes", proc.tokenizer, 512, limit=limit), proc, 512, model)
    probe = VisionAwareProbe()
    for start in range(0, limit, batch):
        samples = corpus.samples[start : start + batch]
        ids, mask = pad_batch([s.ids for s in samples], 0, left_pad=True)
        extra = collate(samples, ids.shape[1], True, "cpu")
        probe.measure(model, dict(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), **extra))
    return pd.DataFrame(probe.head_rows())


def test_vision_aware_scans_shapes_through_the_cli(monkeypatch, capsys, llava_dir, tmp_path):
    out = tmp_path / "run"
    code, _, err = run(
        monkeypatch, capsys, "scan", str(llava_dir), "--probes", "sink,vision_aware", "--corpus", "shapes",
        "--limit", "3", "--batch-size", "2", "--out", str(out), "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    heads = pd.read_parquet(out / "heads.parquet")
    rows = heads[heads.probe == "vision_aware"].sort_values(["layer", "head"]).reset_index(drop=True)
    assert set(rows.tower) == {"text"} and set(heads.tower) == {"text", "vision"}  # sink has vision rows too
    assert sorted(zip(rows.layer, rows["head"], strict=True)) == [(l, h) for l in (0, 1) for h in range(4)]
    assert (rows.n == 3).all() and (rows.value > 0).all()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["probe_corpora"]["vision_aware"] == "shapes" and "vision_aware" in meta["probes"]
    # the scan ran the probe's paired forward on its batches: the same computation as measure() on them
    want = _direct_vision_aware(llava_dir, 3, 2).sort_values(["layer", "head"]).reset_index(drop=True)
    assert np.array_equal(rows.value.to_numpy(), want.value.to_numpy())
    assert np.array_equal(rows.n.to_numpy(), want.n.to_numpy())


def test_vision_aware_alone_reads_shapes_by_default(llava_dir, tmp_path):
    atlas = headmap.scan(str(llava_dir), probes="vision_aware", limit=2, batch_size=2, progress=False)
    assert atlas.meta["probe_corpora"] == {"vision_aware": "shapes"}  # its built-in corpus
    # all rows of the text tower: the table has no tower column, which reads as text (docs/multimodal.md)
    assert set(towers_of(atlas.heads)) == {"text"} and len(atlas.heads) == 8


def test_vision_aware_on_a_text_corpus_is_one_clear_line(monkeypatch, capsys, llava_dir, tmp_path):
    text = tmp_path / "plain.txt"
    text.write_text("what colour is the square\nhow many circles are there\n")
    code, _, err = run(
        monkeypatch, capsys, "scan", str(llava_dir), "--corpus", str(text), "--probes", "vision_aware",
        "--out", str(tmp_path / "run"), "--no-progress",
    )  # fmt: skip
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("headmap: error:")]
    assert len(errors) == 1 and "vision_aware" in errors[0] and "image corpus" in errors[0], err
    assert not (tmp_path / "run").exists()
