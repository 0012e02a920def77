#!/usr/bin/env python
"""Which token each attribution method ranks first on the planted induction model, per target.

The planted model and inputs of tests/test_explain_planted.py (seed 0 of the planted training, 16 inputs,
BOS + r + r[:k]): for each input the answer (the token after the earlier occurrence of the current token)
and the key (that earlier occurrence) are ranked among the other tokens, the target row's own token left
out, with the target ``next`` (log p of the prediction, saturated: p up to 0.999) and with ``contrast``
(the logit of the prediction minus the runner-up's, not saturated). Prints, per target and method, how
many inputs rank the answer first, and the ranks of the answer and of the key.

    .venv/bin/python bench/planted_targets.py        # about a minute on a CPU (the training)
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

import torch  # noqa: E402
from test_planted_heads import repeats, train  # noqa: E402

import headmap.explain as E  # noqa: E402

N, INPUTS = 12, 16
METHODS = ["integrated_gradients", "rollout", "saliency", "attn_grad", "occlusion"]


def ranks(frame, answer: int) -> dict[str, tuple[int, int]]:
    frame = frame[frame.position < frame.position.max()].copy()  # the target row's own token left out
    frame["rank"] = frame.groupby("method").value.rank(ascending=False, method="min")
    out = {}
    for method in METHODS:
        sub = frame[frame.method == method]
        rank_of = {int(p): int(r) for p, r in zip(sub.position, sub["rank"], strict=True)}
        out[method] = (rank_of[answer], rank_of[answer - 1])
    return out


def main() -> int:
    model = train().model
    gen = torch.Generator().manual_seed(123)  # the inputs of tests/test_explain_planted.py
    x = repeats(gen, INPUTS, N)
    cases = []
    for b in range(INPUTS):
        k = int(torch.randint(2, N - 1, (1,), generator=gen))
        cases.append((x[b, : 1 + N + k].tolist(), 1 + k))
    for kind in ("next", "contrast"):
        got: dict[str, list[tuple[int, int]]] = {m: [] for m in METHODS}
        for ids, answer in cases:
            with torch.no_grad():
                top = model(torch.tensor([ids])).logits[0, -1].topk(2).indices.tolist()
            assert top[0] == ids[answer]  # the model predicts the copy
            target = "next" if kind == "next" else f"contrast:{top[0]},{top[1]}"
            frame = E.explain(model, None, [ids], target=target, methods=METHODS)
            for method, pair in ranks(frame, answer).items():
                got[method].append(pair)
        print(f"target {kind}")
        for method in METHODS:
            first = sum(a == 1 for a, _ in got[method])
            print(f"  {method:<22} answer first {first:>2}/{INPUTS}  answer ranks {[a for a, _ in got[method]]}")
            print(f"  {'':<22} key ranks    {[k for _, k in got[method]]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
