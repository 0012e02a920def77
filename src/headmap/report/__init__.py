"""The atlas report: one self-contained HTML page per run, paper figures, and a notebook summary.

``write_report(run)`` writes ``report.html``: the page carries plotly.js (from the installed
``plotly`` package), its own script and styles, and the run's data inline, so it opens from disk
with no network. Data goes into a ``<script type="application/json">`` block with ``<``, ``>``,
``&`` and every non-ASCII character escaped as ``\\uXXXX``, and the page only ever puts data into
the document as text (``textContent``, and entity-escaped labels for plotly), so no token, text,
file or model name can add markup or script. A Content-Security-Policy admits only the page's
two scripts (by hash) and no network at all.

``png_dir`` also writes the heatmaps and the sink chart as PNG figures (matplotlib, 300 dpi,
single-column width). :func:`summary_html` is the compact HTML of ``Atlas._repr_html_``.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
from pathlib import Path
from typing import Any

from ..atlas import Atlas, summary_html
from ..errors import OutputError
from ..rundir import CHECKPOINT_DIR, check_writable, progress_summary, write_text
from .assets import asset
from .data import report_data

__all__ = ["report_data", "report_html", "summary_html", "write_compress_report", "write_report"]

#: A report should stay below this size (checked by the tests; see ``headmap.report.data``).
SIZE_LIMIT_BYTES = 10 * 1024 * 1024


_asset = asset


#: ``x.href="https://..."`` in plotly.js: the mode bar's logo link (off by ``displaylogo: false``, and
#: taken out here as well, so that the page links nowhere whatever its plot settings).
_HREF_ASSIGNMENT = re.compile(r"""(\.href\s*=\s*)(["'])https?://[^"']*\2""")


def _plotly_js() -> str:
    from plotly.offline import get_plotlyjs

    return _HREF_ASSIGNMENT.sub(r"\1\2#\2", get_plotlyjs())


def safe_script(code: str) -> str:
    """Script text that cannot end its ``<script>`` element early or open an HTML comment."""
    code = re.sub(r"</(script)", r"<\\/\1", code, flags=re.IGNORECASE)
    return code.replace("<!--", "<\\!--")


def json_for_script(data: Any) -> str:
    """JSON that is inert inside ``<script type="application/json">``: no ``<``, ``>``, ``&``, non-ASCII."""
    text = json.dumps(data, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _sha256(text: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")


PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="headmap {version}">
<title>headmap: {title}</title>
<style>{css}</style>
</head>
<body>
<header>
  <h1 id="title">{title}</h1>
  <p class="sub">headmap atlas report</p>
  <nav>
    <a href="#card-section">model</a> <a href="#categories-section">categories</a>
    <a href="#heatmaps-section">heatmaps</a> <a href="#strips-section">tokens</a>
    <a href="#sinks-section">sinks</a> <a href="#top-section">top heads</a>
    <a href="#settings-section">settings</a>{compress_nav}
  </nav>
</header>
<main>
  <section id="card-section"><h2>Model</h2><table id="card" class="kv"></table></section>
  <section id="categories-section"><h2>Head categories</h2>
    <p class="hint">Each head's main category (the first rule it meets, in this order).
    Click a cell to open the head.</p>
    <div id="categories-plot" class="plot wide"></div><ul id="category-rules" class="rules"></ul></section>
  <section id="heatmaps-section"><h2>Heads, metric by metric</h2>
    <p class="hint">Layer x head. Hover a cell for its value; click it to open the head's panel.</p>
    <div id="heatmaps" class="grid"></div></section>
  <section id="strips-section"><h2>Tokens</h2>
    <p class="hint">Each token coloured by the chosen measure; hover a token for all of them.</p>
    <label class="control">colour by <select id="strip-metric"></select></label>
    <div id="strips"></div></section>
  <section id="sinks-section"><h2>Attention sinks</h2>
    <p class="hint">Tokens that collect attention: in which layers (primary: token 0; secondary: any other;
    hidden: in single heads only), their lifetime (longest run of sink layers) and the largest ratio of their
    hidden-state norm to the input's median.</p>
    <div id="sinks-plot" class="plot wide"></div></section>
  <section id="top-section"><h2>Top heads per probe</h2><div id="top-tables" class="grid"></div></section>
{compress}
  <section id="settings-section"><h2>Settings</h2><ul id="notes" class="rules"></ul><pre id="settings"></pre></section>
{extra}
</main>
<aside id="head-panel" hidden aria-live="polite">
  <button id="panel-close" type="button" aria-label="close">&times;</button>
  <h2 id="panel-title"></h2>
  <p id="panel-kv" class="sub"></p>
  <div id="panel-tags"></div>
  <h3>Attention maps</h3>
  <p class="hint">Mean attention probability per cell of the pooled map (query rows, key columns);
  colours clipped at the map's 98th percentile.</p>
  <div id="panel-maps"></div>
  <h3>Scores</h3>
  <table id="panel-scores" class="scores"></table>
</aside>
<script type="application/json" id="headmap-data">{data}</script>
<script>{plotly}</script>
<script>{app}</script>
</body>
</html>
"""


def report_html(atlas: Atlas, compress: dict[str, Any] | None = None) -> str:
    """The report of ``atlas`` as one HTML string; ``compress`` (a checked ``compress.json``,
    :func:`headmap.report.compress.load_compress`) adds the compress section."""
    from .. import __version__
    from .alignment import alignment_section
    from .images import images_section
    from .towers import main_view, towers_section

    data = json_for_script(report_data(main_view(atlas)))  # several towers: the page shows the main one
    plotly_js = safe_script(_plotly_js())
    app = safe_script(_asset("report.js"))
    csp = (
        "default-src 'none'; "
        f"script-src '{_sha256(plotly_js)}' '{_sha256(app)}'; "
        "style-src 'unsafe-inline'; img-src data: blob:; font-src data:; "
        "connect-src 'none'; base-uri 'none'; form-action 'none'"
    )
    title = html.escape(str(atlas.meta.get("model") or "headmap run"), quote=True)
    return PAGE.format(
        csp=csp,
        version=html.escape(str(__version__)),
        title=title,
        css=_asset("report.css"),
        data=data,
        plotly=plotly_js,
        app=app,
        extra=towers_section(atlas) + images_section(atlas) + alignment_section(atlas),
        compress_nav=' <a href="#compress-section">compress</a>' if compress is not None else "",
        compress=_compress_section(compress) if compress is not None else "",
    )


def _compress_section(data: dict[str, Any]) -> str:
    from .compress import compress_section

    return compress_section(data)


def _check_run_folder(folder: Path) -> None:
    """Refuse, before anything is read, a folder that is not a run or holds only an unfinished scan."""
    if not folder.is_dir():
        raise OutputError(f"{folder} is not a folder; pass the --out folder of a headmap scan")
    if not (folder / "meta.json").exists() and (folder / CHECKPOINT_DIR).is_dir():
        done = progress_summary(folder)
        raise OutputError(
            f"{folder} holds an unfinished scan ({CHECKPOINT_DIR}{', ' + done if done else ''}) and no finished run "
            f"yet: finish it with the same command and --resume (headmap scan ... --out {folder} --resume), then "
            "run headmap report again"
        )


def _check_places(target: Path, png_dir: Path | None) -> None:
    """Refuse an output place that cannot be written, before the run is read or anything is written."""
    if target.is_dir():
        raise OutputError(f"--out {target} is a folder; give the path of the HTML file to write")
    if not target.parent.is_dir():
        raise OutputError(f"cannot write {target}: folder {target.parent} does not exist")
    check_writable(target, "--out")
    if png_dir is not None:
        if png_dir.exists() and not png_dir.is_dir():
            raise OutputError(f"--png {png_dir} is a file; choose a folder for the PNG figures")
        check_writable(png_dir, "--png")


def write_report(
    atlas_or_dir: Atlas | str | Path, out: str | Path | None = None, png_dir: str | Path | None = None
) -> list[Path]:
    """Write ``report.html`` (default: into the run folder) and, with ``png_dir``, the PNG figures.

    ``atlas_or_dir``: an Atlas or a run folder (read with ``Atlas.load``: OutputError when it is
    missing or corrupt, or holds only an unfinished scan). Every output place is checked before the
    run is read and before anything is written. A run folder that also holds a ``compress.json``
    (``headmap compress ... --out RUN_DIR``) gets the compress section; an invalid one is refused
    (OutputError) before anything is written. Returns the paths written, the HTML first.
    """
    png = Path(png_dir) if png_dir is not None else None
    compress = None
    if isinstance(atlas_or_dir, Atlas):
        if out is None:
            raise OutputError("write_report(atlas) needs out=...: the path of the HTML file to write")
        target = Path(out)
        _check_places(target, png)
        atlas = atlas_or_dir
    else:
        folder = Path(atlas_or_dir)
        _check_run_folder(folder)
        target = Path(out) if out is not None else folder / "report.html"
        _check_places(target, png)
        if (folder / "compress.json").exists():
            from .compress import load_compress

            compress = load_compress(folder / "compress.json")
        atlas = Atlas.load(folder)
    page = report_html(atlas, compress)
    try:
        written = [write_text(target, page)]
    except OSError as exc:
        raise OutputError(f"cannot write {target}: {exc.strerror or exc}") from exc
    if png is not None:
        from .figures import write_pngs
        from .towers import main_view

        written += write_pngs(main_view(atlas), png)
    return written


def write_compress_report(folder: str | Path, out: str | Path | None = None) -> Path:
    """Write ``report.html`` (default: into ``folder``) for the compress run in ``folder``.

    When ``folder`` is also a finished scan run (it holds ``meta.json``), the page is the atlas
    report with the compress section, so the scan's report is not replaced by a smaller one; else a
    page of the compress section alone. The summary is checked before anything is written.
    """
    folder = Path(folder)
    target = Path(out) if out is not None else folder / "report.html"
    if (folder / "meta.json").exists():
        return write_report(folder, out=target)[0]
    from .compress import SUMMARY_FILE, compress_report_html, load_compress

    check_writable(target, "--out")
    data = load_compress(folder / SUMMARY_FILE)
    try:
        return write_text(target, compress_report_html(data))
    except OSError as exc:
        raise OutputError(f"cannot write {target}: {exc.strerror or exc}") from exc
