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
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CorpusError

BUILTIN_CORPORA = ("text", "repeats", "needle", "items")
DEFAULT_CORPUS = "text"

#: Options of each built-in corpus: option -> (value kind, what it sets).
CORPUS_OPTIONS: dict[str, dict[str, tuple[str, str]]] = {
    "text": {},
    "repeats": {},
    "needle": {
        "lengths": ("ints", "context lengths in tokens, comma-separated; default: --max-length"),
        "depths": ("fractions", "needle depths as fractions of the haystack in [0, 1]; default 0,0.25,0.5,0.75,1"),
    },
    "items": {
        "k": ("int", "documents per input; default 10"),
        "item_tokens": ("int", "tokens per document; default 48"),
    },
}
NEEDLE_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
#: How a needle sentence ends after its number: the first, else the second where the tokenizer
#: merges the number with the first's punctuation.
NEEDLE_ENDINGS = (".", " and nothing else.")
ITEMS_K = 10
ITEMS_TOKENS = 48
ITEMS_INPUTS = 8
#: Fewest haystack tokens a needle input may have.
MIN_HAYSTACK = 16
# Where a sentence ends (its closing punctuation, closing quotes, then white space) or a paragraph.
_SENTENCE_END = re.compile(r"[.!?][\"'`)\]_]*\s+|\n+")


@dataclass
class Sample:
    """One input: its token ids (no padding) and, for built-in corpora, what it is made of."""

    ids: list[int]
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Corpus:
    name: str
    samples: list[Sample]
    description: dict[str, Any]

    def __len__(self) -> int:
        return len(self.samples)

    def batches(self, batch_size: int, pad_id: int, left_pad: bool, device: torch.device):
        """Yield (first index, input_ids, attention_mask) batches, padded to the longest input."""
        for start in range(0, len(self.samples), batch_size):
            chunk = list(self.samples[start : start + batch_size])  # a streamed file reads its lines here
            ids, mask = pad_batch([s.ids for s in chunk], pad_id, left_pad)
            yield start, ids.to(device), mask.to(device)


@dataclass
class Batch:
    """What a scan tells probes about the inputs of the next forward call (see :meth:`Probe.begin`).

    ``samples[b]`` is the corpus sample in batch row ``b`` (``.ids`` without padding, ``.info``
    with what a built-in corpus recorded: repeat length, needle span, item spans, named spans);
    ``first`` is the corpus index of row 0, so row ``b`` is input ``first + b`` of corpus
    ``corpus``. Positions inside an input (``Block.rel_q()``) index ``samples[b].ids``.
    """

    corpus: str
    first: int
    samples: list[Any]
    input_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    left_pad: bool = True

    def index(self, row: int) -> int:
        """Corpus index of batch row ``row``."""
        return self.first + row


def pad_batch(rows: Sequence[Sequence[int]], pad_id: int, left_pad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), [B, longest] long, of token id rows padded on the left (or right)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, seq in enumerate(rows):
        n = len(seq)
        cols = slice(width - n, width) if left_pad else slice(0, n)
        ids[row, cols] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, cols] = 1
    return ids, mask


class FileSamples(Sequence):
    """The inputs of a plain text file, tokenised when they are read: memory does not grow with the file.

    Built by one streaming pass over the file (``scan_text_file``) that checks every line (UTF-8,
    length under ``strict``), hashes its token ids and keeps only each line's byte offset, line
    number and token count. Reading an input seeks to its line and tokenises it again; a file that
    changed in between raises CorpusError. Slicing gives a view; ``signature`` is the sha256 of
    every input's token ids, as ``headmap.checkpoint.corpus_signature`` computes it.
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
        if _stamp(self.path) != self._stamp:
            raise CorpusError(f"corpus file {self.path} changed while it was being read; run the scan again")
        with open(self.path, "rb") as fh:
            fh.seek(offset)
            text = fh.readline().decode("utf-8").strip()
        ids = _encode(self.tokenizer, text)[: self.max_length]
        return Sample(ids, {"line": int(self.numbers[index])})

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]

    def total_tokens(self) -> int:
        return int(sum(self.lengths))


def _stamp(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def _check_file(path: Path) -> None:
    if not path.exists():
        raise CorpusError(
            f"corpus file {path} does not exist; pass a UTF-8 text file (one input per line) "
            f"or a built-in corpus: {', '.join(BUILTIN_CORPORA)}"
        )
    if path.is_dir():
        raise CorpusError(f"corpus {path} is a folder; pass a UTF-8 text file with one input per line")


def scan_text_file(
    path: Path, tokenizer: Any, max_length: int, limit: int | None, strict: bool
) -> tuple[FileSamples, int]:
    """One pass over a text file (one input per non-blank line); returns the lazy inputs and how many are cut."""
    _check_file(path)
    offsets: list[int] = []
    numbers: list[int] = []
    lengths: list[int] = []
    digest = hashlib.sha256()
    cut = 0
    stamp = _stamp(path)
    with open(path, "rb") as fh:
        position = 0
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
            ids = _encode(tokenizer, text)
            if not ids:
                continue
            if len(ids) > max_length:
                if strict:
                    raise _too_long(path, number, len(ids), max_length)
                cut += 1
                ids = ids[:max_length]
            arr = np.asarray(ids, dtype=np.int64)
            digest.update(np.int64(len(arr)).tobytes())
            digest.update(arr.tobytes())
            offsets.append(start + (3 if number == 1 and raw.startswith(b"\xef\xbb\xbf") else 0))
            numbers.append(number)
            lengths.append(len(ids))
            if limit and len(offsets) >= limit:
                break
    if not offsets:
        raise CorpusError(f"corpus file {path} is empty (no non-blank line); put one input per line")
    samples = FileSamples(
        path,
        tokenizer,
        max_length,
        np.asarray(offsets, dtype=np.int64),
        np.asarray(numbers, dtype=np.int64),
        np.asarray(lengths, dtype=np.int64),
        digest.hexdigest(),
        stamp,
    )
    return samples, cut


def shipped_text() -> list[str]:
    """Paragraphs of the shipped public-domain prose, one per line."""
    raw = resources.files("headmap").joinpath("data/text.txt").read_text(encoding="utf-8")
    return [line.strip() for line in raw.splitlines() if line.strip()]


def needle_names() -> list[str]:
    """Place names the ``needle`` corpus draws its needles from (``data/needle_names.txt``)."""
    raw = resources.files("headmap").joinpath("data/needle_names.txt").read_text(encoding="utf-8")
    return [line.strip() for line in raw.splitlines() if line.strip()]


# -- corpus specs ----------------------------------------------------------------------------------


def _option_error(name: str, problem: str) -> CorpusError:
    valid = CORPUS_OPTIONS[name]
    if not valid:
        return CorpusError(f"corpus '{name}': {problem}; '{name}' takes no options")
    listed = "; ".join(f"{key} ({what})" for key, (_, what) in valid.items())
    return CorpusError(f"corpus '{name}': {problem}; valid options: {listed} (write {name}:key=value:key=value)")


def _option_value(name: str, key: str, kind: str, value: str) -> Any:
    if kind == "int":
        parts = [value]
    else:
        parts = [p.strip() for p in value.split(",")]
        if any(not p for p in parts):
            raise _option_error(name, f"option {key}={value!r} has an empty item")
    out: list[Any] = []
    for part in parts:
        if kind in ("ints", "int"):
            try:
                number: Any = int(part)
            except ValueError:
                raise _option_error(name, f"option {key}: {part!r} is not a whole number") from None
            if number < 1:
                raise _option_error(name, f"option {key}: {number} must be at least 1")
        else:
            try:
                number = float(part)
            except ValueError:
                raise _option_error(name, f"option {key}: {part!r} is not a number") from None
            if not (math.isfinite(number) and 0.0 <= number <= 1.0):
                raise _option_error(name, f"option {key}: {part} is not a fraction between 0 and 1")
        out.append(number)
    return out[0] if kind == "int" else out


def parse_spec(spec: str) -> tuple[str, dict[str, Any]] | None:
    """``(name, options)`` for a built-in corpus spec ``name[:key=value]...``; None for a file path.

    Option values are checked and converted (``ints``/``fractions`` options become lists); an
    unknown option or a bad value raises CorpusError naming it and listing the valid options.
    """
    name, colon, rest = spec.partition(":")
    if name not in BUILTIN_CORPORA:
        return None
    options: dict[str, Any] = {}
    if not colon:
        return name, options
    valid = CORPUS_OPTIONS[name]
    for part in rest.split(":"):
        key, eq, value = (s.strip() for s in part.partition("="))
        if not key:
            raise _option_error(name, f"empty option in {spec!r} (a ':' with nothing after it)")
        if key not in valid:
            raise _option_error(name, f"unknown option '{key}'")
        if not eq or not value:
            raise _option_error(name, f"option '{key}' has no value (write {key}=...)")
        if key in options:
            raise _option_error(name, f"option '{key}' is given twice")
        options[key] = _option_value(name, key, valid[key][0], value)
    return name, options


# -- tokens ----------------------------------------------------------------------------------------


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


class _Tokens:
    """The few tokenizer operations the corpora need, with and without offset mappings.

    ``pre`` and ``suf`` are the special tokens the tokenizer puts around a text (BOS or CLS,
    EOS or SEP). Fast tokenizers map characters to tokens with their offsets; others fall back
    to tokenising prefixes of the text (exact at word boundaries).
    """

    def __init__(self, tokenizer: Any):
        self.tok = tokenizer
        self._ends: tuple[str | None, list[int]] = (None, [])
        plain = self.plain("hello")
        full = _encode(tokenizer, "hello")
        self.pre, self.suf = [], []
        for i in range(len(full) - len(plain) + 1):
            if full[i : i + len(plain)] == plain:
                self.pre, self.suf = full[:i], full[i + len(plain) :]
                break
        try:
            self.fast = "offset_mapping" in tokenizer("hello", add_special_tokens=False, return_offsets_mapping=True)
        except (NotImplementedError, TypeError, ValueError, KeyError):
            self.fast = False

    def plain(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def count(self, text: str) -> int:
        return len(self.plain(text)) if text else 0

    def counts(self, texts: list[str]) -> list[int]:
        return [len(ids) for ids in self.tok(texts, add_special_tokens=False)["input_ids"]]

    def cut(self, text: str, n: int) -> str:
        """The longest start of ``text`` that holds at most ``n`` tokens (cut at a token end)."""
        if n <= 0:
            return ""
        if self.fast:
            if self._ends[0] is not text:  # the needle corpus cuts one text several times
                offsets = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
                ends, top = [], 0
                for _, end in offsets:
                    top = max(top, end)
                    ends.append(top)
                self._ends = (text, ends)
            ends = self._ends[1]
            return text if n >= len(ends) else text[: ends[n - 1]]
        if self.count(text) <= n:
            return text
        cuts = [m.start() for m in re.finditer(r"\s+", text)]  # word ends
        lo, hi, best = 0, len(cuts) - 1, 0
        while lo <= hi:
            mid = (lo + hi) // 2
            if self.count(text[: cuts[mid]]) <= n:
                best, lo = cuts[mid], mid + 1
            else:
                hi = mid - 1
        for end in range(best + 1, min(len(text), best + 32) + 1):  # into the next word, one character at a time
            if self.count(text[:end]) > n:
                break
            best = end
        return text[:best]

    def encode(
        self, text: str, char_spans: list[tuple[int, int]], suffix: bool
    ) -> tuple[list[int], list[tuple[int, int] | None]]:
        """Token ids of ``text`` (leading special tokens; trailing ones only with ``suffix``) and,
        for each character range [a, b), the token range [s, e) of the tokens that overlap it
        (None when no ordinary token does)."""
        if self.fast:
            enc = self.tok(
                text, add_special_tokens=suffix, return_offsets_mapping=True, return_special_tokens_mask=True
            )
            ids = list(enc["input_ids"])
            offsets = [tuple(o) for o in enc["offset_mapping"]]
            special = list(enc.get("special_tokens_mask") or [0] * len(ids))
            if not suffix:
                ids = self.pre + ids
                offsets = [(0, 0)] * len(self.pre) + offsets
                special = [1] * len(self.pre) + special
            spans: list[tuple[int, int] | None] = []
            for a, b in char_spans:
                hit = [
                    t
                    for t, ((ts, te), sp) in enumerate(zip(offsets, special, strict=True))
                    if not sp and te > ts and ts < b and te > a
                ]
                spans.append((hit[0], hit[-1] + 1) if hit else None)
            return ids, spans
        ids = _encode(self.tok, text) if suffix else self.pre + self.plain(text)
        last = len(ids) - (len(self.suf) if suffix else 0)
        spans = []
        for a, b in char_spans:
            s = len(self.pre) + self.count(text[:a].rstrip())
            e = min(len(self.pre) + self.count(text[:b]), last)
            spans.append((s, e) if e > s else None)
        return ids, spans


def _truncate(samples: list[Sample], max_length: int, name: str) -> int:
    cut = 0
    for s in samples:
        if len(s.ids) > max_length:
            s.ids = s.ids[:max_length]
            cut += 1
    if cut:
        warnings.warn(
            f"{cut} input(s) of corpus '{name}' were longer than --max-length {max_length} tokens and were truncated",
            stacklevel=3,
        )
    return cut


# -- text and repeats ------------------------------------------------------------------------------


def _encode_cut(tokenizer: Any, text: str, max_length: int) -> list[int]:
    """At most ``max_length`` tokens, the tokenizer's closing special tokens kept (an encoder's [SEP])."""
    ids = list(tokenizer(text, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"])
    return ids[:max_length]


def _packed_text(tokenizer: Any, max_length: int, limit: int) -> list[Sample]:
    """Consecutive paragraphs joined until an input holds ``max_length`` tokens."""
    samples: list[Sample] = []
    current: list[str] = []
    first = 0
    paragraphs = shipped_text()
    for i, para in enumerate(paragraphs):
        if not current:
            first = i
        current.append(para)
        ids = _encode(tokenizer, " ".join(current))
        if len(ids) >= max_length:
            samples.append(Sample(_encode_cut(tokenizer, " ".join(current), max_length), {"paragraphs": [first, i]}))
            current = []
            if len(samples) >= limit:
                break
    if current and len(samples) < limit:
        samples.append(Sample(_encode_cut(tokenizer, " ".join(current), max_length), {"paragraphs": [first, i]}))
    return samples


def _repeats(tokenizer: Any, max_length: int, limit: int, seed: int, vocab_size: int) -> list[Sample]:
    """Random tokens r (n of them) followed by r again; BOS first when the tokenizer has one."""
    gen = torch.Generator().manual_seed(seed)
    bos = getattr(tokenizer, "bos_token_id", None)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    n = (max_length - (1 if bos is not None else 0)) // 2
    if n < 1:
        raise CorpusError(f"--max-length {max_length} is too short for the 'repeats' corpus; use at least 3")
    samples = []
    if vocab_size - len(special) < 2:
        raise CorpusError("the model's vocabulary has no ordinary tokens to draw the 'repeats' corpus from")
    for _ in range(limit):
        seq: list[int] = []
        while len(seq) < n:  # draw until n ordinary (non-special) tokens
            draw = torch.randint(0, vocab_size, (n * 2,), generator=gen).tolist()
            seq += [t for t in draw if t not in special][: n - len(seq)]
        ids = ([bos] if bos is not None else []) + seq + seq
        samples.append(Sample(ids, {"repeat_length": n, "offset": 1 if bos is not None else 0}))
    return samples


# -- needle ----------------------------------------------------------------------------------------


def _secret_number(rng: random.Random) -> str:
    digits = rng.randint(4, 6)
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def _haystack_source(paragraphs: list[str], counts: list[int], start: int, tokens: int) -> str:
    """Consecutive paragraphs from ``start`` (wrapping around), one per line, with well over ``tokens`` tokens."""
    parts: list[str] = []
    have = 0
    i = start
    while have < tokens + 64 + tokens // 50:
        parts.append(paragraphs[i % len(paragraphs)])
        have += counts[i % len(paragraphs)]
        i += 1
    return "\n".join(parts)


def _insert(haystack: str, needle: str, depth: float) -> tuple[str, int]:
    """``haystack`` with ``needle`` at the sentence (or, failing one close by, word) boundary nearest
    to ``depth`` of its length; returns the text and where the needle starts in it."""
    if not haystack:
        return needle, 0
    target = depth * len(haystack)
    bounds = {0, len(haystack)} | {m.end() for m in _SENTENCE_END.finditer(haystack)}
    at = min(sorted(bounds), key=lambda p: abs(p - target))
    if abs(at - target) > 0.1 * len(haystack):
        words = {0, len(haystack)} | {m.end() for m in re.finditer(r"\s+", haystack)}
        at = min(sorted(words), key=lambda p: abs(p - target))
    if at == 0:
        return needle + " " + haystack.lstrip(), 0
    if at >= len(haystack.rstrip()):
        left = haystack.rstrip()
        return left + " " + needle, len(left) + 1
    return haystack[:at] + needle + " " + haystack[at:], at


def _needle_input(
    toks: _Tokens, source: str, name: str, value: str, ending: str, length: int, depth: float, explicit: bool
) -> tuple[list[int], dict[str, Any], bool]:
    """One needle prompt of at most ``length`` tokens; the flag says whether the needle's answer
    tokens are exactly the tokens the model should generate after the prompt."""
    lead = f"The secret number of {name} is "
    needle = f"{lead}{value}{ending}"
    question = f"What is the secret number of {name}?"
    tail = f"\n\nQuestion: {question}\nAnswer: The secret number of {name} is"
    fixed = len(toks.pre) + toks.count(needle) + toks.count(tail)
    need = fixed + MIN_HAYSTACK
    if need > length:
        hint = f" and needle lengths >= {need}" if explicit else ""
        raise CorpusError(
            f"the needle and question need {need} tokens ({fixed} for the needle, question and answer prefix, "
            f"at least {MIN_HAYSTACK} of haystack) but the context length is {length}; "
            f"use --max-length >= {need}{hint}"
        )
    budget = length - fixed
    best: tuple[list[int], dict[str, Any], bool] | None = None
    for _ in range(10):  # the haystack's tokens shift a little where it meets the needle and question
        haystack = toks.cut(source, max(budget, 1))
        text, at = _insert(haystack, needle, depth)
        prompt = text + tail
        full = prompt + " " + value
        v_at = at + len(lead)  # where the number starts
        ids, spans = toks.encode(
            full,
            [(at, at + len(needle)), (v_at - 1, v_at + len(value)), (len(text), len(prompt)), (len(prompt), len(full))],
            suffix=False,
        )
        sentence, in_needle, question_span, answer = spans
        if sentence is None or in_needle is None or question_span is None or answer is None:
            raise CorpusError(f"the tokenizer gives no token to part of the needle prompt {needle!r}")
        n = answer[0]  # the prompt is everything before the answer's first token
        answer_ids = ids[answer[0] : answer[1]]
        exact = ids[in_needle[0] : in_needle[1]] == answer_ids
        if not exact:
            answer_ids = ids[in_needle[0] : in_needle[1]]
        haystack_tokens = question_span[0] - len(toks.pre) - (sentence[1] - sentence[0])
        info = {
            "needle_span": list(in_needle),
            "answer": value,
            "answer_ids": answer_ids,
            "needle": needle,
            "needle_sentence_span": list(sentence),
            "question": question,
            "depth": depth,
            "actual_depth": round((sentence[0] - len(toks.pre)) / max(haystack_tokens, 1), 4),
            "context_length": length,
        }
        if n <= length and (best is None or n > len(best[0])):
            best = (ids[:n], info, exact)
        if n == length or (n > length and budget <= 1):
            break
        budget = max(budget + length - n, 1)
    if best is None:
        raise CorpusError(f"could not fit a needle prompt into {length} tokens; use a longer context length")
    return best


def _needle(
    tokenizer: Any, max_length: int, limit: int | None, seed: int, lengths: list[int] | None, depths: list[float]
) -> list[Sample]:
    """Every (length, depth) pair, in that order, repeated with new needles and haystacks until ``limit``."""
    explicit = lengths is not None
    lengths = lengths if lengths is not None else [max_length]
    for length in lengths:
        if length > max_length:
            raise CorpusError(
                f"corpus 'needle': context length {length} is above --max-length {max_length}; "
                f"raise --max-length to {max(lengths)} or use shorter lengths"
            )
    toks = _Tokens(tokenizer)
    rng = random.Random(f"headmap-needle-{seed}")
    names = needle_names()
    paragraphs = shipped_text()
    counts = toks.counts(paragraphs)
    total = limit or len(lengths) * len(depths)
    samples: list[Sample] = []
    mismatched = 0
    while len(samples) < total:
        for length in lengths:
            if len(samples) >= total:
                break
            start = rng.randrange(len(paragraphs))
            name = rng.choice(names)
            value, ending = _secret_number(rng), NEEDLE_ENDINGS[0]
            source = _haystack_source(paragraphs, counts, start, length)
            for depth in depths:
                if len(samples) >= total:
                    break
                # a needle whose number the tokenizer splits alike in the needle and in the answer: on a
                # mismatch (say "3." is one token) end the sentence otherwise, then try another number
                for _ in range(10):
                    ids, info, exact = _needle_input(toks, source, name, value, ending, length, depth, explicit)
                    if exact:
                        break
                    if ending == NEEDLE_ENDINGS[0]:
                        ending = NEEDLE_ENDINGS[1]
                    else:
                        value, ending = _secret_number(rng), NEEDLE_ENDINGS[0]
                else:
                    mismatched += 1
                info["haystack_start"] = start
                info["exact_copy"] = exact
                samples.append(Sample(ids, info))
    if mismatched:
        warnings.warn(
            f"{mismatched} needle input(s): the tokenizer splits the secret number differently inside the needle "
            "and after the question; their answer_ids are the needle's tokens",
            stacklevel=3,
        )
    return samples


# -- items -----------------------------------------------------------------------------------------


def _passages(
    toks: _Tokens, paragraphs: list[str], counts: list[int], k: int, item_tokens: int, rng: random.Random
) -> list[str]:
    """``k`` passages of ``item_tokens`` tokens, each from consecutive paragraphs that no other passage
    uses (unless the text runs out)."""
    out: list[str] = []
    used: set[int] = set()
    while len(out) < k:
        order = list(range(len(paragraphs)))
        rng.shuffle(order)
        before = len(out)
        for p in order:
            run, have, j = [], 0, p
            while have < item_tokens and j < len(paragraphs) and j not in used:
                run.append(j)
                have += counts[j] + 1
                j += 1
            if have < item_tokens:
                continue
            used.update(run)
            out.append(toks.cut(" ".join(paragraphs[i] for i in run), item_tokens))
            if len(out) == k:
                break
        if len(out) == before:
            if not used:
                raise CorpusError(f"corpus 'items': item_tokens={item_tokens} is longer than the shipped text")
        used = set()  # the text ran out: passages may now repeat
    return out


def _keyword(passages: list[str], target: int, rng: random.Random) -> str:
    """A word of passage ``target`` that no other passage has (longer words preferred)."""
    others: set[str] = set()
    for i, p in enumerate(passages):
        if i != target:
            others.update(w.lower() for w in re.findall(r"[A-Za-z]+", p))
    words = re.findall(r"[A-Za-z]+", passages[target])[:-1]  # the last word may be cut
    for shortest in (5, 3, 1):
        pool = sorted({w for w in words if len(w) >= shortest and w.lower() not in others})
        if pool:
            return rng.choice(pool)
    return rng.choice(sorted(set(words))) if words else passages[target].split()[0]


def _items(tokenizer: Any, max_length: int, limit: int, seed: int, k: int, item_tokens: int) -> list[Sample]:
    toks = _Tokens(tokenizer)
    at_least = len(toks.pre) + k * item_tokens
    if at_least > max_length:
        raise CorpusError(
            f"corpus 'items' needs more than {at_least} tokens per input (k={k} documents of {item_tokens} tokens, "
            f"their labels and the question) but --max-length is {max_length}; raise --max-length or lower "
            "k or item_tokens (items:k=...:item_tokens=...)"
        )
    rng = random.Random(f"headmap-items-{seed}")
    paragraphs = shipped_text()
    counts = toks.counts(paragraphs)
    samples = []
    for _ in range(limit):
        passages = _passages(toks, paragraphs, counts, k, item_tokens, rng)
        target = rng.randrange(k)
        keyword = _keyword(passages, target, rng)
        text, char_spans = "", []
        for i, passage in enumerate(passages):
            label = f"Document [{i + 1}]: "
            char_spans.append((len(text) + len(label), len(text) + len(label) + len(passage)))
            text += f"{label}{passage}\n"
        question = f'Question: which document mentions "{keyword}"?'
        ids, spans = toks.encode(text + question + "\nAnswer: Document [", char_spans, suffix=False)
        if any(s is None for s in spans):
            raise CorpusError("corpus 'items': the tokenizer gives no token to a document")
        info = {
            "items": [list(s) for s in spans if s is not None],
            "k": k,
            "target": target,
            "answer": str(target + 1),
            "keyword": keyword,
            "question": question,
            "item_tokens": item_tokens,
        }
        samples.append(Sample(ids, info))
    need = max(len(s.ids) for s in samples)
    if need > max_length:
        raise CorpusError(
            f"corpus 'items' needs {need} tokens per input (k={k} documents of {item_tokens} tokens, their "
            f"'Document [i]: ' labels and the question) but --max-length is {max_length}; use --max-length >= {need} "
            "or lower k or item_tokens (items:k=...:item_tokens=...)"
        )
    return samples


# -- files -----------------------------------------------------------------------------------------


def _numbered_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, stripped line) of every non-blank line of a UTF-8 text file; clear errors."""
    if not path.exists():
        raise CorpusError(
            f"corpus file {path} does not exist; pass a UTF-8 text file (one input per line) "
            f"or a built-in corpus: {', '.join(BUILTIN_CORPORA)}"
        )
    if path.is_dir():
        raise CorpusError(f"corpus {path} is a folder; pass a UTF-8 text file with one input per line")
    data = path.read_bytes()
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
        raise CorpusError(f"corpus file {path} is empty (no non-blank line); put one input per line")
    return lines


def read_lines(path: Path) -> list[str]:
    """Non-blank lines of a UTF-8 text file, with a clear error for every way it can be wrong."""
    return [line for _, line in _numbered_lines(path)]


def _too_long(path: Path, line: int, tokens: int, max_length: int) -> CorpusError:
    return CorpusError(
        f"line {line} of corpus file {path} has {tokens} tokens, more than --max-length {max_length}; "
        "raise --max-length or drop --strict to truncate it"
    )


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


def _jsonl_sample(toks: _Tokens, path: Path, line: int, raw: str, max_length: int, strict: bool) -> tuple[Sample, bool]:
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
    if "text" not in obj:
        raise CorpusError(f'{where}: the object has no "text"')
    text = obj["text"]
    if not isinstance(text, str) or not text.strip():
        raise CorpusError(f'{where}: "text" must be a non-empty string')
    named = obj.get("spans", {})
    if not isinstance(named, dict):
        raise CorpusError(f'{where}: "spans" must be an object of named spans, like {{"query": [12, 40]}}')
    names = list(named)
    char_spans = [_char_span(where, n, named[n], text) for n in names]
    ids, spans = toks.encode(text, char_spans, suffix=True)
    if strict and len(ids) > max_length:
        raise _too_long(path, line, len(ids), max_length)
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


def _file(path: Path, tokenizer: Any, max_length: int, limit: int | None, strict: bool) -> tuple[list[Sample], str]:
    _check_file(path)
    with open(path, "rb") as fh:
        head = fh.read(65536).lstrip(b"\xef\xbb\xbf").lstrip()
    if path.suffix.lower() != ".jsonl" and not head.startswith(b"{"):
        samples, cut = scan_text_file(path, tokenizer, max_length, limit, strict)
        samples.truncated = cut
        return samples, "text"
    lines = _numbered_lines(path)
    if limit:
        lines = lines[:limit]
    if path.suffix.lower() == ".jsonl" or lines[0][1].startswith("{"):
        toks = _Tokens(tokenizer)
        built = [_jsonl_sample(toks, path, line, raw, max_length, strict) for line, raw in lines]
        samples = [s for s, _ in built]
        if not any(has for _, has in built):  # no line names a span: not a corpus with spans
            for s in samples:
                del s.info["spans"]
        return samples, "jsonl"
    samples = []
    for line, text in lines:
        ids = _encode(tokenizer, text)
        if strict and len(ids) > max_length:
            raise _too_long(path, line, len(ids), max_length)
        samples.append(Sample(ids, {"line": line}))
    return samples, "text"


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
    if parsed is not None:
        name, options = parsed
        desc: dict[str, Any] = {"name": name, "kind": "builtin"}
        if name == "text":
            samples = _packed_text(tokenizer, max_length, limit or 8)
            desc["source"] = "headmap/data/text.txt (public domain prose)"
        elif name == "repeats":
            vocab = vocab_size or len(tokenizer)
            samples = _repeats(tokenizer, max_length, limit or 8, seed, vocab)
            desc["seed"] = seed
        elif name == "needle":
            lengths = options.get("lengths")
            options = {"lengths": lengths or [max_length], "depths": options.get("depths", list(NEEDLE_DEPTHS))}
            samples = _needle(tokenizer, max_length, limit, seed, lengths, options["depths"])
            desc.update({"seed": seed, "source": "headmap/data/text.txt with needle sentences"})
        else:
            k = options.get("k", ITEMS_K)
            if "item_tokens" in options:
                item_tokens = options["item_tokens"]
                samples = _items(tokenizer, max_length, limit or ITEMS_INPUTS, seed, k, item_tokens)
            else:  # the default: documents of ITEMS_TOKENS tokens, shorter when k of them do not fit max_length
                item_tokens = ITEMS_TOKENS
                while True:
                    try:
                        samples = _items(tokenizer, max_length, limit or ITEMS_INPUTS, seed, k, item_tokens)
                        break
                    except CorpusError:
                        if item_tokens <= 4:
                            raise
                        item_tokens = max(4, min(item_tokens - 1, int(item_tokens * 0.85)))
            options = {"k": k, "item_tokens": item_tokens}
            desc.update({"seed": seed, "source": "headmap/data/text.txt passages"})
        desc["options"] = options
    else:
        path = Path(spec).expanduser()
        if not path.exists() and "/" not in spec and "." not in spec:
            raise CorpusError(
                f"no corpus file or built-in corpus named '{spec}'; built-ins: {', '.join(BUILTIN_CORPORA)}"
            )
        samples, fmt = _file(path, tokenizer, max_length, limit, strict)
        desc = {"name": path.name, "kind": "file", "path": str(path.resolve()), "format": fmt, "strict": strict}
    if isinstance(samples, FileSamples):  # streamed: checked, cut and counted in one pass already
        truncated = samples.truncated
        if truncated:
            warnings.warn(
                f"{truncated} input(s) of corpus '{spec}' were longer than --max-length {max_length} tokens and "
                "were truncated",
                stacklevel=2,
            )
        tokens = samples.total_tokens()
    else:
        samples = [s for s in samples if len(s.ids) >= 1]
        if not samples:
            raise CorpusError(f"corpus '{spec}' produced no input with at least one token")
        truncated = _truncate(samples, max_length, spec)
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
