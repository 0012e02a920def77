#!/usr/bin/env python
"""Does ``torch.compile`` pay under the engine? One process, side by side, alternating.

Builds bench/engine.py's ``--shape`` with ``--layers`` layers (random weights), then times forwards of one
input of ``--T`` tokens under ``headmap.observe`` with the sink probe (``--route blocks``: the block
route; ``fused``: the fused route), uncompiled and ``torch.compile``d (inductor), alternating
``--repeats`` times, and prints every time and the largest difference of the sink values from the first
uncompiled forward (the compiled ones may differ by the rounding of the model's other operations).

    OMP_NUM_THREADS=1 python bench/compile.py --layers 2 --T 1024
    python bench/compile.py --device cuda --shape llama8b --dtype bfloat16 --layers 4 --T 8192
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import engine as bench_engine  # noqa: E402

import headmap  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="gpt2", choices=sorted(bench_engine.SHAPES))
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--T", type=int, default=1024)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--route", choices=("blocks", "fused"), default="blocks")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    from transformers import AutoModelForCausalLM

    shape = dataclasses.replace(bench_engine.SHAPES[args.shape], layers=args.layers)
    config = bench_engine.build_config(shape, args.T, args.dtype)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=getattr(torch, args.dtype))
    model.eval()
    ids = torch.randint(0, shape.vocab, (1, args.T), generator=torch.Generator().manual_seed(1)).to(args.device)
    headmap.engine_config.fused = args.route == "fused"
    cuda = args.device.startswith("cuda")

    def run(m):
        probe = headmap.SinkProbe()
        t0 = time.perf_counter()
        with torch.no_grad(), headmap.observe(model, probes=[probe]):
            m(ids, use_cache=False, logits_to_keep=1)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0, probe.values()

    print(f"{args.shape} x {args.layers} layers, T={args.T}, {args.device}, {args.dtype}, route {args.route}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)  # fmt: skip
    first, ref = run(model)
    print(f"uncompiled, first call: {first:.3f} s", flush=True)
    compiled = torch.compile(model)
    dt, vals = run(compiled)
    print(f"compiled, first call (compiles): {dt:.3f} s, max |sink diff| {abs(vals - ref).max():.2e}", flush=True)
    for i in range(args.repeats):
        dt, vals = run(model)
        print(f"uncompiled {i + 1}: {dt:.3f} s, max |sink diff| {abs(vals - ref).max():.2e}", flush=True)
        dt, vals = run(compiled)
        print(f"compiled {i + 1}: {dt:.3f} s, max |sink diff| {abs(vals - ref).max():.2e}", flush=True)


if __name__ == "__main__":
    main()
