"""The ``name:key=value:key=value`` spec syntax shared by probes (``--probes``) and edits (``--edit``).

Values are JSON (numbers, true/false, [lists], "strings") or bare words; colons and commas inside
brackets or quotes do not split.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any


def split_top(text: str, sep: str, error: Callable[[str], Exception]) -> list[str]:
    """Split ``text`` on ``sep`` outside brackets and quotes; ``error(message)`` for an unclosed quote."""
    parts, current, depth, quote = [], [], 0, None
    for ch in text:
        if quote:
            current.append(ch)
            if ch == quote:
                quote = None
            continue
        if ch in "\"'":
            quote = ch
        elif ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == sep and depth <= 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if quote:
        raise error(f"spec {text!r} has an unclosed quote ({quote})")
    parts.append("".join(current))
    return parts


def parse_value(text: str) -> Any:
    """A spec value: JSON, a 'single-quoted' string, true/false, none, a non-finite number, or the bare word."""
    text = text.strip()
    try:
        return json.loads(text)
    except ValueError:
        pass
    if len(text) >= 2 and text[0] == text[-1] == "'":
        return text[1:-1]
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    if lowered in ("nan", "inf", "+inf", "-inf", "infinity", "+infinity", "-infinity"):
        return float(lowered)  # so that the class says the number must be finite
    return text


def parse_options(
    kind: str,
    name: str,
    options: Sequence[str],
    settable: Sequence[str],
    error: Callable[[str], Exception],
    example: str,
) -> dict[str, Any]:
    """Keyword arguments from ``key=value`` options of the ``kind`` (probe, edit) called ``name``."""
    kwargs: dict[str, Any] = {}
    for option in options:
        key, sep, value = option.partition("=")
        key = key.strip()
        if not sep or not key:
            raise error(f"{kind} option {option!r} of {name} is not key=value (e.g. {example})")
        if key not in settable:
            raise error(f"{kind} {name} has no parameter {key!r}; its parameters: {', '.join(settable) or 'none'}")
        if key in kwargs:
            raise error(f"{kind} {name} sets {key} twice")
        kwargs[key] = parse_value(value)
    return kwargs


def is_whole(value: Any) -> bool:
    """True for an integer that is not a bool (``True`` is an int to Python, never a count to a user)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """True for a finite real number that is not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
