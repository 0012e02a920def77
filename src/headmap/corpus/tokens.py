"""The few tokenizer operations the corpora (and the evaluation) need: :class:`Tokens` and :func:`encode`."""

from __future__ import annotations

import re
from typing import Any


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` with the tokenizer's special tokens (BOS or CLS, EOS or SEP)."""
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


class Tokens:
    """The few tokenizer operations the corpora need, with and without offset mappings.

    ``pre`` and ``suf`` are the special tokens the tokenizer puts around a text (BOS or CLS,
    EOS or SEP). Fast tokenizers map characters to tokens with their offsets; others fall back
    to tokenising prefixes of the text (exact at word boundaries).
    """

    def __init__(self, tokenizer: Any):
        self.tok = tokenizer
        self._ends: tuple[str | None, list[int]] = (None, [])
        plain = self.plain("hello")
        full = encode(tokenizer, "hello")
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
        ids = encode(self.tok, text) if suffix else self.pre + self.plain(text)
        last = len(ids) - (len(self.suf) if suffix else 0)
        spans = []
        for a, b in char_spans:
            s = len(self.pre) + self.count(text[:a].rstrip())
            e = min(len(self.pre) + self.count(text[:b]), last)
            spans.append((s, e) if e > s else None)
        return ids, spans
