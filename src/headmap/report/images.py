"""Image overlays in the report: each chosen head's attention from the input's last token over the picture.

From images.parquet (probe ``image_attention``): for the first input and its first image, the heads of
the text model that put the most attention on the image from the last token (at most
:data:`OVERLAY_HEADS`), one figure each: the picture with the head's grid of image-token probabilities
over it (each grid cell covers its patch of the picture). The picture is drawn again from the run's
corpus (``shapes`` from its seed and size; a JSONL corpus from its file); when it cannot be found the
grid is shown alone, on grey.
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


def _overlay(grid: np.ndarray, pic: Any, title: str) -> str:
    fig = new_figure(OVERLAY_IN)
    ax = fig.add_subplot()
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
    return png_data_uri(fig)


def images_section(atlas: Atlas) -> str:
    """HTML of the overlays ('' when the run has no images.parquet rows); every string escaped."""
    table = atlas.images
    if table is None or not len(table):
        return ""
    e = html.escape
    sample = int(table["sample"].min())
    one = table[(table["sample"] == sample) & (table["image"] == 0)]
    mass = one.groupby(["layer", "head"])["value"].sum().sort_values(ascending=False, kind="stable")
    chosen = list(mass.index[:OVERLAY_HEADS])
    pic = picture(atlas.meta, sample)
    out = [
        '<section id="images-section"><h2>Image attention</h2>',
        f'<p class="hint">Input {sample}: attention from its last token over the picture, per head of the text '
        f"model (each cell: one image token's probability; the {len(chosen)} heads with the most attention on "
        "the image).</p>",
        '<div class="grid">',
    ]
    if pic is None:
        out.append('<p class="hint">The picture could not be drawn again from the corpus: grids on grey.</p>')
    for layer, head in chosen:
        cells = one[(one["layer"] == layer) & (one["head"] == head)]
        rows, cols = int(cells["row"].max()) + 1, int(cells["col"].max()) + 1
        grid = np.zeros((rows, cols))
        grid[cells["row"].to_numpy(dtype=np.int64), cells["col"].to_numpy(dtype=np.int64)] = cells["value"]
        title = f"L{int(layer)} H{int(head)}: {float(grid.sum()):.2f} on the image"
        out.append(
            f'<figure><img alt="{e(title)}" src="{_overlay(grid, pic, title)}"><figcaption>{e(title)}</figcaption>'
            "</figure>"
        )
    out.append("</div></section>")
    return "\n".join(out)
