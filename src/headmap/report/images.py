"""Image overlays in the report: each chosen head's attention from the input's last token over the picture.

From images.parquet (probe ``image_attention``): every input it holds, up to the run's ``map_inputs``
(``--map-inputs``, in ``meta.options``; a run without it: every input the table holds), and every image of
each. The heads of the text model that put the most attention on the images from the last token, on average
over those pictures (at most :data:`OVERLAY_HEADS`), get one figure each: a row of panels, one per picture,
titled with its input index, each the picture with the head's grid of image-token probabilities over it
(each grid cell covers its patch of the picture). The pictures are drawn again from the run's corpus
(``shapes`` from its seed and size; a JSONL corpus from its file); when one cannot be found its grid is
shown alone, on grey.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np

from ..atlas import Atlas
from .towers import new_figure, png_data_uri

OVERLAY_HEADS = 6
OVERLAY_IN = (2.4, 2.6)
PANEL_IN = (1.9, 2.1)  # one picture's panel when a figure holds several
PANELS_PER_ROW = 4


def picture(meta: dict[str, Any], sample: int, image: int = 0) -> Any:
    """The PIL picture ``image`` of input ``sample`` of the run's corpus, or None when it cannot be found."""
    corpus = meta.get("corpus") or {}
    try:
        if corpus.get("kind") == "builtin" and corpus.get("name") == "shapes":
            from ..corpus.shapes import SHAPES_SIZE, shapes_items

            size = int((corpus.get("options") or {}).get("size", SHAPES_SIZE))
            return shapes_items(sample + 1, int(corpus.get("seed", 0)), size)[sample]["image"]
        if corpus.get("kind") == "file" and corpus.get("path"):
            from ..corpus.images import read_images

            path = Path(corpus["path"])
            lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
            names = json.loads(lines[sample])["image"]
            return read_images(names, path.parent, str(path))[image]
    except Exception:  # noqa: BLE001  (the picture is a nicety: the grid is drawn alone)
        return None
    return None


def _draw(ax: Any, grid: np.ndarray, pic: Any, title: str) -> None:
    rows, cols = grid.shape
    if pic is not None:
        width, height = pic.size
        ax.imshow(np.asarray(pic), extent=(0, width, height, 0))
    else:
        width, height = cols, rows
        ax.imshow(np.full((1, 1, 3), 0.5), extent=(0, width, height, 0))
    ax.imshow(grid, extent=(0, width, height, 0), cmap="inferno", alpha=0.55, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=7)


def _overlay(panels: list[tuple[np.ndarray, Any, str]], title: str) -> str:
    """One figure: a panel per (grid, picture, panel title); ``title`` above them all when there are several."""
    if len(panels) == 1:
        fig = new_figure(OVERLAY_IN)
        grid, pic, _ = panels[0]
        _draw(fig.add_subplot(), grid, pic, title)
        return png_data_uri(fig)
    cols = min(len(panels), PANELS_PER_ROW)
    rows = -(-len(panels) // cols)
    fig = new_figure((PANEL_IN[0] * cols, PANEL_IN[1] * rows + 0.3))
    for i, (grid, pic, name) in enumerate(panels):
        _draw(fig.add_subplot(rows, cols, i + 1), grid, pic, name)
    fig.suptitle(title, fontsize=8)
    return png_data_uri(fig)


def _grid(cells: Any) -> np.ndarray:
    rows, cols = int(cells["row"].max()) + 1, int(cells["col"].max()) + 1
    grid = np.zeros((rows, cols))
    grid[cells["row"].to_numpy(dtype=np.int64), cells["col"].to_numpy(dtype=np.int64)] = cells["value"]
    return grid


def drawn_pictures(atlas: Atlas) -> list[tuple[int, int]]:
    """(input, image) of every picture the overlays show: the inputs of images.parquet in order, at most the
    run's ``map_inputs`` of them (``meta.options``; absent: all), every image of each."""
    table = atlas.images
    if table is None or not len(table):
        return []
    samples = sorted(int(x) for x in table["sample"].unique())
    cap = ((atlas.meta or {}).get("options") or {}).get("map_inputs")
    if isinstance(cap, int) and cap >= 1:
        samples = samples[:cap]
    pairs = table[table["sample"].isin(samples)][["sample", "image"]].drop_duplicates()
    return sorted((int(s), int(i)) for s, i in zip(pairs["sample"], pairs["image"], strict=True))


def images_section(atlas: Atlas) -> str:
    """HTML of the overlays ('' when the run has no images.parquet rows); every string escaped."""
    pictures = drawn_pictures(atlas)
    if not pictures:
        return ""
    table = atlas.images
    e = html.escape
    inputs = sorted({s for s, _ in pictures})
    several = any(i > 0 for _, i in pictures)
    shown = table.set_index(["sample", "image"]).loc[pictures].reset_index()
    # the heads with the most attention on the images, on average over the pictures shown
    per = shown.groupby(["layer", "head", "sample", "image"])["value"].sum()
    mass = per.groupby(["layer", "head"]).mean().sort_values(ascending=False, kind="stable")
    chosen = list(mass.index[:OVERLAY_HEADS])
    drawn = {(s, i): picture(atlas.meta, s, i) for s, i in pictures}
    which = ", ".join(map(str, inputs))
    out = [
        '<section id="images-section"><h2>Image attention</h2>',
        f'<p class="hint">Input{"s" if len(inputs) > 1 else ""} {which}: attention from each input\'s last token '
        f"over its picture{'s' if len(pictures) > 1 else ''}, per head of the text model (each cell: one image "
        f"token's probability; the {len(chosen)} heads with the most attention on the images, one figure each, "
        "one panel per picture).</p>",
        '<div class="grid">',
    ]
    if any(p is None for p in drawn.values()):
        out.append('<p class="hint">A picture could not be drawn again from the corpus: its grid is on grey.</p>')
    for layer, head in chosen:
        panels, shares, keys = [], [], []
        for s, i in pictures:
            cells = shown[(shown["sample"] == s) & (shown["image"] == i)]
            cells = cells[(cells["layer"] == layer) & (cells["head"] == head)]
            if not len(cells):
                continue
            grid = _grid(cells)
            name = f"input {s}" + (f", image {i}" if several else "")
            panels.append((grid, drawn[(s, i)], name))
            shares.append(f"{name} {float(grid.sum()):.2f}")
            keys.append(f"{s}:{i}")
        if not panels:
            continue
        title = f"L{int(layer)} H{int(head)}: on the image " + ", ".join(shares)
        out.append(
            f'<figure data-pictures="{e(" ".join(keys))}"><img alt="{e(title)}" src="{_overlay(panels, title)}">'
            f"<figcaption>{e(title)}</figcaption></figure>"
        )
    out.append("</div></section>")
    return "\n".join(out)
