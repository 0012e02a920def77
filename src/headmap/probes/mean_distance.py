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

from ..engine.block import Block, QKView
from ..engine.fused import product
from .head import HeadMeanProbe


@dataclass
class MeanDistanceProbe(HeadMeanProbe):
    name = "mean_distance"
    #: sum_j A_ij |i - j| from one more fused call whose values carry the key positions (two for an
    #: encoder: the keys before and after each query), headmap.engine.fused.product
    fused = True

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

    def update_fused(self, view: QKView) -> None:
        values = one_sided_distance(view, "before")
        if not view.is_causal:
            values = values + one_sided_distance(view, "after")
        self._add_rows(view.tower, view.layer, view.num_kv_heads, values, view.query_valid)


def one_sided_distance(view: QKView, part: str) -> torch.Tensor:
    """[B, H, Tq] float64: ``sum_j A_ij |i - j|`` over the keys ``j <= i`` (``part="before"``) or ``j >= i``
    (``"after"``) of a fused call, from one fused product (:func:`headmap.engine.fused.product`).

    In the part's own order (reversed for ``"after"``) row r sees keys r' <= r at distance r - r', and
    sum_{r'} P_rr' (r - r') = r - sum_{r'} P_rr' r'. Subtracting from r a float32 sum of the size of r
    would leave an error of float32's unit roundoff times the position (2^-7 of a token at 128K), so
    the rows are cut into D chunks of C = ceil(T / D) rows (D the head size) and value channel m holds
    r' - m C: row r reads channel floor(r / C), whose weighted sum has the size of C plus the row's mean
    distance, not of r. Every value is a whole number below 2^24, exact in float32.
    """
    k_len, dim = view.key.shape[2], view.query.shape[-1]
    chunk = -(-k_len // dim)  # C
    pos = torch.arange(k_len, device=view.query.device, dtype=torch.float64)
    if part == "after":
        pos = (k_len - 1) - pos  # the reversed order, given in the keys' own order
    shift = torch.arange(dim, device=pos.device, dtype=torch.float64) * chunk
    values = (pos[:, None] - shift[None, :]).to(view.lse.dtype)[None, None]  # [1, 1, Tk, D]
    out, mass = product(view, values, part=part, tag="positions")  # [B, H, Tq, D]
    rows = view.q_pos - view.k_pos[0]
    if part == "after":
        rows = (k_len - 1) - rows
    channel = torch.div(rows, chunk, rounding_mode="floor")  # [Tq]
    index = channel.view(1, 1, -1, 1).expand(out.shape[0], out.shape[1], -1, 1)
    near = out.gather(-1, index).squeeze(-1).to(torch.float64)  # sum P (r' - m C)
    dist = (rows - channel * chunk).to(torch.float64) - near  # sum P (r - r')
    return dist if mass is None else dist * mass.to(torch.float64)
