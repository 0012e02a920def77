"""Integrated gradients (4 steps) on the fused-kernel route against the engine's route, side by side.

One process, the GPT-2-small-shaped random model of bench/engine.py (float32, CPU), the text and the
target ("cat", next) of bench/explain.py's --inseq part. Per length: one untimed run of each route at T
(so that both find the heap grown), then three timed pairs, alternating which route goes first. The
engine's route is forced by making ``headmap.explain._flash.plain_usable`` answer False.

    PYTHONPATH=src .venv/bin/python bench/explain_ig_routes.py 512 2048
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import engine as bench_engine  # noqa: E402
import explain as bench_explain  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import headmap.explain as E  # noqa: E402
from headmap.explain import _flash  # noqa: E402


def run(model, target, ids: list[int], route: str) -> tuple[float, torch.Tensor]:
    """(seconds, attributions) of one IG on ``route`` ("kernel" or "engine")."""
    usable = _flash.plain_usable
    if route == "engine":
        _flash.plain_usable = lambda job: False
    try:
        job = E.make_job(model, target, [ids], pad=0)
        t0 = time.perf_counter()
        out = E.IntegratedGradients(steps=4).attribute(job)
        return time.perf_counter() - t0, out
    finally:
        _flash.plain_usable = usable


def main(lengths: list[int]) -> None:
    tok = bench_explain._tokenizer()
    cat = tok.convert_tokens_to_ids("cat")
    for T in lengths:
        config = bench_engine.build_config(bench_engine.SHAPES["gpt2"], T + 8, "float32")
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
        target = E.parse_target(f"token:{cat}", model, None)
        ids = tok(bench_explain._text(tok, T))["input_ids"]
        run(model, target, ids, "kernel")
        run(model, target, ids, "engine")
        times: dict[str, list[float]] = {"kernel": [], "engine": []}
        outs = {}
        for rep in range(3):
            for route in ("kernel", "engine") if rep % 2 == 0 else ("engine", "kernel"):
                wall, outs[route] = run(model, target, ids, route)
                times[route].append(wall)
                print(f"T={T} {route} {wall:.2f} s  load {os.getloadavg()[0]:.2f}", flush=True)
        diff = float((outs["kernel"] - outs["engine"]).abs().max())
        ratio = sum(times["engine"]) / sum(times["kernel"])
        print(f"T={T} engine/kernel time {ratio:.2f}x; max |kernel - engine| {diff:.2e}", flush=True)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [512, 2048])
