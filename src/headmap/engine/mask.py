"""Compact attention masks.

transformers builds the mask it hands to an attention implementation through
``AttentionMaskInterface``. For ``eager`` and ``sdpa`` that is a dense [B, 1, Tq, Tk] tensor,
quadratic in the context length. For ``headmap`` we register :func:`headmap_mask`, which keeps
what the model asked for (the index-based mask function, with causality, sliding windows,
chunks and packed sequences already folded in; the 2D padding mask; the query and key offsets)
and builds any block of the mask on demand. Nothing here grows with T^2.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers.masking_utils import prepare_padding_mask


class _MaskBase:
    """Shared padding logic: ``key_valid()`` gives [B, kv_length] real-token flags or None."""

    batch_size: int
    kv_offset: int
    device: torch.device

    def key_valid(self) -> torch.Tensor | None:
        return None

    def item_start(self) -> torch.Tensor:
        """[B] long: absolute position of each input's first real token."""
        valid = self.key_valid()
        if valid is None:
            return torch.zeros(self.batch_size, dtype=torch.long, device=self.device)
        return valid.to(torch.int8).argmax(dim=1) + self.kv_offset

    def query_valid(self, q_pos: torch.Tensor) -> torch.Tensor:
        """[B, bq] bool: whether each query position holds a real token (not padding)."""
        valid = self.key_valid()
        ones = torch.ones(self.batch_size, q_pos.numel(), dtype=torch.bool, device=q_pos.device)
        if valid is None:
            return ones
        col = q_pos - self.kv_offset
        inside = (col >= 0) & (col < valid.shape[1])
        picked = valid[:, col.clamp(0, valid.shape[1] - 1)]
        return torch.where(inside[None, :], picked, ones)


@dataclass
class LazyMask(_MaskBase):
    """The mask of one attention call, evaluated block by block.

    ``mask_function(batch_idx, head_idx, q_idx, kv_idx) -> bool tensor`` is transformers' own
    index-based description of the pattern. Indices are absolute positions: query row ``i`` of
    the call sits at ``q_offset + i`` and key column ``j`` at ``kv_offset + j``.
    """

    batch_size: int
    q_length: int
    kv_length: int
    q_offset: int
    kv_offset: int
    mask_function: Callable
    padding_mask: torch.Tensor | None  # [B, >= kv_offset + kv_length] bool, True = real token
    device: torch.device
    # Block plans (key ranges, masked columns), filled by the engine at the first layer and
    # reused by every later layer that receives this same mask object.
    plans: dict | None = field(default=None, repr=False, compare=False)

    # transformers only ever checks ``mask is not None``; these make the object look like the
    # [B, 1, Tq, Tk] tensor it stands for, for code that reads the shape.
    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.batch_size, 1, self.q_length, self.kv_length)

    @property
    def ndim(self) -> int:
        return 4

    def block(self, q_start: int, q_end: int, k_start: int, k_end: int) -> torch.Tensor:
        """Boolean mask [B, 1, q_end - q_start, k_end - k_start]; True where attention is allowed."""
        b = torch.arange(self.batch_size, device=self.device)[:, None, None, None]
        h = torch.zeros(1, dtype=torch.long, device=self.device)[None, :, None, None]
        q = (torch.arange(q_start, q_end, device=self.device) + self.q_offset)[None, None, :, None]
        k = (torch.arange(k_start, k_end, device=self.device) + self.kv_offset)[None, None, None, :]
        allowed = torch.as_tensor(self.mask_function(b, h, q, k), device=self.device)
        if self.padding_mask is not None:
            allowed = allowed & self.padding_mask[:, None, None, k_start + self.kv_offset : k_end + self.kv_offset]
        return allowed.expand(self.batch_size, 1, q_end - q_start, k_end - k_start)

    def key_valid(self) -> torch.Tensor | None:
        """[B, kv_length] bool: which key columns hold real tokens (None: all of them)."""
        if self.padding_mask is None:
            return None
        return self.padding_mask[:, self.kv_offset : self.kv_offset + self.kv_length]

    def item_start(self) -> torch.Tensor:
        # From the whole padding mask: with a trimmed (sliding) cache the first real token may
        # no longer be among the keys, but positions stay relative to it.
        if self.padding_mask is None:
            return torch.zeros(self.batch_size, dtype=torch.long, device=self.device)
        return self.padding_mask.to(torch.int8).argmax(dim=1)


def headmap_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Callable | None = None,
    attention_mask: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    **_: object,
) -> LazyMask:
    """The ``AttentionMaskInterface`` entry for ``headmap``: returns a :class:`LazyMask`."""
    from transformers.masking_utils import causal_mask_function

    if isinstance(attention_mask, LazyMask):
        # A mask the outer model already built (PaliGemma, Gemma 3 with images: the wrapper makes the
        # prefix-LM mask, then its language model asks again): kept as it is, as transformers keeps a
        # prepared 4D tensor.
        return attention_mask
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if padding is not None:
        padding = padding.to(device=device, dtype=torch.bool)
        if bool(padding.all()):
            padding = None
    return LazyMask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=int(q_offset),
        kv_offset=int(kv_offset),
        mask_function=mask_function or causal_mask_function,
        padding_mask=padding,
        device=torch.device(device),
    )


class DenseMask(_MaskBase):
    """Adapter for a dense mask a caller built itself (bool, or additive float)."""

    def __init__(self, mask: torch.Tensor, q_length: int, kv_length: int) -> None:
        if mask.ndim == 2:  # [B, Tk] padding mask
            mask = mask[:, None, None, :]
        if mask.dtype != torch.bool:
            mask = mask > torch.finfo(mask.dtype).min / 2
        self.dense = mask[..., -q_length:, -kv_length:]
        self.q_length = q_length
        self.kv_length = kv_length
        self.q_offset = kv_length - q_length
        self.kv_offset = 0
        self.batch_size = mask.shape[0]
        self.device = mask.device

    def block(self, q_start: int, q_end: int, k_start: int, k_end: int) -> torch.Tensor:
        blk = self.dense[..., q_start:q_end, k_start:k_end]
        return blk.expand(self.batch_size, blk.shape[1], q_end - q_start, k_end - k_start)

    def key_valid(self) -> torch.Tensor | None:
        valid = self.dense.any(dim=-2).all(dim=1)  # keys some query may see
        return None if bool(valid.all()) else valid


class CausalMask(_MaskBase):
    """No mask passed and the module is causal: bottom-right aligned causal pattern."""

    def __init__(self, batch_size: int, q_length: int, kv_length: int, device: torch.device) -> None:
        self.batch_size = batch_size
        self.q_length = q_length
        self.kv_length = kv_length
        self.q_offset = kv_length - q_length
        self.kv_offset = 0
        self.device = device

    def block(self, q_start: int, q_end: int, k_start: int, k_end: int) -> torch.Tensor:
        q = torch.arange(q_start, q_end, device=self.device)[:, None] + self.q_offset
        k = torch.arange(k_start, k_end, device=self.device)[None, :]
        return (k <= q)[None, None].expand(self.batch_size, 1, q_end - q_start, k_end - k_start)


class FullMask(_MaskBase):
    """No mask and not causal: every query sees every key."""

    def __init__(self, batch_size: int, q_length: int, kv_length: int, device: torch.device) -> None:
        self.batch_size = batch_size
        self.q_length = q_length
        self.kv_length = kv_length
        self.q_offset = 0
        self.kv_offset = 0
        self.device = device

    def block(self, q_start: int, q_end: int, k_start: int, k_end: int) -> torch.Tensor:
        return torch.ones(1, 1, 1, 1, dtype=torch.bool, device=self.device).expand(
            self.batch_size, 1, q_end - q_start, k_end - k_start
        )


def as_block_mask(
    attention_mask: object, batch_size: int, q_length: int, kv_length: int, causal: bool, device: torch.device
) -> LazyMask | DenseMask | CausalMask | FullMask:
    """Whatever the model passed, return an object with ``block(...)`` and ``key_valid()``."""
    if isinstance(attention_mask, LazyMask):
        if attention_mask.q_length == q_length and attention_mask.kv_length == kv_length:
            return attention_mask
        # The model trimmed its keys after building the mask (e.g. a sliding cache): keep the
        # pattern, re-anchor the key offset so that the last key stays the last key.
        shift = attention_mask.kv_length - kv_length
        return LazyMask(
            batch_size=attention_mask.batch_size,
            q_length=q_length,
            kv_length=kv_length,
            q_offset=attention_mask.q_offset + max(0, attention_mask.q_length - q_length),
            kv_offset=attention_mask.kv_offset + shift,
            mask_function=attention_mask.mask_function,
            padding_mask=attention_mask.padding_mask,
            device=attention_mask.device,
        )
    if isinstance(attention_mask, torch.Tensor):
        return DenseMask(attention_mask, q_length, kv_length)
    if attention_mask is None:
        if causal and q_length > 1:
            return CausalMask(batch_size, q_length, kv_length, device)
        return FullMask(batch_size, q_length, kv_length, device)
    raise TypeError(f"headmap cannot read an attention mask of type {type(attention_mask).__name__}")
