"""``mean_distance``: how far back (or away) a head looks, on average.

    mean_distance[l, h] = mean over inputs of ( mean over query positions i of
                                                sum_j A[i, j] * |i - j| )

Positions are inside the input (padding removed), so |i - j| is the distance in tokens. Every
real query counts, query 0 of a causal model included (its distance is 0). For a causal model
the inner sum is the attention-weighted mean backward distance of row i; for an encoder it
counts keys on both sides.

This is d(l, h) of Li et al. 2025 ("Attention Illuminates LLM Reasoning: The Preplan-and-Anchor
Rhythm Enables Fine-Grained Policy Optimization", arXiv:2510.13554, Eq. 7), which they use to
sort heads into locally and globally focused ones; the "mean attention distance" of Vig and
Belinkov 2019 and of the ViT paper (Dosovitskiy et al. 2021) is the same quantity in tokens or
pixels. See docs/methods/mean_distance.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.block import Block
from .head import HeadMeanProbe


@dataclass
class MeanDistanceProbe(HeadMeanProbe):
    name = "mean_distance"

    def row_values(self, block: Block) -> tuple[torch.Tensor, torch.Tensor]:
        probs = block.probs  # [B, H, bq, bk]; hidden entries are 0, so padding adds nothing
        # Query and key of one input share its left padding, so absolute positions give |i - j|.
        if block.is_causal:
            # Every visible key is at or before its query: sum_j A (i - j) = (i - q0) sum_j A - sum_j A (j - q0),
            # one matrix-vector product per head instead of a pass over a distance matrix.
            q0 = block.q_pos[0]
            offsets = (block.k_pos - q0).to(probs.dtype)  # [bk]
            dot = torch.matmul(probs, offsets).to(torch.float64)  # [B, H, bq]
            mass = probs.sum(dim=-1).to(torch.float64)
            values = (block.q_pos - q0).to(torch.float64) * mass - dot
            return values, block.query_valid
        dist = (block.q_pos[:, None] - block.k_pos[None, :]).abs().to(probs.dtype)  # [bq, bk]
        values = torch.einsum("bhqk,qk->bhq", probs, dist).to(torch.float64)  # [B, H, bq]
        return values, block.query_valid
