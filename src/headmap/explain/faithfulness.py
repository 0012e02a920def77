"""How faithful each attribution is, and how much the methods agree.

Faithfulness (DeYoung et al. 2020, ERASER): order an input's tokens by a method's attribution, most
important first, and replace the top fraction f of them by a baseline token (the pad id):

- deletion curve:  y(x) - y(x without its top-f tokens); **comprehensiveness** is its mean over the
  fractions (an area over the perturbation curve): high = the tokens the method names matter;
- insertion curve: y(x) - y(only the top-f tokens kept, the rest replaced); **sufficiency** is its
  mean: low = those tokens alone carry the prediction.

A ``random`` order (seeded, one permutation per input) is the control every method must beat; the
sign test over inputs (:func:`headmap.stats.sign_test`, each input one unit) says how
often a method's comprehensiveness is above the random one's. Tokens are replaced, not removed, so
that positions stay where they were (the same choice as occlusion).

Agreement: per input, the Spearman correlation of two methods' values over its tokens, and the
top-k overlap |top_k(a) ∩ top_k(b)| / k with k = min(``top_k``, tokens). Every number is a mean over
inputs with its standard error (sample standard deviation / sqrt(n)); see docs/methods/faithfulness.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from .base import Job

FRACTIONS = (0.01, 0.05, 0.1, 0.2, 0.5)  # ERASER's bins
TOP_K = 5
COLUMNS = ["method", "metric", "other", "fraction", "value", "stderr", "n"]


def _mean_se(values: Sequence[float]) -> tuple[float, float, int]:
    arr = np.asarray(values, dtype=np.float64)
    n = int(arr.size)
    if n == 0:
        return math.nan, math.nan, 0
    se = float(arr.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return float(arr.mean()), se, n


def _orders(job: Job, values: torch.Tensor) -> list[torch.Tensor]:
    """Per batch row, the column indices of its real tokens, most attributed first (ties: earlier first)."""
    out = []
    for b in range(job.ids.shape[0]):
        cols = torch.nonzero(job.mask[b].bool()).squeeze(-1)
        v = values[b, cols].double().cpu().numpy()
        out.append(cols[torch.as_tensor(np.argsort(-v, kind="stable"), device=cols.device)])
    return out


def curves(job: Job, orders: list[torch.Tensor], fill: int, fractions=FRACTIONS) -> dict[str, np.ndarray]:
    """``deletion`` and ``insertion`` [B, F]: y(x) minus y after replacing (keeping) the top fraction."""
    with torch.no_grad():
        base = job.score().double()
        out = {kind: np.zeros((len(orders), len(fractions))) for kind in ("deletion", "insertion")}
        for i, f in enumerate(fractions):
            deleted, kept = job.ids.clone(), job.ids.clone()
            for b, order in enumerate(orders):
                k = max(1, math.ceil(f * order.numel()))
                deleted[b, order[:k]] = fill
                kept[b, order[k:]] = fill
            out["deletion"][:, i] = (base - job.score(ids=deleted).double()).cpu().numpy()
            out["insertion"][:, i] = (base - job.score(ids=kept).double()).cpu().numpy()
    return out


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = pd.Series(a).rank().to_numpy(), pd.Series(b).rank().to_numpy()
    if ra.std() == 0 or rb.std() == 0:
        return math.nan
    return float(np.corrcoef(ra, rb)[0, 1])


def _top_overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    k = min(k, a.size)
    ta = set(np.argsort(-a, kind="stable")[:k].tolist())
    tb = set(np.argsort(-b, kind="stable")[:k].tolist())
    return len(ta & tb) / k


class Faithfulness:
    """Collects per-input faithfulness and agreement numbers batch by batch; :meth:`frame` summarises them."""

    def __init__(self, fractions=FRACTIONS, top_k: int = TOP_K, seed: int = 0) -> None:
        self.fractions = tuple(fractions)
        self.top_k = top_k
        self.gen = torch.Generator().manual_seed(seed)
        self.curves: dict[str, dict[str, list[np.ndarray]]] = {}
        self.pairs: dict[tuple[str, str, str], list[float]] = {}
        self.methods: list[str] = []

    def add(self, job: Job, values: dict[str, torch.Tensor]) -> None:
        """One batch: ``values[method]`` [B, W] from the methods' ``attribute``; adds the random control."""
        fill = job.pad
        rand = torch.rand(job.ids.shape, generator=self.gen).to(job.ids.device)
        for name, v in [*values.items(), ("random", rand)]:
            if name not in self.methods:
                self.methods.append(name)
            got = curves(job, _orders(job, v), fill, self.fractions)
            store = self.curves.setdefault(name, {"deletion": [], "insertion": []})
            for kind in ("deletion", "insertion"):
                store[kind].extend(list(got[kind]))
        names = list(values)
        for b in range(job.ids.shape[0]):
            real = job.mask[b].bool()
            vecs = {n: values[n][b, real].double().cpu().numpy() for n in names}
            for i, a in enumerate(names):
                for other in names[i + 1 :]:
                    self.pairs.setdefault((a, "spearman", other), []).append(_spearman(vecs[a], vecs[other]))
                    self.pairs.setdefault((a, f"top{self.top_k}_overlap", other), []).append(
                        _top_overlap(vecs[a], vecs[other], self.top_k)
                    )

    def frame(self) -> pd.DataFrame:
        """Rows (method, metric, other, fraction, value, stderr, n): the curves' points, comprehensiveness,
        sufficiency, the sign test against random (``p_above_random``), and the agreement of each pair."""
        # evaluation sits above explain in the layers; its statistics are read here, lazily, where used
        from ..stats import sign_test

        rows = []
        random_comp = np.mean(np.stack(self.curves["random"]["deletion"]), axis=1) if "random" in self.curves else None
        for name in self.methods:
            store = self.curves[name]
            for kind, summary in (("deletion", "comprehensiveness"), ("insertion", "sufficiency")):
                arr = np.stack(store[kind])  # [inputs, fractions]
                for i, f in enumerate(self.fractions):
                    rows.append((name, kind, "", f, *_mean_se(arr[:, i])))
                rows.append((name, summary, "", math.nan, *_mean_se(arr.mean(axis=1))))
            if name != "random" and random_comp is not None:
                comp = np.stack(store["deletion"]).mean(axis=1)
                # each input its own unit; the test reads only the sign of its difference (0/1 outcomes)
                test = sign_test(
                    (comp < random_comp).astype(float), (comp > random_comp).astype(float), list(range(comp.size))
                )
                rows.append((name, "p_above_random", "random", math.nan, test.p_value, math.nan, test.n))
        for (a, metric, b), vals in self.pairs.items():
            finite = [v for v in vals if not math.isnan(v)]
            rows.append((a, metric, b, math.nan, *_mean_se(finite)))
        return pd.DataFrame(rows, columns=COLUMNS)
