"""Leave-one-token-out occlusion (Zeiler & Fergus 2014; Li, Monroe & Jurafsky 2016)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from . import _flash
from .base import Job, Method


@dataclass
class Occlusion(Method):
    """value_j = y(x) - y(x with token j replaced by a baseline token).

    ``token``: the baseline token id (None: the pad id the batch uses). One forward per position
    (W forwards of the batch): the ground truth on short inputs, too slow for long ones. For a batch
    without padding whose attention calls are plain and whose device and dtype have a fused attention
    kernel, those calls run the kernel (:func:`._flash.plain_forward`); else the headmap engine where it
    runs the model. y(x) is kept for later methods (``job.known["x"]``). See docs/methods/occlusion.md.
    """

    name: ClassVar[str] = "occlusion"
    token: int | None = None

    def attribute(self, job: Job) -> torch.Tensor:
        fill = job.pad if self.token is None else self.token
        out = torch.zeros(job.ids.shape, dtype=torch.float64, device=job.ids.device)
        fast = _flash.plain_usable(job)
        with torch.no_grad():
            y = _flash.score(job, fast=fast)
            job.known.setdefault("x", y)
            base = y.double()
            for j in range(job.ids.shape[1]):
                real = job.mask[:, j].bool()
                if not bool(real.any()):
                    continue
                ids = job.ids.clone()
                ids[real, j] = fill
                out[:, j] = (base - _flash.score(job, ids=ids, fast=fast).double()) * real
        return out
