#!/usr/bin/env python
"""Peer agreement: headmap's prev_token / duplicate_token / induction against TransformerLens.

TransformerLens (TL) is not a dependency of headmap. Run with the project's venv, this script
creates (or reuses) ``.venv-tl/`` next to ``.venv/`` with torch, TransformerLens and headmap
(editable, pinned by constraints.txt), then runs itself again inside it:

    .venv/bin/python bench/peers.py              # 4 layers x 12 heads, d=768, 3 inputs of 202 tokens
    .venv/bin/python bench/peers.py --quick      # 2 layers x 4 heads, 2 inputs of 42 tokens (a few seconds)
    .venv/bin/python bench/peers.py --no-install # exit 3 instead of installing TL when it is missing

What it does, all in one process, offline (no hub):

1. builds a randomly initialised GPT-2 (GPT-2 small's width, fewer layers by default) from a
   seed with transformers, keeps it for headmap, and hands a deep copy to TL 4's
   ``TransformerBridge.boot_transformers("gpt2", hf_model=..., tokenizer=...)`` (TL 4 removed
   ``HookedTransformer``; the bridge is its replacement and recomputes attention itself from the
   split Q/K/V weights, so TL's patterns do not come from transformers' attention code). The
   tokenizer is a word-level one built here (token i is the word ``t{i}``, BOS is
   ``<|endoftext|>`` = vocab - 1), so that ``detect_head`` can take its usual string input;
2. checks that TL's logits equal the transformers model's on the inputs;
3. inputs: BOS + r + r + ``--extra`` fresh tokens, r = n distinct random tokens (so TL's
   token-identity patterns and headmap's positional definitions pick the same pairs);
4. headmap: ``headmap.scan`` with ``PrevTokenProbe``, ``DuplicateTokenProbe(n, offset=1)`` and
   ``InductionProbe(n, offset=1)``;
   TL: one ``run_with_cache`` per input, then ``detect_head(model, text, name, cache=cache)``
   for ``previous_token_head``, ``duplicate_token_head`` and ``induction_head``, with the four
   combinations of ``exclude_bos`` / ``exclude_current_token`` (both default to False);
5. converts TL's scores to headmap's definitions (below), averages over inputs (both weigh
   inputs equally) and prints max |TL - headmap| raw and after the conversion. Exit 1 when the
   converted disagreement exceeds ``--tol`` (1e-5) or the logits disagree.

The conversion (derived from ``transformer_lens/head_detector.py``). For one sequence and one
head, with A the [T, T] pattern, D TL's 0/1 detection pattern, K the kept entries (all; column
0 zeroed when ``exclude_bos``; the diagonal zeroed when ``exclude_current_token``), TL's "mul"
score is  S = sum(A K D) / sum(A K).  headmap's value is  h = sum(A R) / |R|,  with R the
(query, key) pairs of its definition: (i, i - 1) for i >= 1 (prev_token), (i, i - n) for
i in [o + n, o + 2n) (duplicate_token), (i, i - n + 1) for i in [o + n + 1, o + 2n) (induction).
On these inputs R is inside D, so

    h = ( S * sum(A K) + sum(A D (1 - K)) - sum(A (D - R)) ) / |R|

With the defaults (K = all, sum(A) = T since rows sum to 1): prev_token h = S T / (T - 1);
duplicate_token h = S T / n; induction h = (S T - A[o + n, o + 1]) / (n - 1), the subtracted
entry being the first token of the second copy, which TL counts and headmap does not. TL's
own patterns (from its cache) supply sum(A K) and the few entries, so the converted value is
TL's measurement restated in headmap's definition; the "factor" column uses only the closed
forms T / (T - 1), T / n and T / n (docs/methods/*.md), i.e. ignores that entry for induction.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TL_VENV = ROOT / ".venv-tl"
TL_VERSION = "4.3.0"  # the newest TransformerLens the package index offered when this was written
IN_TL_ENV = "HEADMAP_PEERS_IN_TL"
NO_TL_EXIT = 3  # TransformerLens missing and --no-install given
BOS_WORD = "<|endoftext|>"
DETECTORS = {  # headmap probe -> TL head name
    "prev_token": "previous_token_head",
    "duplicate_token": "duplicate_token_head",
    "induction": "induction_head",
}
VARIANTS = [(False, False), (True, False), (False, True), (True, True)]  # (exclude_bos, exclude_current_token)


# --------------------------------------------------------------------------------------------
# The TransformerLens venv (shared with bench/atlas.py)
# --------------------------------------------------------------------------------------------
def tl_venv_python(venv: Path = TL_VENV) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _pinned(name: str) -> str | None:
    """The version constraints.txt pins for ``name`` (None when unpinned)."""
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.lower().startswith(name.lower() + "=="):
            return line.split("==", 1)[1].strip()
    return None


def ensure_tl_venv(tl_version: str = TL_VERSION, venv: Path = TL_VENV, quiet: bool = False) -> Path:
    """Create or reuse ``venv`` with torch, TransformerLens ``tl_version`` and headmap; its python.

    Idempotent: a stamp records what was installed (TL version and a hash of pyproject.toml and
    constraints.txt); only a change reinstalls. The folder carries a ``.gitignore`` of ``*``.
    """
    py = tl_venv_python(venv)
    digest = hashlib.sha256(
        b"".join((ROOT / f).read_bytes() for f in ("pyproject.toml", "constraints.txt"))
    ).hexdigest()[:16]
    want = {"transformer-lens": tl_version, "headmap-files": digest}
    stamp = venv / ".headmap-tl-setup"
    try:
        if py.exists() and json.loads(stamp.read_text()) == want:
            return py
    except (OSError, ValueError):
        pass

    def say(msg: str) -> None:
        if not quiet:
            print(f"[peers] {msg}", file=sys.stderr, flush=True)

    def pip(*args: str) -> None:
        cmd = [str(py), "-m", "pip", "install", "-q", *args]
        say(" ".join(cmd[2:]))
        subprocess.run(cmd, check=True, cwd=ROOT)

    if not py.exists():
        base = getattr(sys, "_base_executable", None) or sys.executable
        say(f"creating {venv} (TransformerLens {tl_version}; a minute or two, once)")
        subprocess.run([base, "-m", "venv", str(venv)], check=True)
    (venv / ".gitignore").write_text("*\n")  # keep the venv out of git without touching the repo's .gitignore
    torch_pin = _pinned("torch")
    # CPU torch first, pinned like the project's own venv (an unpinned torch pulls CUDA wheels)
    pip(f"torch=={torch_pin}" if torch_pin else "torch")
    pip("-c", str(ROOT / "constraints.txt"), "-e", str(ROOT), f"transformer-lens=={tl_version}")
    stamp.write_text(json.dumps(want))
    return py


def reexec_in_tl_venv(argv: list[str], no_install: bool, tl_version: str) -> None:
    """Run this script again inside .venv-tl unless TransformerLens imports here already."""
    if importlib.util.find_spec("transformer_lens") is not None:
        return
    if os.environ.get(IN_TL_ENV):
        sys.exit(f"TransformerLens is not importable in {sys.executable} even after setting up {TL_VENV}")
    if no_install and not tl_venv_python().exists():
        print(f"TransformerLens is not installed and --no-install was given ({TL_VENV} missing)", file=sys.stderr)
        sys.exit(NO_TL_EXIT)
    py = tl_venv_python() if no_install else ensure_tl_venv(tl_version)
    env = dict(os.environ, **{IN_TL_ENV: "1"})
    sys.stdout.flush()
    os.execve(str(py), [str(py), os.path.abspath(__file__), *argv], env)


# --------------------------------------------------------------------------------------------
# Model, tokenizer and inputs (shared with bench/atlas.py)
# --------------------------------------------------------------------------------------------
def build_gpt2(
    layers: int,
    heads: int,
    d_model: int,
    vocab: int,
    n_positions: int,
    seed: int = 0,
    init_range: float = 0.02,
    attn: str = "sdpa",
):
    """A randomly initialised GPT2LMHeadModel (eval mode, float32); BOS = EOS = vocab - 1."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config

    config = GPT2Config(
        n_layer=layers,
        n_head=heads,
        n_embd=d_model,
        n_inner=4 * d_model,
        vocab_size=vocab,
        n_positions=n_positions,
        initializer_range=init_range,
        bos_token_id=vocab - 1,
        eos_token_id=vocab - 1,
        pad_token_id=vocab - 1,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)
    return model.eval()


def word_tokenizer(vocab: int, folder: str):
    """A word-level tokenizer: token i is the word ``t{i}``, BOS/EOS/PAD = ``<|endoftext|>`` = vocab - 1.

    Saved to ``folder`` and loaded back with AutoTokenizer, so that it has a ``name_or_path``
    (TransformerLens reloads tokenizers from it to make them prepend BOS).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    words = {f"t{i}": i for i in range(vocab - 1)}
    words[BOS_WORD] = vocab - 1
    backend = Tokenizer(models.WordLevel(words, unk_token=BOS_WORD))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS_WORD, eos_token=BOS_WORD, unk_token=BOS_WORD)
    tok.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def ids_to_text(ids: list[int], bos: int) -> str:
    """The string ``to_tokens`` turns back into ``ids`` (the leading BOS is added by the tokenizer)."""
    assert ids[0] == bos
    return " ".join(f"t{i}" for i in ids[1:])


def repeat_samples(count: int, n: int, extra: int, vocab: int, seed: int) -> list[list[int]]:
    """``count`` inputs BOS + r + r + ``extra`` tokens: r = n distinct random tokens, the extra ones
    distinct from r and from each other, none of them BOS (vocab - 1)."""
    import torch

    if n + extra > vocab - 1:
        raise SystemExit(f"n + extra = {n + extra} needs more than the {vocab - 1} ordinary tokens")
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        perm = torch.randperm(vocab - 1, generator=gen)[: n + extra].tolist()
        r, tail = perm[:n], perm[n:]
        out.append([vocab - 1, *r, *r, *tail])
    return out


def repeat_corpus(rows: list[list[int]], n: int, name: str = "peers"):
    from headmap.corpus import Corpus, Sample

    samples = [Sample(list(ids), {"repeat_length": n, "offset": 1}) for ids in rows]
    desc = {"name": name, "kind": "bench", "inputs": len(rows), "tokens": sum(map(len, rows)), "repeat_length": n}
    return Corpus(name, samples, desc)


def headmap_repeat_probes(n: int):
    from headmap.probes.duplicate_token import DuplicateTokenProbe
    from headmap.probes.induction import InductionProbe
    from headmap.probes.prev_token import PrevTokenProbe

    return [PrevTokenProbe(), DuplicateTokenProbe(repeat_length=n, offset=1), InductionProbe(repeat_length=n, offset=1)]


def boot_tl(hf_model, tokenizer):
    """TransformerLens 4's view of ``hf_model`` (modified in place: pass a copy)."""
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_transformers("gpt2", hf_model=hf_model, tokenizer=tokenizer, device="cpu")


def headmap_rows(name: str, T: int, n: int, offset: int = 1):
    """0/1 [T, T] matrix of the (query, key) pairs headmap's ``name`` averages over."""
    import torch

    R = torch.zeros(T, T, dtype=torch.float64)
    if name == "prev_token":
        q = torch.arange(1, T)
        R[q, q - 1] = 1
    elif name == "duplicate_token":
        q = torch.arange(offset + n, offset + 2 * n)
        R[q, q - n] = 1
    elif name == "induction":
        q = torch.arange(offset + n + 1, offset + 2 * n)
        R[q, q - n + 1] = 1
    else:
        raise ValueError(name)
    return R


def tl_to_headmap(S, patterns, D, R, exclude_bos: bool, exclude_current: bool):
    """TL's per-head score ``S`` [L, H] restated in headmap's definition (see the module docstring).

    ``patterns`` [L, H, T, T] (TL's cache), ``D`` TL's detection pattern, ``R`` headmap's pairs."""
    import torch

    A = patterns.double()
    D = D.double()
    T = A.shape[-1]
    keep = torch.ones(T, T, dtype=torch.float64)
    if exclude_bos:
        keep[:, 0] = 0
    if exclude_current:
        keep.fill_diagonal_(0)
    if not bool(((D * R) == R).all()):
        raise AssertionError("headmap's pairs are not all in TL's detection pattern: inputs are not BOS + r + r")
    total = (A * keep).sum((-1, -2))
    masked_back = (A * D * (1 - keep)).sum((-1, -2))
    surplus = (A * (D - R)).sum((-1, -2))
    return (S.double() * total + masked_back - surplus) / R.sum()


def factor(name: str, T: int, n: int) -> float:
    """The documented closed form: headmap ~= TL * factor (defaults, rows summing to 1)."""
    return {"prev_token": T / (T - 1), "duplicate_token": T / n, "induction": T / n}[name]


def tl_scores(bridge, text: str, ids: list[int], n: int, variants=VARIANTS) -> dict:
    """For one input: TL's raw scores and their conversions, per detector and variant ([L, H] float64)."""
    import torch
    from transformer_lens import head_detector

    tokens = bridge.to_tokens(text)
    if tokens[0].tolist() != ids:
        raise AssertionError("TransformerLens tokenised the input differently")
    with torch.no_grad():
        _, cache = bridge.run_with_cache(tokens, remove_batch_dim=True)
    L = bridge.cfg.n_layers
    patterns = torch.stack([cache["pattern", layer, "attn"] for layer in range(L)])  # [L, H, T, T]
    T = patterns.shape[-1]
    out = {}
    for name, head in DETECTORS.items():
        D = getattr(head_detector, f"get_{head}_detection_pattern")(tokens.cpu())
        R = headmap_rows(name, T, n)
        for eb, ec in variants:
            S = head_detector.detect_head(
                bridge, text, head, cache=cache, exclude_bos=eb, exclude_current_token=ec
            ).double()
            out[(name, eb, ec)] = {
                "raw": S,
                "factor": S * factor(name, T, n),
                "exact": tl_to_headmap(S, patterns, D, R, eb, ec),
            }
    row_sums = patterns.double().sum(-1)
    out["row_sum_dev"] = float((row_sums - 1).abs().max())
    del cache
    return out


# --------------------------------------------------------------------------------------------
# The comparison
# --------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    import transformer_lens
    import transformers
    from transformers.utils import logging as hf_logging

    import headmap

    hf_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    tl_version = getattr(transformer_lens, "__version__", None) or _dist_version("transformer-lens")
    T = 1 + 2 * args.n + args.extra
    print(
        f"peer agreement, headmap {headmap.__version__} vs TransformerLens {tl_version} "
        f"(torch {torch.__version__}, transformers {transformers.__version__}, python {sys.executable})"
    )
    print(
        f"model: random GPT-2, {args.layers} layers x {args.heads} heads, d={args.d_model}, vocab {args.vocab}, "
        f"initializer_range {args.init_range}, seed {args.seed}; inputs: {args.inputs} x (BOS + r + r + "
        f"{args.extra}), n = {args.n}, T = {T}"
    )
    t0 = time.perf_counter()
    model = build_gpt2(args.layers, args.heads, args.d_model, args.vocab, max(T + 1, 64), args.seed, args.init_range)
    tl_model = copy.deepcopy(model)  # the bridge rewires its model in place
    rows = repeat_samples(args.inputs, args.n, args.extra, args.vocab, args.seed + 1)

    # headmap
    probes = headmap_repeat_probes(args.n)
    corpus = repeat_corpus(rows, args.n)
    headmap.scan(model, None, probes=probes, corpus=corpus, max_length=T, batch_size=args.batch_size, progress=False)
    ours = {p.name: p.values().astype(np.float64) for p in probes}

    # TransformerLens
    with tempfile.TemporaryDirectory() as folder:
        tok = word_tokenizer(args.vocab, folder)
        bridge = boot_tl(tl_model, tok)
        texts = [ids_to_text(ids, args.vocab - 1) for ids in rows]
        logit_dev, logit_scale = 0.0, 0.0
        per_input = []
        for ids, text in zip(rows, texts, strict=True):
            with torch.no_grad():
                ref = model(torch.tensor([ids])).logits
                got = bridge(bridge.to_tokens(text))
            logit_dev = max(logit_dev, float((ref - got).abs().max()))
            logit_scale = max(logit_scale, float(ref.abs().max()))
            per_input.append(tl_scores(bridge, text, ids, args.n))
    row_dev = max(p.pop("row_sum_dev") for p in per_input)
    wall = time.perf_counter() - t0

    logits_ok = logit_dev <= args.logit_tol * max(1.0, logit_scale)
    print(
        f"logits: max |TL - transformers| = {logit_dev:.2e} (largest |logit| {logit_scale:.2f}; "
        f"tolerance {args.logit_tol:g} x max(1, that)) {'ok' if logits_ok else 'DISAGREE'}; "
        f"TL attention rows sum to 1 within {row_dev:.1e}"
    )
    print("TL defaults: exclude_bos=False, exclude_current_token=False, error_measure='mul'\n")
    head = ["probe", "TL detector", "exclude_bos", "exclude_current", "headmap range", "raw", "factor", "converted"]
    table, worst, results = [], 0.0, []
    for (name, head_name), (eb, ec) in ((d, v) for d in DETECTORS.items() for v in VARIANTS):
        if not args.all_variants and (eb or ec):
            continue
        h = ours[name]
        diffs = {}
        for kind in ("raw", "factor", "exact"):
            tl_mean = torch.stack([p[(name, eb, ec)][kind] for p in per_input]).mean(0).numpy()
            diffs[kind] = float(np.abs(tl_mean - h).max())
        default = not (eb or ec)
        worst = max(worst, diffs["exact"])
        results.append({"probe": name, "tl": head_name, "exclude_bos": eb, "exclude_current_token": ec, **diffs})
        table.append(
            [
                name,
                head_name,
                str(eb),
                str(ec),
                f"{h.min():.4f}..{h.max():.4f}",
                f"{diffs['raw']:.2e}",
                f"{diffs['factor']:.2e}" if default else "-",
                f"{diffs['exact']:.2e}",
            ]
        )
    widths = [max(len(head[i]), *(len(r[i]) for r in table)) for i in range(len(head))]
    print("max |TL - headmap| over layers x heads (TL averaged over inputs):")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in table:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
    ok = logits_ok and worst <= args.tol
    print(
        f"\nconverted agreement: worst {worst:.2e} (tolerance {args.tol:g}) -> {'PASS' if ok else 'FAIL'}; {wall:.1f} s"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "transformer_lens": tl_version,
                    "torch": torch.__version__,
                    "transformers": transformers.__version__,
                    "headmap": headmap.__version__,
                    "config": {k: v for k, v in vars(args).items() if k != "json"},
                    "T": T,
                    "logit_max_abs_diff": logit_dev,
                    "rows": results,
                    "worst_converted": worst,
                    "pass": ok,
                },
                indent=2,
            )
        )
    return 0 if ok else 1


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "?"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 layers x 4 heads, d=64, vocab 1000, 2 inputs, n=20")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--n", type=int, default=100, help="length of the repeated sequence r")
    p.add_argument("--extra", type=int, default=1, help="fresh tokens after the second copy")
    p.add_argument("--inputs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=2, help="headmap batch size (inputs have equal length)")
    p.add_argument(
        "--init-range",
        type=float,
        default=0.1,
        help="initializer_range of the random model (GPT-2's 0.02 gives nearly uniform attention; "
        "0.2 and up make float32 drift between the two implementations reach ~1e-6)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tol", type=float, default=1e-5, help="fail above this converted disagreement")
    p.add_argument("--logit-tol", type=float, default=1e-4, help="relative logit tolerance")
    p.add_argument(
        "--defaults-only",
        dest="all_variants",
        action="store_false",
        help="only TL's default exclude_bos=False, exclude_current_token=False",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--tl-version", default=TL_VERSION, help="TransformerLens version to install into .venv-tl")
    p.add_argument("--no-install", action="store_true", help=f"exit {NO_TL_EXIT} rather than install TL")
    p.add_argument("--json", metavar="PATH", help="write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.heads, args.d_model, args.vocab = 2, 4, 64, 1000
        args.n, args.inputs = min(args.n, 20), min(args.inputs, 2)
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    reexec_in_tl_venv(argv, args.no_install, args.tl_version)
    sys.exit(run(args))


if __name__ == "__main__":
    main()
