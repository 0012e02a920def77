"""The report of a run that measured several towers (a vision-language model's text model and vision tower).

The interactive page (heatmaps, categories, top heads, head panel) shows the **main tower**
(:func:`headmap.atlas.main_tower`: ``text`` for a VLM); :func:`towers_section` adds, for every other
tower, a static heatmap per metric (a PNG inside the page) and its table of top heads. A run of one
tower gets no such section and a page as before.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import replace
from typing import Any

import numpy as np

from ..atlas import Atlas, main_tower, tower_rows, towers_of
from .data import TOP_K

HEATMAP_IN = (3.2, 2.6)
HEATMAP_DPI = 110


def main_view(atlas: Atlas) -> Atlas:
    """``atlas`` with the head rows of its main tower only (itself when it measured one tower)."""
    if "tower" not in atlas.heads.columns or towers_of(atlas.heads).nunique() <= 1:
        return atlas
    return replace(atlas, heads=tower_rows(atlas.heads).drop(columns=["tower"]).reset_index(drop=True))


def png_data_uri(fig: Any) -> str:
    """The figure as a ``data:image/png;base64,...`` URI (the page's policy admits data: images only)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def new_figure(size: tuple[float, float], dpi: int = HEATMAP_DPI) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _heatmap(rows: Any, title: str) -> str:
    layers = int(rows["layer"].max()) + 1
    heads = int(rows["head"].max()) + 1
    grid = np.full((layers, heads), np.nan)
    grid[rows["layer"].to_numpy(dtype=np.int64), rows["head"].to_numpy(dtype=np.int64)] = rows["value"].to_numpy(
        dtype=np.float64
    )
    fig = new_figure(HEATMAP_IN)
    ax = fig.add_subplot()
    shown = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest", origin="lower")
    ax.set_xticks(range(heads))
    ax.set_yticks(range(layers))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title.replace("$", r"\$"), fontsize=8)
    fig.colorbar(shown, ax=ax)
    return png_data_uri(fig)


def towers_section(atlas: Atlas) -> str:
    """HTML of the other towers' heatmaps and top heads ('' for a run of one tower); every string escaped."""
    heads = atlas.heads
    if "tower" not in heads.columns or towers_of(heads).nunique() <= 1:
        return ""
    e = html.escape
    main = main_tower(heads)
    towers = [t for t in dict.fromkeys(towers_of(heads)) if t != main]
    out = [
        '<section id="towers-section"><h2>Towers</h2>',
        f'<p class="hint">This run measured several towers. The sections above show the {e(main)} tower; '
        "below, each other tower (its layers are numbered from 0 like the text model's).</p>",
    ]
    for tower in towers:
        rows = tower_rows(heads, tower)
        out.append(f'<h3>{e(tower)} tower</h3><div class="grid">')
        for (probe, metric), part in rows.groupby(["probe", "metric"], sort=False):
            uri = _heatmap(part, f"{tower}: {metric}")
            top = part[np.isfinite(part["value"].to_numpy(dtype=np.float64))]
            top = top.sort_values("value", ascending=False, kind="stable").head(TOP_K)
            cells = "".join(
                f"<tr><td>L{int(r.layer)}</td><td>H{int(r.head)}</td><td>{float(r.value):.4g}</td></tr>"
                for r in top.itertuples()
            )
            out.append(
                f'<figure><img alt="{e(tower)} {e(metric)} heatmap" src="{uri}">'
                f"<figcaption>{e(str(probe))} / {e(str(metric))}, {e(tower)} tower</figcaption>"
                f'<table class="scores"><tr><th>layer</th><th>head</th><th>value</th></tr>{cells}</table></figure>'
            )
        out.append("</div>")
    out.append("</section>")
    return "\n".join(out)
