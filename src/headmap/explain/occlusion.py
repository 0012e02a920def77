"""Occlusion: leave one token out, or a sliding window of tokens (Zeiler & Fergus 2014; Li, Monroe & Jurafsky 2016)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..errors import OptionError
from ..specs import is_whole
from . import _flash
from .base import Job, Method


def window_count(n: int, window: int, stride: int) -> int:
    """How many windows cover a row of ``n`` real tokens: ceil((n - window) / stride) + 1, the count of
    Captum's ``Occlusion`` along one dimension; one window (the whole row) when ``n <= window``."""
    if n <= 0:
        return 0
    if n <= window:
        return 1
    return -(-(n - window) // stride) + 1


@dataclass
class Occlusion(Method):
    """value_j = mean over the windows w that cover token j of y(x) - y(x with every token of w replaced
    by a baseline token).

    ``window`` consecutive real tokens are replaced at once; window k of a row of n real tokens covers its
    tokens [k s, min(k s + window, n)), k = 0, 1, ..., ceil((n - window) / s), with ``stride`` s (default:
    ``window``): Captum's ``Occlusion`` along the token dimension (``sliding_window_shapes=(window,)``,
    ``strides=s``, the last window cut off at the row's end, each token's sum divided by the number of
    windows that cover it). ``window=1, stride=1`` (the default) is leave-one-token-out. A row no longer
    than the window is one window, the whole row (Captum refuses a window longer than its input). Each
    row's windows run over its own real tokens: padding is never replaced and gets 0.

    ``token``: the baseline token id (None: the pad id the batch uses). Cost: one forward for y(x) and one
    per window, ceil((T - window) / stride) + 2 forwards of the batch (T: its longest row), T + 1 for
    leave-one-out: the ground truth on short inputs; windows of a few hundred tokens reach 16K. Each
    forward is reported through ``job.layer_done("occlusion", done, total)`` (the CLI's progress bar).
    For a batch without padding whose attention calls are plain and whose device and dtype have a fused
    attention kernel, those calls run the kernel (:func:`._flash.plain_forward`); else the headmap engine
    where it runs the model. y(x) is kept for later methods (``job.known["x"]``).
    See docs/methods/occlusion.md.
    """

    name: ClassVar[str] = "occlusion"
    token: int | None = None
    window: int = 1
    stride: int | None = None

    def __post_init__(self) -> None:
        if not is_whole(self.window) or self.window < 1:
            raise OptionError(
                f"occlusion needs a window of at least 1 token (got {self.window!r}); 1 is leave-one-token-out, "
                "a few hundred makes 16K tokens affordable"
            )
        if self.stride is None:
            self.stride = self.window
        if not is_whole(self.stride) or self.stride < 1:
            raise OptionError(
                f"occlusion needs a stride of at least 1 token (got {self.stride!r}); leave it out to use the window"
            )
        if self.stride > self.window:
            raise OptionError(
                f"occlusion's stride {self.stride} is longer than its window {self.window}, which leaves tokens "
                "that no window covers; pass a stride of at most the window (the default is the window)"
            )
        self.window, self.stride = int(self.window), int(self.stride)

    def params(self) -> dict[str, Any]:
        """The parameters; ``window`` and ``stride`` only when not leave-one-out, so that leave-one-out runs
        keep the fingerprint and explain.json they had before windows existed."""
        out = super().params()
        if self.window == 1 and self.stride == 1:
            del out["window"], out["stride"]
        return out

    def windows(self, job: Job) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(first real column [B], real tokens [B], windows [B]) of every row of the batch."""
        mask = job.mask.bool()
        n = mask.sum(dim=1)
        first = mask.long().argmax(dim=1)  # real tokens are contiguous: left or right padding
        counts = torch.tensor([window_count(int(k), self.window, self.stride) for k in n.tolist()], device=n.device)
        return first, n, counts

    def attribute(self, job: Job) -> torch.Tensor:
        fill = job.pad if self.token is None else self.token
        first, n, counts = self.windows(job)
        total = torch.zeros(job.ids.shape, dtype=torch.float64, device=job.ids.device)
        covered = torch.zeros(job.ids.shape, dtype=torch.float64, device=job.ids.device)
        rel = torch.arange(job.ids.shape[1], device=job.ids.device)[None, :] - first[:, None]  # index among reals
        forwards = int(counts.max()) if counts.numel() else 0
        fast = _flash.plain_usable(job)
        with torch.no_grad():
            y = _flash.score(job, fast=fast)
            job.known.setdefault("x", y)
            base = y.double()
            for k in range(forwards):
                lo = k * self.stride
                hi = torch.clamp(n, max=lo + self.window)[:, None]
                cover = (rel >= lo) & (rel < hi) & (k < counts)[:, None]
                ids = job.ids.clone()
                ids[cover] = fill
                drop = base - _flash.score(job, ids=ids, fast=fast).double()
                total += drop[:, None] * cover
                covered += cover
                job.layer_done(self.name, k + 1, forwards)
        return torch.where(covered > 0, total / covered.clamp(min=1), torch.zeros_like(total))
