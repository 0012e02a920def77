"""Planning a scan: which probes read which corpus (groups), in what order, in which batches.

With a corpus every probe reads it. Without one, each probe reads its own built-in corpus
(``needs.default_corpus``, else ``text``). Probes that read the same corpus share its forward
passes; a probe that drives the model itself (``needs.drives_model``) gets a group of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ..corpus import DEFAULT_CORPUS, Corpus, load_corpus
from ..errors import OptionError, ProbeError
from ..models import LoadedModel
from ..probes import Probe
from . import images, seq2seq


@dataclass
class Group:
    """Probes that read the same corpus in the same forward passes (or one probe that drives the model)."""

    corpus: Corpus
    probes: list[Probe]
    offset: int = 0  # index of the corpus's first input in the whole corpus (a shard's slice starts later)

    @property
    def drives_model(self) -> bool:
        return any(p.needs.drives_model for p in self.probes)


@dataclass
class Plan:
    """The groups in scan order, the default probes left out (name: why), all inputs, where batches end."""

    groups: list[Group]
    skipped: dict[str, str]
    data: Corpus  # the inputs of every group in scan order (fingerprint, progress count)
    starts: list[int]  # index in ``data`` of each group's first input
    boundaries: set[int]  # input counts at which a batch ends (where a checkpoint may stand)

    @property
    def probes(self) -> list[Probe]:
        return [p for g in self.groups for p in g.probes]


def corpus_maker(
    loaded: LoadedModel, max_length: int, limit: int | None, seed: int, strict: bool
) -> Callable[[Any], Corpus]:
    """``make(spec) -> Corpus``: a built-in name or a file, tokenized for this model."""

    def make(spec: Any) -> Corpus:
        if loaded.tokenizer is None:
            raise OptionError("pass the model's tokenizer (scan(model, tokenizer=...)) to build a corpus")
        extra = {"strict": True} if strict else {}
        data = load_corpus(
            spec,
            loaded.tokenizer,
            max_length,
            limit=limit,
            seed=seed,
            vocab_size=_vocab_size(loaded.model.config),
            **extra,
        )
        data = seq2seq.prepare(data, loaded, max_length, strict)  # an encoder-decoder: pairs or audio
        return images.prepare(data, loaded, max_length)  # an image corpus: the model's processor prepares it

    return make


def _vocab_size(config: Any) -> int | None:
    """The vocabulary size of a model's config (a VLM's is in its text config)."""
    size = getattr(config, "vocab_size", None)
    if size is None:
        size = getattr(getattr(config, "get_text_config", lambda: None)(), "vocab_size", None)
    return size


def make_plan(probes: list[Probe], explicit: bool, corpus: Any, make: Callable[[Any], Corpus], batch_size: int) -> Plan:
    """Plan the groups, then let every probe ``prepare`` for the corpus it reads."""
    groups, skipped = plan_groups(probes, explicit, corpus, make)
    for group in groups:
        for probe in group.probes:
            probe.prepare(group.corpus)
    return _layout(groups, skipped, batch_size)


def _layout(groups: list[Group], skipped: dict[str, str], batch_size: int) -> Plan:
    data = combined(groups)
    starts, boundaries, offset = [], {0}, 0
    for g in groups:
        starts.append(offset)
        boundaries.update(offset + min(k + batch_size, len(g.corpus)) for k in range(0, len(g.corpus), batch_size))
        offset += len(g.corpus)
    return Plan(groups, skipped, data, starts, boundaries)


def shard(plan: Plan, index: int, count: int, batch_size: int) -> Plan:
    """Shard ``index`` of ``count`` (0-based) of ``plan``: in every group, a contiguous run of whole batches.

    The batches are those of the unsharded scan (same inputs, same padding), so every input's
    numbers are those of a single-process scan; the shards of all ``count`` indices cover each
    batch once. Inputs keep their index in the whole corpus (``Group.offset``). A shard may be empty
    (more shards than batches).
    """
    groups = []
    for g in plan.groups:
        batches = -(-len(g.corpus) // batch_size)
        lo, hi = batches * index // count, batches * (index + 1) // count
        a, b = lo * batch_size, min(hi * batch_size, len(g.corpus))
        part = Corpus(g.corpus.name, Slice(g.corpus.samples, a, b), g.corpus.description)
        groups.append(Group(part, g.probes, g.offset + a))
    return _layout(groups, plan.skipped, batch_size)


def batches_of(plan: Plan, batch_size: int) -> int:
    """How many batches the plan's groups make."""
    return sum(-(-len(g.corpus) // batch_size) for g in plan.groups)


def plan_groups(
    probes: list[Probe], explicit: bool, corpus: Any, make: Callable[[Any], Corpus]
) -> tuple[list[Group], dict[str, str]]:
    """Which probes read which corpus; returns the groups and the default probes skipped (name: why).

    With a corpus every probe reads it: an explicitly named probe that cannot read it is an error,
    a default one is skipped. Without one, each probe reads its own built-in corpus (``text`` unless
    it names another).
    """
    if corpus is not None:
        return _one_corpus(probes, explicit, corpus if isinstance(corpus, Corpus) else make(corpus))
    skipped: dict[str, str] = {}
    by_corpus: dict[str, list[Probe]] = {}
    for p in probes:
        if p.needs.corpus == "spans" and p.needs.default_corpus is None:
            if explicit:
                raise ProbeError(
                    f"probe {p.name} needs inputs with named spans and has no built-in corpus; pass a JSONL "
                    'corpus whose lines hold {"text": ..., "spans": {...}} with --corpus'
                )
            skipped[p.name] = "it needs a corpus with spans"
            continue
        by_corpus.setdefault(p.needs.default_corpus or DEFAULT_CORPUS, []).append(p)
    groups = []
    for name, members in by_corpus.items():
        data = make(name)
        blind = [(p, why) for p in members if (why := _blind(p, data)) is not None]
        if blind and explicit:
            raise ProbeError(f"probe {blind[0][0].name} cannot read corpus '{data.name}': {blind[0][1]}")
        skipped.update({p.name: why for p, why in blind})
        members = [p for p in members if _blind(p, data) is None]
        if members:
            groups += _split(data, members)
    return groups, skipped


def _blind(probe: Probe, data: Corpus) -> str | None:
    """Why ``probe`` cannot read ``data``: image inputs, or an encoder-decoder's (None when it can)."""
    return images.tower_blind(probe, data) or seq2seq.tower_blind(probe, data)


def _one_corpus(probes: list[Probe], explicit: bool, data: Corpus) -> tuple[list[Group], dict[str, str]]:
    skipped: dict[str, str] = {}
    keep = []
    for p in probes:
        why = p.applies_to(data) or _blind(p, data)
        if why is None:
            keep.append(p)
        elif explicit:
            raise ProbeError(
                f"probe {p.name} cannot read corpus '{data.name}': {why}; drop it from --probes, or leave "
                "out --corpus so that each probe reads its own built-in corpus"
            )
        else:
            skipped[p.name] = why
    if not keep:
        raise ProbeError(f"no probe of the default set can read corpus '{data.name}'; name probes with --probes")
    return _split(data, keep), skipped


def _split(data: Corpus, probes: list[Probe]) -> list[Group]:
    """One group for the probes that share forward passes, then one per probe that drives the model."""
    plain = [p for p in probes if not p.needs.drives_model]
    return ([Group(data, plain)] if plain else []) + [Group(data, [p]) for p in probes if p.needs.drives_model]


class Slice(Sequence):
    """Inputs ``[start, stop)`` of a sequence of inputs, without copying (a streamed file stays streamed)."""

    def __init__(self, base: Sequence, start: int, stop: int) -> None:
        self.base, self.start, self.stop = base, start, max(start, stop)

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            lo, hi, step = index.indices(len(self))
            if step != 1:
                return [self[i] for i in range(lo, hi, step)]
            return Slice(self.base, self.start + lo, self.start + max(lo, hi))
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.base[self.start + index]

    def __iter__(self) -> Iterator[Any]:
        if self.start == 0 and self.stop >= len(self.base):
            yield from self.base  # a streamed file reads in one pass
            return
        for i in range(self.start, self.stop):
            yield self.base[i]


class Chain(Sequence):
    """The inputs of several corpora in scan order, without copying (a streamed file stays streamed)."""

    def __init__(self, parts: list[Sequence]) -> None:
        self.parts = parts

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def __getitem__(self, index: int) -> Any:
        for part in self.parts:
            if index < len(part):
                return part[index]
            index -= len(part)
        raise IndexError(index)

    def __iter__(self) -> Iterator[Any]:
        for part in self.parts:
            yield from part


def combined(groups: list[Group]) -> Corpus:
    """All inputs of all groups in scan order (for the fingerprint and the progress count)."""
    if len(groups) == 1:
        return groups[0].corpus
    samples = Chain([g.corpus.samples for g in groups])
    name = "+".join(f"{g.corpus.name}[{','.join(p.name for p in g.probes)}]" for g in groups)
    desc = {
        "name": name,
        "kind": "groups",
        "groups": [{"probes": [p.name for p in g.probes], **g.corpus.description} for g in groups],
        "inputs": len(samples),
        "tokens": sum(g.corpus.description.get("tokens", 0) for g in groups),
    }
    return Corpus(name, samples, desc)
