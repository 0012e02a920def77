"""Synthetic atlases for the report tests: the output contract's tables built directly, no model.

Token strings, the model name, the corpus file name and the model path carry markup and script
(``EVIL``): a report must show them as text and never run them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from headmap.atlas import FORMAT, HEADS_SCHEMA, MAPS_SCHEMA, TOKENS_SCHEMA, Atlas, empty_frame

EVIL = [
    "<script>alert(1)</script>",
    "<img src=x onerror=alert(1)>",
    "</script><script>window.__pwned=1</script>",
    '"><svg onload=alert(1)>',
    'it\'s "quoted"',
    "back\\slash\\",
    "&lt;b&gt;entity&amp;",
    "<!--",
    "\u2028line\u2029sep",
    "$x^2$",
    "<b>bold</b>",
]
EVIL_MODEL = 'evil/<script>alert("model")</script>&'
EVIL_FILE = "<img src=x onerror=alert(2)>.txt"

HEAD_PROBES = {"sink": None, "entropy": None, "prev_token": None, "waad": None, "induction": None}


def heads_frame(layers: int, heads: int, kv_heads: int, rng: np.random.Generator) -> pd.DataFrame:
    rows = []
    metrics = [(p, p) for p in HEAD_PROBES] + [("massive_values", "q_massive"), ("massive_values", "k_peak_ratio")]
    group = heads // kv_heads
    for probe, metric in metrics:
        values = rng.random((layers, heads))
        if metric == "waad":
            values *= 10
        elif metric in ("sink", "prev_token", "induction"):
            values *= 0.25  # below the category thresholds, except the planted heads
        for layer in range(layers):
            for head in range(heads):
                rows.append((probe, metric, layer, head, head // group, float(values[layer, head]), 0.01, 8))
    frame = pd.DataFrame(rows, columns=HEADS_SCHEMA.names)
    # a planted sink head and a previous-token head, so categories differ
    frame.loc[(frame.metric == "sink") & (frame.layer == 0) & (frame["head"] == 1), "value"] = 0.99
    frame.loc[(frame.metric == "prev_token") & (frame.layer == 1) & (frame["head"] == 0), "value"] = 0.95
    return frame


def tokens_frame(layers: int, samples: int, length: int, rng: np.random.Generator, evil: bool) -> pd.DataFrame:
    parts = []
    words = [f"Ġword{i}" for i in range(50)] + ["Ċ", "Ġthe", "Ġ(", "âĢĻ"]
    for s in range(samples):
        toks = [words[i] for i in rng.integers(0, len(words), size=length)]
        ids = rng.integers(0, 1000, size=length)
        if evil:
            for i, bad in enumerate(EVIL):
                if 1 + i < length:
                    toks[1 + i] = bad
        pos = np.arange(length)

        def add(metric, layer, positions, values, s=s, toks=toks, ids=ids):
            positions = np.asarray(positions, dtype=np.int64)
            parts.append(
                pd.DataFrame(
                    {
                        "sample": s,
                        "position": positions,
                        "token_id": ids[positions],
                        "token": [toks[p] for p in positions],
                        "metric": metric,
                        "layer": layer,
                        "value": np.asarray(values, dtype=np.float64),
                    }
                )
            )

        received = rng.random((layers, length)) * 0.05
        received[:, 0] = 0.8
        for layer in range(layers):
            add("received", layer, pos[:-1], received[layer, :-1])
        add("received", -1, pos[:-1], received[:, :-1].mean(0))
        add("fai", -1, pos[:-1], rng.random(length - 1) * 0.1)
        add("anchor", -1, [2, 3], [1.0, 1.0])
        add_layers = range(layers)
        for layer in add_layers:
            add("primary_sink", layer, [0], [0.8])
            add("sink_norm", layer, [0, 1], [50.0 + layer, 12.0])
            add("sink_norm_ratio", layer, [0, 1], [20.0, 1.5])
        for layer in range(1, layers, 2):
            add("secondary_sink", layer, [1], [0.3])  # the first evil token is a secondary sink
        add("hidden_sink", 0, [1], [0.25])
        add("sink_lifetime", -1, [0, 1], [float(layers), 1.0])
    frame = pd.concat(parts, ignore_index=True)
    return frame[TOKENS_SCHEMA.names]


def maps_frame(layers: int, heads: int, samples: int, length: int, bins: int) -> pd.DataFrame:
    """Causal maps: each row of cells spreads its mass evenly over the visible cells."""
    n = min(bins, length)
    grid = np.tril(np.ones((n, n)))
    grid = grid / grid.sum(axis=1, keepdims=True) * n / length  # mean probability per cell (roughly)
    cells = n * n
    count = samples * layers * heads * cells
    s, layer, head, r, c = np.meshgrid(
        np.arange(samples), np.arange(layers), np.arange(heads), np.arange(n), np.arange(n), indexing="ij"
    )
    value = np.broadcast_to(grid, (samples, layers, heads, n, n)).reshape(-1)
    frame = pd.DataFrame(
        {
            "sample": s.reshape(-1),
            "layer": layer.reshape(-1),
            "head": head.reshape(-1),
            "row_bin": r.reshape(-1),
            "col_bin": c.reshape(-1),
            "length": np.full(count, length, dtype=np.int64),
            "value": value,
        }
    )
    return frame[MAPS_SCHEMA.names]


def make_atlas(
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    samples: int = 3,
    length: int = 40,
    map_samples: int = 2,
    bins: int = 8,
    evil: bool = True,
    tokens: bool = True,
    seed: int = 0,
) -> Atlas:
    rng = np.random.default_rng(seed)
    meta = {
        "model": EVIL_MODEL if evil else "synthetic/model",
        "model_path": "/tmp/</script><script>alert(3)</script>" if evil else "/tmp/model",
        "model_source": "synthetic",
        "revision": None,
        "architecture": {
            "model_type": "llama",
            "class": "LlamaForCausalLM",
            "causal": True,
            "layers": layers,
            "heads": heads,
            "kv_heads": kv_heads,
            "max_positions": 4096,
        },
        "dtype": "float32",
        "device": "cpu",
        "corpus": {"name": EVIL_FILE if evil else "text", "inputs": samples, "tokens": samples * length},
        "probes": {**{p: {} for p in HEAD_PROBES}, "massive_values": {"lam": 5.0}, "attention_maps": {"bins": bins}},
        "probe_corpora": {},
        "skipped_probes": {"retrieval": "<script>alert(4)</script>"} if evil else {},
        "options": {"max_length": length, "batch_size": 4, "seed": 0, "limit": None},
        "versions": {"headmap": "0.1.0"},
        "wall_time_s": 12.5,
        "forward_time_s": 10.25,
        "memory": {"peak_rss_gib": 1.5},
        "created": "2026-01-01T00:00:00Z",
        "resumed_from": [],
        "format": FORMAT,
    }
    return Atlas(
        heads=heads_frame(layers, heads, kv_heads, rng),
        meta=meta,
        tokens=tokens_frame(layers, samples, length, rng, evil) if tokens else empty_frame(TOKENS_SCHEMA),
        maps=maps_frame(layers, heads, map_samples, length, bins) if map_samples else empty_frame(MAPS_SCHEMA),
    )
