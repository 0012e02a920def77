"""explain.html: one token strip per method over the same text, and the deletion and insertion curves.

A single self-contained page (inline CSS and SVG, no script): for the first few inputs, each method's
values as the background of the tokens (red positive, blue negative, scaled by the largest |value| of
that method on that input); then the faithfulness curves (mean over inputs) and the summary table.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

import pandas as pd

from ..rundir import write_text

PALETTE = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#7f7f7f")
_SPACE_MARKS = {"Ġ": " ", "▁": " ", "Ċ": "\\n"}


def _token_text(token: str) -> str:
    for mark, repl in _SPACE_MARKS.items():
        token = token.replace(mark, repl)
    return html.escape(token)


def _strip(rows: pd.DataFrame) -> str:
    peak = float(rows.value.abs().max()) or 1.0
    spans = []
    for r in rows.sort_values("position").itertuples():
        a = min(1.0, abs(float(r.value)) / peak) if math.isfinite(r.value) else 0.0
        rgb = "214,39,40" if r.value >= 0 else "31,119,180"
        spans.append(
            f'<span style="background:rgba({rgb},{a:.3f})" title="{r.position}: {r.value:.4g}">'
            f"{_token_text(str(r.token))}</span>"
        )
    return "".join(spans)


def _curve_svg(faith: pd.DataFrame, metric: str, title: str) -> str:
    rows = faith[faith.metric == metric]
    if rows.empty:
        return ""
    w, h, pad = 360, 220, 36
    xs = sorted(rows.fraction.unique())
    lo, hi = float(rows.value.min()), float(rows.value.max())
    hi = hi if hi > lo else lo + 1.0

    def px(f: float) -> float:
        return pad + (w - 2 * pad) * (f - xs[0]) / ((xs[-1] - xs[0]) or 1.0)

    def py(v: float) -> float:
        return h - pad - (h - 2 * pad) * (v - lo) / (hi - lo)

    parts = [f'<svg width="{w}" height="{h}" role="img"><title>{html.escape(title)}</title>']
    parts.append(f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="#999"/>')
    parts.append(f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="#999"/>')
    parts.append(f'<text x="{w / 2}" y="{h - 6}" font-size="11" text-anchor="middle">fraction of tokens</text>')
    parts.append(f'<text x="4" y="{pad - 8}" font-size="11">{lo:.3g} .. {hi:.3g}</text>')
    for i, (method, sub) in enumerate(rows.groupby("method", sort=False)):
        sub = sub.sort_values("fraction")
        color = PALETTE[i % len(PALETTE)]
        points = " ".join(f"{px(f):.1f},{py(v):.1f}" for f, v in zip(sub.fraction, sub.value, strict=True))
        dash = ' stroke-dasharray="4 3"' if method == "random" else ""
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2"{dash} points="{points}"/>')
        parts.append(f'<text x="{w - pad + 2}" y="{pad + 12 * i}" font-size="10" fill="{color}">{method}</text>')
    parts.append("</svg>")
    return "".join(parts)


def write_page(path: Path, attributions: pd.DataFrame, faith: pd.DataFrame, meta: dict, inputs: int = 3) -> Path:
    """Write the page to ``path`` (atomically) and return it."""
    title = f"headmap explain: {meta.get('model', '')}, target {meta.get('target', '')}"
    body = [f"<h1>{html.escape(title)}</h1>"]
    for sample in sorted(attributions["sample"].unique())[:inputs]:
        body.append(f"<h2>input {int(sample)}</h2><table>")
        rows = attributions[attributions["sample"] == sample]
        for method, sub in rows.groupby("method", sort=False):
            body.append(f'<tr><th>{html.escape(str(method))}</th><td class="strip">{_strip(sub)}</td></tr>')
        body.append("</table>")
    body.append("<h2>faithfulness (mean over inputs)</h2>")
    body.append(_curve_svg(faith, "deletion", "deletion: y(x) - y(top tokens replaced)"))
    body.append(_curve_svg(faith, "insertion", "insertion: y(x) - y(only top tokens kept)"))
    body.append("<table><tr><th>method</th><th>comprehensiveness</th><th>sufficiency</th></tr>")
    for method in faith.method.unique():
        cells = []
        for metric in ("comprehensiveness", "sufficiency"):
            r = faith[(faith.method == method) & (faith.metric == metric)]
            cells.append(f"{r.value.iloc[0]:.4f} ± {r.stderr.iloc[0]:.4f}" if len(r) else "")
        body.append(f"<tr><td>{html.escape(str(method))}</td><td>{cells[0]}</td><td>{cells[1]}</td></tr>")
    body.append("</table><p>Definitions: docs/explain.md, docs/methods/faithfulness.md.</p>")
    style = (
        "body{font-family:sans-serif;max-width:72em;margin:2em auto}th{text-align:left;padding-right:1em;"
        "vertical-align:top}.strip span{font-family:monospace;white-space:pre;padding:1px 0}svg{margin-right:1em}"
    )
    page = (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n"
    )
    return write_text(Path(path), page)
