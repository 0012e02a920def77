"""The headmap command line: a working scan, and one clear line for every bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from cli_runner import assert_one_line_error, run


@pytest.fixture
def corpus_file(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("the cat sat on the mat\n\nand the dog sat on the log\nbirds fly south in winter\n")
    return path


def test_scan_writes_the_contract(monkeypatch, capsys, tiny_llama_dir, corpus_file, tmp_path):
    out = tmp_path / "run"
    code, stdout, err = run(
        monkeypatch,
        capsys,
        "scan",
        str(tiny_llama_dir),
        "--probes",
        "sink",
        "--corpus",
        str(corpus_file),
        "--out",
        str(out),
        "--batch-size",
        "2",
        "--no-progress",
    )
    assert code == 0, err
    heads = pd.read_parquet(out / "heads.parquet")
    assert list(heads.columns) == ["probe", "metric", "layer", "head", "kv_head", "value", "stderr", "n"]
    assert len(heads) == 2 * 4  # 2 layers x 4 heads, one probe
    assert (heads.probe == "sink").all() and (heads.metric == "sink").all()
    assert (heads.kv_head == heads["head"] // 2).all()  # 4 query heads share 2 kv heads
    assert (heads.n == 3).all()  # three non-blank lines
    assert heads.value.between(0, 1).all()
    assert heads.value.dtype == "float64"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["architecture"]["layers"] == 2 and meta["architecture"]["heads"] == 4
    assert meta["architecture"]["kv_heads"] == 2
    assert meta["corpus"]["inputs"] == 3 and meta["dtype"] == "float32" and meta["device"] == "cpu"
    for key in ("versions", "wall_time_s", "memory", "probes", "model"):
        assert key in meta
    assert "heads.parquet" in stdout


def test_unknown_model_id(monkeypatch, capsys, tmp_path):
    out = tmp_path / "run"
    code, _, err = run(monkeypatch, capsys, "scan", "no-such-org/no-such-model", "--out", str(out))
    assert_one_line_error(code, err, "no-such-org/no-such-model", "local folder")
    assert not out.exists()


def test_missing_local_path(monkeypatch, capsys, tmp_path):
    code, _, err = run(monkeypatch, capsys, "scan", str(tmp_path / "nothing" / "here"), "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "no such model folder")


def test_folder_without_config(monkeypatch, capsys, tmp_path):
    folder = tmp_path / "empty-model"
    folder.mkdir()
    code, _, err = run(monkeypatch, capsys, "scan", str(folder), "--out", str(tmp_path / "run"))
    assert_one_line_error(code, err, "config.json")
    assert not (tmp_path / "run").exists()


def test_unknown_architecture(monkeypatch, capsys, tmp_path):
    folder = tmp_path / "weird"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "not-a-real-architecture"}))
    code, _, err = run(monkeypatch, capsys, "scan", str(folder), "--out", str(tmp_path / "run"))
    assert_one_line_error(code, err, "does not know the architecture")


def test_unsupported_architecture(monkeypatch, capsys, tmp_path):
    from transformers import MambaConfig, MambaForCausalLM

    folder = tmp_path / "mamba"
    MambaForCausalLM(MambaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, state_size=4)).save_pretrained(
        folder
    )
    code, _, err = run(monkeypatch, capsys, "scan", str(folder), "--out", str(tmp_path / "run"))
    assert_one_line_error(code, err, "'mamba'", "llama")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "content, needle",
    [(None, "does not exist"), (b"", "empty"), (b"\n  \n\n", "empty"), (b"caf\xe9 au lait\n", "not UTF-8")],
    ids=["missing", "empty", "blank", "latin1"],
)
def test_bad_corpus(monkeypatch, capsys, tiny_llama_dir, tmp_path, content, needle):
    path = tmp_path / "corpus.txt"
    if content is not None:
        path.write_bytes(content)
    out = tmp_path / "run"
    code, _, err = run(monkeypatch, capsys, "scan", str(tiny_llama_dir), "--corpus", str(path), "--out", str(out))
    assert_one_line_error(code, err, needle)
    assert not out.exists()


def test_unknown_builtin_corpus(monkeypatch, capsys, tiny_llama_dir, tmp_path):
    code, _, err = run(
        monkeypatch,
        capsys,
        "scan",
        str(tiny_llama_dir),
        "--corpus",
        "wikipedia",
        "--out",
        str(tmp_path / "r"),
    )
    assert_one_line_error(code, err, "'wikipedia'", "text, repeats")


@pytest.mark.parametrize("length, needle", [("1", "at least 2"), ("100000", "limit of 256")])
def test_bad_max_length(monkeypatch, capsys, tiny_llama_dir, corpus_file, tmp_path, length, needle):
    out = tmp_path / "run"
    code, _, err = run(
        monkeypatch,
        capsys,
        "scan",
        str(tiny_llama_dir),
        "--corpus",
        str(corpus_file),
        "--max-length",
        length,
        "--out",
        str(out),
    )
    assert_one_line_error(code, err, needle)
    assert not out.exists()


def test_unknown_probe(monkeypatch, capsys, tiny_llama_dir, tmp_path):
    code, _, err = run(
        monkeypatch,
        capsys,
        "scan",
        str(tiny_llama_dir),
        "--probes",
        "sink,nope",
        "--out",
        str(tmp_path / "run"),
    )
    assert_one_line_error(code, err, "'nope'", "sink")


@pytest.mark.parametrize(
    "option, value, needle",
    [
        ("--dtype", "float8", "unknown dtype"),
        ("--device", "cuda", "not available"),
        ("--batch-size", "0", "at least 1"),
    ],
)
def test_bad_options(monkeypatch, capsys, tiny_llama_dir, corpus_file, tmp_path, option, value, needle):
    if value == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, _, err = run(
        monkeypatch,
        capsys,
        "scan",
        str(tiny_llama_dir),
        "--corpus",
        str(corpus_file),
        option,
        value,
        "--out",
        str(tmp_path / "run"),
    )
    assert_one_line_error(code, err, needle)


def test_output_folder_with_another_run(monkeypatch, capsys, tiny_llama_dir, corpus_file, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["scan", str(tiny_llama_dir), "--corpus", str(corpus_file), "--out", str(out), "--no-progress"]
    assert run(monkeypatch, capsys, *args)[0] == 0  # a folder of foreign files is fine: nothing collides
    before = (out / "heads.parquet").read_bytes()
    code, _, err = run(monkeypatch, capsys, *args)
    assert_one_line_error(code, err, "already holds a headmap run", "--overwrite")
    assert (out / "heads.parquet").read_bytes() == before  # refused: the first run is intact
    code, _, err = run(monkeypatch, capsys, *args, "--overwrite")
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "mine"  # never delete what headmap did not write
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_out_is_a_file(monkeypatch, capsys, tiny_llama_dir, corpus_file, tmp_path):
    target = tmp_path / "file"
    target.write_text("keep me")
    code, _, err = run(
        monkeypatch, capsys, "scan", str(tiny_llama_dir), "--corpus", str(corpus_file), "--out", str(target)
    )
    assert_one_line_error(code, err, "is a file")
    assert target.read_text() == "keep me"


def test_console_script_error_has_no_traceback(tmp_path):
    exe = Path(sys.executable).with_name("headmap")
    proc = subprocess.run(
        [str(exe), "scan", "--probes", "nope", "--out", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("headmap: error: unknown probe 'nope'")


def test_unreachable_hub_fails_fast(monkeypatch, capsys, tmp_path):
    """Without HF_HUB_OFFLINE, an unreachable hub is detected once, not retried for a minute."""
    from headmap import models

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: False)
    code, _, err = run(monkeypatch, capsys, "scan", "some-org/some-model", "--out", str(tmp_path / "r"))
    assert_one_line_error(code, err, "hub could not be reached")


def test_scan_many_probes_on_repeats(monkeypatch, capsys, tiny_llama_dir, tmp_path):
    out = tmp_path / "run"
    probes = "sink,entropy,mean_distance,waad,prev_token,duplicate_token,induction"
    code, _, err = run(
        monkeypatch,
        capsys,
        "scan",
        str(tiny_llama_dir),
        "--probes",
        probes,
        "--corpus",
        "repeats",
        "--max-length",
        "33",
        "--limit",
        "3",
        "--out",
        str(out),
        "--no-progress",
    )
    assert code == 0, err
    heads = pd.read_parquet(out / "heads.parquet")
    assert sorted(heads.probe.unique()) == sorted(probes.split(","))
    assert (heads.groupby("probe").size() == 8).all()
    assert (heads.n == 3).all()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["probes"]["waad"] == {"window": 10}
    assert meta["probes"]["induction"]["repeat_length"] == 16


def test_repeat_probes_need_the_repeats_corpus(monkeypatch, capsys, tiny_llama_dir, corpus_file, tmp_path):
    code, _, err = run(
        monkeypatch,
        capsys,
        "scan",
        str(tiny_llama_dir),
        "--probes",
        "induction",
        "--corpus",
        str(corpus_file),
        "--out",
        str(tmp_path / "r"),
    )
    assert_one_line_error(code, err, "repeats")
    assert not (tmp_path / "r").exists()


# -- usage mistakes: click's usage message, its --help hint and exit code 2, never a traceback ----------


@pytest.mark.parametrize(
    "args, command, needle",
    [
        (["nosuchcommand"], "headmap", "No such command 'nosuchcommand'"),
        (["--no-such-flag"], "headmap", "No such option: --no-such-flag"),
        (["scan", "--no-such-flag"], "headmap scan", "No such option: --no-such-flag"),
        (["scan", "--probes"], "headmap scan", "Option '--probes' requires an argument"),
        (["scan", "--max-length", "many"], "headmap scan", "Invalid value for '--max-length'"),
        (["steer", "--prompt", "hi"], "headmap steer", "Missing option '--edit'"),
        (["steer", "--edit", "temperature:tau=2"], "headmap steer", "Missing option '--prompt'"),
        (["report"], "headmap report", "Missing argument"),
        (["eval", "--bogus"], "headmap eval", "No such option: --bogus"),
    ],
)
def test_usage_mistakes_get_the_usage_message(monkeypatch, capsys, args, command, needle):
    code, out, err = run(monkeypatch, capsys, *args)
    assert code == 2, err
    assert "Traceback" not in err + out
    assert err.startswith(f"Usage: {command} "), err
    assert f"Try '{command} --help' for help." in err
    assert needle in err


def test_no_arguments_prints_the_help(monkeypatch, capsys):
    code, out, err = run(monkeypatch, capsys)
    assert code == 2
    assert "Traceback" not in out + err
    assert "scan" in out + err and "steer" in out + err


def test_console_script_usage_mistake(tmp_path):
    exe = Path(sys.executable).with_name("headmap")
    proc = subprocess.run([str(exe), "scan", "--no-such-flag"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[:2] == [
        "Usage: headmap scan [OPTIONS] [model]",
        "Try 'headmap scan --help' for help.",
    ]
    assert proc.stderr.strip().endswith("Error: No such option: --no-such-flag")


# -- help texts: paragraphs reflowed (no line cut mid-sentence), brackets shown ----------------------------


@pytest.mark.parametrize("command", ["scan", "steer", "eval", "tune", "report"])
def test_help_paragraphs_are_not_cut_mid_sentence(monkeypatch, capsys, command):
    """On a terminal wide enough for every paragraph, each paragraph of the docstring is one line of --help."""
    import inspect

    from headmap.cli import app

    monkeypatch.setenv("COLUMNS", "1000")
    code, out, _ = run(monkeypatch, capsys, command, "--help")
    assert code == 0
    info = next(c for c in app.registered_commands if (c.name or c.callback.__name__) == command)
    lines = [" ".join(line.split()) for line in out.splitlines()]
    for paragraph in inspect.getdoc(info.callback).split("\n\n"):
        words = " ".join(paragraph.split())
        assert any(words in line for line in lines), f"{command} --help cuts the paragraph {words!r}:\n{out}"


def test_help_shows_brackets(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "1000")
    code, out, _ = run(monkeypatch, capsys, "steer", "--help")
    assert code == 0
    flat = " ".join(out.replace("│", " ").split())
    assert "heads=[[layer,head],...]" in flat
    assert "span=[start,end]" in flat


def test_steer_model_defaults_to_the_builtin_and_shows_newlines(monkeypatch, capsys):
    """MODEL is optional (as for scan, eval, tune); line breaks of a generation show as \\n, not blank rows."""
    import importlib

    from headmap.steer import Comparison

    steering = importlib.import_module("headmap.steer")  # the module (headmap.steer is also the function)

    seen = {}

    def fake_compare(model, edits, prompt, **kwargs):
        seen["model"] = model
        return Comparison("m", prompt, ["temperature"], "\n\nHello\tworld", "Hi\nthere", [1, 2], [3])

    monkeypatch.setattr(steering, "compare", fake_compare)
    monkeypatch.setenv("COLUMNS", "120")
    code, out, err = run(monkeypatch, capsys, "steer", "--edit", "temperature:tau=2", "--prompt", "hi")
    assert code == 0, err
    assert seen["model"] is None  # load_model(None) is the built-in smollm2
    assert "\\n\\nHello\\tworld" in out
    assert "Hi\\nthere" in out
    rows = [line for line in out.splitlines() if line.startswith("│")]
    assert all(line.strip("│ ") for line in rows), out  # no blank row inside the table


def _spoil_config(folder: Path) -> None:
    (folder / "config.json").write_text('{"model_type": "llama",\n  "hidden_size": 32,,\n}')


def _config_list(folder: Path) -> None:
    (folder / "config.json").write_text("[1, 2]")


def _damage_weights(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])


def _drop_tokenizer(folder: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        (folder / name).unlink(missing_ok=True)


def _spoil_tokenizer(folder: Path) -> None:
    (folder / "tokenizer.json").write_text("{oops")


@pytest.mark.parametrize(
    "spoil, needles",
    [
        (_spoil_config, ["config.json is not valid JSON", "line 2 column 21"]),
        (_config_list, ["config.json holds a JSON list"]),
        (_damage_weights, ["weights in", "damaged or incomplete"]),
        (_drop_tokenizer, ["has no tokenizer files"]),
        (_spoil_tokenizer, ["tokenizer.json is not valid JSON"]),
    ],
    ids=["config-not-json", "config-a-list", "weights-truncated", "no-tokenizer", "tokenizer-not-json"],
)
def test_broken_model_folder_is_one_line(monkeypatch, capsys, tiny_llama_dir, tmp_path, spoil, needles):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, folder)
    spoil(folder)
    code, _, err = run(monkeypatch, capsys, "scan", str(folder), "--out", str(tmp_path / "run"))
    assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag, shown", [("--no-progress", False), ("--progress", False)])
def test_scan_progress_flag_reaches_the_model_loader(monkeypatch, capsys, tmp_path, flag, shown):
    """--no-progress silences the GGUF dequantization bar too (and off a terminal, --progress shows none)."""
    import importlib

    from headmap import models
    from headmap.errors import OptionError

    scanning = importlib.import_module("headmap.scan")  # the package (headmap.scan is also the function)
    seen = {}

    def fake_scan(*args, **kwargs):
        seen["loader"] = models._show_progress(None)
        seen["scan"] = kwargs["progress"]
        raise OptionError("stop here")

    monkeypatch.setattr(scanning, "scan", fake_scan)
    code, _, err = run(monkeypatch, capsys, "scan", flag, "--out", str(tmp_path / "r"))
    assert_one_line_error(code, err, "stop here")
    assert seen == {"loader": shown, "scan": shown}
