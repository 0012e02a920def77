"""Bigger corpora (issue 13): a folder of .txt/.jsonl files and a Parquet file stream like a text file;
``--limit`` and ``--shard i/n`` select work deterministically."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import headmap
from headmap import cli
from headmap.corpus import load_corpus
from headmap.corpus.files import FileSamples
from headmap.errors import CorpusError, OptionError

SCAN = {"probes": "sink,received", "max_length": 24, "batch_size": 2, "progress": False}
LINES = [f"line {i} says the cat sat on mat {i * 7}" + " again" * (i % 4) for i in range(11)]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    (root / "c.txt").write_text("\n".join(LINES) + "\n")
    folder = root / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("\n".join(LINES[:4]) + "\n\n")
    (folder / "sub" / "b.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in LINES[4:]) + "\n")
    (folder / "notes.md").write_text("not read\n")
    pq.write_table(pa.table({"id": list(range(len(LINES))), "text": LINES}), root / "c.parquet", row_group_size=3)
    return root


def test_folder_and_parquet_equal_the_text_file(tiny_llama_dir, sources):
    tok = headmap.load_model(str(tiny_llama_dir)).tokenizer
    plain = headmap.scan(str(tiny_llama_dir), corpus=str(sources / "c.txt"), **SCAN)
    for spec in ("folder", "c.parquet"):
        corpus = load_corpus(str(sources / spec), tok, 24)
        assert isinstance(corpus.samples, FileSamples)  # streamed: offsets kept, texts read when needed
        assert [s.ids for s in corpus.samples] == [s.ids for s in load_corpus(str(sources / "c.txt"), tok, 24).samples]
        atlas = headmap.scan(str(tiny_llama_dir), corpus=str(sources / spec), **SCAN)
        assert atlas.meta["fingerprint"]["corpus"]["sha256"] == plain.meta["fingerprint"]["corpus"]["sha256"]
        pd.testing.assert_frame_equal(atlas.heads, plain.heads, check_exact=True)
        pd.testing.assert_frame_equal(atlas.tokens, plain.tokens, check_exact=True)


def test_limit_and_shards_cover_the_corpus(tiny_llama_dir, sources):
    whole = headmap.scan(str(tiny_llama_dir), corpus=str(sources / "c.parquet"), limit=9, **SCAN)
    assert whole.meta["corpus"]["inputs"] == 9
    parts = [
        headmap.scan(str(tiny_llama_dir), corpus=str(sources / "c.parquet"), limit=9, shard=f"{i}/3", **SCAN)
        for i in range(3)
    ]
    # 9 inputs in batches of 2 make 5 batches: shards of 1, 2 and 2 batches, inputs numbered as in the whole
    assert [sorted(p.tokens["sample"].unique()) for p in parts] == [[0, 1], [2, 3, 4, 5], [6, 7, 8]]
    joined = pd.concat([p.tokens for p in parts], ignore_index=True)
    joined = joined.sort_values(["metric", "sample", "layer", "position"], kind="stable").reset_index(drop=True)
    pd.testing.assert_frame_equal(joined, whole.tokens, check_exact=True)
    assert sum(int(p.heads.n.iloc[0]) for p in parts) == int(whole.heads.n.iloc[0])
    # the same command gives the same shard
    again = headmap.scan(str(tiny_llama_dir), corpus=str(sources / "c.parquet"), limit=9, shard="1/3", **SCAN)
    pd.testing.assert_frame_equal(again.tokens, parts[1].tokens, check_exact=True)
    assert parts[1].meta["options"]["shard"] == "1/3"


BAD_SHARDS = [("3/3", "out of range"), ("-1/2", "out of range"), ("1/0", "out of range"), ("two", "I/N")]


@pytest.mark.parametrize(("shard", "needle"), BAD_SHARDS)
def test_bad_shard_is_one_line_exit_2(monkeypatch, capsys, tiny_llama_dir, sources, tmp_path, shard, needle):
    monkeypatch.setattr("sys.argv", ["headmap", "scan", str(tiny_llama_dir), "--corpus", str(sources / "c.txt"),
                                     "--shard", shard, "--out", str(tmp_path / "run")])  # fmt: skip
    with pytest.raises(SystemExit) as stop:
        cli.main()
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1 and needle in err
    assert not (tmp_path / "run").exists()


def test_shard_without_inputs_is_refused(tiny_llama_dir, sources):
    with pytest.raises(OptionError, match="holds no input"):
        headmap.scan(
            str(tiny_llama_dir), corpus=str(sources / "c.txt"), limit=2, shard="0/2", **SCAN
        )  # one batch: shard 1 has it


def test_parquet_and_folder_mistakes(tiny_llama_dir, sources, tmp_path):
    tok = headmap.load_model(str(tiny_llama_dir)).tokenizer
    pq.write_table(pa.table({"a": ["x"], "b": ["y"]}), tmp_path / "two.parquet")
    with pytest.raises(CorpusError, match="several string columns"):
        load_corpus(str(tmp_path / "two.parquet"), tok, 24)
    pq.write_table(pa.table({"body": ["some words", None, "more words"]}), tmp_path / "one.parquet")
    assert len(load_corpus(str(tmp_path / "one.parquet"), tok, 24)) == 2  # the only string column; nulls skipped
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="no .txt or .jsonl"):
        load_corpus(str(tmp_path / "empty"), tok, 24)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jsonl").write_text('{"txt": "no"}\n')
    with pytest.raises(CorpusError, match='"text" string'):
        load_corpus(str(tmp_path / "bad"), tok, 24)
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(CorpusError, match="as Parquet"):
        load_corpus(str(tmp_path / "junk.parquet"), tok, 24)
    assert np.all(np.diff([s.info["line"] for s in load_corpus(str(sources / "c.parquet"), tok, 24).samples]) == 1)
