"""Real-weight explain studies (docs/models/explain.md): the needle task's prompts through ``headmap explain``,
where attribution lands on the needle, and a summary of any ``headmap explain`` folder.

    python bench/explain_real.py needle --out DIR [--limit 15] [--length 128] [--steps 8] [--batch-size 5]
        builds ``needle:lengths=LENGTH`` prompts for SmolLM2 (offline, seed 0), runs
        ``headmap explain smollm2 --text P1 ... --text Pn --target next ...`` (the exact argv is written to
        DIR/command.json; the prompts hold newlines, so they go as --text, not as lines of a --corpus
        file), then measures, per method and input, where the attribution lands on the needle.
    python bench/explain_real.py summary DIR
        comprehensiveness, sufficiency, the sign test against random and the agreement with occlusion
        of a ``headmap explain`` folder, as markdown (mean ± standard error over inputs, n).

Needle measures (per input, then mean ± standard error over inputs): the share of the absolute
attribution that falls on the needle sentence's tokens (and that share divided by the sentence's
share of the tokens: 1 = no preference), the best rank of a needle-number token among the input's
tokens (the target row, the last token, left out: attention methods always credit it), and whether
the top-1 token lies in the needle sentence.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

METHODS = "rollout,attn_grad,saliency,integrated_gradients,last_layer_attention,occlusion"


def _mean_se(values) -> str:
    arr = np.asarray([v for v in values if v == v], dtype=np.float64)
    if arr.size == 0:
        return "n/a"
    se = arr.std(ddof=1) / math.sqrt(arr.size) if arr.size > 1 else float("nan")
    return f"{arr.mean():.3f} ± {se:.3f}"


def prompts(length: int, limit: int, echo: bool = False) -> tuple[list[dict], object]:
    from headmap.corpus import load_corpus
    from headmap.models import load_model

    loaded = load_model("smollm2", dtype="float32", device="cpu")
    tok = loaded.tokenizer
    spec = f"needle:lengths={length}" + (":echo=1" if echo else "")
    corpus = load_corpus(spec, tok, max_length=length, limit=limit, seed=0)
    out = []
    for s in corpus.samples:
        text = tok.decode(s.ids, skip_special_tokens=False)
        enc = tok(text, add_special_tokens=True, return_offsets_mapping=True)
        needle, answer = s.info["needle"], s.info["answer"]
        c0 = text.find(needle)
        v0 = c0 + needle.find(answer)
        spans = enc["offset_mapping"]
        sentence = [i for i, (a, b) in enumerate(spans) if b > a and a < c0 + len(needle) and b > c0]
        number = [i for i, (a, b) in enumerate(spans) if b > a and a < v0 + len(answer) and b > v0]
        out.append(
            {
                "text": text,
                "ids_equal": list(enc["input_ids"]) == list(s.ids),
                "tokens": len(enc["input_ids"]),
                "sentence": sentence,
                "number": number,
                "answer_first": int(s.info["answer_ids"][0]),
                "answer_ids": [int(t) for t in s.info["answer_ids"]],
                "depth": s.info["depth"],
                "needle_id": s.info["needle_id"],
            }
        )
    return out, loaded


def needle(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, _ = prompts(args.length, args.limit, args.echo)
    (out / "needle.json").write_text(json.dumps(rows, indent=1))
    argv = ["headmap", "explain", "smollm2"]
    for r in rows:
        argv += ["--text", r["text"]]
    argv += ["--target", args.target, "--methods", args.methods, "--steps", str(args.steps)]
    argv += ["--batch-size", str(args.batch_size), "--out", str(out / "explain"), "--overwrite", "--no-progress"]
    (out / "command.json").write_text(json.dumps(argv, indent=1))
    if not args.analyse_only:
        subprocess.run([sys.executable, "-m", "headmap", *argv[1:]], check=True, env=os.environ)
    analyse(out, rows, args.target)


def analyse(out: Path, rows: list[dict], target: str = "next") -> None:
    span = int(target.split(":")[1]) if target.startswith("span:") else 1
    frame = pd.read_parquet(out / "explain" / "attributions.parquet")
    lines = [f"inputs: {len(rows)}; prompt tokens: {sorted({r['tokens'] for r in rows})}"]
    lines.append(f"re-tokenised prompt equals the corpus ids: {sum(r['ids_equal'] for r in rows)}/{len(rows)}")
    meta = json.loads((out / "explain" / "explain.json").read_text())
    lines.append(f"explain wall time: {meta['wall_time_s']} s")
    # the token explained: the model's greedy next token; right when it is the answer's first token
    right = _greedy_right(out, rows, span)
    lines.append(f"the model's greedy {span} token(s) = the answer's first {span}: {sum(right)}/{len(rows)}")
    head = "| method | share on needle sentence | share / token share | best rank of a number token | top-1 in sentence"
    table = [head + " | n |"]
    table.append("| --- | --- | --- | --- | --- | --- |")
    per = []
    for method in frame.method.unique():
        share, ratio, rank, top = [], [], [], []
        for s, r in enumerate(rows):
            sub = frame[(frame["sample"] == s) & (frame.method == method)].sort_values("position")
            v = sub.value.to_numpy()[:-span]  # the target rows (the last, and the generated tokens) left out
            a = np.abs(v)
            sent = [i for i in r["sentence"] if i < v.size]
            share.append(a[sent].sum() / a.sum() if a.sum() > 0 else float("nan"))
            ratio.append(share[-1] / (len(sent) / v.size))
            order = np.argsort(-v, kind="stable")
            ranks = np.empty(v.size, dtype=int)
            ranks[order] = np.arange(1, v.size + 1)
            rank.append(min(ranks[i] for i in r["number"] if i < v.size))
            top.append(float(order[0] in sent))
            per.append(
                {
                    "method": method,
                    "sample": s,
                    "share": share[-1],
                    "rank": rank[-1],
                    "top1": top[-1],
                    "right": right[s],
                }
            )
        table.append(
            f"| {method} | {_mean_se(share)} | {_mean_se(ratio)} | {_mean_se(rank)} "
            f"(median {np.median(rank):.0f}) | {_mean_se(top)} | {len(rows)} |"
        )
    pd.DataFrame(per).to_csv(out / "needle_per_input.csv", index=False)
    text = "\n".join(lines + [""] + table) + "\n"
    (out / "needle.md").write_text(text)
    print(text)


def _greedy_right(out: Path, rows: list[dict], span: int = 1) -> list[bool]:
    """Whether the model's greedy first ``span`` tokens are the answer's first ``span`` tokens."""
    import torch

    from headmap.models import load_model

    loaded = load_model("smollm2", dtype="float32", device="cpu")
    right = []
    with torch.no_grad():
        for r in rows:
            ids = loaded.tokenizer(r["text"], add_special_tokens=True, return_tensors="pt")["input_ids"]
            got = []
            for _ in range(span):
                token = int(loaded.model(ids).logits[0, -1].argmax())
                got.append(token)
                ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
            right.append(got == r.get("answer_ids", [r["answer_first"]])[:span])
    return right


def summary(folder: str) -> str:
    faith = pd.read_parquet(Path(folder) / "faithfulness.parquet")
    meta = json.loads((Path(folder) / "explain.json").read_text())
    out = [
        f"{meta['model']}, target {meta['target']}, {meta['inputs']} inputs, {meta['tokens']} tokens in all,"
        f" {meta['wall_time_s']} s"
    ]
    if meta.get("integrated_gradients_gap"):
        gaps = np.asarray(meta["integrated_gradients_gap"])
        steps = meta["methods"].get("integrated_gradients", {}).get("steps")
        out.append(
            f"integrated gradients ({steps} steps) completeness gap: median {np.median(gaps):.3g}, max {gaps.max():.3g}"
        )
    out.append("")
    out.append("| method | comprehensiveness | sufficiency | sign test vs random, two-sided p | n |")
    out.append("| --- | --- | --- | --- | --- |")
    for method in faith.method.unique():
        rows = faith[(faith.method == method) & (faith.other.isin(["", "random"]))].set_index("metric")
        c, s = rows.loc["comprehensiveness"], rows.loc["sufficiency"]
        p = f"{rows.loc['p_above_random'].value:.3g}" if "p_above_random" in rows.index else ""
        out.append(f"| {method} | {c.value:.3f} ± {c.stderr:.3f} | {s.value:.3f} ± {s.stderr:.3f} | {p} | {int(c.n)} |")
    pairs = faith[faith.metric.isin(["spearman", "top5_overlap"])]
    if len(pairs):
        out.append("")
        out.append("| pair | Spearman | top-5 overlap | n |")
        out.append("| --- | --- | --- | --- |")
        for (a, b), g in pairs.groupby(["method", "other"], sort=False):
            g = g.set_index("metric")
            sp, tk = g.loc["spearman"], g.loc["top5_overlap"]
            cells = f"{sp.value:.3f} ± {sp.stderr:.3f} | {tk.value:.3f} ± {tk.stderr:.3f}"
            out.append(f"| {a} / {b} | {cells} | {int(sp.n)} |")
    text = "\n".join(out) + "\n"
    print(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    n = sub.add_parser("needle")
    n.add_argument("--out", required=True)
    n.add_argument("--limit", type=int, default=15)
    n.add_argument("--length", type=int, default=128)
    n.add_argument("--steps", type=int, default=8)
    n.add_argument("--batch-size", type=int, default=5)
    n.add_argument("--methods", default=METHODS)
    n.add_argument("--target", default="next", help="next, or span:K (the answer's first K tokens, with --echo)")
    n.add_argument("--echo", action="store_true", help="needle:echo=1: the prompt ends with the needle's own words")
    n.add_argument("--analyse-only", action="store_true")
    s = sub.add_parser("summary")
    s.add_argument("folder")
    args = parser.parse_args()
    if args.cmd == "needle":
        needle(args)
    else:
        summary(args.folder)


if __name__ == "__main__":
    main()
