"""On the planted induction model of test_planted_heads.py, attributions find the copied token.

Input: BOS + r + r[:k]; the model predicts r[k] at the last token by induction (the layer-1 head
attends to the token after the earlier copy of the current token, r[k] at position 1 + k). The
token at the target row itself is left out of the ranking: the current token is the query of the
induction head, every method credits it (attn_grad's relevance starts from the identity and gives it
at least 1), and the question is which *other* token the prediction comes from.

Measured here (seed 0 of the planted training, 16 inputs, k drawn from 2..10), the answer's rank among
the other tokens: integrated_gradients 1 on 16/16, rollout 16/16, saliency 1 on 13/16 and 2 on the
other three (it then ranks first the earlier copy of the current token, whose embedding forms the
induction key through the previous-token head), attn_grad 1 on only 7/16. So the issue's claim
"every gradient method's top-1" holds for integrated_gradients, within the top two for saliency, and
not for attn_grad: the positive part of dA ⊙ A keeps the raw gradient dy/dA_j = dO . v_j, which is not
shift-invariant over j, and the one surviving induction head is diluted by the head mean (1/4).
The bounds below leave a margin for another machine's training path (test_planted_heads.py).
"""

from __future__ import annotations

import pytest
import torch
from test_planted_heads import repeats, train

import headmap.explain as E

pytestmark = pytest.mark.slow

N = 12
INPUTS = 16


@pytest.fixture(scope="module")
def cases():
    model = train().model
    gen = torch.Generator().manual_seed(123)
    x = repeats(gen, INPUTS, N)
    rows, answers = [], []
    for b in range(INPUTS):
        k = int(torch.randint(2, N - 1, (1,), generator=gen))
        rows.append(x[b, : 1 + N + k].tolist())
        answers.append(1 + k)
    return model, rows, answers


def _ranks(model, rows, answers, method) -> list[int]:
    frame = E.explain(model, None, rows, target="next", methods=[method], batch_size=len(rows))
    last = frame.groupby("sample").position.transform("max")
    frame = frame[frame.position < last].copy()  # the target row's own token is left out (docstring)
    frame["rank"] = frame.groupby("sample").value.rank(ascending=False, method="min")
    return [int(frame[(frame["sample"] == s) & (frame.position == a)]["rank"].iloc[0]) for s, a in enumerate(answers)]


def test_the_model_predicts_the_copy(cases):
    model, rows, _ = cases
    with torch.no_grad():
        for ids in rows:
            k = len(ids) - 1 - N
            assert int(model(torch.tensor([ids])).logits[0, -1].argmax()) == ids[1 + k]


def test_integrated_gradients_top_one_is_the_copied_token(cases):
    ranks = _ranks(*cases, "integrated_gradients")
    assert sum(r == 1 for r in ranks) >= INPUTS - 1, ranks  # measured 16/16


def test_saliency_ranks_the_copied_token_first_or_second(cases):
    ranks = _ranks(*cases, "saliency")
    assert all(r <= 2 for r in ranks), ranks  # measured: 13 firsts, 3 seconds
    assert sum(r == 1 for r in ranks) >= INPUTS // 2, ranks


def test_rollout_top_one_is_the_copied_token(cases):
    ranks = _ranks(*cases, "rollout")
    assert sum(r == 1 for r in ranks) >= INPUTS - 1, ranks  # measured 16/16


def test_attn_grad_finds_the_copied_token_more_often_than_chance(cases):
    """Not the issue's claim (see the module docstring): chance is about 1 in 2N = 24 per input."""
    ranks = _ranks(*cases, "attn_grad")
    assert sum(r == 1 for r in ranks) >= 4, ranks  # measured 7/16; chance expects < 1
