"""Built-in corpus ``text``: shipped public-domain English prose (``data/text.txt``), packed into
inputs of ``max_length`` tokens made of consecutive paragraphs."""

from __future__ import annotations

from importlib import resources
from typing import Any

from .registry import Built, register_corpus
from .tokens import encode
from .types import Sample

#: Inputs of the ``text`` corpus when no limit is given.
TEXT_INPUTS = 8


def shipped_text() -> list[str]:
    """Paragraphs of the shipped public-domain prose, one per line."""
    raw = resources.files("headmap").joinpath("data/text.txt").read_text(encoding="utf-8")
    return [line.strip() for line in raw.splitlines() if line.strip()]


def encode_cut(tokenizer: Any, text: str, max_length: int) -> list[int]:
    """At most ``max_length`` tokens, the tokenizer's closing special tokens kept (an encoder's [SEP])."""
    ids = list(tokenizer(text, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"])
    return ids[:max_length]


def packed_text(tokenizer: Any, max_length: int, limit: int) -> list[Sample]:
    """Consecutive paragraphs joined until an input holds ``max_length`` tokens."""
    samples: list[Sample] = []
    current: list[str] = []
    first = 0
    paragraphs = shipped_text()
    for i, para in enumerate(paragraphs):
        if not current:
            first = i
        current.append(para)
        ids = encode(tokenizer, " ".join(current))
        if len(ids) >= max_length:
            samples.append(Sample(encode_cut(tokenizer, " ".join(current), max_length), {"paragraphs": [first, i]}))
            current = []
            if len(samples) >= limit:
                break
    if current and len(samples) < limit:
        samples.append(Sample(encode_cut(tokenizer, " ".join(current), max_length), {"paragraphs": [first, i]}))
    return samples


@register_corpus("text")
def build_text(tokenizer: Any, *, max_length: int, limit: int | None, seed: int, vocab_size: int | None, options):
    samples = packed_text(tokenizer, max_length, limit or TEXT_INPUTS)
    return Built(samples, options, {"source": "headmap/data/text.txt (public domain prose)"})
