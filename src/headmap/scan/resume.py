"""Where a scan starts and what it keeps: the resume point, and the checkpoints between batches.

A scan with an output folder checkpoints the inputs it has completed (:mod:`.checkpoint`) at
batch boundaries, at most every ``checkpoint_every_s`` seconds and once more when Ctrl-C or
SIGTERM stops it. ``resume=True`` reads the checkpoint back (:func:`start`) when it belongs to the
same run.
"""

from __future__ import annotations

import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import rundir
from ..atlas import Atlas
from ..engine.towers import split_layer_key
from ..errors import HeadmapError, OptionError, OutputError, ScanInterrupted, Terminated
from ..probes import Probe, supports_state
from ..rundir import CHECKPOINT_DIR
from . import checkpoint
from .plan import Plan


def layer_name(key: int | tuple[str, int]) -> str:
    """A layer key of ``Run.layers`` in a checkpoint: ``"3"`` (text tower, as ever) or ``"vision:3"``."""
    tower, layer = split_layer_key(key)
    return str(layer) if tower == "text" else f"{tower}:{layer}"


def layer_of(name: str) -> int | tuple[str, int]:
    """The key of ``Run.layers`` that :func:`layer_name` wrote."""
    tower, sep, layer = str(name).rpartition(":")
    return (tower, int(layer)) if sep else int(layer)


def _layer_order(item: tuple) -> tuple:
    tower, layer = split_layer_key(item[0])
    return (tower != "text", tower, layer)


@dataclass
class Run:
    """A scan in progress: how far it is, the time and layers it recorded, and its checkpoints."""

    out: Path | None
    fingerprint: dict[str, Any]
    total: int  # inputs of the whole scan
    started: float  # time.time() when this process started the scan
    every_s: float  # checkpoint at most this often
    can_save: bool  # an output folder, and every probe can save its state
    resume_at: int = 0  # inputs done when the loop starts (the resume point)
    wall_before: float = 0.0  # wall time of the runs before the resume point
    forward_time: float = 0.0
    resumed_from: list[int] = field(default_factory=list)
    #: (heads, kv_heads) by layer, from the engine: the layer number for the text tower, (tower, layer) for others
    layers: dict[int | tuple[str, int], tuple[int, int]] = field(default_factory=dict)
    #: (inputs done, probe states) at the last batch boundary, assigned in one step once both are
    #: complete: an interrupt anywhere (mid-forward, mid-commit) leaves it whole.
    last: tuple[int, list | None] = (0, None)
    on_disk: int = 0  # inputs the checkpoint in ``out`` holds (for this run)
    last_write: float = field(default_factory=time.monotonic)
    #: the finished run the folder held when the scan started (``rundir.run_stamp``), which it may replace
    found: tuple[int, int, int, int] | None = None

    def wall_time(self) -> float:
        return round(self.wall_before + time.time() - self.started, 3)

    def completed(self, inputs: int, probes: list[Probe]) -> None:
        """A batch of ``inputs`` inputs is done: remember the probes' states (when checkpoints are on)."""
        self.last = (self.last[0] + inputs, [p.state_dict() for p in probes] if self.can_save else None)

    def save_if_due(self) -> None:
        due = time.monotonic() - self.last_write >= self.every_s
        if self.can_save and self.last[0] < self.total and due:
            self.save(self.last)
            self.last_write = time.monotonic()

    def save(self, point: tuple[int, list | None]) -> None:
        checkpoint.write(
            self.out,
            done=point[0],
            total=self.total,
            fingerprint=self.fingerprint,
            states=point[1],
            extra={
                "layers": {layer_name(k): list(v) for k, v in sorted(self.layers.items(), key=_layer_order)},
                "wall_time_s": self.wall_time(),
                "forward_time_s": round(self.forward_time, 3),
                "resumed_from": self.resumed_from,
            },
        )
        self.on_disk = point[0]

    def write(self, atlas: Atlas, overwrite: bool) -> None:
        """Save the run into the output folder (all or nothing), then drop the checkpoint.

        The folder was checked before the first forward: what is in it now is this run's checkpoint
        or the run that --overwrite / --resume replaces. A finished run that another writer saved
        meanwhile is refused (unless ``overwrite``). The checkpoint goes also after a failed save, so
        that no stale checkpoint is left beside the old run.
        """
        try:
            rundir.check_unchanged(self.out, self.found, overwrite)
            atlas.save(self.out, overwrite=True)
        finally:
            checkpoint.remove(self.out)

    def stopped(self, exc: BaseException) -> None:
        """The scan stops with ``exc``: keep the completed batches; turn an interrupt into ScanInterrupted.

        Not after a HeadmapError: those follow from the inputs (a corpus that does not fit a probe,
        NaN attention) and a resumed run would meet them again. Returns when ``exc`` should be re-raised.
        """
        if self.can_save and self.last[1] is not None and self.last[0] > self.on_disk:
            if not isinstance(exc, HeadmapError):
                try:
                    self.save(self.last)
                except Exception as save_error:  # e.g. a full disk: say so, keep the original exception
                    warnings.warn(f"could not write the checkpoint into {self.out}: {save_error}", stacklevel=3)
        if isinstance(exc, KeyboardInterrupt) and not isinstance(exc, ScanInterrupted):
            kept = self.on_disk > 0 and (self.out / CHECKPOINT_DIR).exists()
            signum = signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT
            raise ScanInterrupted(self.on_disk, self.total, str(self.out) if kept else None, int(signum)) from None


def can_save(probes: list[Probe], out: Path | None, resume: bool) -> bool:
    """Whether the scan checkpoints: an output folder and probes that all save their state.

    OptionError for ``resume`` with a probe that cannot; a warning when such a probe makes a scan
    with an output folder non-resumable.
    """
    stateless = [p.name or type(p).__name__ for p in probes if not supports_state(p)]
    if resume and stateless:
        raise OptionError(
            f"--resume needs probes that can save their state (state_dict/load_state_dict); {', '.join(stateless)} "
            "cannot"
        )
    if out is not None and stateless:
        warnings.warn(
            f"probe(s) {', '.join(stateless)} cannot save their state; this scan writes no checkpoint and "
            "cannot be resumed",
            stacklevel=3,
        )
    return out is not None and not stateless


def start(run: Run, plan: Plan, resume: bool, overwrite: bool) -> Atlas | None:
    """Set ``run`` at its resume point (with ``resume``); returns the finished atlas when there is nothing to do."""
    if not resume:
        return None
    done, prior, finished = _resume_point(run.out, run.fingerprint, plan, overwrite)
    if finished is not None:
        return finished
    run.resume_at = run.on_disk = done
    run.last = (done, None)
    run.resumed_from = [int(x) for x in prior.get("resumed_from", [])] + ([done] if prior else [])
    run.wall_before = float(prior.get("wall_time_s", 0.0))
    run.forward_time = float(prior.get("forward_time_s", 0.0))
    run.layers.update({layer_of(k): (int(v[0]), int(v[1])) for k, v in prior.get("layers", {}).items()})
    return None


def _finished_run(folder: Path) -> Atlas | None:
    """The finished run in ``folder`` (None when it holds none)."""
    if not (folder / "meta.json").exists() and not (folder / "heads.parquet").exists():
        return None
    return Atlas.load(folder)


def _resume_point(
    out: Path, fp: dict[str, Any], plan: Plan, overwrite: bool
) -> tuple[int, dict[str, Any], Atlas | None]:
    """Where a ``resume=True`` scan starts: (inputs done, what the checkpoint recorded, a finished atlas).

    Loads the checkpoint's probe states into the plan's probes. Raises OutputError when the folder
    holds another run's checkpoint or results (unless ``overwrite``: then it starts over).
    """
    saved = checkpoint.read(out)
    if saved is None:
        return _no_checkpoint(out, fp, len(plan.data), overwrite)
    diffs = checkpoint.differences(saved.fingerprint, fp)
    if diffs:
        if overwrite:
            warnings.warn(
                f"--resume: the checkpoint in {out} is of another run ({'; '.join(diffs)}); --overwrite: starting over",
                stacklevel=4,
            )
            return 0, {}, None
        raise OutputError(
            f"cannot resume the scan in {out}: {'; '.join(diffs)}; the checkpoint ({saved.done} of {saved.total} "
            "inputs) is kept: rerun the command that started it with --resume, or add --overwrite to start over"
        )
    probes = plan.probes
    aligned = saved.done in plan.boundaries
    if not (0 <= saved.done <= len(plan.data) and aligned and len(saved.states) == len(probes)):
        raise OutputError(
            f"the checkpoint in {out} is damaged ({saved.done} inputs done of {len(plan.data)}, not at a batch "
            f"boundary or {len(saved.states)} probe states for {len(probes)} probes); add --overwrite to start over"
        )
    for probe, state in zip(probes, saved.states, strict=True):
        try:
            probe.load_state_dict(state)
        except ValueError as exc:
            raise OutputError(f"the checkpoint in {out} is damaged ({exc}); add --overwrite to start over") from exc
    return saved.done, saved.extra, None


def _no_checkpoint(out: Path, fp: dict[str, Any], total: int, overwrite: bool) -> tuple[int, dict, Atlas | None]:
    """``--resume`` into a folder without a checkpoint: start over, or the finished run when it is this one."""
    try:
        finished = _finished_run(out)
    except OutputError:
        if not overwrite:
            raise
        finished = None  # a damaged run that --overwrite replaces
    if finished is None:
        warnings.warn(f"--resume: no checkpoint in {out}; starting from the beginning", stacklevel=5)
        return 0, {}, None
    diffs = checkpoint.differences(finished.meta.get("fingerprint"), fp, theirs="the finished run")
    if not diffs:
        warnings.warn(
            f"--resume: {out} already holds this scan, finished; nothing to do (add --overwrite without "
            "--resume to run it again)",
            stacklevel=5,
        )
        return total, {}, finished
    if overwrite:
        return 0, {}, None
    raise OutputError(
        f"--resume: {out} holds a finished scan of another run, not a checkpoint: {'; '.join(diffs)}; "
        "add --overwrite to replace it, or choose another folder"
    )
