"""The compress section of the report: accuracy against cache bytes, and the press x ratio table.

``headmap compress`` writes ``compress.json`` (per press and ratio: accuracy with a 95 % cluster-
bootstrap interval, mean cache bytes, prefill and per-token decode times). This module turns it
into one HTML section: the plot (a PNG drawn with matplotlib, inlined as a ``data:`` image, so the
page stays offline) and a table. The section has no script; every string from the file goes into
the page through :func:`html.escape`.

- :func:`load_compress` reads and checks a ``compress.json`` (OutputError, one line, when it is not
  a valid summary);
- :func:`compress_section` is the section's HTML (also placed into the atlas report by
  ``headmap report RUN_DIR`` when the run folder holds a ``compress.json``);
- :func:`headmap.report.write_compress_report` writes ``report.html`` into a compress ``--out`` folder: the atlas
  report with the section when the folder is also a scan run, else a page of the section alone.

See docs/compress.md.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import warnings
from pathlib import Path
from typing import Any

from ..errors import OutputError

#: The file ``headmap compress`` writes, and the one this section reads.
SUMMARY_FILE = "compress.json"

_NUMBERS = ("ratio", "accuracy", "low", "high", "cache_bytes")
_TIMES = ("prefill_s", "decode_s_per_token")


def _bad(path: Path, what: str) -> OutputError:
    return OutputError(
        f"{path} is not a valid compress summary: {what}; write it again with headmap compress ... --out "
        f"{path.parent} --overwrite, or remove it"
    )


def _number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def check_compress(data: Any, path: Path) -> dict[str, Any]:
    """The checked summary of ``compress.json`` (``path`` only names it in messages)."""
    if not isinstance(data, dict) or not isinstance(data.get("summary"), list) or not data["summary"]:
        raise _bad(path, "it needs an object with a non-empty 'summary' list")
    rows = []
    for k, row in enumerate(data["summary"]):
        where = f"summary[{k}]"
        if not isinstance(row, dict):
            raise _bad(path, f"{where} is not an object")
        if not isinstance(row.get("press"), str) or not row["press"]:
            raise _bad(path, f"{where}.press must be the press's name, got {row.get('press')!r}")
        for key in _NUMBERS:
            if not _number(row.get(key)):
                raise _bad(path, f"{where}.{key} must be a number, got {row.get(key)!r}")
        if not 0 <= row["ratio"] < 1:
            raise _bad(path, f"{where}.ratio {row['ratio']} is outside [0, 1)")
        if not 0 <= row["low"] <= row["accuracy"] <= row["high"] <= 1:
            raise _bad(
                path,
                f"{where}: accuracy {row['accuracy']} with interval [{row['low']}, {row['high']}] is not "
                "0 <= low <= accuracy <= high <= 1",
            )
        if row["cache_bytes"] < 0:
            raise _bad(path, f"{where}.cache_bytes is negative ({row['cache_bytes']})")
        for key in (*_TIMES, "peak_bytes"):
            value = row.get(key)
            if value is not None and not (_number(value) and value >= 0) and not _is_nan(value):
                raise _bad(path, f"{where}.{key} must be a number >= 0 (or null), got {value!r}")
        n = row.get("n")
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise _bad(path, f"{where}.n must be a whole number >= 1, got {n!r}")
        rows.append(row)
    for key in ("model", "task"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise _bad(path, f"'{key}' must be a string, got {data[key]!r}")
    return {"model": data.get("model"), "task": data.get("task"), "summary": rows}


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def load_compress(path: str | Path) -> dict[str, Any]:
    """Read and check a ``compress.json`` (a file, or a folder holding one); OutputError when it is not valid."""
    path = Path(path)
    if path.is_dir():
        path = path / SUMMARY_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise OutputError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise _bad(path, "it is not UTF-8 text") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _bad(path, f"not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    return check_compress(data, path)


# -- the figure ---------------------------------------------------------------------------------------
def compress_figure(summary: list[dict[str, Any]]) -> bytes:
    """PNG bytes: accuracy (with its 95 % interval) against mean cache bytes, one line per press, full as a star."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name in dict.fromkeys(s["press"] for s in summary):
        pts = sorted((s for s in summary if s["press"] == name), key=lambda s: s["cache_bytes"])
        x = [s["cache_bytes"] / 2**20 for s in pts]
        y = [s["accuracy"] for s in pts]
        err = [[s["accuracy"] - s["low"] for s in pts], [s["high"] - s["accuracy"] for s in pts]]
        label = name.replace("\\", "\\\\").replace("$", r"\$")  # drawn as text, never as mathtext
        style = dict(marker="*", markersize=12, linestyle="none", color="black") if name == "full" else dict(marker="o")
        ax.errorbar(x, y, yerr=err, label=label, capsize=3, **style)
    ax.set_xlabel("KV cache after the prefill (MiB, mean per item)")
    ax.set_ylabel("accuracy (95% cluster-bootstrap interval)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. a glyph the bundled font lacks
        fig.savefig(buffer, format="png", metadata={"Software": "headmap"})
    return buffer.getvalue()


# -- the section --------------------------------------------------------------------------------------
def _fmt(value: Any, scale: float = 1.0, digits: int = 3) -> str:
    if value is None or _is_nan(value):
        return "n/a"
    return f"{value * scale:.{digits}f}"


def _cell(text: str, value: Any = None) -> str:
    attr = "" if value is None or _is_nan(value) else f' data-value="{html.escape(repr(value), quote=True)}"'
    return f"<td{attr}>{html.escape(text)}</td>"


COMPRESS_CSS = """
table.compress { border-collapse: collapse; font-size: 12.5px; font-variant-numeric: tabular-nums; margin-top: 6px; }
table.compress th, table.compress td { padding: 2px 8px; text-align: right; border-bottom: 1px solid #dde2e8; }
table.compress th:first-child, table.compress td:first-child { text-align: left; word-break: break-all; }
img.compress-plot { max-width: 100%; height: auto; }
"""


def compress_section(data: dict[str, Any]) -> str:
    """The ``<section id="compress-section">`` of a checked summary (:func:`load_compress`)."""
    summary = data["summary"]
    full = next((s for s in summary if s["press"] == "full"), None)
    has_peak = any(_number(s.get("peak_bytes")) for s in summary)
    png = base64.b64encode(compress_figure(summary)).decode("ascii")
    head = [
        "press",
        "ratio (fraction removed)",
        "items",
        "accuracy (fraction correct)",
        "95% interval",
        "cache (MiB)",
        "cache / full",
        "prefill (s)",
        "decode (ms/token)",
    ]
    if has_peak:
        head.append("peak (MiB)")
    rows = []
    for s in summary:
        share = s["cache_bytes"] / full["cache_bytes"] if full is not None and full["cache_bytes"] > 0 else None
        cells = [
            _cell(s["press"]),
            _cell(f"{s['ratio']:.2f}", s["ratio"]),
            _cell(str(s["n"]) if s.get("n") is not None else "n/a", s.get("n")),
            _cell(f"{s['accuracy']:.3f}", s["accuracy"]),
            f'<td data-low="{s["low"]!r}" data-high="{s["high"]!r}">[{s["low"]:.3f}, {s["high"]:.3f}]</td>',
            _cell(_fmt(s["cache_bytes"], 2**-20), s["cache_bytes"]),
            _cell(_fmt(share), share),
            _cell(_fmt(s.get("prefill_s")), s.get("prefill_s")),
            _cell(_fmt(s.get("decode_s_per_token"), 1000.0, 1), s.get("decode_s_per_token")),
        ]
        if has_peak:
            cells.append(_cell(_fmt(s.get("peak_bytes"), 2**-20, 1), s.get("peak_bytes")))
        rows.append("<tr>" + "".join(cells) + "</tr>")
    about = []
    if data.get("model"):
        about.append(f"model {html.escape(data['model'])}")
    if data.get("task"):
        about.append(f"task {html.escape(data['task'])}")
    about_text = f" ({'; '.join(about)})" if about else ""
    return (
        f"<style>{COMPRESS_CSS}</style>\n"
        '<section id="compress-section"><h2>Compress: accuracy against cache bytes</h2>\n'
        f'  <p class="hint">Every press at every ratio (the fraction of the KV cache removed) against the full '
        f"cache on the same items{about_text}. Accuracy: the fraction of items answered correctly, with a 95% "
        "cluster-bootstrap interval; cache: bytes of keys and values after the prefill, measured from the "
        "cache's tensors, mean per item; times: mean per item.</p>\n"
        f'  <img class="compress-plot" id="compress-plot" alt="accuracy against cache bytes, one line per press" '
        f'src="data:image/png;base64,{png}">\n'
        '  <table class="compress" id="compress-table"><thead><tr>'
        + "".join(f"<th>{html.escape(h)}</th>" for h in head)
        + "</tr></thead>\n  <tbody>\n  "
        + "\n  ".join(rows)
        + "\n  </tbody></table></section>\n"
    )


PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; img-src data:; \
base-uri 'none'; form-action 'none'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="headmap {version}">
<title>headmap compress: {title}</title>
<style>{css}</style>
</head>
<body>
<header>
  <h1 id="title">{title}</h1>
  <p class="sub">headmap compress report</p>
</header>
<main>
{section}</main>
</body>
</html>
"""


def compress_report_html(data: dict[str, Any]) -> str:
    """A page of the compress section alone (no script, no network)."""
    from .. import __version__
    from .assets import asset

    return PAGE.format(
        version=html.escape(str(__version__)),
        title=html.escape(data.get("model") or "compress run", quote=True),
        css=asset("report.css"),
        section=compress_section(data),
    )
