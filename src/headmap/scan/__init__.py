"""``headmap.scan``: run probes over a corpus and return an :class:`~headmap.atlas.Atlas`.

Everything a user can get wrong (model, probes, corpus, lengths, output folder, a checkpoint of
another run) is checked before the first forward pass, so a bad input costs nothing and writes
nothing.

With an output folder, a scan checkpoints the inputs it has completed (``headmap.checkpoint``)
between batches, at most every ``checkpoint_every_s`` seconds and once more when Ctrl-C or
SIGTERM stops it; ``resume=True`` (``--resume``) goes on from there and produces tables equal,
bit for bit, to those of a scan that never stopped.
"""

from __future__ import annotations

import inspect
import platform
import resource
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from .. import rundir  # rundir:
from ..atlas import HEADS_SCHEMA, MAPS_SCHEMA, TOKENS_SCHEMA, Atlas, empty_frame
from ..corpus import DEFAULT_CORPUS, Batch, Corpus, load_corpus
from ..engine import CONFIG as ENGINE_CONFIG
from ..engine import check_supported, observe
from ..errors import HeadmapError, NumericalError, OptionError, OutputError, ProbeError, ScanInterrupted
from ..models import LoadedModel, load_model, logits_to_keep, position_ids, wrap_model
from ..probes import Probe, RepeatProbe, default_probe_names, make_probes, supports_state
from ..rundir import CHECKPOINT_DIR, check_output_folder
from . import checkpoint

DEFAULT_MAX_LENGTH = 512


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("headmap", "torch", "transformers", "numpy", "pandas", "pyarrow"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def _peak_memory(device: torch.device) -> dict[str, float]:
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"peak_rss_gib": rss_kb / 2**20 if sys.platform != "darwin" else rss_kb / 2**30}
    if device.type == "cuda":
        out["peak_cuda_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def _check_length(max_length: int, loaded: LoadedModel) -> None:
    limit = loaded.max_length
    if max_length < 2:
        raise OptionError(f"--max-length must be at least 2 tokens (got {max_length})")
    if limit is not None and max_length > limit:
        raise OptionError(
            f"--max-length {max_length} exceeds the model's limit of {limit} positions; use at most {limit}"
        )


def _check_probes(probes: Sequence[Probe], loaded: LoadedModel) -> None:
    if not loaded.is_causal:
        bad = [p.name for p in probes if p.causal_only]
        if bad:
            raise ProbeError(
                f"probe(s) {', '.join(bad)} need a causal (decoder) model, and "
                f"{loaded.model.config.model_type} is an encoder; drop them from --probes"
            )


@dataclass
class _Group:
    """Probes that read the same corpus in the same forward passes (or one generating probe)."""

    corpus: Corpus
    probes: list[Probe]

    @property
    def generates(self) -> bool:
        return any(p.generates for p in self.probes)


def _plan_groups(
    probe_objs: list[Probe],
    explicit: bool,
    corpus: Any,
    make: Callable[[Any], Corpus],
) -> tuple[list[_Group], dict[str, str]]:
    """Which probes read which corpus; returns the groups and the default probes skipped (name: why).

    With a corpus every probe reads it: an explicitly named probe that cannot read it is an error,
    a default one is skipped. Without one, each probe reads its own built-in corpus (``text`` unless
    it names another); a generating probe gets a group of its own.
    """
    skipped: dict[str, str] = {}
    groups: list[_Group] = []
    if corpus is not None:
        data = corpus if isinstance(corpus, Corpus) else make(corpus)
        keep = []
        for p in probe_objs:
            why = p.applies_to(data)
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
        plain = [p for p in keep if not p.generates]
        if plain:
            groups.append(_Group(data, plain))
        groups += [_Group(data, [p]) for p in keep if p.generates]
        return groups, skipped
    by_corpus: dict[str, list[Probe]] = {}
    for p in probe_objs:
        name = p.default_corpus or DEFAULT_CORPUS
        if p.requires == "spans" and p.default_corpus is None:
            if explicit:
                raise ProbeError(
                    f"probe {p.name} needs inputs with named spans and has no built-in corpus; pass a JSONL "
                    'corpus whose lines hold {"text": ..., "spans": {...}} with --corpus'
                )
            skipped[p.name] = "it needs a corpus with spans"
            continue
        by_corpus.setdefault(name, []).append(p)
    made: dict[str, Corpus] = {}
    for name, members in by_corpus.items():
        data = made.setdefault(name, make(name))
        plain = [p for p in members if not p.generates]
        if plain:
            groups.append(_Group(data, plain))
        groups += [_Group(data, [p]) for p in members if p.generates]
    return groups, skipped


class _Chain(Sequence):
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


def _combined(groups: list[_Group]) -> Corpus:
    """All inputs of all groups in scan order (for the fingerprint and the progress count)."""
    if len(groups) == 1:
        return groups[0].corpus
    samples = _Chain([g.corpus.samples for g in groups])
    names = "+".join(f"{g.corpus.name}[{','.join(p.name for p in g.probes)}]" for g in groups)
    if len(groups) == 1:
        desc = dict(groups[0].corpus.description)
    else:
        desc = {
            "name": names,
            "kind": "groups",
            "groups": [{"probes": [p.name for p in g.probes], **g.corpus.description} for g in groups],
            "inputs": len(samples),
            "tokens": sum(g.corpus.description.get("tokens", 0) for g in groups),
        }
    return Corpus(names if len(groups) > 1 else groups[0].corpus.name, samples, desc)


def _layer_list(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The model's stack of transformer layers: the first ModuleList as long as its layer count."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    count = next(
        (getattr(config, n) for n in ("num_hidden_layers", "n_layer", "num_layers") if getattr(config, n, None)), None
    )
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return module
    return None


class _HiddenNorms:
    """Records the l2 norm of every token's residual stream entering each layer, with forward pre-hooks.

    What ``output_hidden_states=True`` would give for the ``sinks`` probe, without keeping L + 1
    [B, W, d] tensors alive: one [B, W] float64 per layer. Norms are taken in float64 from the
    tensor the layer receives, so they equal the norms of ``hidden_states[l]``.
    """

    def __init__(self, layers: torch.nn.ModuleList) -> None:
        self.layers = layers
        self.norms: list[torch.Tensor | None] = [None] * len(layers)
        self._hooks: list[Any] = []

    def __enter__(self) -> _HiddenNorms:
        for i, layer in enumerate(self.layers):
            self._hooks.append(layer.register_forward_pre_hook(self._hook(i), with_kwargs=True))
        return self

    def _hook(self, index: int):
        def record(module, args, kwargs):
            states = args[0] if args else kwargs.get("hidden_states")
            if isinstance(states, torch.Tensor) and states.ndim == 3:
                self.norms[index] = torch.linalg.vector_norm(states.to(torch.float64), dim=-1)

        return record

    def take(self) -> tuple[torch.Tensor, ...] | None:
        norms, self.norms = self.norms, [None] * len(self.layers)
        if any(n is None for n in norms):
            return None
        return (*norms, norms[-1])  # L + 1 entries, as hidden_states has (the last is not read)

    def __exit__(self, *exc: object) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()


class _Outputs:
    """The model's outputs plus ``hidden_norms`` for probes that asked for them."""

    def __init__(self, outputs: Any, hidden_norms: Any) -> None:
        self._outputs = outputs
        self.hidden_norms = hidden_norms

    def __getattr__(self, name: str) -> Any:
        return getattr(self._outputs, name)


def _token_table(probes: Sequence[Probe], tokenizer: Any) -> pd.DataFrame:
    frames = [f for f in (p.token_frame() for p in probes) if f is not None and len(f)]
    if not frames:
        return empty_frame(TOKENS_SCHEMA)
    table = pd.concat(frames, ignore_index=True)
    ids = table["token_id"].astype("int64")
    if tokenizer is not None and hasattr(tokenizer, "convert_ids_to_tokens"):
        unique = sorted(set(ids.tolist()))
        names = dict(zip(unique, tokenizer.convert_ids_to_tokens(unique), strict=True))
        table["token"] = ids.map(lambda t: str(names.get(t)))
    else:
        table["token"] = ids.astype(str)
    table = table[TOKENS_SCHEMA.names]
    if table["value"].isna().any():
        bad = table[table["value"].isna()].iloc[0]
        raise NumericalError(
            f"token metric {bad['metric']} is NaN at sample {bad['sample']}, position {bad['position']}, "
            f"layer {bad['layer']}; no NaN is written"
        )
    return table.sort_values(["metric", "sample", "layer", "position"], kind="stable").reset_index(drop=True)


def _map_table(probes: Sequence[Probe]) -> pd.DataFrame:
    """Rows of maps.parquet from the probes that keep attention maps (``map_frame()``)."""
    frames = [f for f in (p.map_frame() for p in probes if hasattr(p, "map_frame")) if f is not None and len(f)]
    if not frames:
        return empty_frame(MAPS_SCHEMA)
    return pd.concat(frames, ignore_index=True)[MAPS_SCHEMA.names]


class _Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an interrupt while a scan with an output folder runs."""


@contextmanager
def _sigterm_as_interrupt(enabled: bool) -> Iterator[None]:
    """While the body runs, SIGTERM (a scheduler's or ``kill``'s polite stop) interrupts like Ctrl-C.

    Only in the main thread and only when nobody installed a SIGTERM handler of their own.
    """
    if (
        not enabled
        or threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise _Terminated

    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _finished_run(folder: Path) -> Atlas | None:
    """The finished run in ``folder`` (None when it holds none)."""
    if not (folder / "meta.json").exists() and not (folder / "heads.parquet").exists():
        return None
    return Atlas.load(folder)


def _resume_point(
    out: Path, fp: dict[str, Any], probes: Sequence[Probe], data: Corpus, boundaries: set[int], overwrite: bool
) -> tuple[int, dict[str, Any], Atlas | None]:
    """Where a ``resume=True`` scan starts: (inputs done, what the checkpoint recorded, a finished atlas).

    Loads the checkpoint's probe states into ``probes``. Raises OutputError when the folder holds
    another run's checkpoint or results (unless ``overwrite``: then it starts over).
    """
    saved = checkpoint.read(out)
    if saved is None:
        try:
            finished = _finished_run(out)
        except OutputError:
            if not overwrite:
                raise
            finished = None  # a damaged run that --overwrite replaces
        if finished is None:
            warnings.warn(f"--resume: no checkpoint in {out}; starting from the beginning", stacklevel=3)
            return 0, {}, None
        diffs = checkpoint.differences(finished.meta.get("fingerprint"), fp, theirs="the finished run")
        if not diffs:
            warnings.warn(
                f"--resume: {out} already holds this scan, finished; nothing to do (add --overwrite without "
                "--resume to run it again)",
                stacklevel=3,
            )
            return len(data), {}, finished
        if overwrite:
            return 0, {}, None
        raise OutputError(
            f"--resume: {out} holds a finished scan of another run, not a checkpoint: {'; '.join(diffs)}; "
            "add --overwrite to replace it, or choose another folder"
        )
    diffs = checkpoint.differences(saved.fingerprint, fp)
    if diffs:
        if overwrite:
            warnings.warn(
                f"--resume: the checkpoint in {out} is of another run ({'; '.join(diffs)}); --overwrite: starting over",
                stacklevel=3,
            )
            return 0, {}, None
        raise OutputError(
            f"cannot resume the scan in {out}: {'; '.join(diffs)}; the checkpoint ({saved.done} of {saved.total} "
            "inputs) is kept: rerun the command that started it with --resume, or add --overwrite to start over"
        )
    aligned = saved.done in boundaries
    if not (0 <= saved.done <= len(data) and aligned and len(saved.states) == len(probes)):
        raise OutputError(
            f"the checkpoint in {out} is damaged ({saved.done} inputs done of {len(data)}, not at a batch boundary "
            f"or {len(saved.states)} probe states for {len(probes)} probes); add --overwrite to start over"
        )
    for probe, state in zip(probes, saved.states, strict=True):
        try:
            probe.load_state_dict(state)
        except ValueError as exc:
            raise OutputError(f"the checkpoint in {out} is damaged ({exc}); add --overwrite to start over") from exc
    return saved.done, saved.extra, None


def scan(
    model: Any = None,
    tokenizer: Any = None,
    probes: str | Sequence[str] | Sequence[Probe] | None = None,
    corpus: str | Path | Corpus | None = None,
    max_length: int | None = None,
    batch_size: int = 4,
    limit: int | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    out: str | Path | None = None,
    overwrite: bool = False,
    seed: int = 0,
    progress: bool = True,
    resume: bool = False,
    checkpoint_every_s: float = checkpoint.DEFAULT_EVERY_S,
    strict: bool = False,
) -> Atlas:
    """Measure ``probes`` on ``model`` over ``corpus``; write the run to ``out`` when given.

    ``model`` is a model object (then pass its ``tokenizer``), a built-in name (``smollm2``,
    ``minilm``), a local folder, a ``.gguf`` file or a hub id; None means ``smollm2``.

    ``probes``: names (``"sink,waad:window=20"``), a list of names or of Probe objects; None runs the
    default set: every probe that applies to the model (encoders: no causal-only probe). ``corpus``:
    a built-in name (``text``, ``repeats``, ``needle``, ``items``, with options as in
    ``needle:depths=0,0.5,1``), a text or JSONL file, or a Corpus; None lets each probe read its
    own built-in corpus (``text`` for most, ``repeats`` for duplicate_token and induction, ``needle``
    for retrieval, ``items`` for position_profile). ``strict``: refuse inputs longer than
    ``max_length`` instead of truncating them.

    With ``out``, completed batches are checkpointed into ``out/.headmap-checkpoint`` at most
    every ``checkpoint_every_s`` seconds (0: after every batch) and when the scan is interrupted,
    which raises :class:`~headmap.errors.ScanInterrupted` (a KeyboardInterrupt). ``resume=True``
    continues from that checkpoint when it belongs to the same run (else OutputError naming what
    differs); the checkpoint is removed once the run is written.
    """
    # rundir: one writer per output folder: its lock is held from the start-up checks to the save
    args = dict(locals())
    if out is None:
        return _scan(**args)
    check_output_folder(Path(out), overwrite, resume=resume)  # rundir: before any model loads
    with rundir.lock(Path(out), command=rundir.command_line()):  # rundir:
        return _scan(**args)


def _scan(  # rundir: the body of scan(), unchanged but for the lines marked rundir
    model,
    tokenizer,
    probes,
    corpus,
    max_length,
    batch_size,
    limit,
    dtype,
    device,
    out,
    overwrite,
    seed,
    progress,
    resume,
    checkpoint_every_s,
    strict,
) -> Atlas:
    started = time.time()
    explicit = probes is not None and not (isinstance(probes, str) and not probes.strip())
    if explicit:
        probe_objs = list(probes) if isinstance(next(iter(probes), None), Probe) else make_probes(probes)
        if not probe_objs:
            raise ProbeError("no probe given; leave probes out for the default set")
    if batch_size < 1:
        raise OptionError(f"--batch-size must be at least 1 (got {batch_size})")
    if not checkpoint_every_s >= 0:  # NaN too; inf: only when interrupted
        raise OptionError(f"--checkpoint-every must be a number of seconds >= 0 (got {checkpoint_every_s})")
    out_dir = Path(out) if out is not None else None
    if resume and out_dir is None:
        raise OptionError("resume=True needs out=..., the folder that holds the checkpoint")
    if out_dir is not None:
        check_output_folder(out_dir, overwrite, resume=resume)
    started_from = rundir.run_stamp(out_dir) if out_dir is not None else None  # rundir: the run found at the start
    if model is None or isinstance(model, (str, Path)):
        loaded = load_model(str(model) if model is not None else None, dtype=dtype, device=device)
    else:
        loaded = wrap_model(model, tokenizer)
    check_supported(loaded.model)
    if not explicit:
        probe_objs = make_probes(default_probe_names(loaded.is_causal))
    if max_length is None:
        max_length = min(DEFAULT_MAX_LENGTH, loaded.max_length or DEFAULT_MAX_LENGTH)
    _check_length(max_length, loaded)
    _check_probes(probe_objs, loaded)

    def make(spec: Any) -> Corpus:
        if loaded.tokenizer is None:
            raise OptionError("pass the model's tokenizer (scan(model, tokenizer=...)) to build a corpus")
        extra = {"strict": True} if strict else {}
        return load_corpus(
            spec,
            loaded.tokenizer,
            max_length,
            limit=limit,
            seed=seed,
            vocab_size=loaded.model.config.vocab_size,
            **extra,
        )

    groups, skipped = _plan_groups(probe_objs, explicit, corpus, make)
    probe_objs = [p for g in groups for p in g.probes]
    for g in groups:
        for p in g.probes:
            if isinstance(p, RepeatProbe) and p.repeat_length is None:
                p.configure(g.corpus)  # repeat length and offset from the corpus; a clear error if it has none
    data = _combined(groups)
    boundaries = {0}
    starts = []  # (group, first input of the group in scan order)
    offset = 0
    for g in groups:
        starts.append(offset)
        boundaries.update(offset + min(k + batch_size, len(g.corpus)) for k in range(0, len(g.corpus), batch_size))
        offset += len(g.corpus)
    model_obj = loaded.model
    dev = next(model_obj.parameters()).device
    fp = checkpoint.fingerprint(loaded, probe_objs, data, max_length, batch_size, seed, ENGINE_CONFIG.budget_bytes)

    stateless = [p.name or type(p).__name__ for p in probe_objs if not supports_state(p)]
    if resume and stateless:
        raise OptionError(
            f"--resume needs probes that can save their state (state_dict/load_state_dict); {', '.join(stateless)} "
            "cannot"
        )
    can_checkpoint = out_dir is not None and not stateless
    if out_dir is not None and stateless:
        warnings.warn(
            f"probe(s) {', '.join(stateless)} cannot save their state; this scan writes no checkpoint and "
            "cannot be resumed",
            stacklevel=2,
        )
    done, prior = 0, {}
    if resume:
        done, prior, finished = _resume_point(out_dir, fp, probe_objs, data, boundaries, overwrite)
        if finished is not None:
            return finished
    resumed_from = [int(x) for x in prior.get("resumed_from", [])] + ([done] if prior else [])  # prior: a checkpoint
    wall_before = float(prior.get("wall_time_s", 0.0))
    forward_time = float(prior.get("forward_time_s", 0.0))
    layers: dict[int, tuple[int, int]] = {int(k): (int(v[0]), int(v[1])) for k, v in prior.get("layers", {}).items()}

    tok = loaded.tokenizer
    pad_id = getattr(tok, "pad_token_id", None)
    if pad_id is None:
        pad_id = getattr(tok, "eos_token_id", None) or 0

    bar = Progress(
        TextColumn("[bold]scan[/] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not progress,
        transient=False,
    )
    # ``last`` is (inputs done, probe states) at the last batch boundary, assigned in one step
    # once both are complete: an interrupt anywhere (mid-forward, mid-commit) leaves it whole.
    last: tuple[int, list | None] = (done, None)
    on_disk = done  # inputs the checkpoint in out_dir holds (for this run)

    def save_checkpoint(point: tuple[int, list | None]) -> None:
        nonlocal on_disk
        checkpoint.write(
            out_dir,
            done=point[0],
            total=len(data),
            fingerprint=fp,
            states=point[1],
            extra={
                "layers": {str(k): list(v) for k, v in sorted(layers.items())},
                "wall_time_s": round(wall_before + time.time() - started, 3),
                "forward_time_s": round(forward_time, 3),
                "resumed_from": resumed_from,
            },
        )
        on_disk = point[0]

    params = inspect.signature(model_obj.forward).parameters
    takes_positions = "position_ids" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    last_logits = logits_to_keep(model_obj)  # probes read attention, not the [B, T, V] logits
    layer_list = _layer_list(model_obj) if any(p.needs_hidden_norms for p in probe_objs) else None
    norms = _HiddenNorms(layer_list) if layer_list is not None else None
    need_hidden = any(p.needs_hidden_states for p in probe_objs) or (
        norms is None and any(p.needs_hidden_norms for p in probe_objs)
    )
    try:
        with _sigterm_as_interrupt(out_dir is not None):
            last_write = time.monotonic()
            with bar, torch.no_grad():
                note = f" (resumed at {done})" if done else ""
                task = bar.add_task(f"{data.name} inputs{note}", total=len(data), completed=done)
                for group, first in zip(groups, starts, strict=True):
                    if done >= first + len(group.corpus):
                        continue  # finished before an interruption
                    bar.update(task, description=f"{group.corpus.name}: {', '.join(p.name for p in group.probes)}")
                    with observe(model_obj, probes=group.probes, check_finite=True) as session:
                        session.layers = layers  # record_layer fills the dict that checkpoints save
                        skip = max(0, done - first)  # a multiple of batch_size: the batches of an unbroken run
                        rest = Corpus(group.corpus.name, group.corpus.samples[skip:], group.corpus.description)
                        for start, ids, mask in rest.batches(batch_size, pad_id, left_pad=loaded.is_causal, device=dev):
                            start += skip
                            batch = Batch(
                                group.corpus.name,
                                start,
                                list(group.corpus.samples[start : start + ids.shape[0]]),
                                ids,
                                mask,
                                loaded.is_causal,
                            )
                            for p in group.probes:
                                p.begin(batch)
                            t0 = time.perf_counter()
                            if group.generates:
                                outputs = None
                                for p in group.probes:
                                    p.run(model_obj, batch, session)
                            else:
                                extra = {"output_hidden_states": True} if need_hidden else {}
                                extra.update(last_logits)
                                if loaded.is_causal and takes_positions:
                                    # left padding: count positions from each input's first real token, as
                                    # generate() does, so an input's numbers do not depend on its batch
                                    extra["position_ids"] = position_ids(mask)
                                if norms is not None and any(p.needs_hidden_norms for p in group.probes):
                                    with norms:
                                        outputs = model_obj(input_ids=ids, attention_mask=mask, **extra)  # commits
                                    outputs = _Outputs(outputs, norms.take())
                                else:
                                    outputs = model_obj(input_ids=ids, attention_mask=mask, **extra)  # commits
                            forward_time += time.perf_counter() - t0
                            for p in group.probes:
                                p.end(batch, outputs)
                            del outputs
                            count = last[0] + ids.shape[0]
                            last = (count, [p.state_dict() for p in probe_objs] if can_checkpoint else None)
                            bar.advance(task, ids.shape[0])
                            due = time.monotonic() - last_write >= checkpoint_every_s
                            if can_checkpoint and count < len(data) and due:
                                save_checkpoint(last)
                                last_write = time.monotonic()
            for p in probe_objs:
                if p.generates and getattr(p, "reproduced", None) == 0 and getattr(p, "instances", 0):
                    warnings.warn(
                        f"{p.name}: the model reproduced the needle in 0 of {p.instances} inputs, so no head is "
                        f"scored (n = 0); try {p.name}:mode=teacher, shorter inputs or a larger model",
                        stacklevel=2,
                    )

            rows = [row for p in probe_objs for row in p.head_rows()]
            heads = pd.DataFrame(rows, columns=HEADS_SCHEMA.names) if rows else empty_frame(HEADS_SCHEMA)
            config = model_obj.config
            layer_shapes = sorted(layers.items())
            meta = {
                "model": loaded.model_id,
                "model_path": loaded.path,
                "model_source": loaded.source,
                "revision": loaded.revision,
                "architecture": {
                    "model_type": config.model_type,
                    "class": type(model_obj).__name__,
                    "causal": loaded.is_causal,
                    "layers": len(layer_shapes),
                    "heads": layer_shapes[0][1][0] if layer_shapes else None,
                    "kv_heads": layer_shapes[0][1][1] if layer_shapes else None,
                    "max_positions": loaded.max_length,
                },
                "dtype": str(next(model_obj.parameters()).dtype).removeprefix("torch."),
                "device": str(dev),
                "corpus": data.description,
                "probes": {p.name: p.params() for p in probe_objs},
                "probe_corpora": {p.name: g.corpus.name for g in groups for p in g.probes},
                "skipped_probes": skipped,
                "options": {
                    "max_length": max_length,
                    "batch_size": batch_size,
                    "seed": seed,
                    "limit": limit,
                    "checkpoint_every_s": checkpoint_every_s,
                    "strict": strict,
                },
                "versions": _versions(),
                "wall_time_s": round(wall_before + time.time() - started, 3),
                "forward_time_s": round(forward_time, 3),
                "memory": _peak_memory(dev),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "resumed_from": resumed_from,
                "fingerprint": fp,
            }
            atlas = Atlas(heads=heads, meta=meta, tokens=_token_table(probe_objs, tok), maps=_map_table(probe_objs))
            if out_dir is not None:
                # The folder was checked before the first forward; what is in it now is this run's
                # checkpoint or the run that --overwrite / --resume replaces.
                try:  # rundir:
                    rundir.check_unchanged(out_dir, started_from, overwrite)  # rundir: a run saved meanwhile
                    atlas.save(out_dir, overwrite=True)
                finally:  # rundir: also after a failed save: no stale checkpoint beside the old run
                    checkpoint.remove(out_dir)
    except BaseException as exc:
        # Keep the completed batches, except after a HeadmapError: those follow from the inputs
        # (a corpus that does not fit a probe, NaN attention) and a resumed run would meet them again.
        if can_checkpoint and last[1] is not None and last[0] > on_disk and not isinstance(exc, HeadmapError):
            try:
                save_checkpoint(last)
            except Exception as save_error:  # e.g. a full disk: say so, keep the original exception
                warnings.warn(f"could not write the checkpoint into {out_dir}: {save_error}", stacklevel=2)
        if isinstance(exc, KeyboardInterrupt) and not isinstance(exc, ScanInterrupted):
            kept = on_disk > 0 and (out_dir / CHECKPOINT_DIR).exists()
            signum = signal.SIGTERM if isinstance(exc, _Terminated) else signal.SIGINT
            raise ScanInterrupted(on_disk, len(data), str(out_dir) if kept else None, int(signum)) from None
        raise
    return atlas
