"""Data-parallel scans: ``torchrun --nproc-per-node N -m headmap scan ...`` (or ``accelerate launch``).

Every rank loads the model, plans the whole scan and computes the run's fingerprint; the ranks
compare fingerprints (and output folder) before any forward pass and stop together, naming the
field, when they disagree. Each rank then scans its own shard (:func:`headmap.scan.plan.shard`: a
contiguous run of the single-process scan's batches in every group), checkpoints its progress into
``<out>/.headmap-rank-R-of-N/``, and at the end rank 0 gathers every rank's probe states over
``torch.distributed`` (gloo on CPU, NCCL on GPU), merges them (:func:`merge_states`) and writes the
one run folder.

Probe states are sums and counts. Token rows belong to one input each and come back unchanged,
so token tables equal a single-process scan's bit for bit; head sums are float64 sums merged in
another order (rank by rank instead of batch by batch), which moves a head value by at most
2 (m - 1) u relative for m inputs and non-negative per-input values (u = 2^-53; each order's
float64 sum is within (m - 1) u sum|x| of the exact sum), i.e. below 1e-12 for m < 2^42.

A rank that dies makes torchrun stop the others with SIGTERM: they write their checkpoints and
exit. The same command with ``--resume`` goes on from every rank's own checkpoint.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import parallel
from ..errors import OptionError, ProbeError
from ..probes import Probe

RANK_DIR = ".headmap-rank-{rank}-of-{world}"


@dataclass
class Ranks(parallel.Ranks):
    """This process's place in a data-parallel scan (:class:`headmap.parallel.Ranks`), with the scan's
    fingerprint check and its rank checkpoint folders."""

    def agree(self, fingerprint: dict[str, Any], out: Path | None, resume: bool) -> None:
        """Refuse ranks whose run differs from rank 0's (fingerprint fields, output folder, --resume)."""
        from .checkpoint import differences

        mine = {"fingerprint": fingerprint, "out": str(out.resolve()) if out else None, "resume": resume}
        every = self.gather(mine)
        lead = every[0]
        for rank, theirs in enumerate(every):
            diffs = differences(lead["fingerprint"], theirs["fingerprint"], theirs="rank 0")
            for key in ("out", "resume"):
                if theirs[key] != lead[key]:
                    diffs.append(f"--{key} differs: rank 0 has {lead[key]}, this run {theirs[key]}")
            if diffs:
                raise OptionError(
                    f"the ranks of this data-parallel scan disagree before any work: rank {rank} vs rank 0: "
                    f"{'; '.join(diffs)}; start every rank with the same command and corpus"
                )

    def folder(self, out: Path | None) -> Path | None:
        """This rank's checkpoint folder inside the run folder."""
        return None if out is None else out / RANK_DIR.format(rank=self.rank, world=self.world)


def rank_folders(out: Path) -> list[Path]:
    """The rank checkpoint folders in ``out`` (of any world size)."""
    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir() if p.name.startswith(".headmap-rank-") and p.is_dir())


def check_rank_folders(out: Path | None, world: int, overwrite: bool, resume: bool) -> None:
    """Refuse rank checkpoints of an interrupted data-parallel scan unless resumed (same world size) or overwritten."""
    if out is None:
        return
    found = rank_folders(out)
    if found and overwrite:  # --overwrite starts over: the old ranks' checkpoints go
        for folder in found:
            remove_rank_folder(folder)
        return
    if not found:
        return
    other = [p.name for p in found if not p.name.endswith(f"-of-{world}")]
    if other:
        raise OptionError(
            f"--out {out} holds checkpoints of a data-parallel scan with another number of ranks ({other[0]}); "
            f"resume it with that many ranks, or add --overwrite to start over"
        )
    if not resume:
        raise OptionError(
            f"--out {out} holds the checkpoints of an interrupted data-parallel scan ({len(found)} ranks); "
            "pass --resume to continue it, --overwrite to start over, or choose another folder"
        )


def remove_rank_folder(folder: Path | None) -> None:
    if folder is not None and folder.is_dir():
        from . import checkpoint

        checkpoint.remove(folder)
        shutil.rmtree(folder, ignore_errors=True)


def idle_note(ranks: Ranks, batches: int) -> None:
    """More ranks than batches: said once, by rank 0 (:meth:`headmap.parallel.Ranks.idle_note`)."""
    ranks.idle_note(batches, "batch")


# -- merging probe states ------------------------------------------------------------------------


def _kind(state: dict[str, np.ndarray]) -> str:
    if "chunks" in state:
        return "token"
    if "samples" in state and "lengths" in state:
        return "maps"
    return "sums"


#: state keys (before ``.<layer>``) that are sums over inputs: added across ranks
SUM_KEYS = ("total", "total_sq", "count", "q", "k", "n")


def mergeable(probe: Probe) -> str | None:
    """None when a data-parallel scan can merge the probe's states (read from the form of its empty
    state, not from its name); else why not."""
    from ..probes import supports_state

    label = probe.name or type(probe).__name__
    if not supports_state(probe):
        return f"probe {label} cannot save its state (state_dict), so the ranks cannot hand it to rank 0"
    state = probe.state_dict()
    kind = _kind(state)
    if kind == "sums":
        odd = [k for k in state if k not in ("layers", "kv_heads", "k", "instances")]
        odd = [k for k in odd if k.partition(".")[0] not in SUM_KEYS]
        if odd:
            return f"probe {label} keeps state {odd[0]!r}, which headmap does not know how to merge across ranks"
    return None


def check_mergeable(probes: Sequence[Probe]) -> None:
    bad = [why for p in probes if (why := mergeable(p)) is not None]
    if bad:
        raise ProbeError(f"{bad[0]}; run it in one process (without torchrun), or leave it out of --probes")


def merge_states(states: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One probe's states from every rank (rank order), merged into the state of one scan over all inputs."""
    states = [s for s in states if s is not None]
    kind = _kind(states[0])
    if kind == "token":
        return _merge_token(states)
    if kind == "maps":
        return _merge_maps(states)
    return _merge_sums(states)


def _merge_token(states: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    chunks = 0
    for s in states:
        n = int(np.asarray(s["chunks"]))
        for key, value in s.items():
            head, dot, name = key.partition(".")
            if dot and head.isdigit():
                out[f"{int(head) + chunks}.{name}"] = value
        chunks += n
    out["chunks"] = np.array(chunks)
    out["next_sample"] = np.array(max(int(np.asarray(s["next_sample"])) for s in states), dtype=np.int64)
    return out


def _merge_maps(states: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    samples: list[int] = []
    lengths: list[int] = []
    for s in states:
        samples += [int(x) for x in np.asarray(s["samples"]).reshape(-1)]
        lengths += [int(x) for x in np.asarray(s["lengths"]).reshape(-1)]
        out.update({k: v for k, v in s.items() if k.startswith("map.")})
    out["samples"] = np.array(samples, dtype=np.int64)
    out["lengths"] = np.array(lengths, dtype=np.int64)
    out["next_sample"] = np.array(max(int(np.asarray(s["next_sample"])) for s in states), dtype=np.int64)
    return out


def _merge_sums(states: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    kv: dict[int, int] = {}
    for s in states:
        layers = [int(x) for x in np.asarray(s.get("layers", np.zeros(0))).reshape(-1)]
        if "kv_heads" in s:
            kv.update(zip(layers, (int(x) for x in np.asarray(s["kv_heads"]).reshape(-1)), strict=True))
        for key, value in s.items():
            if key in ("layers", "kv_heads"):
                continue
            if key == "k":  # a profile's width: 0 on a rank that saw no input
                seen = int(np.asarray(value).reshape(-1)[0])
                if seen:
                    out[key] = np.asarray(value)
                else:
                    out.setdefault(key, np.asarray(value))
                continue
            prefix = key.partition(".")[0]
            if prefix not in SUM_KEYS and key != "instances":
                raise ValueError(f"state key {key!r} is not a sum headmap can merge")
            out[key] = np.asarray(value) + out[key] if key in out else np.array(value, copy=True)
        for layer in layers:
            kv.setdefault(layer, 0)
    layers = sorted(kv)
    out["layers"] = np.array(layers, dtype=np.int64)
    if any(kv.values()):
        out["kv_heads"] = np.array([kv[layer] for layer in layers], dtype=np.int64)
    return out
