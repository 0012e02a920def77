"""Print the findings of a headmap run folder as markdown sections.

    python docs/models/summarize.py runs/smollm2

Reads heads.parquet, tokens.parquet and meta.json through ``headmap.Atlas.load`` and prints the
tables quoted in docs/models/*.md. Head tables give ``layer``/``head`` (and ``kv_head`` under GQA);
token tables give the input (``sample``) and the position inside it.
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd

import headmap
from headmap.probes import sink_rate

SINK_EPS = 0.3  # Gu et al.'s threshold for a sink head
TOP = 8  # heads per "top heads" table
NEAR_END = 32  # causal inputs: a token with fewer later queries than this is "near the end"
CONTEXT = 6  # tokens of context on each side of an anchor


# -- formatting ------------------------------------------------------------------------------------


def fmt(value, digits=3) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{value:.{digits}f}"
    return str(value)


def table(df: pd.DataFrame, digits=3) -> str:
    """A markdown table (no tabulate needed); every cell is already text or a number."""
    cols = [str(c) for c in df.columns]
    align = [" ---: " if pd.api.types.is_numeric_dtype(df[c]) else " --- " for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(align) + "|"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(fmt(v, digits) for v in row) + " |")
    return "\n".join(lines)


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: byte-level BPE token strings back to bytes."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


BYTES = _byte_decoder()


def detok(tokens: list[str], wordpiece: bool) -> str:
    """Token strings to text: WordPiece joins ``##`` pieces, byte-level BPE maps its characters back to bytes."""
    if wordpiece:
        out = ""
        for tok in tokens:
            out += tok[2:] if tok.startswith("##") else (" " + tok if out else tok)
        return out
    raw = bytes(BYTES.get(ch, ord("?")) for tok in tokens for ch in tok if ch in BYTES)
    return raw.decode("utf-8", errors="replace")


def md(text: str) -> str:
    """Text safe inside a markdown table cell."""
    for ch in "\\`*_|<>[]":
        text = text.replace(ch, "\\" + ch)
    return text.replace("\n", "⏎")


def show(token: str, wordpiece: bool) -> str:
    """One token, readable: a leading space shows as ␣."""
    text = detok([token], wordpiece)
    return md(text.replace(" ", "␣"))


# -- sections --------------------------------------------------------------------------------------


def run_facts(atlas: headmap.Atlas) -> str:
    m = atlas.meta
    arch = m["architecture"]
    kv = f" ({arch['kv_heads']} kv heads)" if arch["kv_heads"] != arch["heads"] else ""
    lines = [
        "## Run",
        "",
        f"- model: {m['model']}",
        f"- architecture: `{arch['model_type']}` ({arch['class']}, {'causal' if arch['causal'] else 'encoder'}), "
        f"{arch['layers']} layers x {arch['heads']} heads{kv}, max positions {arch['max_positions']}",
        f"- dtype {m['dtype']}, device {m['device']}, seed {m['options']['seed']}, "
        f"max length {m['options']['max_length']}, batch size {m['options']['batch_size']}",
        f"- inputs: {m['corpus']['inputs']}, tokens: {m['corpus']['tokens']}",
        f"- wall time {m['wall_time_s']:.1f} s (forward {m['forward_time_s']:.1f} s), "
        f"peak RSS {m['memory']['peak_rss_gib']:.2f} GiB",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
        f"- skipped probes: {m['skipped_probes'] or 'none'}",
        "",
    ]
    groups = m["corpus"].get("groups") or [dict(m["corpus"], probes=list(m["probe_corpora"]))]
    rows = [
        {
            "corpus": g["name"],
            "probes": ", ".join(g["probes"]),
            "options": ", ".join(f"{k}={v}" for k, v in g.get("options", {}).items()) or "-",
            "inputs": g["inputs"],
            "tokens": g["tokens"],
        }
        for g in groups
    ]
    lines.append(table(pd.DataFrame(rows)))
    params = {p: v for p, v in m["probes"].items() if v}
    if params:
        lines += ["", "Probe parameters: " + "; ".join(f"`{p}` {v}" for p, v in params.items())]
    return "\n".join(lines)


def metric(atlas: headmap.Atlas, probe: str, name: str | None = None) -> pd.DataFrame:
    h = atlas.heads
    return h[(h.probe == probe) & (h.metric == (name or probe))]


def has(atlas: headmap.Atlas, probe: str) -> bool:
    return bool((atlas.heads.probe == probe).any())


def absent(atlas: headmap.Atlas, probe: str) -> str:
    why = atlas.meta.get("skipped_probes", {}).get(probe)
    if why:
        return f"`{probe}` was skipped: {why}."
    if not atlas.meta["architecture"]["causal"] and probe in ("induction", "retrieval", "fai", "position_profile"):
        return f"`{probe}` is causal-only and not in an encoder's default set."
    return f"`{probe}` is not in this run."


def top_heads(atlas: headmap.Atlas, probe: str, k=TOP, ascending=False, metric_name=None, extra=()) -> pd.DataFrame:
    """The k highest (or lowest) heads of one metric, with other probes' values of the same heads beside them."""
    rows = metric(atlas, probe, metric_name).sort_values("value", ascending=ascending, kind="stable").head(k)
    out = rows[["layer", "head"]].copy()
    if atlas.meta["architecture"]["kv_heads"] != atlas.meta["architecture"]["heads"]:
        out["kv_head"] = rows["kv_head"]
    out[metric_name or probe] = rows["value"]
    out["stderr"] = rows["stderr"]
    out["n"] = rows["n"]
    for other in extra:
        if has(atlas, other):
            vals = metric(atlas, other).set_index(["layer", "head"])["value"]
            out[other] = [vals.get((lay, hd), np.nan) for lay, hd in zip(rows["layer"], rows["head"], strict=True)]
    return out.reset_index(drop=True)


def sink_section(atlas: headmap.Atlas) -> str:
    if not has(atlas, "sink"):
        return "## Sink heads\n\n" + absent(atlas, "sink")
    s = metric(atlas, "sink")
    per = s.groupby("layer")["value"]
    layers = pd.DataFrame(
        {
            "layer": per.mean().index,
            "mean sink": per.mean().values,
            "max sink": per.max().values,
            f"heads > {SINK_EPS}": per.apply(lambda v: int((v > SINK_EPS).sum())).values,
        }
    )
    rate = sink_rate(list(s["value"]), eps=SINK_EPS)
    return "\n".join(
        [
            "## Sink heads (`sink`: mass on the first token)",
            "",
            f"Sink rate (fraction of heads with sink > {SINK_EPS}): **{rate:.3f}** "
            f"({int((s.value > SINK_EPS).sum())} of {len(s)} heads). Mean over all heads: {s.value.mean():.3f}.",
            "",
            table(layers),
            "",
            "Top sink heads:",
            "",
            table(top_heads(atlas, "sink", extra=("mean_distance", "entropy"))),
        ]
    )


def input_lengths(atlas: headmap.Atlas) -> pd.Series:
    """T per input of the corpus the token probes read (the last causal token has no `received` row)."""
    t = atlas.tokens
    rec = t[(t.metric == "received") & (t.layer == -1)]
    causal = atlas.meta["architecture"]["causal"]
    return rec.groupby("sample")["position"].max() + (2 if causal else 1)


def sinks_section(atlas: headmap.Atlas, wordpiece: bool) -> str:
    t = atlas.tokens
    if not (t.metric == "sink_lifetime").any() and not (t.metric == "sink_norm").any():
        return "## Primary, secondary and hidden sinks\n\n" + absent(atlas, "sinks")
    causal = atlas.meta["architecture"]["causal"]
    lengths = input_lengths(atlas)
    n_inputs = len(lengths)
    t = t.assign(later=lengths.reindex(t["sample"]).values - 1 - t["position"])
    params = atlas.meta["probes"].get("sinks", {})
    layers = range(atlas.meta["architecture"]["layers"])
    prim = t[t.metric == "primary_sink"]
    sec = t[t.metric == "secondary_sink"]
    hid = t[t.metric == "hidden_sink"]
    rec0 = t[(t.metric == "received") & (t.position == 0) & (t.layer >= 0)].groupby("layer")["value"].mean()
    ratio = t[t.metric == "sink_norm_ratio"]
    ratio0 = ratio[ratio.position == 0].groupby("layer")["value"].median()
    rows = []
    for lay in layers:
        row = {
            "layer": lay,
            "primary (inputs)": int((prim.layer == lay).sum()),
            "received[0]": rec0.get(lay, np.nan),
            "norm ratio [0]": ratio0.get(lay, np.nan),
            "secondary": int((sec.layer == lay).sum()),
            "hidden": int((hid.layer == lay).sum()),
        }
        if causal:
            row["secondary, not near end"] = int(((sec.layer == lay) & (sec.later >= NEAR_END)).sum())
            row["hidden, not near end"] = int(((hid.layer == lay) & (hid.later >= NEAR_END)).sum())
        rows.append(row)
    out = [
        "## Primary, secondary and hidden sinks (`sinks`)",
        "",
        f"Thresholds: tau = {params.get('tau')}, ratio = {params.get('ratio')} "
        f"(a sink receives at least max(tau, ratio / T) of the attention of the queries that see it); "
        f"{n_inputs} inputs of T = {', '.join(str(v) for v in sorted(set(lengths)))} tokens. "
        "Per layer: inputs whose position 0 is a (primary) sink, the mean received attention of position 0, "
        "the median over inputs of its hidden-state norm / the input's median norm (residual stream entering the "
        "layer), and the number of (input, token) secondary and hidden sinks.",
    ]
    if causal:
        out[-1] += (
            f' "Near end": fewer than {NEAR_END} later queries can see the token, so its received attention is a '
            "mean over few rows."
        )
    out += ["", table(pd.DataFrame(rows))]

    life = t[t.metric == "sink_lifetime"]
    life0 = life[life.position == 0]
    first_tokens = t[(t.position == 0) & (t.metric == "received") & (t.layer == -1)]["token"]
    out += [
        "",
        f"Primary sink: position 0 is a sink in {prim['sample'].nunique()} of {n_inputs} inputs; layers "
        + (", ".join(f"{lay} ({c})" for lay, c in prim.groupby("layer").size().items()) or "none")
        + " (inputs in brackets). Lifetime (longest run of consecutive sink layers) per input: "
        + (", ".join(f"{int(v)}" for v in life0.sort_values("sample")["value"]) or "-")
        + ". First tokens: "
        + ", ".join(sorted({show(x, wordpiece) for x in first_tokens}))
        + ".",
    ]
    if not causal:  # an encoder's last token has a received row (a causal input's last token has none)
        rec = t[(t.metric == "received") & (t.layer == -1)]
        last = rec[rec.position == rec["sample"].map(lengths) - 1]["token"]
        out[-1] += " Last tokens: " + ", ".join(sorted({show(x, wordpiece) for x in last})) + "."

    if len(sec):
        rows = []
        for (sample, pos), g in sec.groupby(["sample", "position"]):
            r = ratio[(ratio["sample"] == sample) & (ratio.position == pos)].set_index("layer")["value"]
            lt = life[(life["sample"] == sample) & (life.position == pos)]["value"]
            row = {
                "sample": sample,
                "position": pos,
                "token": show(g.token.iloc[0], wordpiece),
                "layers": ",".join(str(v) for v in sorted(g.layer)),
                "lifetime": int(lt.iloc[0]) if len(lt) else np.nan,
                "max received": g.value.max(),
                "norm ratio (sink layers, mean)": r.reindex(sorted(g.layer)).mean(),
                "max norm ratio": r.max() if len(r) else np.nan,
                "at layer": int(r.idxmax()) if len(r) else np.nan,
            }
            if causal:
                row = {**row, "later queries": int(g.later.iloc[0])}
            rows.append(row)
        out += ["", "Secondary sinks (one row per input and token):", "", table(pd.DataFrame(rows), 2)]
    else:
        out += ["", "No secondary sinks."]

    if len(hid):
        far = hid[hid.later >= NEAR_END] if causal else hid
        near = len(hid) - len(far)
        out += [
            "",
            f"Hidden sinks: {len(hid)} (input, token, layer) rows over "
            f"{hid.groupby(['sample', 'position']).ngroups} tokens"
            + (f"; {near} of the rows are near the end (fewer than {NEAR_END} later queries)" if causal else "")
            + ".",
        ]
        if len(far):
            g = far.groupby("layer")
            rows = [
                {
                    "layer": lay,
                    "rows": len(d),
                    "tokens (sample:position)": ", ".join(
                        f"{show(tok, wordpiece)} ({smp}:{pos})"
                        for tok, smp, pos in zip(d.token, d["sample"], d.position, strict=True)
                    ),
                    "max head received": d.value.max(),
                }
                for lay, d in g
            ]
            label = f" with at least {NEAR_END} later queries" if causal else ""
            out += ["", f"Hidden sinks{label}, by layer:", "", table(pd.DataFrame(rows))]
    else:
        out += ["", "No hidden sinks."]
    return "\n".join(out + ["", most_received(t, causal, wordpiece)])


def most_received(t: pd.DataFrame, causal: bool, wordpiece: bool, per_layer=3, min_count=8) -> str:
    """Per layer, the token strings that receive the most attention (position 0 and, causal, the end left out)."""
    rec = t[(t.metric == "received") & (t.layer >= 0) & (t.position > 0)]
    if causal:
        rec = rec[rec.later >= NEAR_END]
    counts = rec[rec.layer == rec.layer.min()].groupby("token").size()
    rec = rec[rec.token.isin(counts[counts >= min_count].index)]
    overall = rec.groupby("layer")["value"].median()
    rows = []
    for lay, d in rec.groupby("layer"):
        g = d.groupby("token")["value"].agg(["mean", "size"]).sort_values("mean", ascending=False).head(per_layer)
        rows.append(
            {
                "layer": lay,
                "median token": overall[lay],
                "top token strings: mean received (count)": ", ".join(
                    f"{show(tok, wordpiece)}: {r['mean']:.3f} ({int(r['size'])})" for tok, r in g.iterrows()
                ),
            }
        )
    where = f", at least {NEAR_END} later queries" if causal else ""
    return "\n".join(
        [
            f"Most-attended token strings per layer (`received`; position 0 left out{where}; strings seen at least "
            f"{min_count} times; median token: the median received attention of all those tokens):",
            "",
            table(pd.DataFrame(rows)),
        ]
    )


def copying_section(atlas: headmap.Atlas) -> str:
    out = ["## Retrieval, induction, duplicate-token and previous-token heads"]
    if has(atlas, "retrieval"):
        groups = atlas.meta["corpus"].get("groups", [])
        needle = next((g for g in groups if "retrieval" in g["probes"]), None)
        r = metric(atlas, "retrieval")
        n = int(r["n"].max()) if len(r) else 0
        mode = atlas.meta["probes"]["retrieval"].get("mode")
        total = needle["inputs"] if needle else "?"
        out += [
            "",
            f"`retrieval` (mode {mode}): the model reproduced the needle in **{n} of {total}** needle inputs "
            f"(n of every head). Heads with retrieval > 0: {int((r.value > 0).sum())} of {len(r)}; "
            f"> 0.5: {int((r.value > 0.5).sum())}.",
            "",
            table(top_heads(atlas, "retrieval", extra=("induction", "duplicate_token", "prev_token", "sink"))),
        ]
    else:
        out += ["", absent(atlas, "retrieval")]
    for probe, extra in (
        ("induction", ("retrieval", "prev_token", "duplicate_token", "sink")),
        ("duplicate_token", ("induction", "retrieval", "prev_token")),
        ("prev_token", ("waad", "induction", "duplicate_token")),
    ):
        out += ["", f"`{probe}`:", ""]
        if has(atlas, probe):
            v = metric(atlas, probe).value
            out += [
                f"Heads above 0.3: {int((v > 0.3).sum())}; above 0.1: {int((v > 0.1).sum())} (of {len(v)}).",
                "",
                table(top_heads(atlas, probe, extra=extra)),
            ]
        else:
            out.append(absent(atlas, probe))
    return "\n".join(out)


def distance_section(atlas: headmap.Atlas) -> str:
    if not (has(atlas, "waad") and has(atlas, "mean_distance")):
        return "## Local and global heads\n\n" + absent(atlas, "waad")
    w = atlas.meta["probes"]["waad"].get("window")
    waad, md_ = metric(atlas, "waad"), metric(atlas, "mean_distance")
    per = pd.DataFrame(
        {
            "layer": sorted(waad.layer.unique()),
            "waad mean": waad.groupby("layer").value.mean().values,
            "waad min": waad.groupby("layer").value.min().values,
            "mean_distance mean": md_.groupby("layer").value.mean().values,
            "mean_distance min": md_.groupby("layer").value.min().values,
            "mean_distance max": md_.groupby("layer").value.max().values,
        }
    )
    return "\n".join(
        [
            f"## Local and global heads (`waad`, W = {w}; `mean_distance`)",
            "",
            "Most local (lowest waad):",
            "",
            table(top_heads(atlas, "waad", ascending=True, extra=("mean_distance", "prev_token", "entropy"))),
            "",
            "Most global (highest mean_distance):",
            "",
            table(top_heads(atlas, "mean_distance", extra=("waad", "sink", "entropy"))),
            "",
            "Per layer:",
            "",
            table(per, 2),
        ]
    )


def entropy_section(atlas: headmap.Atlas) -> str:
    if not has(atlas, "entropy"):
        return "## Entropy profile\n\n" + absent(atlas, "entropy")
    e = metric(atlas, "entropy")
    g = e.groupby("layer").value
    per = pd.DataFrame({"layer": g.mean().index, "mean": g.mean().values, "min": g.min().values, "max": g.max().values})
    return "\n".join(
        [
            "## Entropy profile (`entropy`, normalised to [0, 1])",
            "",
            table(per),
            "",
            "Lowest-entropy heads:",
            "",
            table(top_heads(atlas, "entropy", k=5, ascending=True, extra=("sink", "prev_token"))),
        ]
    )


def massive_section(atlas: headmap.Atlas) -> str:
    if not has(atlas, "massive_values"):
        return "## Massive Q/K values\n\n" + absent(atlas, "massive_values")
    lam = atlas.meta["probes"]["massive_values"].get("lam")
    q, k = metric(atlas, "massive_values", "q_massive"), metric(atlas, "massive_values", "k_massive")
    qp, kp = metric(atlas, "massive_values", "q_peak_ratio"), metric(atlas, "massive_values", "k_peak_ratio")
    kv = k.drop_duplicates(["layer", "kv_head"])  # key counts repeat on the query heads of a kv head
    kvp = kp.drop_duplicates(["layer", "kv_head"])
    per = pd.DataFrame(
        {
            "layer": sorted(q.layer.unique()),
            "q dims (sum over heads)": q.groupby("layer").value.sum().astype(int).values,
            "q heads with >= 1": q.groupby("layer").value.apply(lambda v: int((v > 0).sum())).values,
            "q peak ratio max": qp.groupby("layer").value.max().reindex(sorted(q.layer.unique())).values,
            "k dims (sum over kv heads)": kv.groupby("layer").value.sum().astype(int).values,
            "k peak ratio max": kvp.groupby("layer").value.max().reindex(sorted(q.layer.unique())).values,
        }
    )
    return "\n".join(
        [
            f"## Massive Q/K values (`massive_values`, lam = {lam})",
            "",
            f"Massive dimensions in all: q {int(q.value.sum())} over {int((q.value > 0).sum())} of {len(q)} "
            "query heads; "
            f"k {int(kv.value.sum())} over {int((kv.value > 0).sum())} of {len(kv)} kv heads.",
            "",
            table(per, 1),
        ]
    )


def context(rec: pd.DataFrame, sample: int, pos: int, wordpiece: bool) -> str:
    toks = rec[rec["sample"] == sample].set_index("position")["token"]
    left = [toks[p] for p in range(pos - CONTEXT, pos) if p in toks.index]
    mid = toks.get(pos)
    right = [toks[p] for p in range(pos + 1, pos + 1 + CONTEXT) if p in toks.index]
    if mid is None:
        return "-"
    both = detok(left + [mid] + right, wordpiece)
    a = len(detok(left, wordpiece))
    b = len(detok(left + [mid], wordpiece))
    word = both[a:b]
    a += len(word) - len(word.lstrip())  # bold the token, not the space before it
    return md(both[:a]) + "**" + md(both[a:b]) + "**" + md(both[b:])


def anchors_section(atlas: headmap.Atlas, wordpiece: bool) -> str:
    t = atlas.tokens
    if not (t.metric == "fai").any():
        return "## Anchor tokens (`fai`)\n\n" + absent(atlas, "fai")
    lengths = input_lengths(atlas)
    rec = t[(t.metric == "received") & (t.layer == -1)]
    fai = t[t.metric == "fai"].assign(later=lambda d: lengths.reindex(d["sample"]).values - 1 - d["position"])
    anchors = t[t.metric == "anchor"][["sample", "position"]]
    a = anchors.merge(fai, on=["sample", "position"])
    p = atlas.meta["probes"]["fai"]

    def rows(df):
        return pd.DataFrame(
            {
                "sample": df["sample"].values,
                "position": df["position"].values,
                "later positions": df["later"].values,
                "token": [show(x, wordpiece) for x in df.token],
                "FAI": df["value"].values,
                "context": [context(rec, s, q, wordpiece) for s, q in zip(df["sample"], df["position"], strict=True)],
            }
        )

    buckets = pd.cut(fai.position, [-1, 0, 63, 255, 447, 10**9], labels=["0", "1-63", "64-255", "256-447", "448-"])
    by_pos = fai.groupby(buckets, observed=True)["value"].agg(["mean", "median", "max", "count"]).reset_index()
    by_pos = by_pos.rename(columns={"position": "positions"})
    far = fai[(fai.position > 0) & (fai.later >= 64)].sort_values("value", ascending=False).head(10)
    return "\n".join(
        [
            "## Anchor tokens (`fai`)",
            "",
            f"Group: layers={p.get('layers')}, heads={p.get('heads')}, horizon={p.get('horizon')}; "
            f"{p.get('anchors')} anchors per input (position 0 excluded). "
            f"{len(a)} anchors; their positions: {int(a.position.min())}-{int(a.position.max())}.",
            "",
            table(rows(a.sort_values(["sample", "position"])), 4),
            "",
            "FAI by position:",
            "",
            table(by_pos, 4),
            "",
            "Highest FAI among tokens with at least 64 later positions (position 0 excluded):",
            "",
            table(rows(far), 4),
        ]
    )


def position_section(atlas: headmap.Atlas) -> str:
    if not has(atlas, "position_profile"):
        return "## Position profile (`position_profile`)\n\n" + absent(atlas, "position_profile")
    h = metric(atlas, "position_profile").drop(columns="metric")
    pp = atlas.heads[(atlas.heads.probe == "position_profile") & (atlas.heads.metric.str.startswith("item_"))]
    wide = pp.pivot_table(index=["layer", "head"], columns="metric", values="value")
    items = sorted(wide.columns, key=lambda c: int(c.split("_")[1]))
    wide = wide[items]
    n_layers = atlas.meta["architecture"]["layers"]
    thirds = np.array_split(np.arange(n_layers), 3)
    rows = [{"heads": "all", **wide.mean().to_dict(), "item mass": wide.sum(axis=1).mean()}]
    for part in thirds:
        sub = wide[wide.index.get_level_values("layer").isin(part)]
        rows.append(
            {"heads": f"layers {part[0]}-{part[-1]}", **sub.mean().to_dict(), "item mass": sub.sum(axis=1).mean()}
        )
    basin = h.set_index(["layer", "head"])["value"]
    for (lay, hd), _ in basin.sort_values(ascending=False).head(5).items():
        rows.append({"heads": f"L{lay}H{hd}", **wide.loc[(lay, hd)].to_dict(), "item mass": wide.loc[(lay, hd)].sum()})
    prof = pd.DataFrame(rows)
    prof["basin depth"] = [
        (r[items[0]] + r[items[-1]]) / 2 - np.mean([r[c] for c in items[1:-1]]) for _, r in prof.iterrows()
    ]
    prof.columns = [c.replace("item_", "") if c.startswith("item_") else c for c in prof.columns]
    g = [x for x in atlas.meta["corpus"].get("groups", []) if "position_profile" in x["probes"]]
    opts = g[0].get("options", {}) if g else {}
    return "\n".join(
        [
            "## Position profile (`position_profile`: final query to each item)",
            "",
            f"Corpus options: {opts}. Columns 0..{len(items) - 1}: mean attention mass from the last token to item m; "
            "item mass: their sum; basin depth: mean of the end items minus mean of the middle ones. "
            f"Basin depth over all heads: mean {h.value.mean():.4f}, "
            f"{int((h.value > 0).sum())} of {len(h)} heads positive. Rows L<l>H<h>: the five deepest basins.",
            "",
            table(prof, 4),
        ]
    )


def main(folder: str) -> None:
    atlas = headmap.Atlas.load(folder)
    wordpiece = (
        atlas.meta["architecture"]["model_type"] in ("bert",) or atlas.tokens["token"].str.startswith("##").any()
    )
    sections = [
        f"# headmap atlas: {atlas.meta['model']}",
        run_facts(atlas),
        sink_section(atlas),
        sinks_section(atlas, wordpiece),
        copying_section(atlas),
        distance_section(atlas),
        anchors_section(atlas, wordpiece),
        entropy_section(atlas),
        massive_section(atlas),
        position_section(atlas),
    ]
    print("\n\n".join(sections))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python docs/models/summarize.py RUN_FOLDER")
    main(sys.argv[1])
