"""Built-in corpus ``repeats``: random token sequences from the model's own vocabulary, each
repeated once (previous-token, duplicate-token and induction heads)."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import CorpusError
from .registry import Built, register_corpus
from .types import Sample

#: Inputs of the ``repeats`` corpus when no limit is given.
REPEATS_INPUTS = 8


def repeats(tokenizer: Any, max_length: int, limit: int, seed: int, vocab_size: int) -> list[Sample]:
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


@register_corpus("repeats")
def build_repeats(tokenizer: Any, *, max_length: int, limit: int | None, seed: int, vocab_size: int | None, options):
    vocab = vocab_size or len(tokenizer)
    samples = repeats(tokenizer, max_length, limit or REPEATS_INPUTS, seed, vocab)
    return Built(samples, options, {"seed": seed})
