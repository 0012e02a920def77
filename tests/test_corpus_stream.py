"""Plain text corpora are streamed: one checking pass keeps offsets and counts, inputs are tokenised when read.

The scan's numbers do not depend on it: a streamed file gives the tables of the same inputs held in
memory, its fingerprint is the same hash of token ids, and a file that changes under a running scan
is refused instead of silently mixing two corpora.
"""

from __future__ import annotations

import os
import threading
import tracemalloc

import numpy as np
import pytest
from cli_runner import run
from transformers import AutoModelForCausalLM, AutoTokenizer

import headmap
from headmap.corpus import Corpus, FileSamples, Sample, load_corpus
from headmap.errors import CorpusError
from headmap.scan.checkpoint import corpus_signature

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()


def write_lines(path, n, seed=0):
    rng = np.random.default_rng(seed)
    lines = [" ".join(rng.choice(WORDS, size=rng.integers(3, 12))) for _ in range(n)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return lines


@pytest.fixture(scope="module")
def tok(tiny_llama_dir):
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def test_a_text_file_is_streamed_and_reads_the_same_inputs(tok, tmp_path):
    path = tmp_path / "c.txt"
    lines = write_lines(path, 50)
    corpus = load_corpus(path, tok, 64)
    assert isinstance(corpus.samples, FileSamples) and len(corpus) == 50
    eager = [Sample(tok(t)["input_ids"], {"line": i + 1}) for i, t in enumerate(lines)]
    assert [s.ids for s in corpus.samples] == [s.ids for s in eager]
    assert [s.info for s in corpus.samples[10:13]] == [{"line": 11}, {"line": 12}, {"line": 13}]
    assert corpus_signature(corpus.samples) == corpus_signature(eager)  # resumable across both forms
    assert corpus.description["tokens"] == sum(len(s.ids) for s in eager)


def test_memory_does_not_hold_the_tokenised_file(tok, tmp_path):
    path = tmp_path / "big.txt"
    write_lines(path, 20000)
    tracemalloc.start()
    corpus = load_corpus(path, tok, 64)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    eager_bytes = corpus.description["tokens"] * 36  # a Python list of token ids: ~36 bytes per id
    held = corpus.samples.offsets.nbytes + corpus.samples.numbers.nbytes + corpus.samples.lengths.nbytes
    assert held < eager_bytes / 4
    assert peak < eager_bytes / 2, f"peak {peak} bytes while reading; eager would hold ~{eager_bytes}"


def test_scan_of_a_streamed_file_equals_the_scan_of_the_same_inputs_in_memory(tiny_llama_dir, tok, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    path = tmp_path / "c.txt"
    lines = write_lines(path, 9, seed=3)
    eager = Corpus("c", [Sample(tok(t)["input_ids"], {"line": i + 1}) for i, t in enumerate(lines)], {"name": "c"})
    probes = "sink,entropy,received"
    a = headmap.scan(model, tokenizer=tok, probes=probes, corpus=path, batch_size=4, progress=False)
    b = headmap.scan(model, tokenizer=tok, probes=probes, corpus=eager, batch_size=4, progress=False)
    assert a.heads.equals(b.heads)
    assert a.tokens.equals(b.tokens)


def test_a_file_changed_during_the_scan_is_refused(tok, tmp_path):
    path = tmp_path / "c.txt"
    write_lines(path, 5)
    corpus = load_corpus(path, tok, 64)
    first = corpus.samples[0]
    path.write_text("something else entirely\n" * 5, encoding="utf-8")
    with pytest.raises(CorpusError, match="changed while it was being read"):
        corpus.samples[1]
    assert first.ids  # what was read before stays valid


def test_streamed_errors_name_the_line(tok, tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes(b"fine line\n\nalso fine\nbad \xff byte\n")
    with pytest.raises(CorpusError, match="not UTF-8 \\(bad byte at offset 25\\)"):
        load_corpus(path, tok, 64)
    path.write_text("short\n" + "word " * 50 + "\n", encoding="utf-8")
    with pytest.raises(CorpusError, match="line 2 of corpus file .* has \\d+ tokens, more than --max-length 16"):
        load_corpus(path, tok, 16, strict=True)
    with pytest.warns(UserWarning, match="1 input\\(s\\) .* truncated"):
        cut = load_corpus(path, tok, 16)
    assert [len(s.ids) for s in cut.samples] == [len(tok("short")["input_ids"]), 16]
    path.write_text("\n\n  \n", encoding="utf-8")
    with pytest.raises(CorpusError, match="is empty"):
        load_corpus(path, tok, 16)


def test_a_file_deleted_during_the_scan_is_refused(tok, tmp_path):
    path = tmp_path / "c.txt"
    write_lines(path, 5)
    corpus = load_corpus(path, tok, 64)
    first = corpus.samples[0]
    path.unlink()
    with pytest.raises(CorpusError, match=f"corpus file {path} disappeared while it was being read"):
        corpus.samples[1]
    assert first.ids


def _feed(path, data: bytes) -> threading.Thread:
    """A writer that opens ``path`` (a FIFO: blocks until a reader opens it) and writes ``data``."""

    def write():
        with open(path, "wb") as fh:
            fh.write(data)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    return thread


def test_a_pipe_is_read_once_and_gives_the_inputs_of_the_same_file(tok, tmp_path):
    """``--corpus <(cat file)`` is /dev/fd/N, a pipe: it cannot be read twice (head, then lines)."""
    path = tmp_path / "c.txt"
    write_lines(path, 40, seed=2)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write("word " * 100 + "\n")  # one input longer than max_length: cut, and counted
    with pytest.warns(UserWarning, match="1 input"):
        regular = load_corpus(path, tok, 64)
    read, write = os.pipe()
    feeder = threading.Thread(target=lambda: (os.write(write, path.read_bytes()), os.close(write)), daemon=True)
    feeder.start()
    try:
        with pytest.warns(UserWarning, match="1 input"):
            piped = load_corpus(f"/dev/fd/{read}", tok, 64)
    finally:
        feeder.join(10)
        os.close(read)
    assert [(s.ids, s.info) for s in piped.samples] == [(s.ids, s.info) for s in regular.samples]
    assert corpus_signature(piped.samples) == corpus_signature(regular.samples)
    for key in ("inputs", "tokens", "truncated", "format"):
        assert piped.description[key] == regular.description[key], key


def test_a_fifo_is_read_once_text_and_jsonl(tok, tmp_path):
    fifo = tmp_path / "corpus.fifo"
    os.mkfifo(fifo)
    feeder = _feed(fifo, b"first line\n\nsecond line\n")
    corpus = load_corpus(fifo, tok, 64)
    feeder.join(10)
    assert [s.info["line"] for s in corpus.samples] == [1, 3]
    assert corpus.samples[0].ids == tok("first line")["input_ids"]
    feeder = _feed(fifo, b'{"text": "the cat sat", "spans": {"animal": "cat"}}\n')
    corpus = load_corpus(fifo, tok, 64, limit=1)
    feeder.join(10)
    assert corpus.description["format"] == "jsonl" and "animal" in corpus.samples[0].info["spans"]


def test_an_empty_pipe_is_called_empty(tok, tmp_path):
    fifo = tmp_path / "corpus.fifo"
    os.mkfifo(fifo)
    feeder = _feed(fifo, b"\n\n")
    with pytest.raises(CorpusError, match="is empty"):
        load_corpus(fifo, tok, 64)
    feeder.join(10)


def test_a_fifo_nobody_writes_to_is_refused_not_waited_on_forever(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(headmap.corpus.files, "PIPE_WAIT_S", 0.3)
    fifo = tmp_path / "corpus.fifo"
    os.mkfifo(fifo)
    outcome: list[BaseException | None] = []

    def load():
        try:
            load_corpus(fifo, tok, 64)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001  (the test reports what came out)
            outcome.append(exc)

    reader = threading.Thread(target=load, daemon=True)
    reader.start()
    reader.join(30)
    if reader.is_alive():  # the old behaviour: blocked in open(); release it before failing
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(10)
        pytest.fail("load_corpus waited on a FIFO that nothing writes to")
    assert len(outcome) == 1 and isinstance(outcome[0], CorpusError), outcome
    message = str(outcome[0])
    assert str(fifo) in message and "is a pipe that nothing was written to in 0.3 s" in message


def test_cli_scan_reads_a_process_substitution(monkeypatch, capsys, tiny_llama_dir, tmp_path):
    """``headmap scan --corpus <(cat file)``: the scan gets every line of the pipe."""
    import json

    source = tmp_path / "c.txt"
    write_lines(source, 6, seed=4)
    read, write = os.pipe()
    feeder = threading.Thread(target=lambda: (os.write(write, source.read_bytes()), os.close(write)), daemon=True)
    feeder.start()
    out = tmp_path / "run"
    args = ["scan", str(tiny_llama_dir), "--probes", "sink", "--corpus", f"/dev/fd/{read}", "--out", str(out)]
    try:
        code, _, err = run(monkeypatch, capsys, *args, "--no-progress")
    finally:
        feeder.join(10)
        os.close(read)
    assert code == 0, err  # headmap.cli.main returns, or exits with an int: never SystemExit(None)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["corpus"]["inputs"] == 6
