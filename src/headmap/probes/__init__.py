"""Probes: small classes that reduce attention blocks to per-head or per-token statistics."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from ..errors import ProbeError
from .attention_maps import AttentionMapsProbe
from .base import HeadMeanProbe, HeadStats, Probe, supports_state
from .duplicate_token import DuplicateTokenProbe, RepeatProbe
from .entropy import EntropyProbe
from .fai import FaiProbe
from .induction import InductionProbe
from .massive_values import MassiveValuesProbe
from .mean_distance import MeanDistanceProbe
from .position_profile import PositionProfileProbe
from .prev_token import PrevTokenProbe
from .received import ReceivedProbe
from .retrieval import RetrievalProbe
from .sink import SinkProbe, sink_rate
from .sinks import SinksProbe
from .span import SpanProbe
from .waad import WaadProbe

#: Probe classes by command-line name.
PROBES: dict[str, type[Probe]] = {
    cls.name: cls
    for cls in (
        SinkProbe,
        EntropyProbe,
        MeanDistanceProbe,
        WaadProbe,
        PrevTokenProbe,
        DuplicateTokenProbe,
        InductionProbe,
        RetrievalProbe,
        SpanProbe,
        PositionProfileProbe,
        ReceivedProbe,
        FaiProbe,
        SinksProbe,
        MassiveValuesProbe,
        AttentionMapsProbe,
    )
}


def _split_names(text: str) -> list[str]:
    """Split ``a,b:k=[1,2],c`` on the commas outside brackets."""
    parts, depth, current = [], 0, []
    for ch in text:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == "," and depth <= 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        lowered = text.strip().lower()
        if lowered in ("true", "false"):
            return lowered == "true"
        return text.strip()


def _build(spec: str) -> Probe:
    """One probe from ``name`` or ``name:key=value:key=value`` (values in JSON, or bare strings)."""
    name, *options = spec.split(":")
    name = name.strip()
    if name not in PROBES:
        raise ProbeError(f"unknown probe {name!r}; choose from: {', '.join(sorted(PROBES))}")
    cls = PROBES[name]
    settable = [f.name for f in dataclasses.fields(cls) if f.init] if dataclasses.is_dataclass(cls) else []
    kwargs: dict[str, Any] = {}
    for option in options:
        key, sep, value = option.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ProbeError(f"probe option {option!r} of {name} is not key=value (e.g. waad:window=20)")
        if key not in settable:
            have = ", ".join(settable) or "none"
            raise ProbeError(f"probe {name} has no parameter {key!r}; its parameters: {have}")
        kwargs[key] = _parse_value(value)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ProbeError(f"bad parameters for probe {name}: {exc}") from exc


def make_probes(names: str | list[str]) -> list[Probe]:
    """Instantiate probes from a comma-separated string or a list of names.

    Each name may carry parameters: ``waad:window=20``, ``retrieval:mode=teacher``,
    ``sinks:tau=0.3:ratio=10`` (values are JSON: numbers, true/false, [lists], or bare strings).
    """
    if isinstance(names, str):
        names = _split_names(names)
    names = [n.strip() for n in names if n and n.strip()]
    if not names:
        raise ProbeError(f"no probe named; choose from: {', '.join(sorted(PROBES))}")
    unknown = [n for n in names if n.split(":")[0].strip() not in PROBES]
    if unknown:
        raise ProbeError(
            f"unknown probe {', '.join(repr(n) for n in unknown)}; choose from: {', '.join(sorted(PROBES))}"
        )
    seen: dict[str, Probe] = {}
    for spec in names:
        probe = _build(spec)
        if probe.name in seen:
            if spec.strip() == probe.name:
                continue
            raise ProbeError(f"probe {probe.name} is named twice; name each probe once")
        seen[probe.name] = probe
    return list(seen.values())


def default_probe_names(causal: bool) -> list[str]:
    """The default probe set: every probe marked ``default`` that applies to the kind of model.

    Encoders get no causal-only probe (and so no generation probe).
    """
    return [name for name, cls in PROBES.items() if cls.default and (causal or not cls.causal_only)]


__all__ = [
    "PROBES",
    "AttentionMapsProbe",
    "DuplicateTokenProbe",
    "EntropyProbe",
    "FaiProbe",
    "HeadMeanProbe",
    "HeadStats",
    "InductionProbe",
    "MassiveValuesProbe",
    "MeanDistanceProbe",
    "PositionProfileProbe",
    "PrevTokenProbe",
    "Probe",
    "ReceivedProbe",
    "RepeatProbe",
    "RetrievalProbe",
    "SinkProbe",
    "SinksProbe",
    "SpanProbe",
    "WaadProbe",
    "default_probe_names",
    "make_probes",
    "sink_rate",
    "supports_state",
]
