"""The built-in corpora, registered by name the way transformers' ``GeneralInterface`` registers
attention functions: a mapping ``name -> BuiltinCorpus`` shared by every instance, to which a
module adds its corpus with :func:`register_corpus` (or ``CorpusInterface.register``).

``load_corpus`` and ``parse_spec`` look names up here, so a new corpus is one new module that
registers itself; nothing else changes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from .types import Sample


@dataclass
class Built:
    """What a built-in corpus builder returns: the inputs, its options as used (recorded in the
    corpus description), and what else the description says about it (seed, source)."""

    samples: list[Sample]
    options: dict[str, Any] = field(default_factory=dict)
    description: dict[str, Any] = field(default_factory=dict)


#: ``build(tokenizer, max_length=..., limit=..., seed=..., vocab_size=..., options=...) -> Built``;
#: ``limit`` is None when the user gave none (each corpus has its own default count).
Builder = Callable[..., Built]


@dataclass(frozen=True)
class BuiltinCorpus:
    """A built-in corpus: its builder and its options, option -> (value kind, what it sets).

    Value kinds: ``int`` (a whole number >= 1), ``ints`` (comma-separated whole numbers >= 1),
    ``fractions`` (comma-separated numbers in [0, 1]).
    """

    name: str
    build: Builder
    options: dict[str, tuple[str, str]] = field(default_factory=dict)


class CorpusInterface(MutableMapping):
    """Name -> :class:`BuiltinCorpus`. The global mapping holds every registered corpus; an instance
    may add or override entries locally without touching the global one."""

    _global_mapping: dict[str, BuiltinCorpus] = {}

    def __init__(self) -> None:
        self._local_mapping: dict[str, BuiltinCorpus] = {}

    def __getitem__(self, key: str) -> BuiltinCorpus:
        if key in self._local_mapping:
            return self._local_mapping[key]
        return self._global_mapping[key]

    def __setitem__(self, key: str, value: BuiltinCorpus) -> None:
        self._local_mapping[key] = value

    def __delitem__(self, key: str) -> None:
        del self._local_mapping[key]

    def __iter__(self) -> Iterator[str]:
        return iter({**self._global_mapping, **self._local_mapping})

    def __len__(self) -> int:
        return len(self._global_mapping.keys() | self._local_mapping.keys())

    @classmethod
    def register(cls, key: str, value: BuiltinCorpus) -> None:
        cls._global_mapping.update({key: value})

    def valid_keys(self) -> list[str]:
        return list(self.keys())


def register_corpus(name: str, options: dict[str, tuple[str, str]] | None = None) -> Callable[[Builder], Builder]:
    """Decorator: register ``build`` as the built-in corpus ``name`` with ``options``."""

    def wrap(build: Builder) -> Builder:
        CorpusInterface.register(name, BuiltinCorpus(name, build, dict(options or {})))
        return build

    return wrap


#: Every registered corpus (the shipped ones register on ``import headmap.corpus``).
ALL_CORPORA = CorpusInterface()
