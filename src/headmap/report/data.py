"""What the HTML report shows, as one JSON-ready dict built from an :class:`~headmap.atlas.Atlas`.

Every part is bounded so that the page stays small whatever the run (the limits are the
module constants below and are recorded in the page's settings):

- head metrics: one layer x head grid per metric, numbers rounded to 4 significant digits;
- attention maps: at most ``MAP_SAMPLES`` samples, at most ``MAP_BINS`` bins a side, and at most
  ``MAP_CELLS`` cells in all (fewer samples, then coarser bins, when a model has many heads), each
  cell one byte (square-root quantised against its map's maximum), base64 encoded;
- token strips: at most ``STRIP_SAMPLES`` samples of at most ``STRIP_TOKENS`` tokens, each token
  shown with at most ``TOKEN_CHARS`` characters;
- the sink chart: at most ``SINK_TOKENS`` tokens (longest lifetime first);
- tables of top heads: ``TOP_K`` heads per probe.
"""

from __future__ import annotations

import base64
import math
import re
import unicodedata
from typing import Any

import numpy as np
import pandas as pd

from ..atlas import Atlas, bin_sizes

MAP_SAMPLES = 2
MAP_BINS = 32
MAP_CELLS = 1 << 20
STRIP_SAMPLES = 4
STRIP_TOKENS = 512
TOKEN_CHARS = 48
SINK_TOKENS = 40
TOP_K = 10
DIGITS = 4

#: Head categories, in order of precedence: (name, metric, test, threshold, description).
CATEGORY_RULES: tuple[tuple[str, str, str, float, str], ...] = (
    ("retrieval", "retrieval", ">=", 0.3, "copies needle tokens while decoding"),
    ("induction", "induction", ">=", 0.3, "attends to the token after the previous occurrence"),
    ("duplicate-token", "duplicate_token", ">=", 0.3, "attends to the previous occurrence of its token"),
    ("previous-token", "prev_token", ">=", 0.4, "attends to the token just before"),
    ("sink", "sink", ">=", 0.3, "puts its mass on the first token (Gu et al.: eps = 0.3)"),
    ("local", "waad", "<=", 3.0, "attends within a few tokens (windowed distance)"),
    ("global", "entropy", ">=", 0.75, "spreads its attention broadly (normalised entropy)"),
)
OTHER = "mixed"

#: One line per known metric, for the heatmap titles and the head panel.
METRIC_HELP = {
    "sink": "attention mass on the first token",
    "entropy": "normalised entropy of each row (1 = uniform)",
    "mean_distance": "attention-weighted distance |i - j|",
    "waad": "windowed average attention distance (W = 10)",
    "prev_token": "attention to the previous token",
    "duplicate_token": "attention to the previous occurrence of the token (repeats)",
    "induction": "attention to the token after the previous occurrence (repeats)",
    "retrieval": "needle tokens copied while decoding",
    "span": "mass from the query span to the key span",
    "position_profile": "mass from the last token to the items",
    "q_massive": "massive query dimensions",
    "k_massive": "massive key dimensions",
    "q_peak_ratio": "largest query dimension / layer median",
    "k_peak_ratio": "largest key dimension / layer median",
}


def _round(x: Any, digits: int = DIGITS) -> float | None:
    """A float rounded to ``digits`` significant digits; None for NaN, inf or missing."""
    if x is None:
        return None
    x = float(x)
    if not math.isfinite(x):
        return None
    return float(f"{x:.{digits}g}")


def _rounded(values: np.ndarray, digits: int = DIGITS) -> list:
    return [_round(v, digits) for v in np.asarray(values, dtype=np.float64).reshape(-1)]


def _jsonable(value: Any) -> Any:
    """Meta values as plain JSON (non-finite floats as None, anything unknown as its string)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return _round(value, 12)
    return str(value)


def atlas_shape(atlas: Atlas) -> tuple[int, int, int | None]:
    arch = atlas.meta.get("architecture") or {}
    layers = arch.get("layers") or 0
    heads = arch.get("heads") or 0
    if len(atlas.heads):
        layers = max(int(layers), int(atlas.heads["layer"].max()) + 1)
        heads = max(int(heads), int(atlas.heads["head"].max()) + 1)
    return int(layers), int(heads), arch.get("kv_heads")


def _metric_list(atlas: Atlas) -> list[tuple[str, str]]:
    """(probe, metric) pairs of heads.parquet: probes in meta order, metrics in table order."""
    pairs = list(dict.fromkeys(zip(atlas.heads["probe"].astype(str), atlas.heads["metric"].astype(str), strict=True)))
    order = {name: i for i, name in enumerate(atlas.meta.get("probes") or {})}
    return sorted(pairs, key=lambda pm: (order.get(pm[0], len(order)), pm[0] != pm[1]))


def _grids(atlas: Atlas, layers: int, heads: int) -> list[dict[str, Any]]:
    out = []
    for probe, metric in _metric_list(atlas):
        rows = atlas.heads[(atlas.heads["probe"] == probe) & (atlas.heads["metric"] == metric)]
        value = np.full((layers, heads), np.nan)
        stderr = np.full((layers, heads), np.nan)
        count = np.zeros((layers, heads), dtype=np.int64)
        li, hi = rows["layer"].to_numpy(dtype=np.int64), rows["head"].to_numpy(dtype=np.int64)
        ok = (li >= 0) & (li < layers) & (hi >= 0) & (hi < heads)
        value[li[ok], hi[ok]] = rows["value"].to_numpy(dtype=np.float64)[ok]
        stderr[li[ok], hi[ok]] = rows["stderr"].to_numpy(dtype=np.float64)[ok]
        count[li[ok], hi[ok]] = rows["n"].to_numpy(dtype=np.int64)[ok]
        out.append(
            {
                "id": f"{probe}/{metric}",
                "probe": probe,
                "metric": metric,
                "help": METRIC_HELP.get(metric, METRIC_HELP.get(probe, "")),
                "value": _rounded(value),
                "stderr": _rounded(stderr, 2),
                "n": count.reshape(-1).tolist(),
            }
        )
    return out


def categories(atlas: Atlas) -> tuple[list[str], np.ndarray, dict[tuple[int, int], list[str]]]:
    """Head categories: (names, [layers, heads] index of each head's main category, every category of a head).

    A head gets every category whose rule holds (``CATEGORY_RULES``); its main category is the
    first of them, or ``mixed`` when none holds. Rules whose metric the run lacks are skipped.
    """
    layers, heads, _ = atlas_shape(atlas)
    names = [rule[0] for rule in CATEGORY_RULES] + [OTHER]
    main = np.full((layers, heads), len(names) - 1, dtype=np.int64)
    tags: dict[tuple[int, int], list[str]] = {}
    own = atlas.heads[atlas.heads["probe"].astype(str) == atlas.heads["metric"].astype(str)]
    for index in range(len(CATEGORY_RULES) - 1, -1, -1):  # last rule first: earlier rules overwrite
        name, metric, test, threshold, _ = CATEGORY_RULES[index]
        rows = own[own["metric"] == metric]
        for layer, head, value in zip(rows["layer"], rows["head"], rows["value"], strict=True):
            if not (0 <= layer < layers and 0 <= head < heads) or not math.isfinite(value):
                continue
            hit = value >= threshold if test == ">=" else value <= threshold
            if hit:
                main[layer, head] = index
                tags.setdefault((int(layer), int(head)), []).insert(0, name)
    return names, main, tags


def _categories(atlas: Atlas) -> dict[str, Any]:
    names, main, tags = categories(atlas)
    present = set(atlas.heads["metric"].astype(str))
    return {
        "names": names,
        "rules": [
            {"name": n, "metric": m, "test": t, "threshold": th, "help": h, "measured": m in present}
            for n, m, t, th, h in CATEGORY_RULES
        ],
        "main": main.reshape(-1).tolist(),
        "tags": {f"{layer},{head}": v for (layer, head), v in sorted(tags.items())},
    }


def _top(atlas: Atlas) -> list[dict[str, Any]]:
    out = []
    for probe in dict.fromkeys(p for p, _ in _metric_list(atlas)):
        rows = atlas.heads[atlas.heads["probe"] == probe]
        metric = probe if (rows["metric"] == probe).any() else str(rows["metric"].iloc[0])
        rows = rows[rows["metric"] == metric]
        rows = rows[np.isfinite(rows["value"].to_numpy(dtype=np.float64))]
        top = rows.sort_values("value", ascending=False, kind="stable").head(TOP_K)
        out.append(
            {
                "probe": probe,
                "metric": metric,
                "rows": [
                    [int(r.layer), int(r.head), int(r.kv_head), _round(r.value), _round(r.stderr, 2), int(r.n)]
                    for r in top.itertuples()
                ],
            }
        )
    return out


# -- attention maps ---------------------------------------------------------------------------


def _pool(grid: np.ndarray, length: int, factor: int) -> np.ndarray:
    """Coarser maps: groups of ``factor`` x ``factor`` cells, weighted by their pair counts."""
    n = grid.shape[-1]
    sizes = bin_sizes(length, n).astype(np.float64)
    groups = np.arange(n) // factor
    m = int(groups[-1]) + 1
    onehot = np.zeros((n, m))
    onehot[np.arange(n), groups] = 1.0
    weighted = grid * sizes[:, None] * sizes[None, :]  # [..., n, n] sums per cell
    sums = np.einsum("rm,...rc,cq->...mq", onehot, weighted, onehot)
    new_sizes = onehot.T @ sizes
    return sums / (new_sizes[:, None] * new_sizes[None, :])


def _bin_starts(length: int, n: int) -> list[int]:
    return np.concatenate([[0], np.cumsum(bin_sizes(length, n))[:-1]]).astype(int).tolist()


def _maps(atlas: Atlas, layers: int, heads: int, notes: list[str]) -> dict[str, Any] | None:
    maps = atlas.maps
    if maps is None or not len(maps):
        return None
    stored = sorted(int(s) for s in maps["sample"].unique())
    chosen = stored[:MAP_SAMPLES]
    lengths = {int(s): int(maps.loc[maps["sample"] == s, "length"].iloc[0]) for s in chosen}
    sides = {s: int(maps.loc[maps["sample"] == s, "row_bin"].max()) + 1 for s in chosen}

    def cells(samples: list[int], factor: dict[int, int]) -> int:
        return sum(layers * heads * (-(-sides[s] // factor[s])) ** 2 for s in samples)

    factor = {s: -(-sides[s] // MAP_BINS) for s in chosen}  # at most MAP_BINS a side
    while len(chosen) > 1 and cells(chosen, factor) > MAP_CELLS:
        chosen = chosen[:-1]
    while cells(chosen, factor) > MAP_CELLS and any(-(-sides[s] // factor[s]) > 2 for s in chosen):
        factor = {s: factor[s] * 2 for s in chosen}
    if len(chosen) < len(stored):
        notes.append(f"attention maps: {len(chosen)} of the {len(stored)} stored samples are shown")
    blobs, scale, samples = [], [], []
    offset = 0
    for s in chosen:
        part = maps[maps["sample"] == s]
        n = sides[s]
        grid = np.zeros((layers, heads, n, n))
        li, hi = part["layer"].to_numpy(np.int64), part["head"].to_numpy(np.int64)
        ri, ci = part["row_bin"].to_numpy(np.int64), part["col_bin"].to_numpy(np.int64)
        ok = (li < layers) & (hi < heads) & (ri < n) & (ci < n)
        grid[li[ok], hi[ok], ri[ok], ci[ok]] = part["value"].to_numpy(np.float64)[ok]
        if factor[s] > 1:
            grid = _pool(grid, lengths[s], factor[s])
            notes.append(f"attention maps of sample {s}: {n} bins a side pooled to {grid.shape[-1]}")
            n = grid.shape[-1]
        grid = np.where(np.isfinite(grid) & (grid > 0), grid, 0.0)
        peak = grid.max(axis=(2, 3))  # [layers, heads]
        with np.errstate(invalid="ignore", divide="ignore"):
            rel = np.where(peak[..., None, None] > 0, grid / np.where(peak > 0, peak, 1.0)[..., None, None], 0.0)
        quant = np.clip(np.rint(np.sqrt(rel) * 255.0), 0, 255).astype(np.uint8)
        blobs.append(quant.tobytes())
        scale.extend(_rounded(peak))
        starts = _bin_starts(lengths[s], n)
        samples.append({"sample": s, "length": lengths[s], "n": n, "offset": offset, "starts": starts})
        offset += quant.size
    return {
        "samples": samples,
        "scale": scale,
        "data": base64.b64encode(b"".join(blobs)).decode("ascii"),
        "encoding": "uint8 q per cell, value = scale * (q / 255)^2",
    }


# -- tokens -----------------------------------------------------------------------------------

_BYTE_DECODER: dict[str, int] | None = None
#: Byte-level BPE writes the bytes it does not keep as characters U+0100..U+0143 (space is U+0120, Ġ).
_SHIFTED = range(0x100, 0x144)
#: SentencePiece's byte-fallback pieces, one byte each.
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
#: What a token shows when it holds only the continuation bytes of a character an earlier token started.
CONTINUATION = "\u25cc"
#: Characters shown as they are although unicodedata calls them control characters.
_SHOWN = {"\n", "\t", " "}
_NAMED = {"\r": "\\r", "\x0b": "\\v", "\x0c": "\\f", "\x00": "\\0"}


def _byte_decoder() -> dict[str, int]:
    """Inverse of the byte-level BPE byte-to-character table (GPT-2 and its descendants)."""
    global _BYTE_DECODER
    if _BYTE_DECODER is None:
        keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
        chars, extra = list(keep), 0
        for b in range(256):
            if b not in keep:
                keep.append(b)
                chars.append(256 + extra)
                extra += 1
        _BYTE_DECODER = {chr(c): b for b, c in zip(keep, chars, strict=True)}
    return _BYTE_DECODER


def _visible(text: str) -> str:
    """Invisible characters (zero-width and other format characters, control characters) as ``\\uXXXX``."""
    out = []
    for ch in text:
        if ch in _NAMED:
            out.append(_NAMED[ch])
        elif ch not in _SHOWN and unicodedata.category(ch) in ("Cc", "Cf", "Co", "Cs", "Cn"):
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


def _utf8_chars(data: bytes) -> list[tuple[int, str]]:
    """(start offset, character) of each UTF-8 character in ``data``; a byte that starts none is ``\\xNN``."""
    out, i = [], 0
    while i < len(data):
        lead = data[i]
        size = 1 if lead < 0x80 else 2 if 0xC2 <= lead < 0xE0 else 3 if 0xE0 <= lead < 0xF0 else 4 if lead < 0xF5 else 0
        try:
            ch = data[i : i + size].decode("utf-8") if size and i + size <= len(data) else None
        except UnicodeDecodeError:
            ch = None
        if ch is None:
            out.append((i, f"\\x{lead:02x}"))
            i += 1
        else:
            out.append((i, ch))
            i += size
    return out


def _decode_bytes(pieces: list[bytes]) -> list[str]:
    """Text of each token from its bytes, decoded as one stream: a character split over several tokens
    (an emoji, most CJK characters, zero-width characters in byte-level BPE) is shown whole on the
    token where it starts; tokens that only continue it show :data:`CONTINUATION`."""
    ends = np.cumsum([len(p) for p in pieces])
    texts = [""] * len(pieces)
    for start, ch in _utf8_chars(b"".join(pieces)):
        texts[int(np.searchsorted(ends, start, side="right"))] += ch
    return [_visible(t) if t or not p else CONTINUATION for t, p in zip(texts, pieces, strict=True)]


def token_kind(tokens: list[str]) -> str:
    """How a tokenizer wrote these pieces: "wordpiece" (##), "sentencepiece" (▁), "bytelevel" (Ġ, Ċ) or "text"."""
    if any(t.startswith("##") for t in tokens):
        return "wordpiece"
    if any("\u2581" in t for t in tokens):
        return "sentencepiece"
    if any(ord(ch) in _SHIFTED for t in tokens for ch in t):
        return "bytelevel"
    return "text"


def token_texts(tokens: list[str], kind: str | None = None) -> list[str]:
    """Readable text of a sequence of tokenizer pieces (one input, in order), for display only.

    Byte-level BPE (Ġ, Ċ) and SentencePiece byte fallback (``<0xE2>``) pieces are turned back into bytes
    and decoded as one UTF-8 stream (see :func:`_decode_bytes`); ``▁`` is a space; WordPiece's ``##``
    joins a word. Zero-width and other invisible characters show as ``\\uXXXX``. ``kind``: see
    :func:`token_kind` (found from ``tokens`` when None). tokens.parquet keeps the pieces themselves.
    """
    tokens = ["" if t is None else str(t) for t in tokens]
    kind = kind or token_kind(tokens)
    if kind == "bytelevel":  # a piece with a character outside the byte table is shown as it is
        table = _byte_decoder()
        return _decode_bytes(
            [bytes(table[ch] for ch in t) if all(ch in table for ch in t) else t.encode("utf-8") for t in tokens]
        )
    if kind == "sentencepiece":
        pieces = []
        for t in tokens:
            byte = _BYTE_PIECE.fullmatch(t)
            pieces.append(bytes([int(byte.group(1), 16)]) if byte else t.replace("\u2581", " ").encode("utf-8"))
        return _decode_bytes(pieces)
    if kind == "wordpiece":
        return [_visible(t[2:] if t.startswith("##") else (t if t.startswith("[") else " " + t)) for t in tokens]
    return [_visible(t) for t in tokens]


def _short(text: str) -> str:
    return text if len(text) <= TOKEN_CHARS else text[: TOKEN_CHARS - 1] + "…"


def _token_views(atlas: Atlas) -> tuple[dict[int, pd.DataFrame], dict[tuple[int, int], str]]:
    """Per sample, its tokens (position, token_id, token) and the readable text of each (sample, position)."""
    tokens = atlas.tokens
    if tokens is None or not len(tokens):
        return {}, {}
    firsts = tokens.drop_duplicates(["sample", "position"])[["sample", "position", "token_id", "token"]]
    per_sample = {int(s): g.sort_values("position") for s, g in firsts.groupby("sample", sort=True)}
    kind = token_kind(firsts["token"].astype(str).tolist())  # one tokenizer wrote every sample
    texts: dict[tuple[int, int], str] = {}
    for s, g in per_sample.items():
        for pos, text in zip(g["position"], token_texts(g["token"].tolist(), kind), strict=True):
            texts[(s, int(pos))] = text
    return per_sample, texts


def _per_token(tokens: pd.DataFrame, sample: int, metric: str, layer: int | None) -> dict[int, float]:
    rows = tokens[(tokens["sample"] == sample) & (tokens["metric"] == metric)]
    if layer is not None:
        rows = rows[rows["layer"] == layer]
    return dict(zip(rows["position"].astype(int), rows["value"].astype(float), strict=True))


def _strips(atlas: Atlas, per_sample, texts, notes: list[str]) -> list[dict[str, Any]]:
    tokens = atlas.tokens
    out = []
    samples = sorted(per_sample)
    if len(samples) > STRIP_SAMPLES:
        notes.append(f"token strips: {STRIP_SAMPLES} of {len(samples)} samples are shown")
    by_metric = {m: g for m, g in tokens.groupby("metric", sort=False)}
    empty = tokens.iloc[:0]
    for s in samples[:STRIP_SAMPLES]:
        g = per_sample[s]
        shown = g.head(STRIP_TOKENS)
        if len(shown) < len(g):
            notes.append(f"token strip of sample {s}: the first {STRIP_TOKENS} of {len(g)} tokens are shown")
        pos = shown["position"].astype(int).tolist()
        fai = _per_token(by_metric.get("fai", empty), s, "fai", -1)
        received = _per_token(by_metric.get("received", empty), s, "received", -1)
        anchors = _per_token(by_metric.get("anchor", empty), s, "anchor", None)
        sink_layers: dict[int, int] = {}
        hidden_layers: dict[int, int] = {}
        sources = (("primary_sink", sink_layers), ("secondary_sink", sink_layers), ("hidden_sink", hidden_layers))
        for metric, counter in sources:
            rows = by_metric.get(metric, empty)
            rows = rows[rows["sample"] == s]
            for p, c in rows.groupby("position").size().items():
                counter[int(p)] = counter.get(int(p), 0) + int(c)
        out.append(
            {
                "sample": s,
                "total": int(len(g)),
                "text": [_short(texts[(s, p)]) for p in pos],
                "fai": [_round(fai.get(p)) for p in pos],
                "received": [_round(received.get(p)) for p in pos],
                "sink_layers": [sink_layers.get(p, 0) for p in pos],
                "hidden_layers": [hidden_layers.get(p, 0) for p in pos],
                "anchor": [1 if anchors.get(p) else 0 for p in pos],
            }
        )
    return out


def _sinks(atlas: Atlas, texts, notes: list[str]) -> dict[str, Any] | None:
    tokens = atlas.tokens
    if tokens is None or not len(tokens):
        return None
    kinds = ("primary_sink", "secondary_sink", "hidden_sink")
    rows = tokens[tokens["metric"].isin(kinds)]
    if not len(rows):
        return None
    lifetime = {
        (int(s), int(p)): float(v)
        for s, p, v in tokens.loc[tokens["metric"] == "sink_lifetime", ["sample", "position", "value"]].itertuples(
            index=False
        )
    }
    counts = rows.groupby(["sample", "position"]).size()
    order = sorted((-lifetime.get((int(s), int(p)), 0.0), -int(c), int(s), int(p)) for (s, p), c in counts.items())
    if len(order) > SINK_TOKENS:
        notes.append(f"sink chart: {SINK_TOKENS} of {len(order)} sink tokens are shown (longest lifetime first)")
    chosen = [(s, p) for _, _, s, p in order[:SINK_TOKENS]]
    wanted = pd.MultiIndex.from_tuples(chosen, names=["sample", "position"])

    def pick(frame: pd.DataFrame) -> dict[tuple[int, int], pd.DataFrame]:
        keep = pd.MultiIndex.from_arrays([frame["sample"], frame["position"]]).isin(wanted)
        return {(int(s), int(p)): g for (s, p), g in frame[keep].groupby(["sample", "position"], sort=False)}

    marks = pick(rows)
    ratios = pick(tokens[tokens["metric"] == "sink_norm_ratio"])
    norms = pick(tokens[tokens["metric"] == "sink_norm"])
    empty = tokens.iloc[:0]
    out = []
    for s, p in chosen:
        mine = marks.get((s, p), empty)
        ratio = ratios.get((s, p), empty)
        ratio_at = dict(zip(ratio["layer"].astype(int), ratio["value"].astype(float), strict=True))
        norm = norms.get((s, p), empty)["value"]
        entry = {
            "sample": s,
            "position": p,
            "text": _short(texts.get((s, p), "")),
            "lifetime": _round(lifetime.get((s, p), 0.0)),
            "max_norm": _round(norm.max()) if len(norm) else None,
            "max_norm_ratio": _round(max(ratio_at.values())) if ratio_at else None,
        }
        for kind in kinds:
            k = mine[mine["metric"] == kind].sort_values("layer")
            layers_k = k["layer"].astype(int).tolist()
            entry[kind] = {
                "layers": layers_k,
                "received": _rounded(k["value"].to_numpy()),
                "norm_ratio": [_round(ratio_at.get(layer)) for layer in layers_k],
            }
        out.append(entry)
    return {"tokens": out}


# -- the whole page ---------------------------------------------------------------------------


def _card(atlas: Atlas, layers: int, heads: int, kv_heads: Any) -> list[list[str]]:
    meta = atlas.meta
    arch = meta.get("architecture") or {}
    corpus = meta.get("corpus") or {}
    memory = meta.get("memory") or {}
    versions = meta.get("versions") or {}

    def fmt(x: Any, unit: str = "") -> str:
        if x is None:
            return "-"
        if isinstance(x, float):
            return f"{x:,.2f}{unit}"
        return f"{x}{unit}"

    rows = [
        ["model", fmt(meta.get("model"))],
        ["source", fmt(meta.get("model_source") or meta.get("model_path"))],
        ["architecture", f"{fmt(arch.get('model_type'))} ({fmt(arch.get('class'))})"],
        ["layers x heads", f"{layers} x {heads}" + (f" ({kv_heads} kv heads)" if kv_heads else "")],
        ["dtype / device", f"{fmt(meta.get('dtype'))} / {fmt(meta.get('device'))}"],
        ["corpus", fmt(corpus.get("name"))],
        ["inputs / tokens", f"{fmt(corpus.get('inputs'))} / {fmt(corpus.get('tokens'))}"],
        ["wall time", fmt(meta.get("wall_time_s"), " s")],
        ["forward time", fmt(meta.get("forward_time_s"), " s")],
        ["peak memory", fmt(memory.get("peak_rss_gib"), " GiB RSS")],
        ["created", fmt(meta.get("created"))],
        ["headmap", fmt(versions.get("headmap"))],
    ]
    if meta.get("resumed_from"):
        rows.append(["resumed at input", ", ".join(str(x) for x in meta["resumed_from"])])
    return rows


def report_data(atlas: Atlas) -> dict[str, Any]:
    """The JSON-ready content of the report (see the module docstring for its bounds)."""
    layers, heads, kv_heads = atlas_shape(atlas)
    notes: list[str] = []
    per_sample, texts = _token_views(atlas)
    meta = atlas.meta
    settings = {
        "probes": meta.get("probes"),
        "probe_corpora": meta.get("probe_corpora"),
        "skipped_probes": meta.get("skipped_probes"),
        "options": meta.get("options"),
        "corpus": meta.get("corpus"),
        "model_path": meta.get("model_path"),
        "revision": meta.get("revision"),
        "versions": meta.get("versions"),
        "memory": meta.get("memory"),
        "report_limits": {
            "map_samples": MAP_SAMPLES,
            "map_bins": MAP_BINS,
            "map_cells": MAP_CELLS,
            "strip_samples": STRIP_SAMPLES,
            "strip_tokens": STRIP_TOKENS,
            "token_chars": TOKEN_CHARS,
            "sink_tokens": SINK_TOKENS,
            "top_k": TOP_K,
            "digits": DIGITS,
        },
    }
    data = {
        "title": str(meta.get("model") or "headmap run"),
        "layers": layers,
        "heads": heads,
        "kv_heads": kv_heads,
        "card": _card(atlas, layers, heads, kv_heads),
        "metrics": _grids(atlas, layers, heads),
        "categories": _categories(atlas),
        "top": _top(atlas),
        "maps": _maps(atlas, layers, heads, notes),
        "strips": _strips(atlas, per_sample, texts, notes) if per_sample else [],
        "sinks": _sinks(atlas, texts, notes),
    }
    settings["report_notes"] = notes
    data["settings"] = _jsonable(settings)
    data["notes"] = notes
    return data
