"""On the planted induction model of test_planted_heads.py, attributions find the copied token.

Input: BOS + r + r[:k]; the model predicts r[k] at the last token t by induction: the layer-0 head
writes each token's predecessor into its position, and the layer-1 head, from t (token r[k-1]),
attends to the position whose predecessor is r[k-1]: position 1 + k, holding r[k], the *answer*
(the token after the earlier occurrence). Two tokens are thus necessary: the answer (the value the
head copies) and its predecessor at position k, the earlier copy of the current token (which forms
the key the head finds it by). The token at the target row itself is left out of every ranking: it
is the query of the induction head, every method credits it, and the question is which *other*
token the prediction comes from.

Measured here (seed 0 of the planted training, 16 inputs, k drawn from 2..10), the answer's rank
among the other tokens, top-1 counts:

- integrated_gradients 16/16 and rollout 16/16: the issue's claim holds; asserted on every input.
- occlusion, the ground truth, 11/16, and 16/16 in the top two: on the other 5 the earlier copy of
  the current token comes first. Replacing either of the two tokens costs the prediction about the
  same (3.0-3.5 nats against ln 31 = 3.43 for a guess; 7.9 once): the circuit needs both, and
  which one an exact measurement ranks first is a near tie.
- saliency 13/16, and on the other 3 the earlier copy of the current token first and the answer
  second, the same near tie as occlusion's. Asserted: top two on every input, and when the answer
  is not first, the first is that key token. An intrinsic property of a local gradient-times-input
  on a circuit with two necessary inputs, not a bug.
- attn_grad (Chefer et al. 2021) 7/16; on the other 9 the answer falls to rank 2 (once) or to
  13-19 of ~20. Compared against a brute force from eager attentions and autograd on this model
  (max difference 1.4e-6 in float32; the formula is right). The cause is the rule itself: Chefer's
  relevance keeps (dA ⊙ A)^+, the positive part of the *raw* gradient dy/dA, and on those 8 inputs
  dy/dA[t, answer] at the induction head is negative (-3.1e-2 to -5.7e-4), so the clamp drops the
  answer's only path. Our reading of why: the answer holds 0.7-0.95 of the head's attention, so more
  weight on it mostly scales the head's output in its own direction, which the final RMSNorm undoes,
  and with the prediction saturated (p = 0.989 to 0.9994 on the misses) the small gradient left
  takes either sign. Asserted: every input where attn_grad misses the answer's
  top two has dy/dA[t, answer] <= 0 at the induction head (computed here by eager autograd), and
  attn_grad is right on at least a quarter of the inputs (chance: about 1 in 20 per input). The head
  mean plays no part in the ranking (the pruned heads' dA is ~0 and the mean scales every column
  of a layer alike).

Over five trainings (seeds 0-4, 80 model-input pairs; `bench/planted_targets.py --seeds 0-4`, in
docs/explain.md) the answer is first for rollout 78/80, integrated_gradients 76/80, saliency 69/80,
attn_grad 43/80 (all 36 misses below second with dy/dA <= 0) and occlusion 46/80: seed 0 is the
kindest, and the ground truth itself splits between the two necessary tokens.

The planted model is left as test_planted_heads.py trains it: a less confident model would let
attn_grad's gradient keep its sign, but that would tune the model to the method; the misses above
are what the method does on a confident induction circuit. Margins of the all-inputs assertions
(measured): IG gives the answer >= 1.09 and every other token <= 0.18 (per input at least 8.8 times
the runner-up), rollout the answer at least 1.15 times the runner-up on every input.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_planted_heads import repeats, train

import headmap.explain as E

pytestmark = pytest.mark.slow

N = 12
INPUTS = 16
METHODS = ["integrated_gradients", "rollout", "saliency", "attn_grad", "occlusion"]


def planted_inputs(seed: int = 123) -> tuple[list[list[int]], list[int]]:
    """INPUTS inputs BOS + r + r[:k] (k drawn from 2..N-2) by the generator ``seed``, and each one's answer
    position 1 + k (bench/planted_targets.py draws other trainings' inputs with it too)."""
    gen = torch.Generator().manual_seed(seed)
    x = repeats(gen, INPUTS, N)
    rows, answers = [], []
    for b in range(INPUTS):
        k = int(torch.randint(2, N - 1, (1,), generator=gen))
        rows.append(x[b, : 1 + N + k].tolist())
        answers.append(1 + k)
    return rows, answers


@pytest.fixture(scope="module")
def cases():
    return (train().model, *planted_inputs())


@pytest.fixture(scope="module")
def ranks(cases):
    """method -> (ranks of the answer, ranks of the key token), the target row's own token left out."""
    model, rows, answers = cases
    frame = E.explain(model, None, rows, target="next", methods=METHODS, batch_size=len(rows))
    last = frame.groupby("sample").position.transform("max")
    frame = frame[frame.position < last].copy()  # the target row's own token is left out (docstring)
    frame["rank"] = frame.groupby(["sample", "method"]).value.rank(ascending=False, method="min")
    out = {}
    for method in METHODS:
        sub = frame[frame.method == method]
        at = [(sub["sample"] == s) & (sub.position == a) for s, a in enumerate(answers)]
        key = [(sub["sample"] == s) & (sub.position == a - 1) for s, a in enumerate(answers)]
        out[method] = ([int(sub[m]["rank"].iloc[0]) for m in at], [int(sub[m]["rank"].iloc[0]) for m in key])
    return out


def test_the_model_predicts_the_copy(cases):
    model, rows, _ = cases
    with torch.no_grad():
        for ids in rows:
            k = len(ids) - 1 - N
            assert int(model(torch.tensor([ids])).logits[0, -1].argmax()) == ids[1 + k]


def test_occlusion_ranks_the_two_tokens_of_the_circuit_first(ranks):
    """The ground truth: the answer and the earlier copy of the current token are the top two on every input."""
    answer, key = ranks["occlusion"]
    assert all(sorted((a, k)) == [1, 2] for a, k in zip(answer, key, strict=True)), (answer, key)  # measured 16/16


@pytest.mark.parametrize("method", ["integrated_gradients", "rollout"])
def test_top_one_is_the_copied_token(ranks, method):
    answer, _ = ranks[method]
    assert all(r == 1 for r in answer), answer  # measured 16/16, with a wide margin (docstring)


def test_saliency_ranks_the_copied_token_first_or_after_the_key_token(ranks):
    """Top-1 is the issue's claim; saliency meets it on 13/16 and otherwise ranks the key token first (docstring)."""
    answer, key = ranks["saliency"]
    assert all(r <= 2 for r in answer), answer
    assert all(k == 1 for a, k in zip(answer, key, strict=True) if a != 1), (answer, key)
    assert sum(r == 1 for r in answer) >= INPUTS // 2, answer  # measured 13


def _induction_gradients(model, rows, answers) -> list[float]:
    """dy/dA[t, answer] at the layer-1 head that attends most from t to the answer, y = log p(next), by
    eager attentions and autograd (float64 copy of the model, no headmap code)."""
    eager = copy.deepcopy(model).double()
    eager.set_attn_implementation("eager")
    out = []
    for ids, a in zip(rows, answers, strict=True):
        embeds = eager.get_input_embeddings()(torch.tensor([ids])).detach().requires_grad_(True)
        res = eager(inputs_embeds=embeds, output_attentions=True)
        logp = res.logits[0, -1].log_softmax(-1)
        y = logp[int(logp.argmax())]
        attn = res.attentions[1]
        (grad,) = torch.autograd.grad(y, attn)
        head = int(attn[0, :, -1, a].argmax())
        out.append(float(grad[0, head, -1, a]))
    return out


def test_attn_grad_misses_only_where_the_clamp_drops_the_answer(cases, ranks):
    """Not the issue's claim (docstring): attn_grad is right on some inputs, and every miss is the clamp."""
    model, rows, answers = cases
    answer, _ = ranks["attn_grad"]
    assert sum(r == 1 for r in answer) >= INPUTS // 4, answer  # measured 7/16; chance ~1 in 20 per input
    grads = _induction_gradients(model, rows, answers)
    misses = [(r, g) for r, g in zip(answer, grads, strict=True) if r > 2]
    assert misses, "attn_grad found the answer everywhere: update the docstring and docs/methods/attn_grad.md"
    assert all(g <= 0 for _, g in misses), misses  # measured: 8 misses, dy/dA from -3.1e-2 to -5.7e-4
