"""Model parallel scans (issue 13): a device map with CPU and disk offload gives the tables of a plain run.

accelerate's hooks move each offloaded layer's weights in for its forward exactly as they move
layers between GPUs, so a map that sends some layers to "cpu" and some to "disk" exercises the same
path on this CPU machine. The arithmetic is the same (same device, same dtype, same order), so the
tables are compared for equality, not within a bound.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest

import headmap
from headmap import cli
from headmap.errors import OptionError
from headmap.models import load_model

SCAN = {"probes": "sink,entropy,prev_token,received", "max_length": 24, "batch_size": 2, "progress": False}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("dm") / "corpus.txt"
    path.write_text("\n".join(f"line {i} says the cat sat on mat number {i * 7}" for i in range(5)) + "\n")
    return path


def _map(offload: str) -> dict[str, str]:
    return {
        "model.embed_tokens": "cpu",
        "model.rotary_emb": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": offload,
        "model.norm": "cpu",
        "lm_head": "disk",
    }


def assert_same_tables(a, b) -> None:
    for name in ("heads", "tokens", "maps"):
        pd.testing.assert_frame_equal(getattr(a, name), getattr(b, name), check_exact=True)


def test_device_map_with_disk_offload_equals_plain_run(tiny_llama_dir, corpus, tmp_path):
    plain = headmap.scan(str(tiny_llama_dir), corpus=str(corpus), **SCAN)
    mapped = headmap.scan(
        str(tiny_llama_dir), corpus=str(corpus), device_map=_map("disk"), offload_folder=tmp_path / "off", **SCAN
    )
    assert len(plain.heads) > 0 and len(plain.tokens) > 0
    assert_same_tables(plain, mapped)
    assert mapped.meta["device"].startswith("map:") and "disk=" in mapped.meta["device"]
    # the layer sent to disk really is offloaded: its weights are on the meta device until its forward
    loaded = load_model(str(tiny_llama_dir), device_map=_map("disk"), offload_folder=tmp_path / "off")
    assert {p.device.type for p in loaded.model.model.layers[1].parameters()} == {"meta"}
    assert {p.device.type for p in loaded.model.model.layers[0].parameters()} == {"cpu"}


def test_auto_map_from_max_memory_and_cli_file(monkeypatch, capsys, tiny_llama_dir, corpus, tmp_path):
    plain = headmap.scan(str(tiny_llama_dir), corpus=str(corpus), **SCAN)
    # a CPU budget below the whole model: accelerate puts what does not fit on disk
    budget = {"device_map": "auto", "max_memory": "cpu=40KB,disk=1GB"}
    auto = headmap.scan(str(tiny_llama_dir), corpus=str(corpus), **budget, **SCAN)
    assert "disk" in auto.meta["device"]
    assert_same_tables(plain, auto)
    file = tmp_path / "map.json"
    file.write_text(json.dumps(_map("cpu")))
    out = tmp_path / "run"
    monkeypatch.setattr(
        "sys.argv",
        ["headmap", "scan", str(tiny_llama_dir), "--corpus", str(corpus), "--probes", SCAN["probes"], "--max-length",
         "24", "--batch-size", "2", "--no-progress", "--out", str(out), "--device-map", str(file)],
    )  # fmt: skip
    cli.main()  # returns on success
    plain.save(tmp_path / "plain")  # compared as written to disk: the same column types
    assert_same_tables(headmap.Atlas.load(tmp_path / "plain"), headmap.Atlas.load(out))


@pytest.mark.parametrize(
    ("kwargs", "needles"),
    [
        ({"device_map": {**_map("cpu"), "model.layers.7": "cpu"}}, ["model.layers.7", "lacks", "model.layers.1)"]),
        ({"device_map": {**_map("cpu"), "model.layers.1": "cuda:3"}}, ["model.layers.1", "cuda:3"]),
        ({"device_map": {**_map("cpu"), "model.layers.1": 2}}, ["model.layers.1", "cuda:2"]),
        ({"device_map": {k: v for k, v in _map("cpu").items() if k != "lm_head"}}, ["lm_head", "places no device"]),
        ({"device_map": "auto", "max_memory": "cpu=1KB"}, ["one layer", "KiB", "at least"]),
        ({"device_map": "auto", "max_memory": "cpu=lots"}, ["lots", "not a size"]),
        ({"device_map": "everywhere"}, ["everywhere", "auto"]),
        ({"max_memory": "cpu=1GB"}, ["--device-map"]),
    ],
)
def test_bad_device_map_is_one_line_before_loading(tiny_llama_dir, corpus, tmp_path, kwargs, needles):
    with pytest.raises(OptionError) as err:
        headmap.scan(str(tiny_llama_dir), corpus=str(corpus), out=tmp_path / "run", **SCAN, **kwargs)
    msg = str(err.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_layer_size_in_max_memory_message(tiny_llama_dir, corpus):
    # one Llama layer of the tiny model: 4 attention projections and 3 MLP matrices, float32
    hidden, inter, heads, kv = 32, 64, 4, 2
    head_dim = hidden // heads
    params = hidden * hidden * 2 + 2 * hidden * kv * head_dim + 3 * hidden * inter + 2 * hidden  # + 2 norms
    with pytest.raises(OptionError) as err:
        headmap.scan(str(tiny_llama_dir), corpus=str(corpus), device_map="auto", max_memory="cpu=1KB", **SCAN)
    assert f"{params * 4 / 1024:.1f} KiB" in str(err.value)


def test_cli_bad_map_exits_2(monkeypatch, capsys, tiny_llama_dir, corpus, tmp_path):
    file = tmp_path / "map.json"
    file.write_text(json.dumps({**_map("cpu"), "model.decoder": "cpu"}))
    monkeypatch.setattr(
        "sys.argv", ["headmap", "scan", str(tiny_llama_dir), "--corpus", str(corpus), "--device-map", str(file),
                     "--out", str(tmp_path / "run")],
    )  # fmt: skip
    with pytest.raises(SystemExit) as stop:
        cli.main()
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2
    assert len(err.splitlines()) == 1 and "model.decoder" in err
