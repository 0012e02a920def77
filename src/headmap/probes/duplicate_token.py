"""``duplicate_token``: attention from a token to its earlier copy, on repeated sequences.

Inputs are ``offset`` leading tokens (1 for a BOS, 0 without), a sequence r of n tokens, and r
again; the built-in ``repeats`` corpus makes them and records n and the offset in each sample's
``info``. With positions inside the input (padding removed), the second copy is
[offset + n, offset + 2n) and the token at i repeats the one at i - n:

    duplicate_token[l, h] = mean over inputs of ( mean over i in [offset + n, offset + 2n) of A[i, i - n] )

Tokens after the second copy (an EOS, a SEP) are not counted. A perfect duplicate-token head
scores 1.

Duplicate-token heads: Wang et al. 2022 ("Interpretability in the Wild: a Circuit for Indirect
Object Identification in GPT-2 small"); TransformerLens ``get_duplicate_token_head_detection_pattern``.
See docs/methods/duplicate_token.md.

Where ``repeat_length`` and ``offset`` come from: see :class:`~headmap.probes.repeat.RepeatProbe`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .repeat import RepeatProbe


@dataclass
class DuplicateTokenProbe(RepeatProbe):
    name = "duplicate_token"

    def lag(self) -> int:
        return self.repeat_length
