"""Held-out discipline: head selection (a scan's corpus), tuning (dev) and testing read disjoint
needles, haystacks, prose and items, checked from what the items record (docs/methods/statistics.md).

A scan's meta.json describes its corpus; the built-in ``needle`` corpus lists its ``needles``,
``haystacks`` and ``paragraphs`` there (``headmap.corpus.needle``). An evaluation's items record the
same (the RULER-style tasks of :mod:`headmap.evaluation.ruler`, the needle corpus, a JSONL file with
those fields). :func:`check` compares two sides and refuses an overlap (TaskError, exit 2, naming
what is shared) unless ``allow`` is given; either way the outcome is recorded for summary.json.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import TaskError

KINDS = ("items", "needles", "haystacks", "paragraphs")


@dataclass(frozen=True)
class Side:
    """What one side of the check reads: items (the sha1 of their context, so that two files' items
    compare by what they say, not by their ids), needle ids, haystack ids, prose paragraph numbers."""

    name: str
    items: frozenset[str]
    needles: frozenset[str]
    haystacks: frozenset[str]
    paragraphs: frozenset[int]

    @property
    def recorded(self) -> bool:
        """Whether this side records anything the check can compare (beyond item ids)."""
        return bool(self.needles or self.haystacks or self.paragraphs)

    def as_exclude(self) -> dict[str, Any]:
        """This side as an ``exclude`` entry of :func:`headmap.evaluation.ruler.generate`."""
        return {
            "needles": sorted(self.needles),
            "haystack": sorted(self.haystacks),
            "paragraphs": sorted(self.paragraphs),
        }


def _values(obj: Any, *names: str) -> list[Any]:
    out: list[Any] = []
    for name in names:
        value = obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)
        if value is None:
            continue
        out.extend(value if isinstance(value, list | tuple | set | frozenset) else [value])
    return out


def from_description(description: dict[str, Any] | None, name: str = "the atlas's corpus") -> Side:
    """The side a scan's corpus description (meta.json ``corpus``, with its ``groups``) records."""
    parts = [description or {}]
    parts += [g for g in (description or {}).get("groups") or [] if isinstance(g, dict)]
    return Side(
        name,
        frozenset(str(v) for p in parts for v in _values(p, "items")),
        frozenset(str(v) for p in parts for v in _values(p, "needles")),
        frozenset(str(v) for p in parts for v in _values(p, "haystacks")),
        frozenset(int(v) for p in parts for v in _values(p, "paragraphs")),
    )


def from_items(items: Iterable[Any], name: str) -> Side:
    """The side task items record: ``id``, ``needle``/``needles``/``needle_id``, ``haystack``, ``paragraphs``
    (TaskItems read them from their ``info``; needle-corpus Samples from theirs)."""
    ids, needles, haystacks, paragraphs = set(), set(), set(), set()
    for item in items:
        info = getattr(item, "info", None)
        source = info if isinstance(info, dict) else item
        context = item.get("context") if isinstance(item, dict) else getattr(item, "context", None)
        if isinstance(context, str):
            ids.add("context sha1 " + hashlib.sha1(context.encode("utf-8")).hexdigest()[:12])
        needles.update(str(v) for v in _values(source, "needle", "needles", "needle_id"))
        haystacks.update(str(v) for v in _values(source, "haystack"))
        paragraphs.update(int(v) for v in _values(source, "paragraphs"))
    return Side(name, frozenset(ids), frozenset(needles), frozenset(haystacks), frozenset(paragraphs))


@dataclass(frozen=True)
class Check:
    """The outcome of one held-out check, as summary.json records it."""

    between: tuple[str, str]
    shared: dict[str, list[Any]]
    allowed: bool
    compared: bool  # False when a side records nothing to compare

    @property
    def disjoint(self) -> bool:
        return self.compared and not any(self.shared.values())

    def describe(self, limit: int = 5) -> str:
        if not self.compared:
            return f"not checked: {self.between[0]} or {self.between[1]} records no needles, haystacks or paragraphs"
        parts = []
        for kind in KINDS:
            values = self.shared[kind]
            if values:
                shown = ", ".join(str(v) for v in values[:limit])
                more = f" and {len(values) - limit} more" if len(values) > limit else ""
                parts.append(f"{len(values)} shared {kind} ({shown}{more})")
        return "; ".join(parts) if parts else "disjoint: no shared item, needle, haystack or paragraph"

    def as_dict(self) -> dict[str, Any]:
        return {
            "between": list(self.between),
            "compared": self.compared,
            "disjoint": self.disjoint,
            "allowed_overlap": self.allowed,
            "shared": {k: len(v) for k, v in self.shared.items()},
            "shared_examples": {k: v[:20] for k, v in self.shared.items() if v},
            "result": self.describe(),
        }


def check(a: Side, b: Side, allow: bool = False, what: str = "--allow-overlap") -> Check:
    """Compare two sides; TaskError naming the shared needles/haystacks/paragraphs/items unless ``allow``."""
    compared = (a.recorded or bool(a.items)) and (b.recorded or bool(b.items))
    shared: dict[str, list[Any]] = {
        kind: sorted(getattr(a, kind) & getattr(b, kind)) if compared else [] for kind in KINDS
    }
    result = Check((a.name, b.name), shared, allow, bool(compared))
    if compared and not result.disjoint and not allow:
        raise TaskError(
            f"{a.name} and {b.name} overlap: {result.describe()}; held-out results need disjoint inputs: "
            f"draw others (another --seed, a RULER-style task such as niah_single, which avoids the atlas's "
            f"needles and prose) or pass {what} to evaluate anyway (recorded in summary.json)"
        )
    return result


def check_all(sides: Sequence[Side], allow: bool = False) -> list[Check]:
    """Every pair of ``sides`` checked, in order; the first overlapping pair raises (unless ``allow``)."""
    out = []
    for i in range(len(sides)):
        for j in range(i + 1, len(sides)):
            out.append(check(sides[i], sides[j], allow))
    return out
