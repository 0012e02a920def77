"""Publication figures of an atlas with matplotlib: one PNG per head-level metric, and the sink chart.

Heatmaps are single-column figures (3.5 x 3.0 in at 300 dpi: 1050 x 900 px); the sink chart is
double-column (7.0 in wide, 2100 px, its height growing with the number of sink tokens). Text in
the figures is set as plain text: ``$`` is escaped so no token switches on mathtext.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np

from ..atlas import Atlas
from ..errors import OutputError
from .data import atlas_shape, report_data

DPI = 300
SINGLE_COLUMN_IN = (3.5, 3.0)
DOUBLE_COLUMN_WIDTH_IN = 7.0


def _plain(text: str) -> str:
    """Text that matplotlib draws as it is (no mathtext)."""
    return str(text).replace("\\", "\\\\").replace("$", r"\$")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.") or "metric"


def _new_figure(size: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _style(ax) -> None:
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.tick_params(labelsize=6, length=2, width=0.5)
    for spine in ax.spines.values():
        spine.set_linewidth(0.5)


def _save(fig, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. a glyph the bundled font lacks
        fig.savefig(path, dpi=DPI, format="png", metadata={"Software": "headmap"})
    return path


def heatmap_figure(values: np.ndarray, title: str, path: Path) -> Path:
    """One layer x head heatmap (rows: layers, 0 at the top)."""
    fig = _new_figure(SINGLE_COLUMN_IN)
    ax = fig.add_subplot()
    masked = np.ma.masked_invalid(values)
    image = ax.imshow(masked, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("head", fontsize=7)
    ax.set_ylabel("layer", fontsize=7)
    ax.set_title(_plain(title), fontsize=8)
    layers, heads = values.shape
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(nbins=min(heads, 8), integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(nbins=min(layers, 8), integer=True))
    _style(ax)
    bar = fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02)
    bar.ax.tick_params(labelsize=6, length=2, width=0.5)
    bar.outline.set_linewidth(0.5)
    return _save(fig, path)


def sink_figure(sinks: dict, layers: int, path: Path) -> Path:
    """Sink tokens by layer (primary, secondary, hidden), with lifetime and norm-ratio bars."""
    tokens = sinks["tokens"]
    labels = [_plain(f"s{t['sample']}:{t['position']} {t['text']!r}") for t in tokens]
    height = min(9.0, 1.1 + 0.16 * len(tokens))
    fig = _new_figure((DOUBLE_COLUMN_WIDTH_IN, height))
    grid = fig.add_gridspec(1, 3, width_ratios=[4, 1, 1])
    ax = fig.add_subplot(grid[0])
    life = fig.add_subplot(grid[1], sharey=ax)
    norm = fig.add_subplot(grid[2], sharey=ax)
    y = np.arange(len(tokens))
    styles = (
        ("primary_sink", "primary", "o", "#c53030"),
        ("secondary_sink", "secondary", "D", "#dd6b20"),
        ("hidden_sink", "hidden", "x", "#2b6cb0"),
    )
    for key, name, marker, colour in styles:
        xs, ys, sizes = [], [], []
        for i, t in enumerate(tokens):
            for layer, received in zip(t[key]["layers"], t[key]["received"], strict=True):
                xs.append(layer)
                ys.append(i)
                sizes.append(4 + 30 * float(np.sqrt(min(max(received or 0.0, 0.0), 1.0))))
        if xs:
            ax.scatter(xs, ys, s=sizes, marker=marker, color=colour, label=name, linewidths=0.6)
    ax.set_yticks(y, labels, fontsize=5.5)
    ax.set_ylim(len(tokens) - 0.5, -0.5)
    ax.set_xlim(-0.5, max(layers, 1) - 0.5)
    ax.set_xlabel("layer", fontsize=7)
    ax.legend(fontsize=6, frameon=False, loc="lower left", bbox_to_anchor=(0, 1.0), ncol=3, markerscale=0.7)
    life.barh(y, [t["lifetime"] or 0 for t in tokens], color="#718096", height=0.6)
    life.set_xlabel("lifetime (layers)", fontsize=7)
    norm.barh(y, [t["max_norm_ratio"] or 0 for t in tokens], color="#d69e2e", height=0.6)
    norm.set_xlabel("max norm / median", fontsize=7)
    for axis in (ax, life, norm):
        _style(axis)
    for axis in (life, norm):
        axis.tick_params(labelleft=False)
    return _save(fig, path)


def write_pngs(atlas: Atlas, folder: Path) -> list[Path]:
    """Heatmaps of every head-level metric (``heatmap-<probe>-<metric>.png``) and ``sinks.png``."""
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"--png {folder} is a file; choose a folder for the PNG figures")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create --png folder {folder}: {exc.strerror or exc}") from exc
    data = report_data(atlas)
    layers, heads, _ = atlas_shape(atlas)
    written: list[Path] = []
    used: set[str] = set()
    try:
        for m in data["metrics"]:
            name = _slug(m["probe"] if m["probe"] == m["metric"] else f"{m['probe']}-{m['metric']}")
            stem, k = f"heatmap-{name}", 2
            while stem in used:
                stem, k = f"heatmap-{name}-{k}", k + 1
            used.add(stem)
            values = np.array([np.nan if v is None else v for v in m["value"]], dtype=np.float64).reshape(layers, heads)
            title = m["metric"] if m["probe"] == m["metric"] else f"{m['probe']}: {m['metric']}"
            written.append(heatmap_figure(values, title, folder / f"{stem}.png"))
        if data["sinks"] and data["sinks"]["tokens"]:
            written.append(sink_figure(data["sinks"], layers, folder / "sinks.png"))
    except OSError as exc:
        raise OutputError(f"cannot write the PNG figures into {folder}: {exc.strerror or exc}") from exc
    return written
