"""What a corpus is made of: inputs (:class:`Sample`), the corpus, the scan's :class:`Batch`, and padding."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


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
    #: the other tensors the model takes for these inputs (an image corpus: ``pixel_values`` and what
    #: else the model's processor made, batched by :func:`headmap.corpus.images.collate`); empty for text
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)

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
