"""Floating-point bounds for the tests: derived from the accumulation length, never measured on one machine.

A float32 sum (or dot product) of n terms, in any order, lies within gamma(n) * sum(|terms|) of the exact
value, gamma(n) = n u / (1 - n u), u = 2**-24 the unit roundoff of float32 (Higham, *Accuracy and Stability
of Numerical Algorithms*, 2nd ed., eq. 3.5). Two evaluations that differ only in the order of their sums
(another BLAS blocking, another block shape, another batch size, another thread count) therefore differ
by at most 2 gamma(n) of the magnitudes summed. The whole suite compares such pairs: headmap's block-wise
attention against eager attention, a budget against another, one batch against two.

Through a chain of ``stages`` accumulations of at most n terms each (a projection, Q K^T, a softmax row,
P V, ...), to first order the differences add: ``reorder(n, stages) = 2 * stages * gamma(n)``, relative to
the largest magnitude of the compared quantity. Stated assumption: the tiny test models (random weights,
two layers) pass a relative error on with a gain of at most one; probabilities and their means are at
most 1, so for them the relative bound is also an absolute one. Each use names its n and its stages.

Where a claim is bit identity (the same arithmetic on the same numbers), the tests compare exactly, or
recompute in float64 and bound with ``gamma(n, U64)``.
"""

from __future__ import annotations

U32 = 2.0**-24  # unit roundoff of float32 (half of numpy's finfo(float32).eps = 2**-23)
U64 = 2.0**-53  # unit roundoff of float64


def gamma(n: int, u: float = U32) -> float:
    """Higham's gamma_n: relative error bound of a sum of n terms in floating point of roundoff u."""
    assert n * u < 1
    return n * u / (1 - n * u)


def reorder(n: int, stages: int = 1, u: float = U32) -> float:
    """Largest difference of two evaluations of ``stages`` chained sums of at most ``n`` terms that differ in
    summation order, relative to the magnitudes summed (first order, gain at most one per stage)."""
    return 2 * stages * gamma(n, u)


#: Accumulations in one attention layer whose order depends on the block shape or the batch:
#: Q K^T (head_dim terms), the softmax row sum (keys) and P V (keys). Projections and MLPs run the same
#: code on the same shapes when only the attention implementation or its block budget changes.
ATTENTION_STAGES = 3

#: Accumulations in one transformer layer when the batch size changes (every matmul may block differently):
#: Q, K, V projections, Q K^T, softmax row sum, P V, output projection, MLP up (and gate), MLP down, norm.
LAYER_STAGES = 9


def eager_bound(keys: int, layers: int = 2, head_dim: int = 8) -> float:
    """headmap's engine against eager attention, or against itself with other block shapes, on a model of
    ``layers`` layers: per layer the attention's ATTENTION_STAGES sums plus one stage for the elementwise
    steps (scale, mask, soft cap) rounded in another order, each of at most max(keys, head_dim) terms.
    The defaults are the tiny models of tests/tiny_models.py (two layers, heads of 8 dimensions)."""
    return reorder(max(keys, head_dim), (ATTENTION_STAGES + 1) * layers)


def batch_bound(width: int, layers: int = 2) -> float:
    """The same model on other batch sizes (every matmul may block differently): LAYER_STAGES sums per
    layer of at most ``width`` terms (the largest of hidden size, MLP size and keys)."""
    return reorder(width, LAYER_STAGES * layers)


#: The tiny models of tests/tiny_models.py (two layers, heads of 8 dimensions) on inputs of at most 32
#: tokens: engine against eager, 2 * 4 * 2 * gamma(32) ~ 3.1e-5 on probabilities and on per-input means
#: of them. A standard error of n >= 2 such means moves by at most the same amount (the sample standard
#: deviation is 1-Lipschitz in the max norm up to sqrt(n / (n - 1)), and is divided by sqrt(n)).
TINY_EAGER = eager_bound(32)
