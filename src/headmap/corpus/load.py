"""``load_corpus``: a built-in corpus (looked up in the registry) or a file, tokenised and described."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from ..errors import CorpusError
from .files import FileSamples, is_regular, load_file
from .registry import ALL_CORPORA
from .sources import is_source, load_records
from .spec import parse_spec
from .types import Corpus, Sample

DEFAULT_CORPUS = "text"


def truncate(samples: list[Sample], max_length: int, name: str) -> int:
    """Cut every input to ``max_length`` tokens in place; warns and returns how many were cut."""
    cut = 0
    for s in samples:
        if len(s.ids) > max_length:
            s.ids = s.ids[:max_length]
            cut += 1
    warn_truncated(cut, name, max_length, stacklevel=4)
    return cut


def warn_truncated(cut: int, name: str, max_length: int, stacklevel: int = 3) -> None:
    """Warn (pointing at the caller of ``load_corpus``) that ``cut`` inputs were truncated."""
    if cut:
        warnings.warn(
            f"{cut} input(s) of corpus '{name}' were longer than --max-length {max_length} tokens and were truncated",
            stacklevel=stacklevel,
        )


def load_corpus(
    spec: str | Path | None,
    tokenizer: Any,
    max_length: int,
    limit: int | None = None,
    seed: int = 0,
    vocab_size: int | None = None,
    strict: bool = False,
) -> Corpus:
    """Build the corpus ``spec`` (built-in name with options, or file path) tokenised for ``tokenizer``.

    ``strict``: a line of a file longer than ``max_length`` tokens raises CorpusError instead of
    being truncated with a warning.
    """
    spec = str(spec) if spec is not None else DEFAULT_CORPUS
    if limit is not None and limit < 1:
        raise CorpusError(f"--limit must be at least 1 (got {limit})")
    parsed = parse_spec(spec)
    truncated: int | None = None
    if parsed is not None:
        name, options = parsed
        built = ALL_CORPORA[name].build(
            tokenizer, max_length=max_length, limit=limit, seed=seed, vocab_size=vocab_size, options=options
        )
        samples: Any = built.samples
        desc: dict[str, Any] = {"name": name, "kind": "builtin", **built.description, "options": built.options}
    else:
        path = Path(spec).expanduser()
        if not path.exists() and "/" not in spec and "." not in spec:
            raise CorpusError(f"no corpus file or built-in corpus named '{spec}'; built-ins: {', '.join(ALL_CORPORA)}")
        read = load_records if path.exists() and is_source(path) else load_file  # a folder or Parquet streams
        samples, fmt, truncated = read(path, tokenizer, max_length, limit, strict)
        where = str(path.resolve()) if is_regular(path) else str(path)  # a pipe's resolved name is no path
        desc = {"name": path.name, "kind": "file", "path": where, "format": fmt, "strict": strict}
    if isinstance(samples, FileSamples):  # streamed: checked, cut and counted in one pass already
        warn_truncated(samples.truncated, spec, max_length)
        truncated = samples.truncated
        tokens = samples.total_tokens()
    else:
        samples = [s for s in samples if len(s.ids) >= 1]
        if not samples:
            raise CorpusError(f"corpus '{spec}' produced no input with at least one token")
        if truncated is None:
            truncated = truncate(samples, max_length, spec)
        else:  # read once from a pipe: cut while it was read
            warn_truncated(truncated, spec, max_length)
        tokens = sum(len(s.ids) for s in samples)
    desc.update(
        {
            "inputs": len(samples),
            "tokens": tokens,
            "max_length": max_length,
            "truncated": truncated,
        }
    )
    return Corpus(spec, samples, desc)
