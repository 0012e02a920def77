"""Statistics that respect how the evaluation data was made (``docs/methods/statistics.md``).

One module for every interval and test headmap prints (eval, tune, compress, explain):

- a single accuracy: :func:`clopper_pearson` (exact binomial) and :func:`wilson` (score);
- a paired difference (the same items with and without an edit): :func:`mcnemar` (exact McNemar
  test on the discordant pairs, with the Bonett-Price adjusted-Wald interval of the difference);
- items that are not independent (they share a needle, a haystack, a document): a bootstrap over
  clusters, :func:`cluster_accuracy` and :func:`cluster_difference`, whose percentile interval is
  joined with a score interval at the design-adjusted number of units, so that it is never
  zero-width; and :func:`sign_test` over clusters;
- planning: :func:`paired_sample_size` (Connor's McNemar sample size from the discordance rate,
  times the design effect of the clusters) and :func:`mcnemar_power` (exact power of the exact test).

Every result carries its estimate, interval, the method's name and the number of independent
units, and ``format()`` prints them together, e.g. ``0.967 [0.828, 0.999] (n = 30 items, 6 clusters)``.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from statistics import NormalDist
from typing import Any

import numpy as np

from .errors import OptionError, TaskError
from .specs import is_whole

LEVEL = 0.95
DEFAULT_RESAMPLES = 2000
DEFAULT_EFFECT = 0.02
DEFAULT_ACCURACY = 0.70  # SmolLM2-135M-Instruct on mc_test (docs/steering-eval.md)
DEFAULT_CORRELATION = 0.75  # between an item's correctness with and without the edit (an assumption)
CLUSTER_FIELD = "cluster"


# -- result types ----------------------------------------------------------------------------------


def _units(n: int, clusters: int | None, unit: str) -> str:
    text = f"n = {n} {unit if n != 1 else unit.rstrip('s')}"
    if clusters is not None:
        text += f", {clusters} cluster{'s' if clusters != 1 else ''}"
    return text


@dataclass(frozen=True)
class Interval:
    """An estimate with its interval, the method that gave it and the number of independent units.

    ``n`` counts items; ``clusters`` the independent units the items come in (None: the items
    themselves are taken as independent).
    """

    estimate: float
    low: float
    high: float
    method: str
    n: int
    clusters: int | None = None
    level: float = LEVEL
    unit: str = "items"

    @property
    def width(self) -> float:
        return self.high - self.low

    @property
    def units(self) -> int:
        """The number of independent units: clusters where there are any, else items."""
        return self.clusters if self.clusters is not None else self.n

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    def format(self, digits: int = 3, signed: bool = False) -> str:
        """``0.967 [0.828, 0.999] (n = 30 items, 6 clusters)``; ``signed`` writes +/- on the estimate."""
        est = f"{self.estimate:+.{digits}f}" if signed else f"{self.estimate:.{digits}f}"
        return f"{est} [{self.low:.{digits}f}, {self.high:.{digits}f}] ({_units(self.n, self.clusters, self.unit)})"

    def __str__(self) -> str:
        return self.format()


@dataclass(frozen=True)
class TestResult:
    """A two-sided exact test: ``plus`` units went one way, ``minus`` the other, ``ties`` neither."""

    p_value: float
    method: str
    plus: int
    minus: int
    ties: int
    n: int  # items behind the test
    clusters: int | None = None

    __test__ = False  # not a pytest class

    def format(self) -> str:
        what = "clusters" if self.clusters is not None else "items"
        return (
            f"p = {self.p_value:.3g} ({self.method}: {self.plus} {what} up, {self.minus} down, {self.ties} tied; "
            f"{_units(self.n, self.clusters, 'items')})"
        )

    def __str__(self) -> str:
        return self.format()


@dataclass(frozen=True)
class PairedComparison:
    """Edited minus base on the same items: the difference with its interval and the exact McNemar test."""

    difference: Interval
    test: TestResult
    gained: int  # wrong before, right with the edit
    lost: int  # right before, wrong with the edit

    @property
    def p_value(self) -> float:
        return self.test.p_value

    def format(self, digits: int = 3) -> str:
        return (
            f"{self.difference.format(digits, signed=True)}; exact McNemar p = {self.test.p_value:.3g} "
            f"({self.gained} gained, {self.lost} lost)"
        )

    def __str__(self) -> str:
        return self.format()


@dataclass(frozen=True)
class SampleSize:
    """Items (and clusters) a paired comparison needs to detect a difference ``effect`` with ``power``."""

    items: int
    clusters: int | None
    pairs: float  # Connor's n before rounding and before the design effect
    discordance: float
    design_effect: float
    effect: float
    alpha: float
    power: float
    accuracy: float | None
    correlation: float | None
    icc: float
    cluster_size: float

    def format(self) -> str:
        text = (
            f"{self.items} items to detect a difference of {self.effect:+.3f} with {self.power:.0%} power at "
            f"alpha {self.alpha:g} (exact McNemar, discordance {self.discordance:.3f}"
        )
        if self.clusters is not None:
            text += f"; {self.clusters} clusters of {self.cluster_size:g}, design effect {self.design_effect:.2f}"
        return text + ")"

    def __str__(self) -> str:
        return self.format()


# -- distributions (numpy and the standard library only: scipy is not a dependency of headmap) -------


def _z(q: float) -> float:
    """The standard normal quantile of ``q``."""
    return NormalDist().inv_cdf(q)


@lru_cache(maxsize=64)
def _log_factorials(n: int) -> np.ndarray:
    """log k! for k = 0..n (a cumulative sum of logs: relative error about n * eps, far below what
    the tests and the printed digits resolve)."""
    out = np.zeros(n + 1)
    if n:
        out[1:] = np.cumsum(np.log(np.arange(1, n + 1, dtype=np.float64)))
    out.flags.writeable = False
    return out


def _binom_pmf(n: int, p: float) -> np.ndarray:
    """P(X = k) for k = 0..n, X ~ Binomial(n, p)."""
    k = np.arange(n + 1)
    if p <= 0.0:
        return (k == 0).astype(np.float64)
    if p >= 1.0:
        return (k == n).astype(np.float64)
    lf = _log_factorials(n)
    return np.exp(lf[n] - lf[k] - lf[n - k] + k * math.log(p) + (n - k) * math.log1p(-p))


def _binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k), X ~ Binomial(n, p)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    return float(min(1.0, _binom_pmf(n, p)[: k + 1].sum()))


def _solve(f: Any, target: float) -> float:
    """The p in [0, 1] where the increasing function ``f`` reaches ``target`` (bisection to 1e-15)."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if f(mid) < target:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-15:
            break
    return (lo + hi) / 2


# -- input checks ----------------------------------------------------------------------------------


def _check_level(level: float) -> float:
    if not (isinstance(level, int | float) and math.isfinite(level) and 0.0 < level < 1.0):
        raise OptionError(f"the confidence level must be a number between 0 and 1, e.g. 0.95 (got {level!r})")
    return float(level)


def _check_counts(successes: float, n: float) -> None:
    if not (isinstance(n, int | float | np.integer | np.floating) and math.isfinite(n)) or n <= 0:
        raise OptionError(f"an interval needs at least one item (got n = {n!r})")
    if not (math.isfinite(successes) and 0 <= successes <= n):
        raise OptionError(f"the number of successes must lie between 0 and n = {n} (got {successes!r})")


def _outcomes(values: Iterable[Any], name: str) -> np.ndarray:
    """Per-item outcomes as floats: booleans or 0/1 (a score in [0, 1] is allowed for partial credit)."""
    arr = np.asarray([float(v) for v in values], dtype=np.float64)
    if arr.size == 0:
        raise OptionError(f"{name} is empty: the statistics need at least one scored item")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0) or np.any(arr > 1):
        bad = next(v for v in arr if not (math.isfinite(v) and 0 <= v <= 1))
        raise OptionError(f"{name} must hold outcomes between 0 and 1 (right = 1, wrong = 0); found {bad!r}")
    return arr


def _paired(base: Iterable[Any], edited: Iterable[Any]) -> tuple[np.ndarray, np.ndarray]:
    a, b = _outcomes(base, "the base outcomes"), _outcomes(edited, "the edited outcomes")
    if a.size != b.size:
        raise OptionError(
            f"a paired comparison needs one outcome per item in both conditions (got {a.size} and {b.size})"
        )
    return a, b


def _binary(arr: np.ndarray, name: str) -> np.ndarray:
    if not np.all((arr == 0) | (arr == 1)):
        raise OptionError(f"{name} must be right/wrong (0 or 1) for an exact test; found partial scores")
    return arr.astype(bool)


def cluster_ids(items: Sequence[Any], field: str = CLUSTER_FIELD) -> list[Hashable]:
    """The cluster id of every item (a dict key or an attribute ``field``); TaskError names the first
    item without one, and the field."""
    if len(items) == 0:
        raise OptionError("no items: the statistics need at least one scored item")
    out: list[Hashable] = []
    for k, item in enumerate(items):
        value = item.get(field) if isinstance(item, dict) else getattr(item, field, None)
        if value is None or (isinstance(value, str) and not value.strip()):
            name = item.get("id") if isinstance(item, dict) else getattr(item, "id", None)
            which = f"item {name!r}" if name is not None else f"item {k}"
            raise TaskError(
                f"{which} has no cluster id in field {field!r}: the cluster statistics resample the independent "
                f"units (needle, haystack, document) the items share; give every item a {field!r} "
                "(the RULER-style tasks of headmap.evaluation.ruler do)"
            )
        out.append(value if isinstance(value, Hashable) else str(value))
    return out


def _groups(clusters: Sequence[Any] | None, n: int, field: str) -> np.ndarray:
    """Cluster index (0..k-1, in order of first appearance) of each of ``n`` items."""
    if clusters is None:
        raise TaskError(
            f"the items have no cluster ids (field {field!r}): a cluster bootstrap or sign test needs the unit "
            "(needle, haystack, document) each item shares with others"
        )
    clusters = list(clusters)
    if len(clusters) != n:
        raise OptionError(f"one cluster id per item is needed (got {len(clusters)} ids for {n} items)")
    index: dict[Any, int] = {}
    out = np.empty(n, dtype=np.int64)
    for k, c in enumerate(clusters):
        if c is None or (isinstance(c, str) and not c.strip()):
            raise TaskError(f"item {k} has no cluster id (field {field!r}); every item needs one")
        key = c if isinstance(c, Hashable) else str(c)
        out[k] = index.setdefault(key, len(index))
    return out


# -- a single accuracy -----------------------------------------------------------------------------


def _cp_bounds(x: int, n: int, alpha: float) -> tuple[float, float]:
    """Clopper-Pearson bounds: ``low`` solves P(X >= x | p) = alpha/2, ``high`` solves P(X <= x | p) = alpha/2."""
    low = 0.0 if x <= 0 else _solve(lambda p: 1.0 - _binom_cdf(x - 1, n, p), alpha / 2)
    high = 1.0 if x >= n else _solve(lambda p: 1.0 - _binom_cdf(x, n, p), 1.0 - alpha / 2)
    return low, high


def _wilson_bounds(x: float, n: float, alpha: float) -> tuple[float, float]:
    z = _z(1 - alpha / 2)
    p = x / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # the exact bounds at x = 0 and x = n are 0 and 1; min/max keep rounding from crossing p
    low = 0.0 if x <= 0 else min(p, max(0.0, centre - half))
    high = 1.0 if x >= n else max(p, min(1.0, centre + half))
    return low, high


def clopper_pearson(successes: int, n: int, level: float = LEVEL) -> Interval:
    """Exact binomial (Clopper-Pearson 1934) interval of an accuracy ``successes / n``.

    30/30 gives [0.884, 1]: at least 95% coverage for every true accuracy, never zero-width.
    """
    _check_counts(successes, n)
    alpha = 1 - _check_level(level)
    low, high = _cp_bounds(successes, n, alpha)
    return Interval(successes / n, low, high, "Clopper-Pearson exact binomial", int(n), level=level)


def wilson(successes: int, n: int, level: float = LEVEL) -> Interval:
    """Wilson (1927) score interval of an accuracy ``successes / n``; 8/10 gives [0.490, 0.943]."""
    _check_counts(successes, n)
    alpha = 1 - _check_level(level)
    low, high = _wilson_bounds(successes, n, alpha)
    return Interval(successes / n, low, high, "Wilson score", int(n), level=level)


def accuracy_interval(correct: Iterable[Any], level: float = LEVEL) -> Interval:
    """Clopper-Pearson interval of the accuracy of right/wrong outcomes (items taken as independent)."""
    arr = _binary(_outcomes(correct, "the outcomes"), "the outcomes")
    return clopper_pearson(int(arr.sum()), arr.size, level)


# -- a paired difference ---------------------------------------------------------------------------


def _bonett_price(gained: float, lost: float, n: float, alpha: float) -> tuple[float, float]:
    """Bonett & Price (2012) adjusted-Wald interval of (gained - lost) / n, clipped to [-1, 1].

    Adding one to each discordant count keeps the variance positive, so the width is never zero.
    """
    z = _z(1 - alpha / 2)
    pg, pl = (gained + 1) / (n + 2), (lost + 1) / (n + 2)
    centre = pg - pl
    half = z * math.sqrt((pg + pl - centre * centre) / (n + 2))
    return max(-1.0, centre - half), min(1.0, centre + half)


def _binom_two_sided(k: int, m: int) -> float:
    """Exact two-sided p of ``k`` successes of ``m`` under p = 1/2 (twice the smaller tail, at most 1)."""
    if m == 0:
        return 1.0
    return min(1.0, 2.0 * _binom_cdf(min(k, m - k), m, 0.5))


def mcnemar_counts(gained: int, lost: int, n: int, level: float = LEVEL) -> PairedComparison:
    """Exact McNemar test from counts: ``gained`` items went wrong -> right with the edit, ``lost``
    right -> wrong, of ``n`` items. The p-value is the two-sided binomial test of ``gained`` among
    the ``gained + lost`` discordant pairs with p = 1/2 (b = 0, c = 3 gives p = 0.25); the interval
    of the difference ``(gained - lost) / n`` is Bonett-Price's adjusted Wald."""
    for name, v in (("gained", gained), ("lost", lost), ("n", n)):
        if not is_whole(v) or v < 0:
            raise OptionError(f"{name} must be a whole number >= 0 (got {v!r})")
    if n == 0:
        raise OptionError("a paired comparison needs at least one item (got n = 0)")
    if gained + lost > n:
        raise OptionError(f"gained + lost ({gained} + {lost}) cannot exceed the number of items {n}")
    alpha = 1 - _check_level(level)
    est = (gained - lost) / n
    low, high = _bonett_price(gained, lost, n, alpha)
    diff = Interval(est, min(low, est), max(high, est), "Bonett-Price adjusted Wald (paired)", int(n), level=level)
    test = TestResult(
        _binom_two_sided(int(gained), int(gained + lost)),
        "exact McNemar",
        int(gained),
        int(lost),
        int(n - gained - lost),
        int(n),
    )
    return PairedComparison(diff, test, int(gained), int(lost))


def mcnemar(base: Iterable[Any], edited: Iterable[Any], level: float = LEVEL) -> PairedComparison:
    """Exact McNemar test and the interval of edited minus base accuracy, from per-item right/wrong."""
    a, b = _paired(base, edited)
    a, b = _binary(a, "the base outcomes"), _binary(b, "the edited outcomes")
    return mcnemar_counts(int(np.sum(~a & b)), int(np.sum(a & ~b)), int(a.size), level)


# -- clusters --------------------------------------------------------------------------------------


def _cluster_sums(values: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    k = int(groups.max()) + 1
    return np.bincount(groups, weights=values, minlength=k), np.bincount(groups, minlength=k).astype(np.float64)


def _bootstrap(sums: np.ndarray, sizes: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """Ratio means (sum of resampled clusters' sums over their sizes) of ``resamples`` cluster resamples."""
    rng = np.random.default_rng(seed)
    k = sums.size
    out = np.empty(resamples, dtype=np.float64)
    step = max(1, 4_000_000 // max(k, 1))  # bounded memory: step x k indices at a time
    for start in range(0, resamples, step):
        stop = min(resamples, start + step)
        idx = rng.integers(0, k, size=(stop - start, k))
        out[start:stop] = sums[idx].sum(axis=1) / sizes[idx].sum(axis=1)
    return out


def _effective_n(values: np.ndarray, boot: np.ndarray, k: int) -> tuple[float, float]:
    """(design effect, effective number of items) from the bootstrap's variance against the
    variance the same items would have if independent; no variation at all (or one cluster): the
    design effect of perfect within-cluster correlation, n / k, so that the clusters are the units."""
    n = values.size
    var_iid = float(values.var()) / n
    var_boot = float(boot.var())
    if k <= 1 or var_iid <= 0.0 or var_boot <= 0.0:
        deff = n / k
    else:
        deff = min(max(var_boot / var_iid, 1.0), n / k)
    return deff, n / deff


def _check_resamples(resamples: int, seed: int) -> None:
    if not is_whole(resamples) or resamples < 100:
        raise OptionError(f"the bootstrap needs at least 100 resamples (got {resamples!r}); the default is 2000")
    if not is_whole(seed):
        raise OptionError(f"the bootstrap seed must be a whole number (got {seed!r})")


def cluster_accuracy(
    correct: Iterable[Any],
    clusters: Sequence[Any] | None,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    level: float = LEVEL,
    field: str = CLUSTER_FIELD,
) -> Interval:
    """Accuracy with a cluster-bootstrap interval: whole clusters are resampled, never single items.

    The percentile interval is joined (the smallest interval holding both) with the Wilson interval
    at the effective number of items ``n / deff`` (``deff`` = the bootstrap variance over the
    variance of independent items, between 1 and n / clusters; n / clusters when nothing varies),
    so it is never zero-width and never narrower than the clusters allow.
    """
    _check_resamples(resamples, seed)
    alpha = 1 - _check_level(level)
    values = _outcomes(correct, "the outcomes")
    groups = _groups(clusters, values.size, field)
    sums, sizes = _cluster_sums(values, groups)
    est = float(values.mean())
    boot = _bootstrap(sums, sizes, resamples, seed)
    q_low, q_high = (float(q) for q in np.quantile(boot, [alpha / 2, 1 - alpha / 2]))
    deff, n_eff = _effective_n(values, boot, sums.size)
    w_low, w_high = _wilson_bounds(est * n_eff, n_eff, alpha)
    method = (
        f"cluster bootstrap (percentile, {resamples} resamples, seed {seed}) joined with Wilson at "
        f"effective n = {n_eff:.1f} (design effect {deff:.2f})"
    )
    return Interval(
        est,
        min(q_low, w_low, est),
        max(q_high, w_high, est),
        method,
        int(values.size),
        int(sums.size),
        level,
    )


def cluster_difference(
    base: Iterable[Any],
    edited: Iterable[Any],
    clusters: Sequence[Any] | None,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    level: float = LEVEL,
    field: str = CLUSTER_FIELD,
) -> Interval:
    """Edited minus base accuracy on paired items, with a cluster-bootstrap interval.

    The percentile interval of the resampled clusters' difference is joined with the Bonett-Price
    interval at the effective number of items (counts scaled by ``n_eff / n``, ``n_eff`` as in
    :func:`cluster_accuracy`): when every resample is identical (nothing flipped, or everything
    did) the interval is Bonett-Price's with the clusters as the units, never [0, 0].
    """
    _check_resamples(resamples, seed)
    alpha = 1 - _check_level(level)
    a, b = _paired(base, edited)
    diff = b - a
    groups = _groups(clusters, diff.size, field)
    sums, sizes = _cluster_sums(diff, groups)
    est = float(diff.mean())
    boot = _bootstrap(sums, sizes, resamples, seed)
    q_low, q_high = (float(q) for q in np.quantile(boot, [alpha / 2, 1 - alpha / 2]))
    deff, n_eff = _effective_n(diff, boot, sums.size)
    scale = n_eff / diff.size
    gained, lost = float(np.clip(diff, 0, None).sum()), float(np.clip(-diff, 0, None).sum())
    s_low, s_high = _bonett_price(gained * scale, lost * scale, n_eff, alpha)
    method = (
        f"cluster bootstrap (percentile, {resamples} resamples, seed {seed}) joined with Bonett-Price at "
        f"effective n = {n_eff:.1f} (design effect {deff:.2f})"
    )
    return Interval(
        est,
        min(q_low, s_low, est),
        max(q_high, s_high, est),
        method,
        int(diff.size),
        int(sums.size),
        level,
    )


def sign_test(
    base: Iterable[Any], edited: Iterable[Any], clusters: Sequence[Any] | None, *, field: str = CLUSTER_FIELD
) -> TestResult:
    """Exact two-sided sign test over clusters: a cluster counts up when its items' mean edited
    minus base is positive, down when negative; tied clusters drop out. Six needles all lost: p = 1/32."""
    a, b = _paired(base, edited)
    diff = b - a
    groups = _groups(clusters, diff.size, field)
    sums, _ = _cluster_sums(diff, groups)
    plus, minus = int(np.sum(sums > 0)), int(np.sum(sums < 0))
    ties = int(sums.size - plus - minus)
    return TestResult(
        _binom_two_sided(plus, plus + minus),
        "exact sign test over clusters",
        plus,
        minus,
        ties,
        int(diff.size),
        int(sums.size),
    )


# -- planning --------------------------------------------------------------------------------------


def _fraction(name: str, value: float, low_open: bool = True, high_open: bool = True) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > 0 if low_open else value >= 0) and (value < 1 if high_open else value <= 1)
    if not ok:
        lo, hi = ("(0" if low_open else "[0"), ("1)" if high_open else "1]")
        raise OptionError(f"{name} must be a number in {lo}, {hi} (got {value!r})")
    return float(value)


def discordance_from(accuracy: float, effect: float, correlation: float) -> float:
    """The share of items whose correctness differs between two conditions with accuracies
    ``accuracy`` and ``accuracy + effect`` whose correctness correlates with ``correlation`` (phi):
    ``p1 (1 - p2) + p2 (1 - p1) - 2 rho sqrt(p1 (1 - p1) p2 (1 - p2))``."""
    p1, p2 = accuracy, accuracy + effect
    return p1 * (1 - p2) + p2 * (1 - p1) - 2 * correlation * math.sqrt(p1 * (1 - p1) * p2 * (1 - p2))


def design_effect(icc: float, cluster_size: float) -> float:
    """Kish's design effect ``1 + (m - 1) icc`` of clusters of ``m`` items with intra-cluster correlation ``icc``."""
    return 1.0 + (cluster_size - 1.0) * icc


def paired_sample_size(
    effect: float = DEFAULT_EFFECT,
    *,
    accuracy: float = DEFAULT_ACCURACY,
    correlation: float = DEFAULT_CORRELATION,
    discordance: float | None = None,
    alpha: float = 0.05,
    power: float = 0.80,
    icc: float = 0.0,
    cluster_size: float = 1,
) -> SampleSize:
    """Items a paired (McNemar) comparison needs to detect a difference ``effect`` in accuracy.

    Connor (1987): ``n = (z_{1-alpha/2} sqrt(psi) + z_{power} sqrt(psi - effect^2))^2 / effect^2``
    with ``psi`` the discordance rate (given, or from the accuracy and the correlation between the
    two conditions' correctness, :func:`discordance_from`). Items in clusters of ``cluster_size``
    with intra-cluster correlation ``icc`` need ``n * (1 + (cluster_size - 1) icc)``. The defaults
    (accuracy 0.70, correlation 0.75, a 2-point difference) give 2026 independent items.
    """
    if not (isinstance(effect, int | float) and not isinstance(effect, bool) and math.isfinite(effect)):
        raise OptionError(f"the effect size must be a finite number (got {effect!r})")
    if effect == 0:
        raise OptionError(
            "the effect size is 0: no number of items can detect a difference of zero; give the smallest "
            "difference in accuracy worth detecting, e.g. 0.02"
        )
    alpha = _fraction("alpha", alpha)
    power = _fraction("power", power)
    icc = _fraction("the intra-cluster correlation", icc, low_open=False, high_open=False)
    if not (isinstance(cluster_size, int | float) and math.isfinite(cluster_size) and cluster_size >= 1):
        raise OptionError(f"the cluster size must be at least 1 item (got {cluster_size!r})")
    d = abs(float(effect))
    acc: float | None = None
    rho: float | None = None
    if discordance is None:
        acc = _fraction("the accuracy", accuracy, low_open=False, high_open=False)
        rho = float(correlation)
        if not (math.isfinite(rho) and -1 <= rho <= 1):
            raise OptionError(f"the correlation must lie in [-1, 1] (got {correlation!r})")
        if not 0 <= acc + effect <= 1:
            raise OptionError(f"accuracy {acc} + effect {effect} leaves [0, 1]; pick a smaller effect")
        psi = discordance_from(acc, float(effect), rho)
        if psi < d:
            raise OptionError(
                f"correlation {rho} is too high for accuracies {acc} and {acc + effect}: the items that change "
                f"({psi:.4f}) would be fewer than the difference {d}; lower the correlation"
            )
    else:
        psi = _fraction("the discordance rate", discordance, high_open=False)
        if psi < d:
            raise OptionError(f"the discordance rate {psi} must be at least the effect size {d}")
    za, zb = _z(1 - alpha / 2), _z(power)
    pairs = (za * math.sqrt(psi) + zb * math.sqrt(max(psi - d * d, 0.0))) ** 2 / (d * d)
    deff = design_effect(icc, float(cluster_size))
    items = math.ceil(pairs * deff - 1e-9)
    clusters = math.ceil(items / cluster_size - 1e-9) if cluster_size > 1 else None
    return SampleSize(
        items, clusters, pairs, psi, deff, float(effect), alpha, power, acc, rho, icc, float(cluster_size)
    )


def mcnemar_power(n: int, effect: float, discordance: float, alpha: float = 0.05) -> float:
    """Exact power of the exact two-sided McNemar test on ``n`` independent pairs when a share
    ``discordance`` of items changes and the changes net to ``effect`` (gained minus lost, as shares)."""
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise OptionError(f"n must be a whole number >= 1 (got {n!r})")
    psi = _fraction("the discordance rate", discordance, high_open=False)
    alpha = _fraction("alpha", alpha)
    if abs(effect) > psi:
        raise OptionError(f"the effect {effect} cannot exceed the discordance rate {psi}")
    weight = _binom_pmf(int(n), psi)  # how many pairs are discordant
    pi = (psi + effect) / (2 * psi)  # chance that a discordant pair is a gain
    power = 0.0
    for m in np.nonzero(weight > 1e-15)[0]:
        m = int(m)
        # reject when min(gained, lost) <= k, k the largest with P(X <= k | m, 1/2) <= alpha / 2
        cdf_half = np.cumsum(_binom_pmf(m, 0.5))
        k = int(np.searchsorted(cdf_half, alpha / 2 * (1 + 1e-12), side="right")) - 1
        if k < 0:
            continue
        if m - k <= k:  # the two tails cover every outcome (only when alpha is near 1)
            power += weight[m]
            continue
        pmf = _binom_pmf(m, pi)
        power += weight[m] * min(1.0, pmf[: k + 1].sum() + pmf[m - k :].sum())
    return float(power)
