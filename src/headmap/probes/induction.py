"""``induction``: attention to the token after the earlier copy, on repeated sequences.

Inputs as for ``duplicate_token``: ``offset`` leading tokens, r (n tokens), r again. With
positions inside the input, a token i of the second copy repeats i - n, and an induction head
attends to the token that followed it, i - n + 1:

    induction[l, h] = mean over inputs of ( mean over i in [offset + n + 1, offset + 2n) of A[i, i - n + 1] )

The first token of the second copy is not counted (docs/methods/induction.md), nor are tokens after the
second copy. A perfect induction head scores 1. Needs n >= 2.

Olsson et al. 2022, "In-context Learning and Induction Heads" (prefix matching on repeated
random tokens); Elhage et al. 2021; TransformerLens ``get_induction_head_detection_pattern``.
Causal only: in an encoder, token i also sees i + 1 itself, and the pattern no longer means
"predict the next token from the earlier copy". See docs/methods/induction.md.

As for ``duplicate_token``, pass ``repeat_length`` and ``offset`` or let the scan read them from the
corpus (:class:`~headmap.probes.repeat.RepeatProbe`); an input shorter than ``offset + 2 * repeat_length``
raises ProbeError.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .repeat import RepeatProbe


@dataclass
class InductionProbe(RepeatProbe):
    name = "induction"
    needs = replace(RepeatProbe.needs, causal=True)
    min_repeat_length = 2
    skip = 1

    def lag(self) -> int:
        return self.repeat_length - 1
