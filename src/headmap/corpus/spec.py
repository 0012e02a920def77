"""Corpus specs: ``name[:key=value]...`` for a built-in corpus, anything else is a file path."""

from __future__ import annotations

import math
from typing import Any

from ..errors import CorpusError
from .registry import ALL_CORPORA


def option_error(name: str, problem: str) -> CorpusError:
    """A CorpusError about an option of corpus ``name`` that lists the valid options."""
    valid = ALL_CORPORA[name].options
    if not valid:
        return CorpusError(f"corpus '{name}': {problem}; '{name}' takes no options")
    listed = "; ".join(f"{key} ({what})" for key, (_, what) in valid.items())
    return CorpusError(f"corpus '{name}': {problem}; valid options: {listed} (write {name}:key=value:key=value)")


def _option_value(name: str, key: str, kind: str, value: str) -> Any:
    if kind == "int":
        parts = [value]
    else:
        parts = [p.strip() for p in value.split(",")]
        if any(not p for p in parts):
            raise option_error(name, f"option {key}={value!r} has an empty item")
    out: list[Any] = []
    for part in parts:
        if kind in ("ints", "int"):
            try:
                number: Any = int(part)
            except ValueError:
                raise option_error(name, f"option {key}: {part!r} is not a whole number") from None
            if number < 1:
                raise option_error(name, f"option {key}: {number} must be at least 1")
        else:
            try:
                number = float(part)
            except ValueError:
                raise option_error(name, f"option {key}: {part!r} is not a number") from None
            if not (math.isfinite(number) and 0.0 <= number <= 1.0):
                raise option_error(name, f"option {key}: {part} is not a fraction between 0 and 1")
        out.append(number)
    return out[0] if kind == "int" else out


def parse_spec(spec: str) -> tuple[str, dict[str, Any]] | None:
    """``(name, options)`` for a built-in corpus spec ``name[:key=value]...``; None for a file path.

    Option values are checked and converted (``ints``/``fractions`` options become lists); an
    unknown option or a bad value raises CorpusError naming it and listing the valid options.
    """
    name, colon, rest = spec.partition(":")
    if name not in ALL_CORPORA:
        return None
    options: dict[str, Any] = {}
    if not colon:
        return name, options
    valid = ALL_CORPORA[name].options
    for part in rest.split(":"):
        key, eq, value = (s.strip() for s in part.partition("="))
        if not key:
            raise option_error(name, f"empty option in {spec!r} (a ':' with nothing after it)")
        if key not in valid:
            raise option_error(name, f"unknown option '{key}'")
        if not eq or not value:
            raise option_error(name, f"option '{key}' has no value (write {key}=...)")
        if key in options:
            raise option_error(name, f"option '{key}' is given twice")
        options[key] = _option_value(name, key, valid[key][0], value)
    return name, options
