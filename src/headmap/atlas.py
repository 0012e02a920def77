"""The atlas: what a scan measured, as tables, and its on-disk form (the output contract).

A run folder holds ``heads.parquet`` (one row per probe, metric, layer, head; and ``tower`` when the
run measured a tower other than ``text``, see :data:`HEADS_TOWER_SCHEMA`), optionally
``tokens.parquet`` and ``maps.parquet`` (downsampled attention maps), ``meta.json``, and the
HTML report ``report.html`` when asked for. A run is saved all or nothing: the new run is written
into a staging folder beside the old one and the two are swapped (:func:`headmap.rundir.replacing`),
so a save that fails (a full disk) leaves the old run whole. headmap refuses to write over another
run unless asked to, holds the folder's lock while it writes, and never deletes a file it did not
write (those are carried into the new folder).

``meta.json`` lists the run's tables (``tables``: name -> bytes and sha256); :meth:`Atlas.load`
refuses a folder whose tables are not the ones its meta.json lists (a mixed or damaged run).
"""

from __future__ import annotations

import errno
import hashlib
import html
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import OutputError
from .rundir import (
    CHECKPOINT_DIR,
    RUN_FILES,
    RUN_TABLES,
    check_output_folder,
    is_temporary,
    lock,
    os_error_text,
    replacing,
    write_text,
)

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
#: heads.parquet of a run that measured a tower other than ``text`` (a vision-language model's vision tower,
#: an encoder-decoder's encoder, decoder and cross-attention): :data:`HEADS_SCHEMA` and ``tower``
#: (``text``, ``vision``, ``encoder``, ``decoder`` or ``cross``; docs/multimodal.md). A table without the
#: column is all ``text``, so the tables of text models are as they were.
HEADS_TOWER_SCHEMA = HEADS_SCHEMA.append(pa.field("tower", pa.string()))
#: The tower a rule, :meth:`Atlas.top` and :meth:`Atlas.grid` read unless told: the first present of these.
MAIN_TOWERS = ("text", "decoder", "encoder", "vision", "cross")

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

#: images.parquet: attention from an input's last token over each image's token grid (probe
#: ``image_attention``), one row per sample, image, text layer, head and grid cell.
IMAGES_SCHEMA = pa.schema(
    [
        ("sample", pa.int64()),
        ("image", pa.int64()),
        ("layer", pa.int64()),
        ("head", pa.int64()),
        ("row", pa.int64()),
        ("col", pa.int64()),
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


def towers_of(heads: pd.DataFrame) -> pd.Series:
    """The ``tower`` of every row of a heads table (``text`` where the table has no such column or a row none)."""
    if "tower" not in heads.columns:
        return pd.Series("text", index=heads.index, dtype=object)
    return heads["tower"].where(heads["tower"].notna(), "text").astype(str)


def main_tower(heads: pd.DataFrame) -> str:
    """The tower rules and summaries read by default: the first of :data:`MAIN_TOWERS` in the table
    (a VLM: ``text``; an encoder-decoder: ``decoder``; a vision encoder alone: ``vision``)."""
    present = set(towers_of(heads).unique())
    return next((t for t in MAIN_TOWERS if t in present), next(iter(sorted(present)), "text"))


def tower_rows(heads: pd.DataFrame, tower: str | None = None) -> pd.DataFrame:
    """The rows of one tower (None: :func:`main_tower`); the table itself when it holds one tower only."""
    towers = towers_of(heads)
    if towers.nunique() <= 1 and tower is None:
        return heads
    return heads[towers == (tower or main_tower(heads))]


def with_towers(heads: pd.DataFrame) -> pd.DataFrame:
    """``heads`` with its ``tower`` column filled (``text`` where missing), or without the column when
    every row is ``text`` (what :meth:`Atlas.save` writes)."""
    if "tower" not in heads.columns:
        return heads
    towers = towers_of(heads)
    if (towers == "text").all():
        return heads.drop(columns=["tower"])
    return heads.assign(tower=towers)


@dataclass
class Atlas:
    """Tables of one scan: ``heads``, ``tokens`` and ``maps`` DataFrames and the ``meta`` dict."""

    heads: pd.DataFrame
    meta: dict[str, Any]
    tokens: pd.DataFrame = field(default_factory=lambda: empty_frame(TOKENS_SCHEMA))
    #: downsampled attention maps (probe ``attention_maps``): one row per sample, layer, head and cell
    maps: pd.DataFrame = field(default_factory=lambda: empty_frame(MAPS_SCHEMA))
    #: attention over image token grids (probe ``image_attention``; images.parquet)
    images: pd.DataFrame = field(default_factory=lambda: empty_frame(IMAGES_SCHEMA))

    def top(self, probe: str, k: int = 10, metric: str | None = None, tower: str | None = None) -> pd.DataFrame:
        """The ``k`` heads with the highest value of ``probe`` (its ``metric``, default the probe's own)
        in ``tower`` (None: the main tower of the probe's rows, :func:`main_tower`)."""
        rows = self.heads[(self.heads.probe == probe) & (self.heads.metric == (metric or probe))]
        if len(rows):
            rows = tower_rows(rows, tower)
        if rows.empty:
            known = sorted(self.heads.probe.unique())
            raise KeyError(f"no probe '{probe}' in this atlas; it has: {', '.join(known) or 'none'}")
        return rows.sort_values("value", ascending=False, kind="stable").head(k).reset_index(drop=True)

    def grid(self, probe: str, metric: str | None = None, tower: str | None = None) -> pd.DataFrame:
        """Layer x head table of one metric in ``tower`` (None: the main tower of its rows)."""
        rows = self.heads[(self.heads.probe == probe) & (self.heads.metric == (metric or probe))]
        rows = tower_rows(rows, tower)
        return rows.pivot(index="layer", columns="head", values="value")

    def save(self, folder: str | Path, overwrite: bool = False) -> list[Path]:
        """Write the run folder, all or nothing; returns the paths written.

        OutputError when the folder holds another run (without ``overwrite``), is held by another
        writer, or the save fails (then the folder is as it was).
        """
        folder = Path(folder)
        check_output_folder(folder, overwrite)
        with lock(folder, command="Atlas.save"):
            check_output_folder(folder, overwrite)  # again, now that no other writer can change it
            heads = with_towers(self.heads)
            frames = [("heads.parquet", heads, HEADS_TOWER_SCHEMA if "tower" in heads.columns else HEADS_SCHEMA)]
            if len(self.tokens):
                frames.append(("tokens.parquet", self.tokens, TOKENS_SCHEMA))
            if len(self.maps):
                frames.append(("maps.parquet", self.maps, MAPS_SCHEMA))
            if len(self.images):
                frames.append(("images.parquet", self.images, IMAGES_SCHEMA))
            try:
                with replacing(folder, ours=_is_run_file, last="meta.json") as stage:
                    tables = {}
                    for name, frame, schema in frames:
                        tables[name] = _file_record(_write_parquet(stage / name, frame, schema))
                    meta = dict(self.meta, format=FORMAT, tables=tables)
                    write_text(stage / "meta.json", json.dumps(meta, indent=2, default=str) + "\n")
            except OSError as exc:
                raise OutputError(
                    f"{os_error_text(exc, f'saving the run into {folder}')}; the folder is as it was"
                    f"{'; free space and run again' if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ''}"
                ) from None
        return [folder / name for name, _, _ in frames] + [folder / "meta.json"]

    @classmethod
    def load(cls, folder: str | Path) -> Atlas:
        """Read a run folder written by :meth:`save` (OutputError naming what is wrong with it)."""
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
        _check_tables(folder, meta.get("tables"))
        try:
            heads = pq.read_table(folder / "heads.parquet").to_pandas()
            tokens_path = folder / "tokens.parquet"
            tokens = pq.read_table(tokens_path).to_pandas() if tokens_path.exists() else empty_frame(TOKENS_SCHEMA)
            maps_path = folder / "maps.parquet"
            maps = pq.read_table(maps_path).to_pandas() if maps_path.exists() else empty_frame(MAPS_SCHEMA)
            images_path = folder / "images.parquet"
            images = pq.read_table(images_path).to_pandas() if images_path.exists() else empty_frame(IMAGES_SCHEMA)
        except (OSError, pa.ArrowException) as exc:
            raise OutputError(f"a table in {folder} is missing or corrupt ({exc}); run the scan again") from exc
        missing = set(HEADS_SCHEMA.names) - set(heads.columns)
        if missing:
            raise OutputError(f"{folder / 'heads.parquet'} lacks columns {sorted(missing)}; run the scan again")
        missing = set(MAPS_SCHEMA.names) - set(maps.columns)
        if missing:
            raise OutputError(f"{folder / 'maps.parquet'} lacks columns {sorted(missing)}; run the scan again")
        return cls(heads=heads, meta=meta, tokens=tokens, maps=maps, images=images)

    def _repr_html_(self) -> str:
        """Compact summary for notebooks: model, shape, probes and top heads (every string escaped)."""
        return summary_html(self)


def _is_run_file(name: str) -> bool:
    """Whether an entry of a run folder belongs to the run a save replaces (the checkpoint is the scan's)."""
    files = [n for n in RUN_FILES if n != CHECKPOINT_DIR]
    return name in files or is_temporary(name, files)


def _write_parquet(path: Path, frame: pd.DataFrame, schema: pa.Schema) -> Path:
    table = pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False)
    with open(path, "wb") as fh:  # mode 0666 & ~umask
        pq.write_table(table, fh)
        fh.flush()
        os.fsync(fh.fileno())
    return path


def _file_record(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return {"bytes": size, "sha256": digest.hexdigest()}


def _check_tables(folder: Path, tables: Any) -> None:
    """Refuse a folder whose tables are not those its meta.json lists (runs saved before the list: not checked)."""
    if tables is None:
        return
    fix = "it mixes the files of two runs or was damaged; run the scan again (with --overwrite)"
    if not isinstance(tables, dict) or "heads.parquet" not in tables:
        raise OutputError(f"{folder / 'meta.json'} lists no heads.parquet; {fix}")
    for name in RUN_TABLES:
        path = folder / name
        record = tables.get(name)
        if record is None:
            if path.exists():
                raise OutputError(f"{path} is not part of the run its meta.json describes; {fix}")
            continue
        if not path.is_file():
            raise OutputError(f"{path} is missing (its meta.json lists it); {fix}")
        try:
            actual = _file_record(path)
        except OSError as exc:
            raise OutputError(f"{path} cannot be read ({exc.strerror}); {fix}") from None
        if not isinstance(record, dict) or actual != {"bytes": record.get("bytes"), "sha256": record.get("sha256")}:
            raise OutputError(
                f"{path} is not the table its meta.json lists ({actual['bytes']} bytes, sha256 "
                f"{actual['sha256'][:12]}, expected {record.get('bytes') if isinstance(record, dict) else '?'} bytes, "
                f"sha256 {str(record.get('sha256') if isinstance(record, dict) else '?')[:12]}); {fix}"
            )


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
