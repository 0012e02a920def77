"""The user's corpus files: UTF-8 text (one input per non-blank line, streamed) and JSONL (one
object per line with ``"text"`` and optional named ``"spans"``); folders and Parquet files are
read by :mod:`headmap.corpus.sources`.

A regular text file is read in one streaming pass that keeps only each line's offset
(:class:`FileSamples`); its lines are tokenised again when the scan reads them. Anything else (a
pipe, ``<(cat file)``, a device) is read once, in one pass, into memory: it cannot be read twice.
A FIFO that nothing writes to is refused after :data:`PIPE_WAIT_S` seconds instead of hanging.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import select
import stat
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ..errors import CorpusError
from .registry import ALL_CORPORA
from .tokens import Tokens, encode
from .types import Sample

#: Seconds to wait for the first bytes (or the end) of a pipe before saying that nothing writes to it.
PIPE_WAIT_S = 10.0
#: Bytes read at the start of a file to tell JSONL from plain text.
HEAD_BYTES = 65536


class FileSamples(Sequence):
    """The inputs of a plain text file, tokenised when they are read: memory does not grow with the file.

    Built by one streaming pass over the file (``scan_text_file``) that checks every line (UTF-8,
    length under ``strict``), hashes its token ids and keeps only each line's byte offset, line
    number and token count. Reading an input seeks to its line and tokenises it again; a file that
    changed or disappeared in between raises CorpusError. Slicing gives a view; ``signature`` is the
    sha256 of every input's token ids, as ``headmap.scan.checkpoint.corpus_signature`` computes it.
    """

    def __init__(self, path: Path, tokenizer: Any, max_length: int, offsets, numbers, lengths, signature, stamp):
        self.path, self.tokenizer, self.max_length = path, tokenizer, max_length
        self.offsets, self.numbers, self.lengths = offsets, numbers, lengths
        self.signature, self._stamp = signature, stamp
        self.truncated = 0

    def __len__(self) -> int:
        return len(self.offsets)

    def _view(self, index: slice) -> FileSamples:
        return FileSamples(
            self.path,
            self.tokenizer,
            self.max_length,
            self.offsets[index],
            self.numbers[index],
            self.lengths[index],
            None,
            self._stamp,
        )

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self._view(index)
        offset = self.offsets[index]
        try:
            if stamp(self.path) != self._stamp:
                raise CorpusError(f"corpus file {self.path} changed while it was being read; run the scan again")
            with open(self.path, "rb") as fh:
                fh.seek(offset)
                text = fh.readline().decode("utf-8").strip()
        except FileNotFoundError:
            raise CorpusError(
                f"corpus file {self.path} disappeared while it was being read; put it back and run the scan again"
            ) from None
        except OSError as exc:
            raise CorpusError(
                f"corpus file {self.path} could not be read again while it was being read ({exc.strerror}); "
                "run the scan again"
            ) from None
        ids = encode(self.tokenizer, text)[: self.max_length]
        return Sample(ids, {"line": int(self.numbers[index])})

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]

    def total_tokens(self) -> int:
        return int(sum(self.lengths))


def stamp(path: Path) -> tuple[int, int]:
    """(size, modification time) of ``path``: a file whose stamp changed was edited."""
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def check_file(path: Path) -> None:
    """A clear CorpusError for a corpus path that does not exist or is a folder."""
    if not path.exists():
        raise CorpusError(
            f"corpus file {path} does not exist; pass a UTF-8 text file (one input per line) "
            f"or a built-in corpus: {', '.join(ALL_CORPORA)}"
        )
    if path.is_dir():
        raise CorpusError(f"corpus {path} is a folder; pass a UTF-8 text file with one input per line")


def is_regular(path: Path) -> bool:
    """Whether ``path`` (after links) is a regular file, one that can be read twice and seeked."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def read_stream(path: Path, wait: float | None = None) -> bytes:
    """Every byte of a pipe or other non-regular file, read once.

    Waits at most ``wait`` seconds (default :data:`PIPE_WAIT_S`) for the first bytes or the end of
    the stream: a FIFO that no program writes to raises CorpusError instead of hanging. Once bytes
    arrive the rest is read to the end, however long the writer takes.
    """
    wait = PIPE_WAIT_S if wait is None else wait
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # opening a FIFO for reading blocks without O_NONBLOCK
    except OSError as exc:
        raise CorpusError(f"cannot read corpus {path} ({exc.strerror})") from None
    chunks: list[bytes] = []
    deadline = time.monotonic() + wait
    try:
        while True:
            timeout = max(0.0, deadline - time.monotonic()) if not chunks else None
            ready, _, _ = select.select([fd], [], [], timeout)
            if not ready:
                raise CorpusError(
                    f"corpus {path} is a pipe that nothing was written to in {wait:g} s (does a program write to "
                    "it?); start the writer first, or pass a regular file"
                )
            try:
                chunk = os.read(fd, 1 << 20)
            except BlockingIOError:
                continue
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    except OSError as exc:
        raise CorpusError(f"cannot read corpus {path} ({exc.strerror})") from None
    finally:
        os.close(fd)


def too_long(path: Path, line: int, tokens: int, max_length: int) -> CorpusError:
    return CorpusError(
        f"line {line} of corpus file {path} has {tokens} tokens, more than --max-length {max_length}; "
        "raise --max-length or drop --strict to truncate it"
    )


def text_inputs(
    fh: BinaryIO, path: Path, tokenizer: Any, max_length: int, limit: int | None, strict: bool
) -> Iterator[tuple[int, int, list[int], bool]]:
    """(line number, byte offset, token ids cut to ``max_length``, whether cut) of every input of a text
    stream: each non-blank line that has a token. Bad UTF-8 and (``strict``) long lines raise CorpusError."""
    position = 0
    count = 0
    for number, raw in enumerate(fh, start=1):
        start, position = position, position + len(raw)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CorpusError(
                f"corpus file {path} is not UTF-8 (bad byte at offset {start + exc.start}); convert it, "
                f"e.g. `iconv -f latin1 -t utf-8 {path} > fixed.txt`"
            ) from exc
        if number == 1:
            text = text.lstrip("\ufeff")
        text = text.strip()
        if not text:
            continue
        ids = encode(tokenizer, text)
        if not ids:
            continue
        cut = len(ids) > max_length
        if cut:
            if strict:
                raise too_long(path, number, len(ids), max_length)
            ids = ids[:max_length]
        yield number, start + (3 if number == 1 and raw.startswith(b"\xef\xbb\xbf") else 0), ids, cut
        count += 1
        if limit and count >= limit:
            return


def empty_file(path: Path) -> CorpusError:
    return CorpusError(f"corpus file {path} is empty (no non-blank line); put one input per line")


def scan_text_file(
    path: Path, tokenizer: Any, max_length: int, limit: int | None, strict: bool
) -> tuple[FileSamples, int]:
    """One pass over a text file (one input per non-blank line); returns the lazy inputs and how many are cut."""
    check_file(path)
    if not is_regular(path):
        raise CorpusError(f"corpus {path} is not a regular file and cannot be streamed; load_corpus reads it once")
    offsets: list[int] = []
    numbers: list[int] = []
    lengths: list[int] = []
    digest = hashlib.sha256()
    cut = 0
    first = stamp(path)
    with open(path, "rb") as fh:
        for number, offset, ids, was_cut in text_inputs(fh, path, tokenizer, max_length, limit, strict):
            arr = np.asarray(ids, dtype=np.int64)
            digest.update(np.int64(len(arr)).tobytes())
            digest.update(arr.tobytes())
            offsets.append(offset)
            numbers.append(number)
            lengths.append(len(ids))
            cut += was_cut
    if not offsets:
        raise empty_file(path)
    samples = FileSamples(
        path,
        tokenizer,
        max_length,
        np.asarray(offsets, dtype=np.int64),
        np.asarray(numbers, dtype=np.int64),
        np.asarray(lengths, dtype=np.int64),
        digest.hexdigest(),
        first,
    )
    return samples, cut


def numbered_lines(path: Path, data: bytes | None = None) -> list[tuple[int, str]]:
    """(line number, stripped line) of every non-blank line of a UTF-8 text file (or of its bytes
    ``data``, already read); clear errors."""
    if data is None:
        check_file(path)
        data = path.read_bytes() if is_regular(path) else read_stream(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorpusError(
            f"corpus file {path} is not UTF-8 (bad byte at offset {exc.start}); convert it, "
            f"e.g. `iconv -f latin1 -t utf-8 {path} > fixed.txt`"
        ) from exc
    lines = [(i, line.strip()) for i, line in enumerate(text.lstrip("\ufeff").splitlines(), start=1)]
    lines = [(i, line) for i, line in lines if line]
    if not lines:
        raise empty_file(path)
    return lines


def read_lines(path: Path) -> list[str]:
    """Non-blank lines of a UTF-8 text file, with a clear error for every way it can be wrong."""
    return [line for _, line in numbered_lines(path)]


def _char_span(where: str, name: str, value: Any, text: str) -> tuple[int, int]:
    if isinstance(value, str):
        if not value:
            raise CorpusError(f"{where}: span '{name}' is an empty marker string")
        start = text.find(value)
        if start < 0:
            raise CorpusError(f"{where}: span '{name}': marker string {value!r} is not found in the text")
        return start, start + len(value)
    if isinstance(value, list) and len(value) == 2 and all(type(x) is int for x in value):
        start, end = value
        if start >= end:
            raise CorpusError(f"{where}: span '{name}' [{start}, {end}) is empty: its start must be before its end")
        if start < 0 or end > len(text):
            raise CorpusError(
                f"{where}: span '{name}' [{start}, {end}) is out of range for a text of {len(text)} characters"
            )
        return start, end
    raise CorpusError(
        f"{where}: span '{name}' must be [start, end] character offsets or a marker string (got {value!r})"
    )


def jsonl_sample(toks: Tokens, path: Path, line: int, raw: str, max_length: int, strict: bool) -> tuple[Sample, bool]:
    where = f"corpus file {path}, line {line}"
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CorpusError(
            f"{where}: not valid JSON ({exc.msg}, column {exc.colno}); a JSONL corpus has one object per line, "
            'like {"text": "...", "spans": {"name": [start, end]}}'
        ) from None
    if not isinstance(obj, dict):
        raise CorpusError(f'{where}: a JSON object is needed, like {{"text": "..."}} (got {type(obj).__name__})')
    if "source" in obj or "audio" in obj:  # encoder-decoder inputs (headmap.corpus.pairs)
        from .pairs import jsonl_seq2seq

        return jsonl_seq2seq(toks, path, line, obj), False
    if "text" not in obj:
        raise CorpusError(f'{where}: the object has no "text"')
    text = obj["text"]
    if not isinstance(text, str) or not text.strip():
        raise CorpusError(f'{where}: "text" must be a non-empty string')
    if "image" in obj:  # an image corpus (headmap.corpus.images): the model's processor prepares it later
        if "spans" in obj:
            raise CorpusError(
                f'{where}: "spans" cannot be given with "image" yet; the spans prompt, image and text come from '
                "the model's processor"
            )
        from .images import read_images

        pictures = read_images(obj["image"], path.parent, where)
        ids, _ = toks.encode(text, [], suffix=True)
        return Sample(ids, {"line": line, "image": pictures, "text": text}), False
    named = obj.get("spans", {})
    if not isinstance(named, dict):
        raise CorpusError(f'{where}: "spans" must be an object of named spans, like {{"query": [12, 40]}}')
    names = list(named)
    char_spans = [_char_span(where, n, named[n], text) for n in names]
    ids, spans = toks.encode(text, char_spans, suffix=True)
    if strict and len(ids) > max_length:
        raise too_long(path, line, len(ids), max_length)
    out: dict[str, list[int]] = {}
    for n, (a, b), span in zip(names, char_spans, spans, strict=True):
        if span is None:
            raise CorpusError(f"{where}: span '{n}' (characters {a}-{b}, {text[a:b]!r}) covers no token")
        if span[1] > max_length:
            raise CorpusError(
                f"{where}: span '{n}' ends at token {span[1]} but the line has {len(ids)} tokens and is cut to "
                f"--max-length {max_length}; raise --max-length or shorten the line"
            )
        out[n] = list(span)
    return Sample(ids, {"line": line, "spans": out}), "spans" in obj


def load_file(
    path: Path, tokenizer: Any, max_length: int, limit: int | None, strict: bool
) -> tuple[Sequence[Sample], str, int | None]:
    """The inputs of a corpus file, its format (``text`` or ``jsonl``) and how many inputs were cut to
    ``max_length`` (None: not cut yet, the caller cuts them).

    A regular text file streams (:class:`FileSamples`); a pipe or other non-regular file is read once.
    (Folders and .parquet files: :func:`headmap.corpus.sources.load_records`.)
    """
    check_file(path)
    jsonl = path.suffix.lower() == ".jsonl"
    data = None
    if is_regular(path):
        with open(path, "rb") as fh:
            head = fh.read(HEAD_BYTES)
    else:
        data = read_stream(path)
        head = data[:HEAD_BYTES]
    if not jsonl and not head.lstrip(b"\xef\xbb\xbf").lstrip().startswith(b"{"):
        if data is None:
            samples, cut = scan_text_file(path, tokenizer, max_length, limit, strict)
            samples.truncated = cut
            return samples, "text", cut
        read = list(text_inputs(io.BytesIO(data), path, tokenizer, max_length, limit, strict))
        if not read:
            raise empty_file(path)
        return [Sample(ids, {"line": number}) for number, _, ids, _ in read], "text", sum(c for *_, c in read)
    lines = numbered_lines(path, data)
    if limit:
        lines = lines[:limit]
    if jsonl or lines[0][1].startswith("{"):
        toks = Tokens(tokenizer)
        built = [jsonl_sample(toks, path, line, raw, max_length, strict) for line, raw in lines]
        samples = [s for s, _ in built]
        pictured = sum("image" in s.info for s in samples)
        if 0 < pictured < len(samples):
            first = next(s for s in samples if ("image" in s.info) != ("image" in samples[0].info))
            raise CorpusError(
                f'corpus file {path}, line {first.info["line"]}: some lines hold "image" and some do not; an image '
                "corpus needs an image on every line"
            )
        if not any(has for _, has in built):  # no line names a span: not a corpus with spans
            for s in samples:
                s.info.pop("spans", None)
        return samples, "jsonl", None
    plain = []
    for line, text in lines:
        ids = encode(tokenizer, text)
        if strict and len(ids) > max_length:
            raise too_long(path, line, len(ids), max_length)
        plain.append(Sample(ids, {"line": line}))
    return plain, "text", None
