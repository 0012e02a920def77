"""Presses side by side: headmap's against a plain sdpa prefill and against kvpress, in one run.

    python bench/compress.py                    # 4K tokens, ratio 0.5, installs kvpress in .venv-kvpress/
    python bench/compress.py --length 512 --no-kvpress
    python bench/compress.py --no-kvpress --decode-length 8192   # also decoding with 25 % of the cache kept

The model is random, GPT-2-small shaped (12 layers, 12 heads of 64, d_model 768, vocab 50257) but
built as a Llama (RoPE, no biases), because kvpress hooks only Llama-family attention modules; the
weights are saved once and every measurement loads them in a fresh process, so that peak memory
(peak RSS above the RSS after loading, Linux) is that of the prefill alone. kvpress 0.5.x is
installed by this script in its own venv (.venv-kvpress/, ignored by git) with the transformers
version it supports (< 5.3), torch 2.13.0 CPU from the local wheel folder, and ``--no-deps`` for
kvpress itself (its metadata also pulls peft and accelerate, which the presses do not import).
Exit code 3: kvpress could not be installed offline (the reason is printed).

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

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    attn = "eager" if mode == "kv_h2o" else "sdpa"
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation=attn, dtype=torch.float32).eval()
    ids = torch.randint(1, 50257, (1, length), generator=torch.Generator().manual_seed(1))
    kept: dict[int, np.ndarray] = {}
    if mode.startswith("decode:"):
        return _decode(model, mode.split(":", 1)[1], ids, repeat, window)
    with torch.no_grad():
        model(ids[:, :64])  # warm-up
        times = []
        for attempt in range(repeat):  # the fastest of `repeat` runs: the machine is shared
            if attempt == 0:
                reset_peak()
                base = rss()
            start = time.perf_counter()
            if mode in ("sdpa", "kv_sdpa"):
                cache = model(ids, use_cache=True).past_key_values
                nbytes = sum(layer.keys.numel() * 4 * 2 for layer in cache.layers)
            elif mode.startswith("kv_"):
                cache, kept = _kvpress(model, mode, ids, ratio, window)
                nbytes = sum(layer.keys.numel() * 4 * 2 for layer in cache.layers)
            else:
                cache, nbytes, kept = _headmap(model, mode, ids, ratio, window)
            times.append(time.perf_counter() - start)
            if attempt == 0:
                peak = peak_rss() - base  # the first run's peak (later ones reuse freed memory)
            del cache
    seconds = min(times)
    np.savez(out, **{str(k): v for k, v in kept.items()})
    return {"mode": mode, "seconds": seconds, "peak_bytes": peak, "cache_bytes": nbytes}


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
        press = make_press("knorm", ratio=0.0)
    else:
        press = make_press(name, ratio=0.75, **({"window": window} if name in ("snapkv", "pyramidkv") else {}))
    times = []
    with compress(model, press) as run, torch.no_grad():
        out = model(ids, use_cache=True, logits_to_keep=1)
        nbytes = run.cache_bytes() if name != "full" else run.full_bytes
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


def measure(python: str, mode: str, folder: Path, args, tmp: Path) -> dict:
    out = tmp / f"{mode}.npz"
    cmd = [python, __file__, "--child", mode, "--folder", str(folder), "--length", str(args.length), "--ratio",
           str(args.ratio), "--window", str(args.window), "--repeat", str(args.repeat), "--kept", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    line = next((x for x in done.stdout.splitlines() if x.startswith(TAG)), None)
    if line is None:
        return {"mode": mode, "error": (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]}
    result = json.loads(line[len(TAG) :])
    result["kept_file"] = str(out)
    return result


def same_share(a: str, b: str) -> float:
    import numpy as np

    x, y = np.load(a), np.load(b)
    layers = sorted(set(x.files) & set(y.files))
    if not layers:
        return float("nan")
    hits = sum(int((x[k] & y[k]).sum()) for k in layers)
    return hits / max(1, sum(int(y[k].sum()) for k in layers))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; the fastest is reported")
    parser.add_argument("--decode-length", type=int, default=0, help="also time decoding after this many tokens")
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--no-kvpress", action="store_true", help="headmap only")
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
    with tempfile.TemporaryDirectory(prefix="headmap-compress-bench-") as tmp_name:
        tmp = Path(tmp_name)
        folder = tmp / "model"
        build(folder, args.length)
        rows = [measure(sys.executable, mode, folder, args, tmp) for mode in HEADMAP_MODES]
        if not args.no_kvpress:
            rows += [measure(str(KV_PYTHON), mode, folder, args, tmp) for mode in KVPRESS_MODES]
        decode_rows = []
        if args.decode_length:
            dec = argparse.Namespace(**{**vars(args), "length": args.decode_length, "repeat": args.decode_steps})
            decode_rows = [
                measure(sys.executable, f"decode:{n}", folder, dec, tmp) for n in ("full", "knorm", "snapkv")
            ]
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
            print(
                f"{r['mode']:<14}{r['seconds']:>9.2f}{r['seconds'] / ref['seconds']:>8.2f}"
                f"{r['peak_bytes'] / 2**20:>10.0f}{r['peak_bytes'] / max(1, ref['peak_bytes']):>8.2f}"
                f"{r['cache_bytes'] / full:>12.3f}{same:>8}"
            )
        if decode_rows:
            full = next((r for r in decode_rows if r["mode"] == "decode:full" and "error" not in r), None)
            print(
                f"decoding after {args.decode_length} tokens, 25 % of the cache kept "
                f"(median of {args.decode_steps} steps)"
            )
            for r in decode_rows:
                if "error" in r or full is None:
                    print(f"{r['mode']:<14} failed: {r.get('error', ['no full-cache row'])[0]}")
                    continue
                print(
                    f"{r['mode']:<14}{1000 * r['seconds']:>9.1f} ms/token{r['seconds'] / full['seconds']:>8.2f} x full"
                    f"{r['cache_bytes'] / full['cache_bytes']:>12.3f} of the cache"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
