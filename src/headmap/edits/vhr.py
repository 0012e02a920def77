"""``vhr``: Vision-aware Head Reinforcement (He, Zhu, Guo, et al. 2025, "Cracking the Code of Hallucination in
LVLMs with Vision-aware Head Divergence", ACL 2025).

For every chosen head h of the language model (``text`` tower) and every query i:

    o'_h(i) = factor * o_h(i)

with o_h(i) the head's attention output before the output projection (its attention-weighted sum of
values). factor = 1 is the identity (the output is returned as it is); the paper uses 2. The heads are
the most vision-aware ones, chosen by a rule over an atlas holding the ``vision_aware`` probe
(``heads="top 5% vision_aware"``) or given as [layer, head] pairs; ``heads`` is required.

The paper scores heads on each input with a text-only forward first and reinforces the top heads of
every layer while generating; this edit uses a fixed set of heads measured beforehand (an atlas), so
it adds no forward. See docs/methods/vhr.md.
"""

from __future__ import annotations

from typing import Any

import torch

from ..engine import Block
from ..errors import EditError
from .base import Edit, check_number


class Vhr(Edit):
    """Scale the outputs of the chosen (vision-aware) heads by ``factor``."""

    name = "vhr"

    def __init__(self, heads: Any = None, factor: float = 2.0, atlas: Any = None) -> None:
        if heads is None:
            raise EditError(
                f'{self.name}: heads= is required, e.g. heads="top 5% vision_aware" with the atlas of a scan with '
                "the vision_aware probe, or heads=[[layer, head], ...]"
            )
        self.factor = check_number(self.name, "factor", factor)
        super().__init__(heads=heads, atlas=atlas)

    def params(self) -> dict[str, Any]:
        return {"factor": self.factor}

    def edit_output(self, block: Block, out: torch.Tensor) -> torch.Tensor:
        if self.factor == 1.0:  # the engine gives it the blocks of its tower only (edits/base.py)
            return out
        return self.on_heads(block, out, lambda x, heads: x * self.factor)
