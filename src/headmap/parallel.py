"""Data parallel across processes: ``torchrun --nproc-per-node N -m headmap VERB ...`` (or ``accelerate launch``).

The pieces every data-parallel verb shares (``scan`` in :mod:`headmap.scan.distributed`, ``eval`` and
``tune`` in :mod:`headmap.evaluation.runs`): finding this process's rank from the variables torchrun
and accelerate set (RANK, WORLD_SIZE, LOCAL_RANK), joining the process group (gloo on CPU, NCCL on
GPU), gathering picklable values, stopping every rank with the same one line when one fails,
refusing ranks whose runs differ (naming the field), saying once (rank 0, one line) when there are
more ranks than work units (:meth:`Ranks.idle_note`), and :func:`split_work`: a deterministic share
of a list of work units per rank, the results gathered back in order on every rank.

The lowest layer of headmap (it imports only :mod:`headmap.errors`), so that sibling verbs can share it.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .errors import HeadmapError, OptionError

T = TypeVar("T")
R = TypeVar("R")

#: how long ranks wait for each other at a collective (a rank still loading a big model included)
TIMEOUT = datetime.timedelta(minutes=float(os.environ.get("HEADMAP_DIST_TIMEOUT_MIN", "60")))


def launched() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when started by torchrun / accelerate launch with more than one rank."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return None
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


@dataclass
class Ranks:
    """This process's place in a data-parallel run, and the collectives it uses."""

    rank: int
    world: int
    local_rank: int
    owns_group: bool = False  # this module started the process group (and ends it)
    said_idle: bool = field(default=False, repr=False, compare=False)  # idle_note has spoken in this run

    @property
    def leader(self) -> bool:
        return self.rank == 0

    @classmethod
    def start(cls, device: str) -> Any:
        """Join the process group torchrun describes (None for a single process)."""
        where = launched()
        if where is None:
            return None
        import torch
        import torch.distributed as dist

        rank, world, local = where
        gpu = torch.cuda.is_available() and str(device).split(":")[0] in ("cuda", "auto")
        if gpu:
            torch.cuda.set_device(local)
        owns = False
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if gpu else "gloo", timeout=TIMEOUT)
            owns = True
        if dist.get_world_size() != world:
            raise OptionError(f"WORLD_SIZE says {world} ranks, the process group has {dist.get_world_size()}")
        return cls(rank, world, local, owns)

    def device(self, device: str) -> str:
        """Each rank's own GPU (LOCAL_RANK) where the command says cuda; else the command's device."""
        import torch

        if str(device) in ("cuda", "auto") and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return device

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (picklable), in rank order, on every rank."""
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def to_leader(self, value: Any) -> list[Any] | None:
        """Every rank's ``value`` in rank order on rank 0 (None elsewhere): the states travel to rank 0 only."""
        import torch.distributed as dist

        out: list[Any] | None = [None] * self.world if self.leader else None
        dist.gather_object(value, out, dst=0)
        return out

    def together(self, step: Callable[[], T]) -> T:
        """Run ``step`` on this rank; when it raises a HeadmapError on any rank, raise on every rank.

        The first failing rank's message is raised everywhere (as an OptionError on the others), so
        that all ranks stop at the same point with the same one line, instead of waiting at the next
        collective for a rank that is gone.
        """
        result, error = None, None
        try:
            result = step()
        except HeadmapError as exc:
            error = exc
        errors = self.gather(None if error is None else f"{type(error).__name__}\x00{error}")
        if error is not None:
            raise error
        for rank, text in enumerate(errors):
            if text is not None:
                raise OptionError(f"rank {rank} stopped: {text.split(chr(0), 1)[1]}")
        return result  # type: ignore[return-value]

    def agree_on(self, fields: dict[str, Any], what: str) -> None:
        """Refuse ranks whose ``fields`` (picklable, compared with ==) differ from rank 0's, naming every
        field that differs (of the first such rank); ``what`` names the run (``eval``)."""
        every = self.gather(fields)
        lead = every[0]
        for rank, theirs in enumerate(every):
            diffs = [
                f"{key} differs ({_short(theirs.get(key))} vs {_short(lead.get(key))})"
                for key in sorted(set(lead) | set(theirs))
                if lead.get(key) != theirs.get(key)
            ]
            if diffs:
                raise OptionError(
                    f"the ranks of this data-parallel {what} disagree before any work: rank {rank} vs rank 0: "
                    f"{'; '.join(diffs)}; start every rank with the same command and inputs"
                )

    def idle_note(self, units: int, unit: str = "work unit") -> None:
        """More ranks than ``units`` units of work (``unit``, singular: ``batch``, ``item``): idle ranks are
        fine and only wait for the others; rank 0 says so in one line (a warning), once per run however
        many times it is called, and the other ranks say nothing. The one wording of scan, eval, tune and
        compress."""
        if units >= self.world or self.said_idle:
            return
        self.said_idle = True
        if self.leader:
            warnings.warn(
                f"{self.world} ranks for {units} {_plural(unit, units)}: ranks {units} to {self.world - 1} have no "
                "inputs and only wait for the others",
                stacklevel=3,
            )

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def close(self) -> None:
        import torch.distributed as dist

        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _plural(noun: str, count: int) -> str:
    if count == 1:
        return noun
    return noun + ("es" if noun.endswith(("s", "x", "ch", "sh")) else "s")


def _short(value: Any, limit: int = 80) -> str:
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- sharing work between ranks ----------------------------------------------------------------------

_ACTIVE: contextvars.ContextVar[Ranks | None] = contextvars.ContextVar("headmap_ranks", default=None)


@contextlib.contextmanager
def sharing(ranks: Ranks | None) -> Iterator[None]:
    """Within the block, :func:`split_work` shares its units among ``ranks`` (None: one process, no change)."""
    token = _ACTIVE.set(ranks)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active() -> Ranks | None:
    """The ranks :func:`split_work` shares work among now (None: one process)."""
    return _ACTIVE.get()


def owner(index: int, world: int) -> int:
    """The rank that computes work unit ``index``: round robin, so that units sorted by size spread evenly."""
    return index % world


def split_work(units: Sequence[T], compute: Callable[[T], R], unit: str = "work unit") -> list[R]:
    """``[compute(u) for u in units]``; inside :func:`sharing` each rank computes only its own units
    (:func:`owner`) and the results are gathered, in unit order, on every rank. Fewer units than ranks:
    rank 0 says once per run that the others only wait (:meth:`Ranks.idle_note`; ``unit`` names a unit).

    A unit is computed exactly as one process would compute it (the same inputs, the same batch),
    so the gathered results equal a single process's bit for bit. Every rank must call this with the
    same units in the same order (the callers check that by a fingerprint before any work). A
    HeadmapError on one rank stops every rank with its message (:meth:`Ranks.together`).
    """
    ranks = _ACTIVE.get()
    if ranks is None:
        return [compute(u) for u in units]

    ranks.idle_note(len(units), unit)

    def mine() -> dict[int, R]:
        return {i: compute(u) for i, u in enumerate(units) if owner(i, ranks.world) == ranks.rank}

    done: dict[int, R] = {}
    for part in ranks.gather(ranks.together(mine)):
        done.update(part)
    return [done[i] for i in range(len(units))]
