"""``prev_token``: attention to the previous token.

    prev_token[l, h] = mean over inputs of ( mean over query positions i >= 1 of A[i, i - 1] )

Positions are inside the input (padding removed); query 0 has no previous token and is not
counted. A pure previous-token head scores 1.

Previous-token heads are the first half of the induction circuit (Elhage et al. 2021, "A
Mathematical Framework for Transformer Circuits"; Olsson et al. 2022, "In-context Learning and
Induction Heads"); TransformerLens detects them with ``get_previous_token_head_detection_pattern``;
Clark et al. 2019 ("What Does BERT Look At?") find them in BERT too. See
docs/methods/prev_token.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.block import Block, QKView
from ..engine.fused import band_probability
from .head import HeadMeanProbe


@dataclass
class PrevTokenProbe(HeadMeanProbe):
    name = "prev_token"
    #: A[i, i - 1] = exp(s_{i,i-1} - lse_i): one shifted key per row and the row's log-sum-exp, so the
    #: engine may run the call with one fused kernel (headmap.engine.fused)
    fused = True

    def row_values(self, block: Block) -> tuple[torch.Tensor, torch.Tensor]:
        probs = block.probs  # [B, H, bq, bk]
        keys = probs.shape[-1]
        col = block.q_pos - 1 - block.k_pos[0]  # [bq]: block column of key i - 1
        inside = (col >= 0) & (col < keys)  # outside = hidden (e.g. a window of 1): attention 0
        index = col.clamp(0, keys - 1).view(1, 1, -1, 1).expand(probs.shape[0], probs.shape[1], -1, 1)
        values = probs.gather(-1, index).squeeze(-1) * inside  # [B, H, bq]
        counted = block.query_valid & (block.rel_q() >= 1)
        return values, counted

    def update_fused(self, view: QKView) -> None:
        values = band_probability(view, [1])[..., 0]  # [B, H, Tq]: A[i, i - 1], 0 for query 0
        counted = view.query_valid & (view.q_pos[None, :] - view.item_start[:, None] >= 1)
        self._add_rows(view.tower, view.layer, view.num_kv_heads, values, counted)
