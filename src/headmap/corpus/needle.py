"""Built-in corpus ``needle``: needle in a haystack (retrieval heads). Shipped prose with a sentence
that states a secret number inserted at a chosen depth, then a question whose answer is that number.

The prompt ends ``Question: What is the secret number of X?\nAnswer:``: it does not repeat the
needle's wording, so a head that merely completes a repeated phrase (an induction pattern) gets no
help from the question. ``echo=1`` ends it ``Answer: The secret number of X is`` instead, the needle's
own words, to measure how much of a result that pattern carries (docs/methods/needle_accuracy.md).

Every input records its needle (``needle_id``, the place and number, also its ``cluster``: one
needle is asked at every depth), its ``haystack`` (the first paragraph of the prose it reads) and
the ``paragraphs`` it reads; the corpus description lists them (``needles``, ``haystacks``,
``paragraphs``), so that a scan's meta.json says which needles chose its heads and an evaluation
can be checked against them."""

from __future__ import annotations

import random
import re
import warnings
from importlib import resources
from typing import Any

from ..errors import CorpusError
from .registry import Built, register_corpus
from .text import shipped_text
from .tokens import Tokens
from .types import Sample

NEEDLE_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
#: How a needle sentence ends after its number: the first, else the second where the tokenizer
#: merges the number with the first's punctuation.
NEEDLE_ENDINGS = (".", " and nothing else.")
#: Fewest haystack tokens a needle input may have.
MIN_HAYSTACK = 16
# Where a sentence ends (its closing punctuation, closing quotes, then white space) or a paragraph.
_SENTENCE_END = re.compile(r"[.!?][\"'`)\]_]*\s+|\n+")


def needle_names() -> list[str]:
    """Place names the ``needle`` corpus draws its needles from (``data/needle_names.txt``)."""
    raw = resources.files("headmap").joinpath("data/needle_names.txt").read_text(encoding="utf-8")
    return [line.strip() for line in raw.splitlines() if line.strip()]


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


def _paragraphs_read(counts: list[int], start: int, tokens: int) -> list[int]:
    """The paragraphs :func:`_haystack_source` joins from ``start`` for ``tokens`` tokens."""
    out: list[int] = []
    have = 0
    i = start
    while have < tokens + 64 + tokens // 50:
        out.append(i % len(counts))
        have += counts[i % len(counts)]
        i += 1
    return sorted(set(out))


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
    toks: Tokens,
    source: str,
    name: str,
    value: str,
    ending: str,
    length: int,
    depth: float,
    explicit: bool,
    echo: bool = False,
) -> tuple[list[int], dict[str, Any], bool]:
    """One needle prompt of at most ``length`` tokens; the flag says whether the needle's answer
    tokens are exactly the tokens the model should generate after the prompt. ``echo``: the answer
    prefix repeats the needle's own words."""
    lead = f"The secret number of {name} is "
    needle = f"{lead}{value}{ending}"
    question = f"What is the secret number of {name}?"
    tail = f"\n\nQuestion: {question}\nAnswer:" + (f" The secret number of {name} is" if echo else "")
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
    tokenizer: Any,
    max_length: int,
    limit: int | None,
    seed: int,
    lengths: list[int] | None,
    depths: list[float],
    echo: bool = False,
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
    toks = Tokens(tokenizer)
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
                    ids, info, exact = _needle_input(toks, source, name, value, ending, length, depth, explicit, echo)
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
                info["needle_id"] = f"{name}={value}"
                info["cluster"] = info["needle_id"]  # one needle is asked at every depth: the unit
                info["haystack"] = f"text@{start}"
                info["paragraphs"] = _paragraphs_read(counts, start, length)
                info["echo"] = echo
                samples.append(Sample(ids, info))
    if mismatched:
        warnings.warn(
            f"{mismatched} needle input(s): the tokenizer splits the secret number differently inside the needle "
            "and after the question; their answer_ids are the needle's tokens",
            stacklevel=4,
        )
    return samples


@register_corpus(
    "needle",
    {
        "lengths": ("ints", "context lengths in tokens, comma-separated; default: --max-length"),
        "depths": ("fractions", "needle depths as fractions of the haystack in [0, 1]; default 0,0.25,0.5,0.75,1"),
        "echo": ("fractions", "1: the answer prefix repeats the needle's words (an induction pattern); default 0"),
    },
)
def build_needle(tokenizer: Any, *, max_length: int, limit: int | None, seed: int, vocab_size: int | None, options):
    lengths = options.get("lengths")
    echo = options.get("echo", [0])
    if len(echo) != 1 or echo[0] not in (0.0, 1.0):
        raise CorpusError(f"corpus 'needle': option echo must be 0 or 1 (got {','.join(map(str, echo))})")
    used = {"lengths": lengths or [max_length], "depths": options.get("depths", list(NEEDLE_DEPTHS))}
    if echo[0]:
        used["echo"] = 1
    samples = _needle(tokenizer, max_length, limit, seed, lengths, used["depths"], bool(echo[0]))
    description = {
        "seed": seed,
        "source": "headmap/data/text.txt with needle sentences",
        "needles": sorted({s.info["needle_id"] for s in samples}),
        "haystacks": sorted({s.info["haystack"] for s in samples}),
        "paragraphs": sorted({p for s in samples for p in s.info["paragraphs"]}),
    }
    return Built(samples, used, description)
