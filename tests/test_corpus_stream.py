"""Plain text corpora are streamed: one checking pass keeps offsets and counts, inputs are tokenised when read.

The scan's numbers do not depend on it: a streamed file gives the tables of the same inputs held in
memory, its fingerprint is the same hash of token ids, and a file that changes under a running scan
is refused instead of silently mixing two corpora.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
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
