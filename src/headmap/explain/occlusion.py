"""Leave-one-token-out occlusion (Zeiler & Fergus 2014; Li, Monroe & Jurafsky 2016)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Job, Method


@dataclass
class Occlusion(Method):
    """value_j = y(x) - y(x with token j replaced by a baseline token).

    ``token``: the baseline token id (None: the pad id the batch uses). One forward per position
    (W forwards of the batch): the ground truth on short inputs, too slow for long ones.
    See docs/methods/occlusion.md.
    """

    name: ClassVar[str] = "occlusion"
    token: int | None = None

    def attribute(self, job: Job) -> torch.Tensor:
        fill = job.pad if self.token is None else self.token
        out = torch.zeros(job.ids.shape, dtype=torch.float64, device=job.ids.device)
        with torch.no_grad():
            base = job.score().double()
            for j in range(job.ids.shape[1]):
                real = job.mask[:, j].bool()
                if not bool(real.any()):
                    continue
                ids = job.ids.clone()
                ids[real, j] = fill
                out[:, j] = (base - job.score(ids=ids).double()) * real
        return out
