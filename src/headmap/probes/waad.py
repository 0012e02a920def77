"""``waad``: Windowed Average Attention Distance, per head.

    waad[l, h] = mean over inputs of ( mean over query positions i of
                                       sum_j A[i, j] * min(|i - j|, W) ),   W = 10 by default

Positions are inside the input (padding removed). Distances are clipped at W and not
normalised, so the value lies in [0, W]: near 0 for a head that attends to the current token,
1 for a pure previous-token head, W for a head that only looks W or more tokens away. Local
heads have low WAAD, global heads high. Every real query counts (query 0 of a causal model
contributes 0).

Li et al. 2025, "Attention Illuminates LLM Reasoning: The Preplan-and-Anchor Rhythm Enables
Fine-Grained Policy Optimization" (arXiv:2510.13554), Definition 4.1 (Eq. 9), with W = 10
(their Sec. 5.3.1). They compute it per token on the attention map averaged over the most
local 30 % of heads; headmap averages it per head over query positions instead. See
docs/methods/waad.md.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import torch

from ..engine.block import Block, QKView
from ..engine.fused import band_probability
from ..errors import ProbeError
from .head import HeadMeanProbe


@dataclass
class WaadProbe(HeadMeanProbe):
    #: clipping window W (tokens): distances beyond W count as W
    window: int = 10

    name = "waad"
    #: sum_j A_ij min(|i - j|, W) = W - sum_{|i - j| < W} A_ij (W - |i - j|): the band of keys closer than W,
    #: each exp(s_ij - lse_i), so the engine may run the call with one fused kernel (headmap.engine.fused)
    fused = True

    def __post_init__(self) -> None:
        w = self.window
        if isinstance(w, bool) or not isinstance(w, numbers.Integral) or w < 1:
            raise ProbeError(f"waad window must be a whole number of tokens >= 1 (got {w!r}); the paper uses 10")
        self.window = int(w)

    def params(self) -> dict[str, Any]:
        return {"window": self.window}

    def row_values(self, block: Block) -> tuple[torch.Tensor, torch.Tensor]:
        probs = block.probs  # [B, H, bq, bk]; hidden entries are 0
        w = self.window
        # sum_j A min(|i - j|, W) = W sum_j A - sum_{|i - j| < W} A (W - |i - j|): only the band of
        # keys closer than W to each query is read (2W - 1 of them, W for a causal model).
        lags = torch.arange(0 if block.is_causal else -(w - 1), w, device=probs.device)  # i - j
        cols = block.q_pos[:, None] - lags[None, :] - block.k_pos[0]  # [bq, band]: block columns
        inside = (cols >= 0) & (cols < probs.shape[-1])
        index = cols.clamp(0, probs.shape[-1] - 1).expand(*probs.shape[:2], *cols.shape)
        band = probs.gather(-1, index) * inside  # [B, H, bq, band]
        weight = (w - lags.abs()).to(probs.dtype)  # [band]
        near = torch.matmul(band, weight).to(torch.float64)
        values = w * probs.sum(dim=-1).to(torch.float64) - near  # [B, H, bq]
        return values, block.query_valid

    def update_fused(self, view: QKView) -> None:
        w = min(self.window, view.key.shape[2])  # lags of W or more reach no key inside the call
        lags = list(range(0 if view.is_causal else -(w - 1), w))
        band = band_probability(view, lags)  # [B, H, Tq, band]
        lag_t = torch.arange(lags[0], w, device=band.device)  # made on the device: no host-to-device copy
        weight = (self.window - lag_t.abs()).to(band.dtype)
        near = torch.matmul(band, weight).to(torch.float64)
        # every row of a plain call sums to 1 over the keys it sees (no sink logit, no hidden row)
        self._add_rows(view.tower, view.layer, view.num_kv_heads, self.window - near, view.query_valid)
