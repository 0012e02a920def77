"""The atlas: what a scan measured, as tables, and its on-disk form (the output contract).

A run folder holds ``heads.parquet`` (one row per probe, metric, layer, head), optionally
``tokens.parquet`` and ``maps.parquet`` (downsampled attention maps), ``meta.json``, and the
HTML report ``report.html`` when asked for. headmap writes each file atomically (a temporary file
renamed into place), refuses to write over another run unless asked to, and never deletes a file
it did not write.
"""

from __future__ import annotations

import html
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import OutputError
from .rundir import check_output_folder, write_text

FORMAT = "headmap-atlas/1"

HEADS_SCHEMA = pa.schema(
    [
        ("probe", pa.string()),
        ("metric", pa.string()),
        ("layer", pa.int64()),
        ("head", pa.int64()),
        ("kv_head", pa.int64()),
        ("value", pa.float64()),
        ("stderr", pa.float64()),
        ("n", pa.int64()),
    ]
)
TOKENS_SCHEMA = pa.schema(
    [
        ("sample", pa.int64()),
        ("position", pa.int64()),
        ("token_id", pa.int64()),
        ("token", pa.string()),
        ("metric", pa.string()),
        ("layer", pa.int64()),
        ("value", pa.float64()),
    ]
)
MAPS_SCHEMA = pa.schema(
    [
        ("sample", pa.int64()),
        ("layer", pa.int64()),
        ("head", pa.int64()),
        ("row_bin", pa.int64()),
        ("col_bin", pa.int64()),
        ("length", pa.int64()),
        ("value", pa.float64()),
    ]
)


def bin_sizes(length: int, bins: int) -> np.ndarray:
    """[bins] number of positions in each bin of a pooled attention map (the rows and columns of maps.parquet).

    Position p of an input of ``length`` tokens falls in bin ``p * bins // length``.
    """
    index = (np.arange(length, dtype=np.int64) * bins) // max(length, 1)
    return np.bincount(index, minlength=bins).astype(np.int64)


def empty_frame(schema: pa.Schema) -> pd.DataFrame:
    return schema.empty_table().to_pandas()


@dataclass
class Atlas:
    """Tables of one scan: ``heads``, ``tokens`` and ``maps`` DataFrames and the ``meta`` dict."""

    heads: pd.DataFrame
    meta: dict[str, Any]
    tokens: pd.DataFrame = field(default_factory=lambda: empty_frame(TOKENS_SCHEMA))
    #: downsampled attention maps (probe ``attention_maps``): one row per sample, layer, head and cell
    maps: pd.DataFrame = field(default_factory=lambda: empty_frame(MAPS_SCHEMA))

    def top(self, probe: str, k: int = 10, metric: str | None = None) -> pd.DataFrame:
        """The ``k`` heads with the highest value of ``probe`` (its ``metric``, default the probe's own)."""
        rows = self.heads[(self.heads.probe == probe) & (self.heads.metric == (metric or probe))]
        if rows.empty:
            known = sorted(self.heads.probe.unique())
            raise KeyError(f"no probe '{probe}' in this atlas; it has: {', '.join(known) or 'none'}")
        return rows.sort_values("value", ascending=False, kind="stable").head(k).reset_index(drop=True)

    def grid(self, probe: str, metric: str | None = None) -> pd.DataFrame:
        """Layer x head table of one metric."""
        rows = self.heads[(self.heads.probe == probe) & (self.heads.metric == (metric or probe))]
        return rows.pivot(index="layer", columns="head", values="value")

    def save(self, folder: str | Path, overwrite: bool = False) -> list[Path]:
        """Write the run folder; returns the paths written."""
        folder = Path(folder)
        check_output_folder(folder, overwrite)
        folder.mkdir(parents=True, exist_ok=True)
        written = [
            _write_parquet(folder / "heads.parquet", self.heads, HEADS_SCHEMA),
        ]
        if len(self.tokens):
            written.append(_write_parquet(folder / "tokens.parquet", self.tokens, TOKENS_SCHEMA))
        elif overwrite and (folder / "tokens.parquet").is_file():
            (folder / "tokens.parquet").unlink()  # a stale table of the run being replaced
        if len(self.maps):
            written.append(_write_parquet(folder / "maps.parquet", self.maps, MAPS_SCHEMA))
        elif overwrite and (folder / "maps.parquet").is_file():
            (folder / "maps.parquet").unlink()
        if overwrite and (folder / "report.html").is_file():
            (folder / "report.html").unlink()  # the report of the run being replaced
        meta = dict(self.meta, format=FORMAT)
        written.append(write_text(folder / "meta.json", json.dumps(meta, indent=2, default=str) + "\n"))
        return written

    @classmethod
    def load(cls, folder: str | Path) -> Atlas:
        """Read a run folder written by :meth:`save`."""
        folder = Path(folder)
        if not folder.is_dir():
            raise OutputError(f"{folder} is not a folder; pass the --out folder of a headmap scan")
        try:
            meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise OutputError(f"{folder} has no meta.json; it is not a headmap run folder") from exc
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise OutputError(f"{folder / 'meta.json'} is corrupt ({exc}); run the scan again") from exc
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise OutputError(f"{folder / 'meta.json'} is not a {FORMAT} file; run the scan again")
        try:
            heads = pq.read_table(folder / "heads.parquet").to_pandas()
            tokens_path = folder / "tokens.parquet"
            tokens = pq.read_table(tokens_path).to_pandas() if tokens_path.exists() else empty_frame(TOKENS_SCHEMA)
            maps_path = folder / "maps.parquet"
            maps = pq.read_table(maps_path).to_pandas() if maps_path.exists() else empty_frame(MAPS_SCHEMA)
        except (OSError, pa.ArrowException) as exc:
            raise OutputError(f"a table in {folder} is missing or corrupt ({exc}); run the scan again") from exc
        missing = set(HEADS_SCHEMA.names) - set(heads.columns)
        if missing:
            raise OutputError(f"{folder / 'heads.parquet'} lacks columns {sorted(missing)}; run the scan again")
        missing = set(MAPS_SCHEMA.names) - set(maps.columns)
        if missing:
            raise OutputError(f"{folder / 'maps.parquet'} lacks columns {sorted(missing)}; run the scan again")
        return cls(heads=heads, meta=meta, tokens=tokens, maps=maps)

    def _repr_html_(self) -> str:
        """Compact summary for notebooks: model, shape, probes and top heads (every string escaped)."""
        return summary_html(self)


def _write_parquet(path: Path, frame: pd.DataFrame, schema: pa.Schema) -> Path:
    table = pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def summary_html(atlas: Atlas, k: int = 3) -> str:
    """Compact HTML summary of an atlas (model, shape, probes, top heads); every string escaped."""
    e = html.escape
    meta = atlas.meta
    arch = meta.get("architecture") or {}
    corpus = meta.get("corpus") or {}
    shape = f"{arch.get('layers', '?')} layers x {arch.get('heads', '?')} heads"
    if arch.get("kv_heads"):
        shape += f" ({arch['kv_heads']} kv)"
    probes = list(meta.get("probes") or dict.fromkeys(atlas.heads["probe"].astype(str)))
    lines = [
        '<div class="headmap-atlas" style="font-family:sans-serif;font-size:13px">',
        f"<b>{e(str(meta.get('model', 'headmap atlas')))}</b> &middot; {e(str(arch.get('model_type', '')))}, "
        f"{e(shape)}, {e(str(meta.get('dtype', '')))}<br>",
        f"corpus {e(str(corpus.get('name', '-')))}: {e(str(corpus.get('inputs', '-')))} inputs, "
        f"{e(str(corpus.get('tokens', '-')))} tokens<br>",
        f"probes: {e(', '.join(str(p) for p in probes))}<br>",
        f"tables: heads {len(atlas.heads):,} rows, tokens {len(atlas.tokens):,}, maps {len(atlas.maps):,}",
    ]
    own = atlas.heads[atlas.heads["probe"].astype(str) == atlas.heads["metric"].astype(str)]
    if len(own):
        lines.append('<table style="margin-top:4px"><tr><th>probe</th><th>top heads (layer.head: value)</th></tr>')
        for probe in dict.fromkeys(own["probe"].astype(str)):
            top = atlas.top(probe, k=k)
            cells = ", ".join(f"L{int(r.layer)}.H{int(r.head)}: {float(r.value):.3g}" for r in top.itertuples())
            lines.append(f"<tr><td>{e(probe)}</td><td>{e(cells)}</td></tr>")
        lines.append("</table>")
    lines.append("</div>")
    return "\n".join(lines)
