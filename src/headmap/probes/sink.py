"""``sink``: attention mass on the first token.

    sink[l, h] = mean over inputs of ( mean over query positions i >= 1 of A[i, 0] )

Position 0 is the input's first real token (left padding removed). StreamingLLM (Xiao et al.
2023, "Efficient Streaming Language Models with Attention Sinks"); Gu et al. 2024 ("When
Attention Sink Emerges in Language Models") call a head a sink head when this mass exceeds
eps = 0.3 and report the fraction of such heads as the model's sink rate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..engine.block import Block, QKView
from ..engine.fused import key_probability
from .head import HeadMeanProbe


@dataclass
class SinkProbe(HeadMeanProbe):
    name = "sink"
    #: A[i, 0] = exp(s_i0 - lse_i) needs one key column and each row's log-sum-exp: the engine may run
    #: a session of sink-only probes through one fused kernel (headmap.engine.fused)
    fused = True

    def row_values(self, block: Block) -> tuple[torch.Tensor, torch.Tensor]:
        probs = block.probs  # [B, H, bq, bk]
        col = block.item_start - block.k_pos[0]  # [B] block column of each input's token 0
        inside = (col >= 0) & (col < probs.shape[-1])
        index = col.clamp(0, probs.shape[-1] - 1).view(-1, 1, 1, 1).expand(-1, probs.shape[1], probs.shape[2], 1)
        first = probs.gather(-1, index).squeeze(-1) * inside.view(-1, 1, 1)  # [B, H, bq]
        counted = block.query_valid & (block.rel_q() >= 1)
        return first, counted

    def update_fused(self, view: QKView) -> None:
        first = key_probability(view, view.item_start - view.k_pos[0])  # [B, H, Tq]
        counted = view.query_valid & (view.q_pos[None, :] - view.item_start[:, None] >= 1)
        self._add_rows(view.tower, view.layer, view.num_kv_heads, first, counted)


def sink_rate(values: torch.Tensor | list, eps: float = 0.3) -> float:
    """Fraction of heads whose ``sink`` score exceeds ``eps`` (Gu et al. 2024)."""
    t = torch.tensor(np.array(values, dtype=np.float64))  # a copy: pandas hands read-only arrays
    t = t[~torch.isnan(t)]
    return float((t > eps).double().mean()) if t.numel() else float("nan")
