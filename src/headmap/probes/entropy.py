"""``entropy``: normalised entropy of each attention row.

    entropy[l, h] = mean over inputs of ( mean over query positions i with |K(i)| > 1 of
                                          H(A[i, :]) / log |K(i)| ),
    H(A[i, :]) = - sum_{j in K(i)} A[i, j] log A[i, j]     (natural log, 0 log 0 = 0)

K(i) is the set of keys query i can see after every mask (i + 1 keys for a causal model
without a window, T for an encoder, at most the window for sliding-window layers), read from
the block's mask. The value lies in [0, 1]: 0 for a head that puts all its mass on one key,
1 for a head that spreads it uniformly over every key it can see. Rows with a single visible
key (query 0 of a causal model) carry no information and are not counted.

Per-head attention entropy is a common descriptor (e.g. Clark et al. 2019, "What Does BERT
Look At?"; Zhai et al. 2023, "Stabilizing Transformer Training by Preventing Attention Entropy
Collapse"); the normalisation by log |K(i)| makes rows of different lengths comparable.
See docs/methods/entropy.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.block import Block, QKView
from ..engine.fused import product
from .head import HeadMeanProbe


@dataclass
class EntropyProbe(HeadMeanProbe):
    name = "entropy"
    #: H_i = lse_i - sum_j A_ij s_ij = lse_i - scale * q_i . (sum_j A_ij k_j): the call's log-sum-exps and
    #: one more fused call whose values are the keys (headmap.engine.fused.product)
    fused = True

    def row_values(self, block: Block) -> tuple[torch.Tensor, torch.Tensor]:
        probs = block.probs  # [B, H, bq, bk]
        seen = block.row_counts()  # [B, bq]: |K(i)|
        logits = block.logits
        if logits is None or block.plan is None or block.plan.empty_rows:  # -inf logits: use entr
            ent = torch.special.entr(probs).sum(dim=-1)  # [B, H, bq], entr(0) = 0
        else:
            # From the logits, without a log per entry: with m the row's largest logit, the
            # largest probability is exp(m - lse), so log A[i, j] = l_j - m + log max_j A[i, j] and
            #   H = sum_j A (m - l_j) - (sum_j A) log max_j A.
            # Hidden entries hold a huge negative logit and probability 0: they add 0.
            top = logits.amax(dim=-1)  # [B, H, bq]
            dot = torch.einsum("bhqk,bhqk->bhq", probs, logits)  # sum_j A l_j
            mass = probs.sum(dim=-1).to(torch.float64)
            peak = probs.amax(dim=-1).to(torch.float64)
            ent = top.to(torch.float64) * mass - dot.to(torch.float64) - mass * torch.log(peak)
            ent = torch.where(peak > 0, ent, 0.0)  # rows that see nothing (not counted)
        norm = torch.log(seen.clamp(min=2).to(torch.float64))  # log |K(i)|, >= log 2 > 0
        values = ent.to(torch.float64) / norm[:, None, :]
        counted = block.query_valid & (seen > 1)
        return values, counted

    def update_fused(self, view: QKView) -> None:
        # sum_j A_ij k_j by the same kernel (float32 for a half-precision model), then one dot product per row
        attended, _ = product(view, view.key, tag="keys")  # [B, H, Tq, D]
        dot = (view.query.to(attended.dtype) * attended).sum(-1) * view.scaling  # sum_j A_ij s_ij
        ent = view.lse.to(torch.float64) - dot.to(torch.float64)  # [B, H, Tq]
        rel = view.q_pos - view.k_pos[0]  # [Tq]: a plain call has no padding, keys start at the input
        seen = rel + 1 if view.is_causal else torch.full_like(rel, view.key.shape[2])  # |K(i)|
        norm = torch.log(seen.clamp(min=2).to(torch.float64))
        counted = view.query_valid & (seen > 1)[None, :]
        self._add_rows(view.tower, view.layer, view.num_kv_heads, ent / norm, counted)
