"""Probes: small classes that reduce attention blocks to per-head or per-token statistics."""

from __future__ import annotations

import dataclasses

from ..errors import ProbeError
from ..specs import parse_options, split_top
from .attention_maps import AttentionMapsProbe
from .base import Needs, Probe, supports_state
from .cross_alignment import CrossAlignmentProbe
from .duplicate_token import DuplicateTokenProbe
from .entropy import EntropyProbe
from .fai import FaiProbe
from .head import HeadMeanProbe, HeadStats
from .image_attention import ImageAttentionProbe
from .induction import InductionProbe
from .massive_values import MassiveValuesProbe
from .mean_distance import MeanDistanceProbe
from .modality_mass import ModalityMassProbe
from .position_profile import PositionProfileProbe
from .prev_token import PrevTokenProbe
from .received import ReceivedProbe
from .repeat import RepeatProbe
from .retrieval import RetrievalProbe
from .sink import SinkProbe, sink_rate
from .sinks import SinksProbe
from .span import SpanProbe
from .token import TokenProbe
from .vision_aware import VisionAwareProbe
from .visual_sinks import VisualSinksProbe
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
        ModalityMassProbe,
        CrossAlignmentProbe,
        VisualSinksProbe,
        VisionAwareProbe,
        ImageAttentionProbe,
    )
}


def _build(spec: str) -> Probe:
    """One probe from ``name`` or ``name:key=value:key=value`` (values in JSON, or bare words)."""
    name, *options = split_top(spec, ":", ProbeError)
    name = name.strip()
    if name not in PROBES:
        raise ProbeError(f"unknown probe {name!r}; choose from: {', '.join(sorted(PROBES))}")
    cls = PROBES[name]
    settable = [f.name for f in dataclasses.fields(cls) if f.init] if dataclasses.is_dataclass(cls) else []
    kwargs = parse_options("probe", name, options, settable, ProbeError, "waad:window=20")
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
        names = [n.strip() for n in split_top(names, ",", ProbeError)]
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
    """The default probe set: every probe whose ``needs.default`` is set and that applies to the kind of model.

    Encoders get no probe that ``needs.causal`` (and so no generation probe).
    """
    return [name for name, cls in PROBES.items() if cls.needs.default and (causal or not cls.needs.causal)]


def encoder_decoder_probe_names() -> list[str]:
    """The default probe set of an encoder-decoder scan: every default probe that keys its sums by tower
    (``tower_aware``) and reads any corpus (encoder-decoders get no causal-only probe), then ``cross_alignment``."""
    names = [n for n in default_probe_names(False) if PROBES[n].tower_aware and PROBES[n].needs.corpus is None]
    return [*names, CrossAlignmentProbe.name] if CrossAlignmentProbe.name not in names else names


__all__ = [
    "PROBES",
    "AttentionMapsProbe",
    "CrossAlignmentProbe",
    "DuplicateTokenProbe",
    "EntropyProbe",
    "FaiProbe",
    "HeadMeanProbe",
    "HeadStats",
    "InductionProbe",
    "MassiveValuesProbe",
    "MeanDistanceProbe",
    "ModalityMassProbe",
    "Needs",
    "PositionProfileProbe",
    "PrevTokenProbe",
    "Probe",
    "ReceivedProbe",
    "RepeatProbe",
    "RetrievalProbe",
    "SinkProbe",
    "SinksProbe",
    "SpanProbe",
    "TokenProbe",
    "VisionAwareProbe",
    "VisualSinksProbe",
    "WaadProbe",
    "default_probe_names",
    "encoder_decoder_probe_names",
    "make_probes",
    "sink_rate",
    "supports_state",
]
