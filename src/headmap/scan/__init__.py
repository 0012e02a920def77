"""``headmap.scan``: run probes over a corpus and return an :class:`~headmap.atlas.Atlas`.

Everything a user can get wrong (model, probes, corpus, lengths, output folder, a checkpoint of
another run) is checked before the first forward pass, so a bad input costs nothing and writes
nothing.

With an output folder, a scan checkpoints the inputs it has completed (``headmap.checkpoint``)
between batches, at most every ``checkpoint_every_s`` seconds and once more when Ctrl-C or
SIGTERM stops it; ``resume=True`` (``--resume``) goes on from there and produces tables equal,
bit for bit, to those of a scan that never stopped.

The scan knows no probe by name: it reads what each probe class declares (``Probe.needs``) and
calls the hooks of the probe contract (:mod:`headmap.probes.base`). The steps, each in a file:
``check`` (inputs), ``plan`` (which probe reads which corpus), ``resume`` (resume point and
checkpoints), ``loop`` (the batches; ``capture`` records hidden states or norms), ``tables`` and
``meta`` (what is written).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from .. import rundir
from ..atlas import Atlas
from ..corpus import Corpus
from ..engine import CONFIG as ENGINE_CONFIG
from ..probes import Probe, default_probe_names, make_probes
from ..rundir import check_output_folder
from . import check, checkpoint
from . import resume as resuming
from .check import DEFAULT_MAX_LENGTH
from .loop import run_batches, sigterm_as_interrupt
from .meta import describe
from .plan import corpus_maker, make_plan
from .tables import emit_warnings, head_table, map_table, token_table

__all__ = ["DEFAULT_MAX_LENGTH", "scan"]


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
    device_map: str | dict[str, Any] | None = None,
    max_memory: str | dict[Any, Any] | None = None,
    offload_folder: str | Path | None = None,
) -> Atlas:
    """Measure ``probes`` on ``model`` over ``corpus``; write the run to ``out`` when given.

    ``model`` is a model object (then pass its ``tokenizer``), a built-in name (``smollm2``,
    ``minilm``), a local folder, a ``.gguf`` file or a hub id; None means ``smollm2``.

    ``probes``: names (comma-separated, each with ``:key=value`` parameters as on the command line),
    a list of names or of Probe objects; None runs the
    default set: every probe that applies to the model (encoders: no causal-only probe); an empty
    string or list is an error. ``corpus``: a built-in name (``text``, ``repeats``, ``needle``,
    ``items``, with options as in ``needle:depths=0,0.5,1``), a text or JSONL file, or a Corpus;
    None lets each probe read its own built-in corpus (the probe's ``needs.default_corpus``, else
    ``text``).
    ``strict``: refuse inputs longer than ``max_length`` instead of truncating them.
    ``device_map``, ``max_memory``, ``offload_folder``: spread the model's layers over devices, with CPU
    and disk offload (accelerate's semantics; see :func:`headmap.models.load_model`); the tables equal
    those of a single-device run.

    With ``out``, completed batches are checkpointed into ``out/.headmap-checkpoint`` at most
    every ``checkpoint_every_s`` seconds (0: after every batch) and when the scan is interrupted,
    which raises :class:`~headmap.errors.ScanInterrupted` (a KeyboardInterrupt). ``resume=True``
    continues from that checkpoint when it belongs to the same run (else OutputError naming what
    differs); the checkpoint is removed once the run is written.
    """
    started = time.time()
    # check: everything a user can get wrong, before the first forward pass
    named = check.named_probes(probes)
    out_dir = check.options(batch_size, checkpoint_every_s, out, resume)
    if out_dir is not None:
        check_output_folder(out_dir, overwrite, resume=resume)
    # one writer per output folder: its lock is held from the start-up checks to the save
    with rundir.lock(out_dir, command=rundir.command_line()) if out_dir is not None else nullcontext():
        loaded = check.load(
            model,
            tokenizer,
            dtype,
            device,
            progress=None if progress else False,
            device_map=device_map,
            max_memory=max_memory,
            offload_folder=offload_folder,
        )
        chosen = named if named is not None else make_probes(default_probe_names(loaded.is_causal))
        max_length = check.max_length(max_length, loaded)
        check.model_kind(chosen, loaded)

        # plan: which probe reads which corpus, in which batches, from where (a resumed scan)
        make = corpus_maker(loaded, max_length, limit=limit, seed=seed, strict=strict)
        plan = make_plan(chosen, named is not None, corpus, make, batch_size)
        fp = checkpoint.fingerprint(
            loaded, plan.probes, plan.data, max_length, batch_size, seed, ENGINE_CONFIG.budget_bytes
        )
        saves = resuming.can_save(plan.probes, out_dir, resume)
        run = resuming.Run(out_dir, fp, len(plan.data), started, checkpoint_every_s, saves)
        run.found = rundir.run_stamp(out_dir) if out_dir is not None else None  # the run in the folder now
        finished = resuming.start(run, plan, resume, overwrite)
        if finished is not None:
            return finished
        options = {
            "max_length": max_length,
            "batch_size": batch_size,
            "seed": seed,
            "limit": limit,
            "checkpoint_every_s": checkpoint_every_s,
            "strict": strict,
        }

        try:
            with sigterm_as_interrupt(out_dir is not None):
                # loop
                run_batches(loaded, plan, batch_size, run, progress)
                emit_warnings(plan.probes)
                # tables
                heads = head_table(plan.probes)
                meta = describe(loaded, plan, run, options)
                tokens = token_table(plan.probes, loaded.tokenizer)
                atlas = Atlas(heads=heads, meta=meta, tokens=tokens, maps=map_table(plan.probes))
                if out_dir is not None:
                    run.write(atlas, overwrite)
        except BaseException as exc:
            run.stopped(exc)  # keeps the completed batches; an interrupt becomes ScanInterrupted
            raise
        return atlas
