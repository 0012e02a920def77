"""Built-in corpus ``items``: k short labelled documents and a question about one of them (position profile)."""

from __future__ import annotations

import random
import re
from typing import Any

from ..errors import CorpusError
from .registry import Built, register_corpus
from .text import shipped_text
from .tokens import Tokens
from .types import Sample

ITEMS_K = 10
ITEMS_TOKENS = 48
ITEMS_INPUTS = 8


def _passages(
    toks: Tokens, paragraphs: list[str], counts: list[int], k: int, item_tokens: int, rng: random.Random
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
    toks = Tokens(tokenizer)
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


@register_corpus(
    "items",
    {
        "k": ("int", "documents per input; default 10"),
        "item_tokens": ("int", "tokens per document; default 48"),
    },
)
def build_items(tokenizer: Any, *, max_length: int, limit: int | None, seed: int, vocab_size: int | None, options):
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
    return Built(
        samples, {"k": k, "item_tokens": item_tokens}, {"seed": seed, "source": "headmap/data/text.txt passages"}
    )
