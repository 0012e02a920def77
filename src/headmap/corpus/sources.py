"""Corpora larger than memory: a folder of ``.txt`` / ``.jsonl`` files, or a Parquet file with a text column.

Both stream like a plain text file (:class:`~headmap.corpus.files.FileSamples`): one pass checks and
tokenises every input, hashes its token ids and keeps only where the input is (file number and byte
offset, or Parquet row) and its token count, three integers per input; reading an input goes back
to its place and tokenises it again. A folder's files are read in sorted order of their paths
(``rglob``), so the order of the inputs, ``--limit`` and ``--shard`` are the same on every machine.
A ``.txt`` file gives one input per non-blank line, a ``.jsonl`` file the ``"text"`` of every
object (spans are read from single JSONL files only). A Parquet file gives the ``text`` column (or
its only string column), one input per non-empty row, read one row group at a time.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CorpusError
from .files import FileSamples, stamp, too_long
from .tokens import encode
from .types import Sample

SUFFIXES = (".txt", ".jsonl")


def is_source(path: Path) -> bool:
    """Whether ``path`` is read by this module: a folder, or a ``.parquet`` file."""
    return path.is_dir() or path.suffix.lower() == ".parquet"


class RecordSamples(FileSamples):
    """Inputs of several files (a folder) or of a Parquet file, tokenised when read (see the module doc)."""

    def __init__(self, root: Path, files: list[Path], tokenizer: Any, max_length: int, where, numbers, lengths,
                 signature, stamps, column: str | None = None) -> None:  # fmt: skip
        super().__init__(root, tokenizer, max_length, where[:, 1], numbers, lengths, signature, None)
        self.root, self.files, self.where, self.stamps, self.column = root, files, where, stamps, column
        self._group: tuple[int, list[Any]] | None = None  # the Parquet row group read last

    def _view(self, index: slice) -> RecordSamples:
        return RecordSamples(
            self.root, self.files, self.tokenizer, self.max_length, self.where[index], self.numbers[index],
            self.lengths[index], None, self.stamps, self.column,
        )  # fmt: skip

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return self._view(index)
        file, place = (int(x) for x in self.where[index])
        path = self.files[file]
        try:
            if stamp(path) != self.stamps[file]:
                raise CorpusError(f"corpus file {path} changed while it was being read; run the scan again")
            text = self._parquet(path, place) if self.column is not None else self._line(path, place)
        except FileNotFoundError:
            raise CorpusError(
                f"corpus file {path} disappeared while it was being read; put it back and run the scan again"
            ) from None
        ids = encode(self.tokenizer, text)[: self.max_length]
        return Sample(ids, {"file": str(path.relative_to(self.root)) if path != self.root else path.name,
                            "line": int(self.numbers[index])})  # fmt: skip

    def _line(self, path: Path, offset: int) -> str:
        with open(path, "rb") as fh:
            fh.seek(offset)
            raw = fh.readline().decode("utf-8").strip()
        return json.loads(raw)["text"] if path.suffix.lower() == ".jsonl" else raw

    def _parquet(self, path: Path, row: int) -> str:
        import pyarrow.parquet as pq

        group, at = int(row >> 32), int(row & 0xFFFFFFFF)
        if self._group is None or self._group[0] != group:
            table = pq.ParquetFile(path).read_row_group(group, columns=[self.column])
            self._group = (group, table.column(0).to_pylist())
        return str(self._group[1][at]).strip()

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]


def _texts_of_file(path: Path) -> Iterator[tuple[int, int, str]]:
    """(line number, byte offset, text) of every input of a .txt or .jsonl file."""
    jsonl = path.suffix.lower() == ".jsonl"
    position = 0
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            start, position = position, position + len(raw)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise CorpusError(
                    f"corpus file {path} is not UTF-8 (bad byte at offset {start + exc.start}); convert it"
                ) from exc
            skip = 3 if number == 1 and raw.startswith(b"\xef\xbb\xbf") else 0
            line = line.lstrip("\ufeff").strip()
            if not line:
                continue
            if jsonl:
                try:
                    obj = json.loads(line)
                    text = obj["text"]
                    if not isinstance(text, str):
                        raise TypeError
                except (ValueError, KeyError, TypeError):
                    raise CorpusError(
                        f'line {number} of {path} is not a JSON object with a "text" string; fix or remove it'
                    ) from None
            else:
                text = line
            if text.strip():
                yield number, start + skip, text.strip()


def _parquet_column(path: Path) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise CorpusError(f"cannot read {path} as Parquet ({exc}); pass a Parquet file with a text column") from None
    strings = [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
    if "text" in strings:
        return "text"
    if len(strings) == 1:
        return strings[0]
    raise CorpusError(
        f"Parquet file {path} has no string column named 'text'"
        + (f" and several string columns ({', '.join(strings)}); rename the one to read to 'text'" if strings else "")
    )


def _texts_of_parquet(path: Path, column: str) -> Iterator[tuple[int, int, str]]:
    """(row number from 1, row group << 32 | row in group, text) of every non-empty row."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    number = 0
    for group in range(pf.num_row_groups):
        values = pf.read_row_group(group, columns=[column]).column(0).to_pylist()
        for at, text in enumerate(values):
            number += 1
            if text is not None and str(text).strip():
                yield number, (group << 32) | at, str(text).strip()


def load_records(
    path: Path, tokenizer: Any, max_length: int, limit: int | None, strict: bool
) -> tuple[RecordSamples, str, int]:
    """The streamed inputs of a folder or a Parquet file, its format, and how many inputs were cut."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
        if not files:
            raise CorpusError(f"corpus folder {path} holds no .txt or .jsonl file")
        column, fmt = None, "folder"
    else:
        files, column, fmt = [path], _parquet_column(path), "parquet"
    where: list[tuple[int, int]] = []
    numbers: list[int] = []
    lengths: list[int] = []
    digest = hashlib.sha256()
    cut = 0
    stamps = [stamp(f) for f in files]
    for k, file in enumerate(files):
        texts = _texts_of_parquet(file, column) if column is not None else _texts_of_file(file)
        for number, place, text in texts:
            ids = encode(tokenizer, text)
            if not ids:
                continue
            if len(ids) > max_length:
                if strict:
                    raise too_long(file, number, len(ids), max_length)
                ids, cut = ids[:max_length], cut + 1
            arr = np.asarray(ids, dtype=np.int64)
            digest.update(np.int64(len(arr)).tobytes())
            digest.update(arr.tobytes())
            where.append((k, place))
            numbers.append(number)
            lengths.append(len(ids))
            if limit and len(where) >= limit:
                break
        if limit and len(where) >= limit:
            break
    if not where:
        raise CorpusError(f"corpus {path} holds no input (no non-blank line or row)")
    samples = RecordSamples(
        path, files, tokenizer, max_length, np.asarray(where, dtype=np.int64), np.asarray(numbers, dtype=np.int64),
        np.asarray(lengths, dtype=np.int64), digest.hexdigest(), stamps, column,
    )  # fmt: skip
    samples.truncated = cut
    return samples, fmt, cut
