"""Presses side by side: headmap's against a plain sdpa prefill and against kvpress, in one run.

    python bench/compress.py                    # 4K tokens, ratio 0.5, installs kvpress in .venv-kvpress/
    python bench/compress.py --length 512 --no-kvpress
    python bench/compress.py --no-kvpress --decode-length 8192   # also decoding with 25 % of the cache kept
    python bench/compress.py --no-table --decode-length 8192 --reach 4096,8192,16384,32768   # the long-context runs

The model is random, GPT-2-small shaped (12 layers, 12 heads of 64, d_model 768, vocab 50257) but
built as a Llama (RoPE, no biases), because kvpress hooks only Llama-family attention modules; the
weights are saved once and every measurement loads them in a fresh process, so that peak memory
(peak RSS above the RSS after loading, Linux) is that of the prefill alone. kvpress 0.5.x is
installed by this script in its own venv (.venv-kvpress/, ignored by git) with the transformers
version it supports (< 5.3), torch 2.13.0 CPU from the local wheel folder, and ``--no-deps`` for
kvpress itself (its metadata also pulls peft and accelerate, which the presses do not import).
Exit code 3: kvpress could not be installed offline (the reason is printed).

``--reach`` runs each h2o once at every length (headmap's through the engine's block pass on an sdpa
model, kvpress's ObservedAttentionPress on an eager one, which hands it each layer's [T, T] attention;
only the last position's logits are computed) in a child whose address space is limited
(``--memory-limit-gib``, RLIMIT_AS) so that the machine is not swapped: a length that does not fit
is reported as "out of memory at T" and larger ones are not tried. headmap's 32K (or any length past
the largest measured one) runs only when the time estimated from the smaller ones
(a T + b T^2 through the two largest, at least linear growth) is within ``--reach-budget-s``; kvpress's lengths stop at
``--reach-eager-max``.

Printed: per press, prefill time and peak memory as ratios of the sdpa prefill of the same run,
cache bytes as a fraction of the full cache, and for kvpress the share of kept entries that are
the same as headmap's (1.000 where the definitions coincide; h2o differs: kvpress divides each
key's sum by the number of queries that see it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KV_VENV = ROOT / ".venv-kvpress"
KV_PYTHON = KV_VENV / "bin" / "python"
TAG = "COMPRESS_BENCH "
HEADMAP_MODES = ("sdpa", "h2o", "snapkv", "streaming", "knorm", "pyramidkv", "adakv", "head_aware")
KVPRESS_MODES = ("kv_sdpa", "kv_h2o", "kv_snapkv", "kv_streaming", "kv_knorm", "kv_pyramidkv")
SAME_AS = {"kv_h2o": "h2o", "kv_snapkv": "snapkv", "kv_streaming": "streaming", "kv_knorm": "knorm",
           "kv_pyramidkv": "pyramidkv"}  # fmt: skip


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def build(folder: Path, length: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12, hidden_size=768,
        intermediate_size=3072, vocab_size=50257, max_position_embeddings=max(length + 16, 4096),
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)


# -- children --------------------------------------------------------------------------------------
def child(mode: str, folder: Path, length: int, ratio: float, window: int, repeat: int, out: Path) -> dict:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 0) or max(1, os.cpu_count() or 1))
    if mode.startswith("reach:"):
        return _reach(mode, folder, length, ratio)
    attn = "eager" if mode == "kv_h2o" else "sdpa"
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation=attn, dtype=torch.float32).eval()
    ids = torch.randint(1, 50257, (1, length), generator=torch.Generator().manual_seed(1))
    kept: dict[int, np.ndarray] = {}
    if mode.startswith("decode:"):
        return _decode(model, mode.split(":", 1)[1], ids, repeat, window)

    def once(x):
        if mode in ("sdpa", "kv_sdpa"):
            cache = model(x, use_cache=True).past_key_values
            return cache, sum(layer.keys.numel() * 4 * 2 for layer in cache.layers), {}
        if mode.startswith("kv_"):
            cache, kept = _kvpress(model, mode, x, ratio, window)
            return cache, sum(layer.keys.numel() * 4 * 2 for layer in cache.layers), kept
        return _headmap(model, mode, x, ratio, window)

    with torch.no_grad():
        # warm-up: the same mode on 128 tokens, so that imports (headmap, pandas, kvpress) and first-call
        # setup are neither timed nor counted in the peak of the measured run
        once(ids[:, :128])
        times = []
        for attempt in range(repeat):  # the fastest of `repeat` runs: the machine is shared
            if attempt == 0:
                reset_peak()
                base = rss()
            start = time.perf_counter()
            cache, nbytes, kept = once(ids)
            times.append(time.perf_counter() - start)
            if attempt == 0:
                peak = peak_rss() - base  # the first run's peak (later ones reuse freed memory)
            del cache
    seconds = min(times)
    np.savez(out, **{str(k): v for k, v in kept.items()})
    return {"mode": mode, "seconds": seconds, "peak_bytes": peak, "cache_bytes": nbytes}


def _reach(mode, folder, length, ratio):
    """One h2o prefill of ``length`` tokens; {'error': 'out of memory at T'} when an allocation fails."""
    import torch
    from transformers import AutoModelForCausalLM

    kind = mode.split(":", 1)[1]
    attn = "eager" if kind == "kv_h2o" else "sdpa"
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation=attn, dtype=torch.float32).eval()
    ids = torch.randint(1, 50257, (1, length), generator=torch.Generator().manual_seed(1))
    reset_peak()
    base = rss()
    start = time.perf_counter()
    try:
        with torch.no_grad():
            if kind == "kv_h2o":
                from kvpress import ObservedAttentionPress

                # eager attention returns each layer's weights to kvpress's hook without output_attentions,
                # so only one layer's [T, T] matrices are alive at a time
                with ObservedAttentionPress(compression_ratio=ratio)(model):
                    cache = model(ids, use_cache=True, logits_to_keep=1).past_key_values
                nbytes = sum(layer.keys.numel() * 4 * 2 for layer in cache.layers)
            else:
                sys.path.insert(0, str(ROOT / "src"))
                from headmap.presses import compress, make_press

                with compress(model, make_press("h2o", ratio=ratio)) as run:
                    model(ids, use_cache=True, logits_to_keep=1)
                nbytes = run.cache_bytes()
    except (MemoryError, RuntimeError) as exc:
        if isinstance(exc, MemoryError) or "alloc" in str(exc).lower() or "memory" in str(exc).lower():
            import re

            tried = re.search(r"allocate (\d+) bytes", str(exc))
            what = f" (an allocation of {int(tried.group(1)) / 2**30:.1f} GiB failed)" if tried else ""
            return {"mode": mode, "length": length, "error": f"out of memory at {length}{what}",
                    "seconds": time.perf_counter() - start, "peak_bytes": peak_rss() - base}  # fmt: skip
        raise
    seconds = time.perf_counter() - start
    return {"mode": mode, "length": length, "seconds": seconds, "peak_bytes": peak_rss() - base, "cache_bytes": nbytes}


def _headmap(model, mode, ids, ratio, window):
    sys.path.insert(0, str(ROOT / "src"))
    import pandas as pd
    import torch

    from headmap.atlas import Atlas
    from headmap.presses import compress, make_press

    extra = {}
    if mode in ("snapkv", "pyramidkv"):
        extra = {"window": window}
    elif mode == "adakv":
        extra = {"scorer": f"snapkv:window={window}"}
    elif mode == "head_aware":
        gen = torch.Generator().manual_seed(2)
        values = torch.rand(12, 12, generator=gen)
        rows = [
            ("retrieval", "retrieval", la, h, h, float(values[la, h]), 0.0, 1) for la in range(12) for h in range(12)
        ]
        cols = ["probe", "metric", "layer", "head", "kv_head", "value", "stderr", "n"]
        atlas = Atlas(heads=pd.DataFrame(rows, columns=cols), meta={"architecture": {"layers": 12, "heads": 12}})
        extra = {"atlas": atlas}
    press = make_press(mode, ratio=ratio, **extra)
    with compress(model, press) as run:
        model(ids, use_cache=True)
    kept = {k: v.numpy() for k, v in run.kept.items()}
    return run.cache, run.cache_bytes(), kept


def _decode(model, name, ids, steps, window):
    """Median seconds per decoding step after a prefill of ``ids`` with 25 % of the cache kept (or all of it)."""
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from headmap.presses import compress, make_press

    if name == "full":
        press = make_press("knorm", ratio=0.0)  # sdpa throughout
    elif name == "full_engine":
        # the whole cache, decoded through the engine (a head-wise press keeps the engine while decoding)
        press = make_press("adakv", ratio=0.0, scorer=f"snapkv:window={window}")
    else:
        press = make_press(name, ratio=0.75, **({"window": window} if name in ("snapkv", "pyramidkv") else {}))
    times = []
    with compress(model, press) as run, torch.no_grad():
        out = model(ids, use_cache=True, logits_to_keep=1)
        nbytes = run.cache_bytes() if not name.startswith("full") else run.full_bytes
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            start = time.perf_counter()
            out = model(token, past_key_values=out.past_key_values, use_cache=True)
            times.append(time.perf_counter() - start)
            token = out.logits[:, -1:].argmax(-1)
    times.sort()
    return {"mode": f"decode:{name}", "seconds": times[len(times) // 2], "peak_bytes": 0, "cache_bytes": nbytes}


def _kvpress(model, mode, ids, ratio, window):
    import numpy as np
    import torch
    from kvpress import KnormPress, ObservedAttentionPress, PyramidKVPress, SnapKVPress, StreamingLLMPress

    press = {
        "kv_h2o": lambda: ObservedAttentionPress(compression_ratio=ratio),
        "kv_snapkv": lambda: SnapKVPress(compression_ratio=ratio, window_size=window),
        "kv_streaming": lambda: StreamingLLMPress(compression_ratio=ratio),
        "kv_knorm": lambda: KnormPress(compression_ratio=ratio),
        "kv_pyramidkv": lambda: PyramidKVPress(compression_ratio=ratio, window_size=window),
    }[mode]()
    kept: dict[int, np.ndarray] = {}
    score = press.score

    def recording(module, hidden_states, keys, *args, **kwargs):
        scores = score(module, hidden_states, keys, *args, **kwargs)
        q_len = keys.shape[2]
        n = press.get_layer_budget(module, q_len) if mode == "kv_pyramidkv" else int(q_len * (1 - ratio))
        mask = torch.zeros(scores.shape, dtype=torch.bool)
        mask.scatter_(-1, scores.topk(n, dim=-1).indices, True)  # the selection kvpress makes from these scores
        kept[module.layer_idx] = mask.numpy()
        return scores

    press.score = recording
    with press(model):
        out = model(ids, use_cache=True, output_attentions=mode == "kv_h2o")
    return out.past_key_values, kept


# -- parent ----------------------------------------------------------------------------------------
def ensure_kvpress() -> str | None:
    """Install kvpress 0.5.x into .venv-kvpress/ if it is not there; None when ready, else why not."""
    check = [str(KV_PYTHON), "-c", "import kvpress, transformers; print(transformers.__version__)"]
    if KV_PYTHON.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return None
    steps = [
        [sys.executable, "-m", "venv", str(KV_VENV)],
        [str(KV_PYTHON), "-m", "pip", "install", "-q", "torch==2.13.0"],
        # what kvpress imports (datasets, fire), in the ranges its metadata names; not peft or accelerate (unused)
        [
            str(KV_PYTHON),
            "-m",
            "pip",
            "install",
            "-q",
            "transformers>=4.56,<5.3",
            "numpy",
            "cachetools<6",
            "requests",
            "pandas<3",
            "safetensors",
            "tqdm",
            "fire<0.7",
            "datasets",
        ],  # fmt: skip
        [str(KV_PYTHON), "-m", "pip", "install", "-q", "--no-deps", "kvpress>=0.5,<0.6"],
        check,
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode:
            return f"{' '.join(step[:6])} failed: {(done.stderr or done.stdout).strip()[-400:]}"
    return None


def _limit(gib: float):
    """preexec_fn: cap the child's address space at ``gib`` GiB (an allocation past it fails, no swapping)."""

    def apply() -> None:
        import resource

        limit = int(gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply


def measure(python: str, mode: str, folder: Path, args, tmp: Path) -> dict:
    out = tmp / f"{mode.replace(':', '-')}.npz"
    cmd = [python, __file__, "--child", mode, "--folder", str(folder), "--length", str(args.length), "--ratio",
           str(args.ratio), "--window", str(args.window), "--repeat", str(args.repeat), "--kept", str(out)]  # fmt: skip
    limit = _limit(args.memory_limit_gib) if getattr(args, "memory_limit_gib", 0) else None
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, preexec_fn=limit)
    line = next((x for x in done.stdout.splitlines() if x.startswith(TAG)), None)
    if line is None:
        if done.returncode < 0:
            why = f"killed by signal {-done.returncode} at {args.length} (out of memory?)"
            return {"mode": mode, "error": [why]}
        return {"mode": mode, "error": (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]}
    result = json.loads(line[len(TAG) :])
    result["kept_file"] = str(out)
    return result


def rounds(modes: list[str], folder: Path, args, tmp: Path) -> list[dict]:
    """Each mode measured ``--rounds`` times, round-robin (sdpa first in every round), so that a change of
    the machine's load falls on every mode alike. A row keeps its fastest time and its first peak, and
    ``round_ratios``: its time over the same round's sdpa time, one per round (their spread is printed)."""
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for r in range(args.rounds):
        for mode in modes:
            runs[mode].append(measure(sys.executable, mode, folder, args, tmp))
        if args.rounds > 1:
            print(f"round {r + 1}/{args.rounds} done; load average {os.getloadavg()}", flush=True)
    rows = []
    for mode in modes:
        good = [x for x in runs[mode] if "error" not in x]
        if not good:
            rows.append(runs[mode][0])
            continue
        row = dict(good[0], seconds=min(x["seconds"] for x in good))
        row["round_ratios"] = [
            x["seconds"] / b["seconds"]
            for x, b in zip(runs[mode], runs["sdpa"], strict=True)
            if "error" not in x and "error" not in b
        ]
        rows.append(row)
    return rows


def same_share(a: str, b: str) -> float:
    import numpy as np

    x, y = np.load(a), np.load(b)
    layers = sorted(set(x.files) & set(y.files))
    if not layers:
        return float("nan")
    hits = sum(int((x[k] & y[k]).sum()) for k in layers)
    return hits / max(1, sum(int(y[k].sum()) for k in layers))


def reach(folder: Path, args, tmp: Path) -> list[dict]:
    """Each h2o at every ``--reach`` length, smallest first; printed as it goes."""
    lengths = sorted(int(x) for x in args.reach.split(","))
    rows = []
    print(f"reach: h2o prefill, ratio {args.ratio}, address space limited to {args.memory_limit_gib} GiB", flush=True)
    which = {"both": ("h2o", "kv_h2o"), "headmap": ("h2o",), "kvpress": ("kv_h2o",)}[args.reach_which]
    for kind, name in (("h2o", "headmap h2o (engine, sdpa model)"), ("kv_h2o", "kvpress ObservedAttentionPress")):
        if kind not in which:
            continue
        done: list[dict] = []
        for length in lengths:
            if kind == "kv_h2o" and length > args.reach_eager_max:
                why = f"not run (past --reach-eager-max {args.reach_eager_max})"
                row = {"mode": kind, "length": length, "error": why}
            elif done and "error" in done[-1]:
                row = {"mode": kind, "length": length, "error": f"not run ({done[-1]['error']})"}
            else:
                guess = _estimate(done, length)
                if guess is not None and guess > args.reach_budget_s:
                    row = {"mode": kind, "length": length, "error": f"not run (estimated {guess:.0f} s)"}
                else:
                    sub = argparse.Namespace(**{**vars(args), "length": length, "repeat": 1})
                    python = sys.executable if kind == "h2o" else str(KV_PYTHON)
                    row = measure(python, f"reach:{kind}", folder, sub, tmp)
                    row.setdefault("length", length)
                    if isinstance(row.get("error"), list):
                        row["error"] = row["error"][0]
                    if guess is not None:
                        row["estimate"] = guess
            rows.append({**row, "name": name})
            if "error" not in row:
                done.append(row)
            elif not row["error"].startswith("not run"):
                done.append(row)
            extra = f" (estimated {row['estimate']:.0f} s)" if "estimate" in row else ""
            if "error" in row:
                print(f"{name:<36}{length:>7}  {row['error']}", flush=True)
            else:
                print(
                    f"{name:<36}{length:>7}{row['seconds']:>9.1f} s{row['peak_bytes'] / 2**20:>9.0f} MiB peak"
                    f"{row['cache_bytes'] / 2**20:>9.0f} MiB cache{extra}",
                    flush=True,
                )
    return rows


def _estimate(done: list[dict], length: int) -> float | None:
    """Seconds at ``length`` from a T + b T^2 through the two largest completed runs, at least linear growth
    from the largest (None: fewer than two)."""
    ok = [r for r in done if "error" not in r]
    if len(ok) < 2 or length <= ok[-1]["length"]:
        return None
    (t1, s1), (t2, s2) = ((r["length"], r["seconds"]) for r in ok[-2:])
    b = (s2 / t2 - s1 / t1) / (t2 - t1)
    a = s1 / t1 - b * t1
    return max(a * length + b * length**2, s2 * length / t2)  # never below linear growth (noise can bend the fit)


def print_table(rows: list[dict], args) -> None:
    by_mode = {r["mode"]: r for r in rows}
    base = by_mode.get("sdpa", {})
    print(f"T = {args.length}, ratio = {args.ratio}, window = {args.window} (CPU, {os.cpu_count()} cores)")
    print(f"{'mode':<14}{'seconds':>9}{'x sdpa':>8}{'peak MiB':>10}{'x sdpa':>8}{'cache/full':>12}{'same':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['mode']:<14} failed: {r['error'][0]}")
            continue
        ref = by_mode.get("kv_sdpa", base) if r["mode"].startswith("kv_") else base
        full = ref.get("cache_bytes") or float("nan")
        same = ""
        if r["mode"] in SAME_AS and SAME_AS[r["mode"]] in by_mode and "kept_file" in by_mode[SAME_AS[r["mode"]]]:
            same = f"{same_share(by_mode[SAME_AS[r['mode']]]['kept_file'], r['kept_file']):.3f}"
        spread = r.get("round_ratios") or []
        spread = f"  per round {min(spread):.2f}-{max(spread):.2f} (n={len(spread)})" if len(spread) > 1 else ""
        print(
            f"{r['mode']:<14}{r['seconds']:>9.2f}{r['seconds'] / ref['seconds']:>8.2f}"
            f"{r['peak_bytes'] / 2**20:>10.0f}{r['peak_bytes'] / max(1, ref['peak_bytes']):>8.2f}"
            f"{r['cache_bytes'] / full:>12.3f}{same:>8}{spread}",
            flush=True,
        )


def print_decode(decode_rows: list[dict], args) -> None:
    full = next((r for r in decode_rows if r["mode"] == "decode:full" and "error" not in r), None)
    print(f"decoding after {args.decode_length} tokens, 25 % of the cache kept (median of {args.decode_steps} steps)")
    for r in decode_rows:
        if "error" in r or full is None:
            print(f"{r['mode']:<14} failed: {r.get('error', ['no full-cache row'])[0]}")
            continue
        print(
            f"{r['mode']:<14}{1000 * r['seconds']:>9.1f} ms/token{r['seconds'] / full['seconds']:>8.2f} x full"
            f"{r['cache_bytes'] / full['cache_bytes']:>12.3f} of the cache",
            flush=True,
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; the fastest is reported")
    parser.add_argument("--decode-length", type=int, default=0, help="also time decoding after this many tokens")
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--no-kvpress", action="store_true", help="headmap only")
    parser.add_argument("--no-table", action="store_true", help="skip the side-by-side table (decode/reach only)")
    parser.add_argument("--reach", default="", help="lengths for the longest-context h2o runs, e.g. 4096,8192")
    parser.add_argument("--reach-budget-s", type=float, default=1500.0, help="skip a reach run estimated longer")
    parser.add_argument("--reach-eager-max", type=int, default=16384, help="kvpress's largest reach length")
    parser.add_argument("--reach-which", choices=("both", "headmap", "kvpress"), default="both")
    parser.add_argument("--memory-limit-gib", type=float, default=16.0, help="address-space limit of each child")
    parser.add_argument(
        "--modes", default=",".join(HEADMAP_MODES),
        help="headmap's rows of the table, comma-separated (sdpa, the baseline, always runs first)",
    )  # fmt: skip
    parser.add_argument(
        "--rounds", type=int, default=1,
        help="measure headmap's modes this many times round-robin (fastest kept; per-round ratios printed)",
    )  # fmt: skip
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--kept", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = child(
            args.child, Path(args.folder), args.length, args.ratio, args.window, args.repeat, Path(args.kept)
        )
        print(TAG + json.dumps(result), flush=True)
        return 0
    if not args.no_kvpress:
        why = ensure_kvpress()
        if why is not None:
            print(f"kvpress 0.5.x cannot be installed offline here: {why}", file=sys.stderr)
            return 3
    unknown = sorted(set(m for m in args.modes.split(",") if m) - set(HEADMAP_MODES))
    if unknown:
        print(f"unknown --modes {', '.join(unknown)}; choose from {', '.join(HEADMAP_MODES)}", file=sys.stderr)
        return 2
    if args.reach and args.no_kvpress and args.reach_which != "headmap":
        print("--reach runs kvpress's h2o beside headmap's: drop --no-kvpress", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="headmap-compress-bench-") as tmp_name:
        tmp = Path(tmp_name)
        folder = tmp / "model"
        longest = max([args.length, args.decode_length, *(int(x) for x in args.reach.split(",") if x)])
        build(folder, longest)
        print(f"CPU, {os.cpu_count()} cores; load average at the start: {os.getloadavg()}", flush=True)
        if not args.no_table:
            modes = ["sdpa"] + [m for m in args.modes.split(",") if m and m != "sdpa"]
            rows = rounds(modes, folder, args, tmp)
            if not args.no_kvpress:
                rows += [measure(str(KV_PYTHON), mode, folder, args, tmp) for mode in KVPRESS_MODES]
            print_table(rows, args)
        if args.decode_length:
            dec = argparse.Namespace(**{**vars(args), "length": args.decode_length, "repeat": args.decode_steps})
            names = ("full", "full_engine", "knorm", "snapkv", "adakv")
            print_decode([measure(sys.executable, f"decode:{n}", folder, dec, tmp) for n in names], args)
        if args.reach:
            reach(folder, args, tmp)
        print(f"load average at the end: {os.getloadavg()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
