#!/usr/bin/env python
"""Which token each attribution method ranks first on the planted induction model, per target and seed.

The planted model and inputs of tests/test_explain_planted.py: the planted training of
tests/test_planted_heads.py at a seed, 16 inputs BOS + r + r[:k] (seed 0: the test's very inputs;
seed s: the generator 123 + s). For each input the answer (the token after the earlier occurrence of
the current token) and the key (that earlier occurrence) are ranked among the other tokens, the
target row's own token left out, with the target ``next`` (log p of the prediction, saturated: p up
to 0.999) and with ``contrast`` (the logit of the prediction minus the runner-up's, not saturated).

Prints, per seed, target and method, how many inputs rank the answer first and the ranks of the
answer and of the key; then, pooled over the seeds (units: one (model, input) pair; the models are
independent trainings, the inputs independent draws), each method's answer-first count with a 95%
Clopper-Pearson interval, how often the method orders the answer and the key as occlusion (the ground
truth) does, and for attn_grad how many of its misses (answer below second) have dy/dA <= 0 at the
induction head's (target, answer) entry, the entry Chefer's positive part then drops.

    .venv/bin/python bench/planted_targets.py               # seed 0, about a minute on a CPU
    .venv/bin/python bench/planted_targets.py --seeds 0-4   # five trainings, about five minutes
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

import torch  # noqa: E402
from test_explain_planted import INPUTS, _induction_gradients, planted_inputs  # noqa: E402
from test_planted_heads import train  # noqa: E402

import headmap.explain as E  # noqa: E402
from headmap.stats import clopper_pearson  # noqa: E402

METHODS = ["integrated_gradients", "rollout", "saliency", "attn_grad", "occlusion"]
TARGETS = ("next", "contrast")


def ranks(frame, answer: int) -> dict[str, tuple[int, int]]:
    frame = frame[frame.position < frame.position.max()].copy()  # the target row's own token left out
    frame["rank"] = frame.groupby("method").value.rank(ascending=False, method="min")
    out = {}
    for method in METHODS:
        sub = frame[frame.method == method]
        rank_of = {int(p): int(r) for p, r in zip(sub.position, sub["rank"], strict=True)}
        out[method] = (rank_of[answer], rank_of[answer - 1])
    return out


def seeds_of(text: str) -> list[int]:
    if "-" in text:
        lo, hi = text.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(s) for s in text.split(",")]


def one_seed(seed: int) -> dict[str, dict[str, list]]:
    """target -> method -> [(answer rank, key rank)] per input, plus "grads": dy/dA at the induction head."""
    model = train(seed).model
    rows, answers = planted_inputs(123 + seed)  # seed 0: the inputs of tests/test_explain_planted.py
    got: dict[str, dict[str, list]] = {}
    for kind in TARGETS:
        got[kind] = {m: [] for m in METHODS}
        for ids, answer in zip(rows, answers, strict=True):
            with torch.no_grad():
                top = model(torch.tensor([ids])).logits[0, -1].topk(2).indices.tolist()
            assert top[0] == ids[answer], f"seed {seed}: the model does not predict the copy"
            target = "next" if kind == "next" else f"contrast:{top[0]},{top[1]}"
            frame = E.explain(model, None, [ids], target=target, methods=METHODS)
            for method, pair in ranks(frame, answer).items():
                got[kind][method].append(pair)
    got["grads"] = {"attn_grad": _induction_gradients(model, rows, answers)}  # target next (log p)
    return got


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0", help="planted trainings: 0, 0-4 or 0,3,7 (default 0)")
    args = parser.parse_args()
    runs = {}
    for seed in seeds_of(args.seeds):
        runs[seed] = got = one_seed(seed)
        for kind in TARGETS:
            print(f"seed {seed} target {kind}", flush=True)
            for method in METHODS:
                pairs = got[kind][method]
                first = sum(a == 1 for a, _ in pairs)
                print(f"  {method:<22} answer first {first:>2}/{INPUTS}  answer ranks {[a for a, _ in pairs]}")
                print(f"  {'':<22} key ranks    {[k for _, k in pairs]}")
    n = INPUTS * len(runs)
    units = f"{len(runs)} trainings x {INPUTS} inputs = {n} units"
    print(f"\npooled over seeds {args.seeds} ({units}), 95% Clopper-Pearson")
    for kind in TARGETS:
        print(f"target {kind}")
        truth = [a < k for got in runs.values() for a, k in got[kind]["occlusion"]]  # occlusion: answer before key
        for method in METHODS:
            pairs = [p for got in runs.values() for p in got[kind][method]]
            hits = sum(a == 1 for a, _ in pairs)
            first = clopper_pearson(hits, n)
            same = sum((a < k) == t for (a, k), t in zip(pairs, truth, strict=True))
            print(
                f"  {method:<22} answer first {hits:>3}/{n} = {first.estimate:.2f} "
                f"[{first.low:.2f}, {first.high:.2f}]; orders answer and key as occlusion does {same}/{n}"
            )
    grads = [g for got in runs.values() for g in got["grads"]["attn_grad"]]
    pairs = [p for got in runs.values() for p in got["next"]["attn_grad"]]
    misses = [g for (a, _), g in zip(pairs, grads, strict=True) if a > 2]
    print(
        f"attn_grad (target next): {len(misses)} misses below second; dy/dA[t, answer] <= 0 at the induction head "
        f"on {sum(g <= 0 for g in misses)} of them"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
