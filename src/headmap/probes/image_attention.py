"""``image_attention``: where each text-model head looks in the picture, from the last token of the input.

For the first ``samples`` inputs of an image corpus (:mod:`headmap.corpus.images`), per layer of the text
tower and per head, the attention probability from the input's last token to every image token, laid out
on the image's token grid (``info["image_runs"]``, ``info["image_grid"]``): row r, column c is the image
token r * columns + c of that image. The report overlays these grids on the picture
(:mod:`headmap.report.images`). Written to ``images.parquet`` (``sample, image, layer, head, row, col,
value``); values are probabilities as the engine computed them (no averaging: one input, one query).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..corpus import Batch
from ..engine.block import Block
from .base import Needs, Probe


@dataclass
class ImageAttentionProbe(Probe):
    """The last token's attention over each image's token grid, per text layer and head, for a few inputs."""

    #: how many inputs (the first of the corpus) to keep
    samples: int = 2

    name = "image_attention"
    needs = Needs(corpus="images", default_corpus="shapes", default=False, map_inputs="samples")
    tower_aware = True  # reads the text tower only, on purpose

    _rows: list[dict[str, Any] | None] = field(default_factory=list, init=False, repr=False)
    _maps: dict[tuple[int, int, int], np.ndarray] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        from ..errors import ProbeError
        from ..specs import is_whole

        if not is_whole(self.samples) or self.samples < 1:
            raise ProbeError(f"image_attention samples must be a whole number >= 1 (got {self.samples!r})")

    def params(self) -> dict[str, Any]:
        return {"samples": int(self.samples)}

    def begin(self, batch: Batch) -> None:
        self._rows = []
        for b, sample in enumerate(batch.samples):
            index = batch.index(b)
            info = sample.info or {}
            if index >= self.samples or not info.get("image_runs") or not info.get("image_grid"):
                self._rows.append(None)
                continue
            self._rows.append({"index": index, "length": len(sample.ids), "runs": info["image_runs"],
                               "grids": info["image_grid"]})  # fmt: skip

    def update(self, block: Block) -> None:
        if block.tower != "text" or block.is_cross or not any(self._rows):
            return
        for b, row in enumerate(self._rows):
            if row is None or b >= block.item_start.shape[0]:
                continue
            start = int(block.item_start[b])
            last = start + row["length"] - 1  # the input's last token (absolute position)
            hit = (block.q_pos == last).nonzero()
            if not hit.numel():
                continue
            r = int(hit[0, 0])
            probs = block.probs[b, :, r, :]  # [H, bk]
            for image, ((a, e), (rows, cols)) in enumerate(zip(row["runs"], row["grids"], strict=False)):
                lo, hi = start + a - int(block.k_pos[0]), start + e - int(block.k_pos[0])
                if lo < 0 or hi > probs.shape[-1] or (e - a) != rows * cols:
                    continue
                grid = probs[:, lo:hi].to("cpu", dtype=probs.dtype).double().numpy().reshape(-1, rows, cols)
                self._maps[(row["index"], image, block.layer)] = grid

    def state_dict(self) -> dict[str, np.ndarray]:
        """The kept grids, ``grid.SAMPLE.IMAGE.LAYER`` -> [H, rows, cols] (copies)."""
        return {f"grid.{s}.{i}.{layer}": g.copy() for (s, i, layer), g in self._maps.items()}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        maps = {}
        for key, value in state.items():
            kind, *parts = key.split(".")
            if kind != "grid" or len(parts) != 3:
                raise ValueError(f"not a state of probe {self.name}: key {key!r}")
            maps[tuple(int(x) for x in parts)] = np.array(value, dtype=np.float64)
        self._maps = maps

    def image_frame(self) -> Any:
        import pandas as pd

        parts = []
        for (sample, image, layer), grid in sorted(self._maps.items()):
            heads, rows, cols = grid.shape
            h, r, c = np.meshgrid(np.arange(heads), np.arange(rows), np.arange(cols), indexing="ij")
            parts.append(
                pd.DataFrame(
                    {
                        "sample": sample,
                        "image": image,
                        "layer": layer,
                        "head": h.reshape(-1),
                        "row": r.reshape(-1),
                        "col": c.reshape(-1),
                        "value": grid.reshape(-1),
                    }
                )
            )
        return pd.concat(parts, ignore_index=True) if parts else None
