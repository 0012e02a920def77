#!/usr/bin/env python
"""Where the engine's time goes on a GPU: one process, a few layers of the llama8b shape, one length.

bench/engine.py measures whole models in fresh processes; this script answers the follow-up questions
in one process so that it fits a short device lease: on ``--layers`` layers of bench/engine.py's
``llama8b`` shape (same widths, heads and vocabulary; the per-layer work of the 32-layer model) in
bfloat16 it times, at each ``--lengths`` (CUDA-synchronised wall time, best of ``--repeats``):

  sdpa      flash sdpa (``sdpa_kernel(FLASH_ATTENTION)``)
  fused     the sink probe, fused route
  blocks    the sink probe, block route, at the engine's own budget and at each ``--budgets`` (MiB)
  default   the default set's plain probes (bench/engine.py's ``default`` mode), block route
  fusedset  every default probe with a fused version (bench/engine.py's ``fused`` mode), fused route
  fusedset_blocks  the same probes, block route at the engine's own budget

then prints a torch.profiler table (self CUDA time) of ``blocks`` and ``default`` at the first length.

    python bench/gpu_profile.py --layers 4 --lengths 8192 32768
    python bench/gpu_profile.py --device cpu --layers 1 --lengths 256 --shape gpt2   # a smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import engine as bench_engine  # noqa: E402

import headmap  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--shape", default="llama8b", choices=sorted(bench_engine.SHAPES))
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--lengths", type=int, nargs="+", default=[8192])
    p.add_argument("--budgets", type=float, nargs="*", default=[4096, 1024], help="block budgets (MiB) to try")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--modes", nargs="+", default=["sdpa", "fused", "fusedset", "blocks", "default"])
    p.add_argument("--no-profile", action="store_true")
    args = p.parse_args()

    import dataclasses

    from transformers import AutoModelForCausalLM

    shape = dataclasses.replace(bench_engine.SHAPES[args.shape], layers=args.layers)
    cuda = args.device.startswith("cuda")
    dtype = getattr(torch, args.dtype)
    config = bench_engine.build_config(shape, max(args.lengths), args.dtype)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype).eval()
    print(
        f"{args.shape} widths, {args.layers} layers, {args.dtype}, {args.device}"
        + (f" ({torch.cuda.get_device_name(0)}), torch {torch.__version__}" if cuda else ""),
        flush=True,
    )

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def timed(fn, repeats: int) -> tuple[float, float]:
        fn()  # warm-up at the same length
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            sync()
            best = min(best, time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        return best, peak

    def run(mode: str, ids: torch.Tensor):
        """The forward of ``mode`` as a function; the caller sets ``engine_config`` around its timing."""
        kwargs = {"use_cache": False, "logits_to_keep": 1}

        def fn():
            with torch.no_grad():
                if mode == "sdpa":
                    if cuda and dtype in (torch.float16, torch.bfloat16):
                        from torch.nn.attention import SDPBackend, sdpa_kernel

                        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                            return model(ids, **kwargs)
                    return model(ids, **kwargs)
                probes = [headmap.SinkProbe()]
                if mode == "default":
                    probes += bench_engine.plain_default_probes()
                if mode in ("fusedset", "fusedset_blocks"):
                    probes += bench_engine.fused_default_probes()
                with headmap.observe(model, probes=probes):
                    return model(ids, **kwargs)

        return fn

    results = {}
    for T in args.lengths:
        ids = torch.randint(0, shape.vocab, (1, T), generator=torch.Generator().manual_seed(1)).to(args.device)
        plans = [(m, None) for m in args.modes]
        plans += [("blocks", b) for b in args.budgets]
        for mode, budget in plans:
            saved = headmap.engine_config.budget_bytes
            headmap.engine_config.fused = mode in ("fused", "fusedset")
            if budget:
                headmap.engine_config.budget_bytes = int(budget * 2**20)
            try:
                fn = run(mode, ids)
                reps = args.repeats if mode in ("sdpa", "fused", "fusedset") or T <= 8192 else 1
                wall, peak = timed(fn, reps)
                results[(T, mode, budget)] = wall
                base = results.get((T, "sdpa", None))
                ratio = f"{wall / base:6.2f}x sdpa" if base else ""
                label = mode + (f" budget {budget:.0f} MiB" if budget else "")
                print(f"T={T:6d} {label:28s} {wall:8.3f} s  peak {peak:6.2f} GiB  {ratio}", flush=True)
            except Exception as exc:  # an OOM or a kernel refusing the shape: say so and go on
                print(f"T={T:6d} {mode} budget {budget}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
            finally:
                headmap.engine_config.budget_bytes = saved
                headmap.engine_config.fused = True
                if cuda:
                    torch.cuda.empty_cache()

    if args.no_profile:
        return
    from torch.profiler import ProfilerActivity, profile

    T = args.lengths[0]
    ids = torch.randint(0, shape.vocab, (1, T), generator=torch.Generator().manual_seed(1)).to(args.device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    for mode in ("blocks", "default"):
        fn = run(mode, ids)
        headmap.engine_config.fused = False
        fn()
        sync()
        with profile(activities=acts) as prof:
            fn()
            sync()
        headmap.engine_config.fused = True
        print(f"\n=== profile: {mode} at T={T} ({args.layers} layers) ===", flush=True)
        print(prof.key_averages().table(sort_by=sort, row_limit=22, max_name_column_width=60), flush=True)


if __name__ == "__main__":
    main()
