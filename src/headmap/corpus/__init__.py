"""Inputs for a scan: built-in corpora (made offline, seeded) and the user's UTF-8 files.

- ``text``: shipped public-domain English prose (``data/text.txt``), packed into inputs of
  ``max_length`` tokens made of consecutive paragraphs;
- ``repeats``: random token sequences from the model's own vocabulary, each repeated once
  (previous-token, duplicate-token and induction heads);
- ``needle``: needle in a haystack (retrieval heads): shipped prose with a sentence that states
  a secret number inserted at a chosen depth, then a question whose answer is that number;
- ``items``: k short labelled documents and a question about one of them (position profile);
- a path: a UTF-8 text file, one input per line (blank lines skipped), or a JSONL file, one
  JSON object per line with ``"text"`` and optional named ``"spans"``.

A built-in corpus takes options after its name, ``name:key=value:key=value`` (list values
comma-separated), e.g. ``needle:depths=0,0.5,1:lengths=256,512``. docs/corpora.md describes
each corpus, its options and what every sample records in ``info``.

Rooms: ``types`` (Sample, Corpus, Batch, padding), ``tokens`` (the tokenizer operations),
``registry`` (built-in corpora by name), one module per built-in corpus (``text``, ``repeats``,
``needle``, ``items``; each registers itself), ``files`` (text and JSONL files, pipes), ``spec``
(``name:key=value`` specs) and ``load`` (``load_corpus``).
"""

from __future__ import annotations

from .registry import ALL_CORPORA, Built, BuiltinCorpus, CorpusInterface, register_corpus
from .tokens import Tokens, encode
from .types import Batch, Corpus, Sample, pad_batch

# isort: off
# the shipped corpora register themselves, in this order (the order error messages list them in)
from .text import shipped_text
from .repeats import REPEATS_INPUTS
from .needle import MIN_HAYSTACK, NEEDLE_DEPTHS, NEEDLE_ENDINGS, needle_names
from .items import ITEMS_INPUTS, ITEMS_K, ITEMS_TOKENS
from .shapes import SHAPES_INPUTS, shapes_items
from .audio import TONES_INPUTS, tones_items  # noqa: F401  (registers the tones corpus)

# isort: on
from .files import PIPE_WAIT_S, FileSamples, read_lines, read_stream, scan_text_file
from .images import has_images, prepare_images
from .load import DEFAULT_CORPUS, load_corpus
from .spec import parse_spec

#: The shipped built-in corpora (``ALL_CORPORA`` also holds any registered later).
BUILTIN_CORPORA = ("text", "repeats", "needle", "items")

__all__ = [
    "ALL_CORPORA",
    "BUILTIN_CORPORA",
    "DEFAULT_CORPUS",
    "ITEMS_INPUTS",
    "ITEMS_K",
    "ITEMS_TOKENS",
    "MIN_HAYSTACK",
    "NEEDLE_DEPTHS",
    "NEEDLE_ENDINGS",
    "PIPE_WAIT_S",
    "Batch",
    "Built",
    "BuiltinCorpus",
    "Corpus",
    "CorpusInterface",
    "FileSamples",
    "Sample",
    "Tokens",
    "encode",
    "has_images",
    "prepare_images",
    "load_corpus",
    "needle_names",
    "pad_batch",
    "parse_spec",
    "read_lines",
    "read_stream",
    "REPEATS_INPUTS",
    "SHAPES_INPUTS",
    "register_corpus",
    "scan_text_file",
    "shapes_items",
    "shipped_text",
]
