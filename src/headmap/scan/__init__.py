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
from ..engine.attention import device_budget
from ..errors import OptionError
from ..models import input_device, model_shape
from ..probes import Probe, default_probe_names, encoder_decoder_probe_names, make_probes
from ..rundir import check_output_folder
from . import check, checkpoint, seq2seq
from . import resume as resuming
from .check import DEFAULT_MAX_LENGTH
from .distributed import Ranks, check_mergeable, check_rank_folders, idle_note, merge_states, remove_rank_folder
from .loop import run_batches, sigterm_as_interrupt
from .meta import describe
from .plan import Plan, batches_of, corpus_maker, make_plan
from .plan import shard as shard_plan
from .tables import emit_warnings, head_table, image_table, map_table, token_table

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
    shard: str | tuple[int, int] | None = None,
    map_inputs: int | None = None,
) -> Atlas:
    """Measure ``probes`` on ``model`` over ``corpus``; write the run to ``out`` when given.

    ``model`` is a model object (then pass its ``tokenizer``; a vision-language model or Whisper: its
    processor; a vision encoder alone (ViT, CLIP or SigLIP vision): its image processor, which may be left
    out when the model's ``name_or_path`` folder holds one), a built-in name (``smollm2``, ``minilm``), a
    local folder, a ``.gguf`` file or a hub id; None means ``smollm2``.

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
    ``shard``: ``"i/n"`` (0-based) scans shard i of n only: a contiguous run of whole batches of every
    corpus group, inputs numbered as in the whole corpus.
    ``map_inputs``: how many inputs (the first of the corpus) get maps in the report: the image overlays (a
    probe that keeps per-input maps, ``needs.map_inputs``, keeps that many) and the cross-attention alignment
    maps of an encoder-decoder; None: the count such a probe was given, else 2 (recorded in ``meta.options``).

    Started by ``torchrun --nproc-per-node N -m headmap scan ...`` (or ``accelerate launch``), the ranks
    share the corpus and rank 0 writes the one run folder (:mod:`headmap.scan.distributed`); scan()
    returns the tables on rank 0 and only the meta on the other ranks.

    With ``out``, completed batches are checkpointed into ``out/.headmap-checkpoint`` at most
    every ``checkpoint_every_s`` seconds (0: after every batch) and when the scan is interrupted,
    which raises :class:`~headmap.errors.ScanInterrupted` (a KeyboardInterrupt). ``resume=True``
    continues from that checkpoint when it belongs to the same run (else OutputError naming what
    differs); the checkpoint is removed once the run is written.
    """
    started = time.time()
    # check: everything a user can get wrong, before the first forward pass
    named = check.named_probes(probes)
    maps = check.map_inputs(map_inputs, probes, named)
    out_dir = check.options(batch_size, checkpoint_every_s, out, resume)
    part = check.shard(shard)
    ranks = Ranks.start(device)  # None: one process; else this rank of a torchrun / accelerate launch
    if ranks is not None:
        if part is not None:
            raise OptionError("--shard selects work for one process; under torchrun the ranks share the corpus")
        device = ranks.device(device)
    budget = ENGINE_CONFIG.budget_bytes
    try:
        return _scan(
            started, named, out_dir, part, ranks, model, tokenizer, corpus, max_length, batch_size, limit, dtype,
            device, overwrite, seed, progress, resume, checkpoint_every_s, strict,
            {"device_map": device_map, "max_memory": max_memory, "offload_folder": offload_folder}, maps,
        )  # fmt: skip
    finally:
        ENGINE_CONFIG.budget_bytes = budget
        if ranks is not None:
            ranks.close()


def _scan(
    started: float,
    named: list[Probe] | None,
    out_dir: Path | None,
    part: tuple[int, int] | None,
    ranks: Ranks | None,
    model: Any,
    tokenizer: Any,
    corpus: Any,
    max_length: int | None,
    batch_size: int,
    limit: int | None,
    dtype: str,
    device: str,
    overwrite: bool,
    seed: int,
    progress: bool,
    resume: bool,
    checkpoint_every_s: float,
    strict: bool,
    placement: dict[str, Any],
    map_inputs: int = check.MAP_INPUTS,
) -> Atlas:
    lead = ranks is None or ranks.leader
    together = ranks.together if ranks is not None else (lambda step: step())

    def check_folder() -> None:
        if out_dir is not None and lead:
            check_output_folder(out_dir, overwrite, resume=resume)
            check_rank_folders(out_dir, ranks.world if ranks else 1, overwrite, resume)

    together(check_folder)
    # one writer per output folder: its lock is held from the start-up checks to the save (rank 0's)
    holds_lock = out_dir is not None and lead
    with rundir.lock(out_dir, command=rundir.command_line()) if holds_lock else nullcontext():
        loaded = together(
            lambda: check.load(model, tokenizer, dtype, device, progress=None if progress else False, **placement)
        )

        def planned() -> tuple[Plan, int]:
            if named is not None:
                chosen = named
            elif seq2seq.is_seq2seq(loaded):  # encoder, decoder and cross towers: the tower-aware defaults
                chosen = make_probes(encoder_decoder_probe_names())
            else:
                chosen = make_probes(default_probe_names(loaded.is_causal))
            length = check.max_length(max_length, loaded)
            check.model_kind(chosen, loaded)
            # plan: which probe reads which corpus, in which batches, from where (a resumed scan)
            make = corpus_maker(loaded, length, limit=limit, seed=seed, strict=strict)
            data = corpus if corpus is not None else seq2seq.audio_corpus(loaded)  # Whisper: tones
            plan = make_plan(chosen, named is not None, data, make, batch_size)
            if ranks is not None:
                check_mergeable(plan.probes)
            return plan, length

        whole, max_length = together(planned)
        # the block budget: the CPU default, or on a GPU a share of its free memory (the same on every rank)
        budget = device_budget(input_device(loaded.model), model_shape(loaded.model).heads, batch=batch_size)
        if ranks is not None:
            budget = min(ranks.gather(budget))
        ENGINE_CONFIG.budget_bytes = budget  # scan() puts the caller's budget back when it returns
        fp = checkpoint.fingerprint(loaded, whole.probes, whole.data, max_length, batch_size, seed, budget)
        if part is not None:  # --shard i/n: a run folder of one shard
            fp["shard"] = {"index": part[0], "count": part[1]}
            plan = shard_plan(whole, part[0], part[1], batch_size)
            if len(plan.data) == 0:
                raise OptionError(
                    f"--shard {part[0]}/{part[1]} holds no input: the corpus makes {batches_of(whole, batch_size)} "
                    "batches; use fewer shards or a smaller --batch-size"
                )
        elif ranks is not None:
            together(lambda: ranks.agree(fp, out_dir, resume))
            idle_note(ranks, batches_of(whole, batch_size))
            plan = shard_plan(whole, ranks.rank, ranks.world, batch_size)
        else:
            plan = whole
        # a rank checkpoints its own shard into its folder inside the run folder
        run_fp = {**fp, "shard": {"index": ranks.rank, "count": ranks.world}} if ranks is not None else fp
        run_out = ranks.folder(out_dir) if ranks is not None else out_dir
        saves = together(lambda: resuming.can_save(plan.probes, run_out, resume))
        run = resuming.Run(run_out, run_fp, len(plan.data), started, checkpoint_every_s, saves)
        run.found = rundir.run_stamp(out_dir) if out_dir is not None and lead else None  # the run there now
        finished = together(lambda: resuming.start(run, plan, resume, overwrite))
        if finished is not None:
            return finished
        options = {
            "max_length": max_length,
            "batch_size": batch_size,
            "seed": seed,
            "limit": limit,
            "checkpoint_every_s": checkpoint_every_s,
            "strict": strict,
            "map_inputs": map_inputs,
        }
        if part is not None:
            options["shard"] = f"{part[0]}/{part[1]}"

        try:
            with sigterm_as_interrupt(out_dir is not None):
                # loop
                run_batches(loaded, plan, batch_size, run, progress and lead)
                if ranks is not None:
                    gather_ranks(ranks, plan, run)
                    if not lead:
                        ranks.barrier()  # rank 0 writes the run folder
                        remove_rank_folder(run_out)
                        return _rank_result(loaded, whole, run, options)
                    run.fingerprint = fp
                    plan = whole
                emit_warnings(plan.probes)
                # tables
                heads = head_table(plan.probes)
                meta = describe(loaded, plan, run, options)
                tokens = token_table(plan.probes, loaded.tokenizer)
                atlas = Atlas(
                    heads=heads, meta=meta, tokens=tokens, maps=map_table(plan.probes), images=image_table(plan.probes)
                )
                if out_dir is not None:
                    if ranks is None:
                        run.write(atlas, overwrite)
                    else:
                        rundir.check_unchanged(out_dir, run.found, overwrite)
                        atlas.save(out_dir, overwrite=True)
                if ranks is not None:
                    ranks.barrier()
                    remove_rank_folder(run_out)
        except BaseException as exc:
            run.stopped(exc)  # keeps the completed batches; an interrupt becomes ScanInterrupted
            raise
        return atlas


def gather_ranks(ranks: Ranks, plan: Plan, run: resuming.Run) -> None:
    """Rank 0 receives every rank's probe states, layers and forward time and merges them into its probes."""
    mine = ([p.state_dict() for p in plan.probes], dict(run.layers), run.forward_time)
    every = ranks.to_leader(mine)
    if every is None:
        return
    for i, probe in enumerate(plan.probes):
        probe.load_state_dict(merge_states([states[i] for states, _, _ in every]))
    for _, layers, _ in every:
        run.layers.update(layers)
    run.forward_time = sum(t for _, _, t in every)


def _rank_result(loaded: Any, whole: Plan, run: resuming.Run, options: dict[str, Any]) -> Atlas:
    """What scan() returns on a rank other than 0: the meta of the run, no tables (rank 0 has them)."""
    from ..atlas import HEADS_SCHEMA, TOKENS_SCHEMA, empty_frame

    return Atlas(
        heads=empty_frame(HEADS_SCHEMA), meta=describe(loaded, whole, run, options), tokens=empty_frame(TOKENS_SCHEMA)
    )
