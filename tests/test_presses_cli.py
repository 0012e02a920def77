"""``headmap compress``: its table, summary and plot on a tiny model, and one clear line for each bad input."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from cli_runner import assert_one_line_error, run


@pytest.fixture
def task_file(tmp_path):
    path = tmp_path / "task.jsonl"
    lines = []
    for k in range(3):
        context = " ".join(["the cat sat on the mat and the dog sat on the log"] * 6) + f" the code is {k}7{k}."
        lines.append(json.dumps({"context": context, "question": "what is the code?", "answer": f"{k}7{k}"}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_compress_writes_table_summary_and_plot(monkeypatch, capsys, tiny_llama_dir, task_file, tmp_path):
    out = tmp_path / "run"
    code, stdout, err = run(
        monkeypatch, capsys, "compress", str(tiny_llama_dir), "--press", "knorm", "--press", "snapkv:window=8",
        "--ratio", "0.25,0.5", "--task", str(task_file), "--max-new-tokens", "3", "--out", str(out),
    )  # fmt: skip
    assert code == 0, err
    table = pd.read_parquet(out / "compress.parquet")
    assert {"press", "ratio", "item", "correct", "cache_bytes", "prefill_s", "decode_s_per_token"} <= set(table.columns)
    assert len(table) == 3 * (1 + 2 * 2)  # items x (full + presses x ratios)
    full = table[table.press == "full"].set_index("item").cache_bytes
    for _, row in table[table.press != "full"].iterrows():
        # cache bytes are measured from the tensors: within 2 % of (1 - ratio) x the full cache
        assert abs(row.cache_bytes - (1 - row.ratio) * full[row["item"]]) <= 0.02 * full[row["item"]]
    summary = json.loads((out / "compress.json").read_text())["summary"]
    assert {(s["press"], s["ratio"]) for s in summary} >= {("full", 0.0), ("knorm", 0.25), ("snapkv:window=8", 0.5)}
    assert all(s["low"] <= s["accuracy"] <= s["high"] for s in summary)
    assert (out / "compress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--press", "zip"], ["unknown press 'zip'"]),
        (["--press", "snapkv:windw=3"], ["no parameter 'windw'"]),
        (["--press", "knorm", "--ratio", "0.5,1"], ["outside [0, 1)"]),
        (["--press", "knorm", "--ratio", "half"], ["not a number"]),
        (["--press", "head_aware"], ["head_aware needs an atlas"]),
    ],
)
def test_bad_options(monkeypatch, capsys, tiny_llama_dir, task_file, tmp_path, args, needles):
    out = tmp_path / "run"
    code, _, err = run(monkeypatch, capsys, "compress", str(tiny_llama_dir), *args, "--task", str(task_file),
                       "--out", str(out))  # fmt: skip
    assert_one_line_error(code, err, *needles)
    assert not out.exists()  # nothing written before the options are checked


def test_malformed_task_line(monkeypatch, capsys, tiny_llama_dir, tmp_path):
    task = tmp_path / "bad.jsonl"
    task.write_text('{"context": "a b c", "answer": "c"}\n{"context": 3}\n')
    code, _, err = run(monkeypatch, capsys, "compress", str(tiny_llama_dir), "--press", "knorm", "--task", str(task),
                       "--out", str(tmp_path / "o"))  # fmt: skip
    assert_one_line_error(code, err, "line 2")


def test_existing_table_is_not_replaced(monkeypatch, capsys, tiny_llama_dir, task_file, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "compress.parquet").write_text("earlier")
    code, _, err = run(monkeypatch, capsys, "compress", str(tiny_llama_dir), "--press", "knorm", "--task",
                       str(task_file), "--out", str(out))  # fmt: skip
    assert_one_line_error(code, err, "--overwrite")
    assert (out / "compress.parquet").read_text() == "earlier"


def test_context_longer_than_the_model_limit(monkeypatch, capsys, tiny_llama_dir, tmp_path):
    task = tmp_path / "long.jsonl"
    task.write_text(json.dumps({"id": "long-1", "context": "the cat sat " * 200, "answer": "cat"}) + "\n")
    out = tmp_path / "o"
    code, _, err = run(monkeypatch, capsys, "compress", str(tiny_llama_dir), "--press", "knorm", "--task", str(task),
                       "--out", str(out))  # fmt: skip
    assert_one_line_error(code, err, "item long-1", "limit of 256")
    assert not (out / "compress.parquet").exists()


# -- one shared prefill (the default) against one prefill per press -----------------------------------
def test_shared_prefill_gives_the_rows_of_one_prefill_per_press(
    monkeypatch, capsys, tiny_llama_dir, task_file, tmp_path
):
    tables = {}
    for mode in ("shared", "each"):
        out = tmp_path / mode
        code, _, err = run(
            monkeypatch, capsys, "compress", str(tiny_llama_dir), "--press", "knorm", "--press", "snapkv:window=8",
            "--press", "h2o", "--ratio", "0.25,0.75", "--task", str(task_file), "--max-new-tokens", "4",
            "--prefill", mode, "--out", str(out),
        )  # fmt: skip
        assert code == 0, err
        tables[mode] = pd.read_parquet(out / "compress.parquet").set_index(["press", "ratio", "item"]).sort_index()
        meta = json.loads((out / "compress.json").read_text())
        assert meta["prefill"] == mode and "prefill_s" in meta["timing"]
    shared, each = tables["shared"], tables["each"]
    assert list(shared.index) == list(each.index)
    assert (shared.cache_bytes == each.cache_bytes).all() and (shared.full_bytes == each.full_bytes).all()
    # snapkv and h2o run under the engine in both modes: the same arithmetic, the same greedy answers.
    # knorm and the full cache read the engine's forward in shared mode (eager attention on their own):
    # tests/test_presses_shared.py bounds that difference; here only their bytes are compared.
    engine = [p in ("snapkv:window=8", "h2o") for p in shared.index.get_level_values("press")]
    assert (shared.output[engine] == each.output[engine]).all()
    assert (shared.correct[engine] == each.correct[engine]).all()
    # one prefill per item: the same prefill time on every row of an item; the press's surgery timed apart
    assert (shared.groupby(level="item").prefill_s.nunique() == 1).all()
    assert shared.press_s.notna().all() and each.press_s.isna().all()


def test_prefill_mode_must_be_known(monkeypatch, capsys, tiny_llama_dir, task_file, tmp_path):
    out = tmp_path / "o"
    code, _, err = run(monkeypatch, capsys, "compress", str(tiny_llama_dir), "--press", "knorm", "--task",
                       str(task_file), "--prefill", "twice", "--out", str(out))  # fmt: skip
    assert_one_line_error(code, err, "--prefill must be one of shared, each")
    assert not out.exists()


# -- RULER-style task options and the held-out check ----------------------------------------------------
def test_ruler_task_takes_the_options_of_eval(monkeypatch, capsys, tiny_llama_dir, tmp_path):
    out = tmp_path / "o"
    code, _, err = run(
        monkeypatch, capsys, "compress", str(tiny_llama_dir), "--press", "knorm", "--ratio", "0.5",
        "--task", "niah_single:lengths=160,192:n=4:per_haystack=1:seed=3:text=0.5-1",
        "--task", "variable_tracking:lengths=192:n=2:per_haystack=2", "--max-new-tokens", "auto", "--out", str(out),
    )  # fmt: skip
    assert code == 0, err
    table = pd.read_parquet(out / "compress.parquet")
    full = table[table.press == "full"]
    assert list(full.task) == [  # taken in turn, so that a stopped run keeps both tasks
        "niah_single:lengths=160,192:n=4:per_haystack=1:seed=3:text=0.5-1",
        "variable_tracking:lengths=192:n=2:per_haystack=2",
        "niah_single:lengths=160,192:n=4:per_haystack=1:seed=3:text=0.5-1",
        "variable_tracking:lengths=192:n=2:per_haystack=2",
        "niah_single:lengths=160,192:n=4:per_haystack=1:seed=3:text=0.5-1",
        "niah_single:lengths=160,192:n=4:per_haystack=1:seed=3:text=0.5-1",
    ]
    single = full[full.task.str.startswith("niah_single")]
    assert single.cluster.nunique() == 4  # per_haystack=1: one haystack per item
    assert all(item.startswith("niah_single-s3-") for item in single["item"])  # seed=3
    assert full[full.task.str.startswith("variable")].cluster.nunique() == 1  # per_haystack=2: one shared haystack
    assert (full.length <= 192).all()
    # auto: as many new tokens as the answers take (variable tracking names several variables)
    assert full.max_new_tokens.min() >= 3 and full.max_new_tokens.nunique() >= 2
    meta = json.loads((out / "compress.json").read_text())
    assert meta["held_out"] == "not checked: no --atlas" and meta["items"] == 6


def test_load_items_reads_the_text_range_and_the_limit(tiny_llama_dir):
    from transformers import AutoTokenizer

    from headmap.cli.compress import load_items
    from headmap.corpus import shipped_text

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    half = len(shipped_text()) // 2
    items = load_items("niah_single:lengths=160:n=5:per_haystack=1:text=0.5-1", tok, 3, 256)
    assert len(items) == 3  # --limit caps n
    assert all(min(it["info"]["paragraphs"]) >= half - 1 for it in items)  # the second half of the prose only
    assert load_items("needle:lengths=160:n=2", tok, 20, 256)[0]["id"].startswith("niah_single-")


@pytest.mark.parametrize(
    "task, needle",
    [
        ("niah_single:lengths=160:n=2:color=red", "'color=red' is not an option of niah_single"),
        ("niah_single:lengths=160:n=0", "n must be at least 1"),
        ("variable_tracking:echo=true", "echo applies to"),
        ("haystack_party", "not a file, 'needle' or a RULER-style task"),
    ],
)
def test_bad_task_options(monkeypatch, capsys, tiny_llama_dir, tmp_path, task, needle):
    out = tmp_path / "o"
    code, _, err = run(monkeypatch, capsys, "compress", str(tiny_llama_dir), "--press", "knorm", "--task", task,
                       "--out", str(out))  # fmt: skip
    assert_one_line_error(code, err, needle)
    assert not out.exists()


@pytest.fixture
def scanned_atlas(tmp_path):
    """An atlas of the tiny Llama whose corpus (meta.json) records one needle, one haystack and paragraphs 0-9."""
    from headmap.atlas import HEADS_SCHEMA, MAPS_SCHEMA, TOKENS_SCHEMA, Atlas, empty_frame

    rows = [("retrieval", "retrieval", layer, head, head // 2, 0.9 if head == 1 else 0.1, 0.01, 8)
            for layer in range(2) for head in range(4)]  # fmt: skip
    corpus = {"name": "needle", "needles": ["Oslo=12345"], "haystacks": ["text@3"], "paragraphs": list(range(10))}
    meta = {"architecture": {"layers": 2, "heads": 4, "kv_heads": 2}, "corpus": corpus}
    atlas = Atlas(
        heads=pd.DataFrame(rows, columns=HEADS_SCHEMA.names),
        tokens=empty_frame(TOKENS_SCHEMA),
        maps=empty_frame(MAPS_SCHEMA),
        meta=meta,
    )
    folder = tmp_path / "atlas"
    atlas.save(folder)
    return folder


def test_a_ruler_task_avoids_the_atlas_corpus_and_records_the_check(
    monkeypatch, capsys, tiny_llama_dir, tmp_path, scanned_atlas
):
    out = tmp_path / "o"
    code, stdout, err = run(
        monkeypatch, capsys, "compress", str(tiny_llama_dir), "--press", "head_aware:rule=top 25% retrieval:sinks=2",
        "--ratio", "0.5", "--atlas", str(scanned_atlas), "--task", "niah_single:lengths=160:n=3:per_haystack=1",
        "--max-new-tokens", "2", "--out", str(out),
    )  # fmt: skip
    assert code == 0, err
    held = json.loads((out / "compress.json").read_text())["held_out"]
    assert len(held) == 1 and held[0]["disjoint"] and held[0]["compared"] and not held[0]["allowed_overlap"]
    assert "held-out check" in stdout and "disjoint" in stdout


def test_an_overlap_with_the_atlas_corpus_is_refused_unless_allowed(
    monkeypatch, capsys, tiny_llama_dir, tmp_path, scanned_atlas
):
    task = tmp_path / "t.jsonl"
    lines = [
        {"context": "the code of Oslo is 12345. " * 3, "question": "code?", "answer": "12345", "needle": "Oslo=12345"},
        {"context": "the code of Rome is 777. " * 3, "question": "code?", "answer": "777", "needle": "Rome=777"},
    ]
    task.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "o"
    args = ["compress", str(tiny_llama_dir), "--press", "knorm", "--ratio", "0.5", "--atlas", str(scanned_atlas),
            "--task", str(task), "--max-new-tokens", "2", "--out", str(out)]  # fmt: skip
    code, _, err = run(monkeypatch, capsys, *args)
    assert_one_line_error(code, err, "overlap", "1 shared needles (Oslo=12345)", "--allow-overlap")
    assert not out.exists()  # refused before the model loads
    code, _, err = run(monkeypatch, capsys, *args, "--allow-overlap")
    assert code == 0, err
    held = json.loads((out / "compress.json").read_text())["held_out"]
    assert held[0]["allowed_overlap"] and not held[0]["disjoint"] and held[0]["shared"]["needles"] == 1
