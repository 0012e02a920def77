"""The tables of a scan, from the probes' rows: heads, tokens and maps (see :mod:`headmap.atlas`)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import pandas as pd

from ..atlas import (
    HEADS_SCHEMA,
    HEADS_TOWER_SCHEMA,
    IMAGES_SCHEMA,
    MAPS_SCHEMA,
    TOKENS_SCHEMA,
    empty_frame,
    with_towers,
)
from ..errors import NumericalError
from ..probes import Probe


def emit_warnings(probes: Sequence[Probe]) -> None:
    """What the probes have to say about the run as a whole (``warnings()``), as warnings to the scan's caller."""
    for p in probes:
        for message in p.warnings():
            warnings.warn(message, stacklevel=3)


def head_table(probes: Sequence[Probe]) -> pd.DataFrame:
    """Rows of heads.parquet from every probe's ``head_rows()``.

    With ``tower`` when some row is of a tower other than ``text`` (a row that names none is ``text``);
    a text model's table is as it always was (:func:`headmap.atlas.with_towers`).
    """
    rows = [row for p in probes for row in p.head_rows()]
    if not rows:
        return empty_frame(HEADS_SCHEMA)
    return with_towers(pd.DataFrame(rows, columns=HEADS_TOWER_SCHEMA.names))


def token_table(probes: Sequence[Probe], tokenizer: Any) -> pd.DataFrame:
    """Rows of tokens.parquet from every probe's ``token_frame()``, with the token strings; no NaN."""
    frames = [f for f in (p.token_frame() for p in probes) if f is not None and len(f)]
    if not frames:
        return empty_frame(TOKENS_SCHEMA)
    table = pd.concat(frames, ignore_index=True)
    ids = table["token_id"].astype("int64")
    if tokenizer is not None and hasattr(tokenizer, "convert_ids_to_tokens"):
        unique = sorted(set(ids.tolist()))
        names = dict(zip(unique, tokenizer.convert_ids_to_tokens(unique), strict=True))
        table["token"] = ids.map(lambda t: str(names.get(t)))
    else:
        table["token"] = ids.astype(str)
    table = table[TOKENS_SCHEMA.names]
    if table["value"].isna().any():
        bad = table[table["value"].isna()].iloc[0]
        raise NumericalError(
            f"token metric {bad['metric']} is NaN at sample {bad['sample']}, position {bad['position']}, "
            f"layer {bad['layer']}; no NaN is written"
        )
    return table.sort_values(["metric", "sample", "layer", "position"], kind="stable").reset_index(drop=True)


def map_table(probes: Sequence[Probe]) -> pd.DataFrame:
    """Rows of maps.parquet from every probe's ``map_frame()``."""
    frames = [f for f in (p.map_frame() for p in probes) if f is not None and len(f)]
    if not frames:
        return empty_frame(MAPS_SCHEMA)
    return pd.concat(frames, ignore_index=True)[MAPS_SCHEMA.names]


def image_table(probes: Sequence[Probe]) -> pd.DataFrame:
    """Rows of images.parquet from every probe's ``image_frame()``."""
    frames = [f for f in (p.image_frame() for p in probes) if f is not None and len(f)]
    if not frames:
        return empty_frame(IMAGES_SCHEMA)
    return pd.concat(frames, ignore_index=True)[IMAGES_SCHEMA.names]
