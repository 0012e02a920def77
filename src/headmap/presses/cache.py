"""Cache layers that hold a pressed prefill: fewer entries, positions of the full sequence.

Both classes are transformers ``DynamicLayer``\\ s and go on growing during decoding. They differ
from it in two numbers they report:

- ``get_seq_length()`` is the number of tokens the layer has *seen* (not the number it stores), so
  that the next token gets the position, and RoPE angle, it would have without the press;
- ``get_mask_sizes(q)`` is ``(stored + q, seen - stored)``: the mask covers the last
  ``stored + q`` positions. Kept entries sit in order of position, left padding first, so a
  padded row's padding columns land exactly on the kept padding entries (which presses drop
  before any real token; see :mod:`headmap.presses.base`).

:class:`PressedLayer` holds the same number of entries for every kv head ([B, Hkv, n, D], what a
uniform press keeps). :class:`RaggedLayer` holds a different number per (row, kv head) packed in
one tensor [N, D] plus the counts; at every call it hands attention a [B, Hkv, max_n + t, D]
view padded on the left, made for that call only, and :class:`RaggedMask` (an engine edit) hides
the padding entries per head. Peak memory during a decoding step: the packed cache plus one
layer's padded view.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from ..edits.base import Edit
from ..engine.block import Block


class PressedLayer(DynamicLayer):
    """The kept entries of one layer ([B, Hkv, n, D]) after a press; ``seen`` tokens went through it."""

    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, seen: int) -> None:
        super().__init__()
        self.dtype, self.device = keys.dtype, keys.device
        self.keys, self.values = keys, values
        self.is_initialized = True
        self.seen = int(seen)
        #: decoding-time eviction only (see :meth:`track`): entries kept after each step, the
        #: positions [B, Hkv, n] int32 of the entries, each row's first real position [B], and the
        #: running scores [B, Hkv, n] float32 of presses that add up attention (h2o)
        self.budget: int | None = None
        self.positions: torch.Tensor | None = None
        self.item_start: torch.Tensor | None = None
        self.scores: torch.Tensor | None = None

    def track(self, budget: int, positions: torch.Tensor, item_start: torch.Tensor, scores=None) -> None:
        """Keep ``budget`` entries per head during decoding; ``positions`` of the entries held now."""
        self.budget = int(budget)
        self.positions = positions.to(torch.int32)
        self.item_start = item_start
        self.scores = None if scores is None else scores.to(torch.float32)

    def update(self, key_states, value_states, *args, **kwargs):
        start = self.seen
        self.seen += key_states.shape[-2]
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        if self.positions is not None:
            batch, kv_heads, new = key_states.shape[:3]
            fresh = torch.arange(start, self.seen, dtype=torch.int32, device=self.positions.device)
            self.positions = torch.cat([self.positions, fresh.expand(batch, kv_heads, new)], dim=-1)
            if self.scores is not None:
                self.scores = torch.cat([self.scores, self.scores.new_zeros(batch, kv_heads, new)], dim=-1)
        return self.keys, self.values

    def select(self, keep: torch.Tensor) -> None:
        """Keep the entries where ``keep`` [B, Hkv, stored] is True (as many per head), in order."""
        batch, kv_heads = keep.shape[:2]
        n = int(keep[0, 0].sum())
        idx = torch.nonzero(keep)[:, 2].view(batch, kv_heads, n)
        self.keys = self.keys.gather(2, idx[..., None].expand(-1, -1, -1, self.keys.shape[-1])).contiguous()
        self.values = self.values.gather(2, idx[..., None].expand(-1, -1, -1, self.values.shape[-1])).contiguous()
        if self.positions is not None:
            self.positions = self.positions.gather(2, idx)
        if self.scores is not None:
            self.scores = self.scores.gather(2, idx)

    def stored(self) -> int:
        return self.keys.shape[-2]

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        stored = self.stored()
        return stored + query_length, self.seen - stored

    def reset(self) -> None:
        super().reset()
        self.seen = 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a pressed cache cannot be cropped (assisted decoding is not supported)")

    def nbytes(self) -> int:
        tensors = (self.keys, self.values, self.positions, self.scores)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class RaggedLayer(PressedLayer):
    """Per (row, kv head) kept entries packed in one tensor, plus the tokens decoded since.

    ``packed_keys`` [N, D] and ``packed_values`` [N, Dv] hold, row by row and head by head in
    order of position, the ``lengths[b, h]`` kept entries of each head; ``pads[b, h]`` of them
    (the first ones) are padding tokens kept because the budget exceeded the row's real tokens.
    ``keys``/``values`` [B, Hkv, t, D] are the tokens every head received after the press.
    """

    def __init__(
        self,
        packed_keys: torch.Tensor,
        packed_values: torch.Tensor,
        lengths: torch.Tensor,
        pads: torch.Tensor,
        seen: int,
        tail_keys: torch.Tensor,
        tail_values: torch.Tensor,
    ) -> None:
        super().__init__(tail_keys, tail_values, seen)
        self.packed_keys, self.packed_values = packed_keys, packed_values
        self.lengths = lengths.to(torch.int32)
        self.pads = pads.to(torch.int32)
        self.width = int(lengths.max())

    def _slots(self) -> torch.Tensor:
        """[N] long: flat index in [B * Hkv * width] of each packed entry (right-aligned per head)."""
        lengths = self.lengths.flatten().long()
        starts = torch.cumsum(lengths, 0) - lengths  # first packed index of each head
        head = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)
        rank = torch.arange(int(lengths.sum()), device=lengths.device) - starts[head]
        return head * self.width + (self.width - lengths[head]) + rank

    def padded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, Hkv, width, D] keys and values with each head's entries right-aligned, zeros before."""
        batch, kv_heads = self.lengths.shape
        slots = self._slots()
        out = []
        for packed in (self.packed_keys, self.packed_values):
            flat = packed.new_zeros(batch * kv_heads * self.width, packed.shape[-1])
            flat.index_copy_(0, slots, packed)
            out.append(flat.view(batch, kv_heads, self.width, packed.shape[-1]))
        return out[0], out[1]

    def hidden(self) -> torch.Tensor:
        """[B, Hkv, width] bool: slots that hold no real kept entry (left filler or kept padding)."""
        col = torch.arange(self.width, device=self.lengths.device)
        first_real = (self.width - self.lengths + self.pads).long()
        return col[None, None, :] < first_real[..., None]

    def update(self, key_states, value_states, *args, **kwargs):
        self.seen += key_states.shape[-2]
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        keys, values = self.padded()
        return torch.cat([keys, self.keys], dim=-2), torch.cat([values, self.values], dim=-2)

    def stored(self) -> int:
        return self.width + self.keys.shape[-2]

    def nbytes(self) -> int:
        tensors = (self.packed_keys, self.packed_values, self.lengths, self.pads, self.keys, self.values)
        return sum(t.numel() * t.element_size() for t in tensors)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("a head-wise pressed cache does not support beam search")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("a head-wise pressed cache does not support repeating the batch")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("a head-wise pressed cache does not support selecting batch rows")


class RaggedMask(Edit):
    """Engine edit that hides, per kv head, the slots of a :class:`RaggedLayer` that hold no kept entry.

    The hidden logits get the most negative float, as the engine's own mask does, so their
    probabilities are exactly 0: attention equals attention over the kept entries only.
    """

    name = "ragged_mask"

    def __init__(self, cache_ref) -> None:
        super().__init__(heads=None)
        self.cache_ref = cache_ref  # callable -> the cache of the current generation, or None

    def _layer(self, layer: int) -> RaggedLayer | None:
        cache = self.cache_ref()
        if cache is None or layer >= len(getattr(cache, "layers", ())):
            return None
        found = cache.layers[layer]
        return found if isinstance(found, RaggedLayer) else None

    def applies_to_layer(self, layer: int) -> bool:
        return self._layer(layer) is not None

    def edit_logits(self, block: Block, logits: torch.Tensor) -> torch.Tensor:
        ragged = self._layer(block.layer)
        if ragged is None or block.k_start >= ragged.width:
            return logits
        k1 = min(block.k_end, ragged.width)
        hidden = ragged.hidden()[..., block.k_start : k1]  # [B, Hkv, cols]
        hidden = hidden.repeat_interleave(block.group_size, dim=1)[:, :, None, :]  # [B, H, 1, cols]
        if torch.is_grad_enabled():
            logits = logits.clone()
        logits[..., : k1 - block.k_start].masked_fill_(hidden, torch.finfo(logits.dtype).min)
        return logits


def cache_bytes(cache) -> int:
    """Bytes held by the key and value tensors of every layer of ``cache``, measured from the tensors."""
    total = 0
    for layer in getattr(cache, "layers", ()):
        if isinstance(layer, PressedLayer):
            total += layer.nbytes()
        elif getattr(layer, "keys", None) is not None and getattr(layer, "values", None) is not None:
            total += layer.keys.numel() * layer.keys.element_size()
            total += layer.values.numel() * layer.values.element_size()
    return total
