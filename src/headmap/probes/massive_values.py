"""``massive_values``: dimensions of Q and K (after RoPE) with outsized mean magnitude.

For layer l, query head h and dimension d, with q_i the query of real token i as the attention
function receives it (after the projection, any q/k norm and RoPE):

    m_q[l, h, d] = mean over inputs of ( 1/T * sum_i |q_i[h, d]| )
    massive      : m_q[l, h, d] > lam * median over (h', d') of m_q[l, h', d']      (lam = 5)

and the same for keys, per key/value head. Per head the probe reports how many of its dimensions
are massive (``q_massive``, ``k_massive``) and its largest dimension relative to the layer's median
(``q_peak_ratio``, ``k_peak_ratio``); :meth:`MassiveValuesProbe.dims` gives every dimension.

Jin et al. 2025, "Massive Values in Self-Attention Modules are the Key to Contextual Knowledge
Understanding" (ICML 2025, arXiv:2502.01563): concentrated massive values appear in a few
(low-frequency) dimensions of Q and K, not of V, in models with RoPE. Their code measures a
(head, dimension) by the l2 norm of its values over the sequence; headmap uses the mean absolute
value (see docs/methods/massive_values.md). K rows: heads.parquet is one row per query head, so
each query head gets the numbers of the key/value head it reads (``kv_head``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..engine.block import Block, QKView
from ..errors import ProbeError
from .base import Needs, Probe

#: elements turned into float64 at a time when summing |q| (bounds the temporary copy)
_CHUNK_ELEMENTS = 2**23


def _mean_abs(x: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per input, the mean over its real tokens of |x| ([B, H, T, D], valid [B, T]).

    Returns ([B, H, D] float64, [B] bool: the input has a real token).
    """
    batch, heads, tokens, dim = x.shape
    step = max(1, _CHUNK_ELEMENTS // max(1, batch * heads * dim))
    total = torch.zeros(batch, heads, dim, dtype=torch.float64, device=x.device)
    for a in range(0, tokens, step):
        part = x[:, :, a : a + step].abs().to(torch.float64)
        keep = valid[:, None, a : a + step, None].to(torch.float64)
        total += (part * keep).sum(dim=2)
    n = valid.sum(dim=1).to(torch.float64)  # [B]
    return total / n.clamp(min=1)[:, None, None], n > 0


@dataclass
class MassiveValuesProbe(Probe):
    #: a dimension is massive above lam times its layer's median (lam > 1)
    lam: float = 5.0

    name = "massive_values"
    needs = Needs(qk=True)

    _pending: dict = field(default_factory=dict, init=False, repr=False)
    _totals: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        lam = self.lam
        if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not math.isfinite(lam) or lam <= 1:
            raise ProbeError(f"massive_values lam must be a finite number > 1 (got {lam!r}); the default is 5")
        self.lam = float(lam)

    def params(self) -> dict[str, Any]:
        return {"lam": self.lam}

    # -- hooks -------------------------------------------------------------------------------
    def update(self, block: Block) -> None:
        """Blocks of probabilities are not needed: everything comes from :meth:`update_qk`."""

    def update_qk(self, view: QKView) -> None:
        q, q_ok = _mean_abs(view.query, view.query_valid)
        k, k_ok = _mean_abs(view.key, view.key_valid)
        ok = q_ok & k_ok  # inputs with at least one real token
        slot = self._pending.get(view.layer)
        q_sum = q[ok].sum(dim=0)
        k_sum = k[ok].sum(dim=0)
        n = int(ok.sum())
        if slot is None:
            self._pending[view.layer] = [q_sum, k_sum, n]
        else:
            slot[0] += q_sum
            slot[1] += k_sum
            slot[2] += n

    def commit(self) -> None:
        for layer, (q_sum, k_sum, n) in self._pending.items():
            total = self._totals.get(layer)
            q_np, k_np = q_sum.cpu().numpy(), k_sum.cpu().numpy()
            if total is None:
                self._totals[layer] = [q_np, k_np, n]
            else:
                total[0] = total[0] + q_np
                total[1] = total[1] + k_np
                total[2] += n
        self._pending.clear()

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """``layers`` and per layer ``q.L`` [H, D], ``k.L`` [Hkv, D] (sums of per-input means), ``n.L``."""
        layers = sorted(self._totals)
        state = {"layers": np.array(layers, dtype=np.int64)}
        for layer in layers:
            q, k, n = self._totals[layer]
            state[f"q.{layer}"] = q.copy()
            state[f"k.{layer}"] = k.copy()
            state[f"n.{layer}"] = np.array(n, dtype=np.int64)
        return state

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        try:
            totals = {}
            for layer in (int(x) for x in np.asarray(state["layers"]).reshape(-1)):
                q = np.array(state[f"q.{layer}"], dtype=np.float64)
                k = np.array(state[f"k.{layer}"], dtype=np.float64)
                n = int(np.asarray(state[f"n.{layer}"]))
                if q.ndim != 2 or k.ndim != 2 or q.shape[1] != k.shape[1] or q.shape[0] % k.shape[0]:
                    raise ValueError(f"layer {layer}: q and k sums of incompatible shapes {q.shape}, {k.shape}")
                totals[layer] = [q, k, n]
        except (KeyError, ValueError, TypeError) as exc:
            raise ValueError(f"not a state of probe {self.name}: {exc}") from exc
        self._pending.clear()
        self._totals = totals

    # -- results -----------------------------------------------------------------------------
    def means(self) -> dict[int, tuple[np.ndarray, np.ndarray, int]]:
        """Per layer: (m_q [H, D], m_k [Hkv, D], inputs): mean over inputs of the per-input mean |x|."""
        self.commit()
        out = {}
        for layer, (q, k, n) in sorted(self._totals.items()):
            if n:
                out[layer] = (q / n, k / n, n)
        return out

    def dims(self) -> pd.DataFrame:
        """Every dimension: ``tensor`` ("q" or "k"), ``layer``, ``head`` (kv head for k), ``dim``,
        ``value`` (mean |x|), ``massive`` (value > lam x the layer's median of that tensor)."""
        parts = []
        for layer, (q, k, _) in self.means().items():
            for tensor, m in (("q", q), ("k", k)):
                median = float(np.median(m))
                heads, dim = m.shape
                parts.append(
                    pd.DataFrame(
                        {
                            "tensor": tensor,
                            "layer": layer,
                            "head": np.repeat(np.arange(heads), dim),
                            "dim": np.tile(np.arange(dim), heads),
                            "value": m.reshape(-1),
                            "massive": (m > self.lam * median).reshape(-1),
                        }
                    )
                )
        if not parts:
            return pd.DataFrame({c: [] for c in ("tensor", "layer", "head", "dim", "value", "massive")})
        return pd.concat(parts, ignore_index=True)

    def head_rows(self) -> list[dict[str, Any]]:
        rows = []
        for layer, (q, k, n) in self.means().items():
            group = q.shape[0] // k.shape[0]
            per_tensor = {}
            for tensor, m in (("q", q), ("k", k)):
                median = float(np.median(m))
                count = (m > self.lam * median).sum(axis=1).astype(np.float64)
                peak = m.max(axis=1) / median if median > 0 else None
                per_tensor[tensor] = (count, peak)
            for head in range(q.shape[0]):
                kv = head // group
                for tensor, idx in (("q", head), ("k", kv)):
                    count, peak = per_tensor[tensor]
                    metrics = [(f"{tensor}_massive", count[idx])]
                    if peak is not None:  # a layer whose median is 0 has no ratio (no NaN written)
                        metrics.append((f"{tensor}_peak_ratio", peak[idx]))
                    for metric, value in metrics:
                        rows.append(
                            {
                                "probe": self.name,
                                "metric": metric,
                                "layer": int(layer),
                                "head": head,
                                "kv_head": kv,
                                "value": float(value),
                                "stderr": math.nan,
                                "n": int(n),
                            }
                        )
        return rows
