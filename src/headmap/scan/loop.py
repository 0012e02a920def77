"""The batch loop of a scan: one group after the other, one forward pass (or one probe's run) per batch.

While a scan with an output folder runs, SIGTERM interrupts it like Ctrl-C
(:func:`sigterm_as_interrupt`), so that the completed batches are kept in a checkpoint.
"""

from __future__ import annotations

import inspect
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..corpus import Batch, Corpus
from ..corpus.images import collate
from ..corpus.pairs import collate_seq2seq
from ..engine import observe
from ..errors import Terminated
from ..models import LoadedModel, input_device, logits_to_keep, pad_id, position_ids
from . import seq2seq
from .capture import Capture
from .plan import Group, Plan

if TYPE_CHECKING:
    from .resume import Run


@contextmanager
def sigterm_as_interrupt(enabled: bool) -> Iterator[None]:
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
        raise Terminated

    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


class Forward:
    """The model call for one batch of a group: what every call passes, plus what the probes need."""

    def __init__(self, loaded: LoadedModel, plan: Plan) -> None:
        self.model = loaded.model
        params = inspect.signature(self.model.forward).parameters
        takes_positions = "position_ids" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
        # left padding: count positions from each input's first real token, as generate() does, so an
        # input's numbers do not depend on its batch
        self.positions = seq2seq.left_pad(loaded) and takes_positions
        self.capture = Capture(self.model, plan.probes)
        # probes read attention, not the [B, T, V] logits
        self.extra = {**self.capture.forward_kwargs(), **logits_to_keep(self.model)}

    def __call__(self, group: Group, batch: Batch, session: Any) -> Any:
        """The outputs of the batch's forward pass; None when the group's probe drives the model itself."""
        if group.drives_model:
            for p in group.probes:
                p.run(self.model, batch, session)
            return None
        extra = dict(self.extra)
        # multimodal rotary positions (Qwen2-VL: image_grid_thw) are the model's own, from its attention mask
        if self.positions and "image_grid_thw" not in batch.inputs:
            extra["position_ids"] = position_ids(batch.attention_mask)
        extra.update(batch.inputs)  # an image corpus: pixel_values and what else the processor made
        # audio: the encoder reads features, the ids are the decoder's; a vision encoder alone reads pixels only
        if "input_features" in batch.inputs or getattr(self.model, "main_input_name", None) == "pixel_values":
            return self.capture.run(group.probes, lambda: self.model(**extra))
        ids, mask = batch.input_ids, batch.attention_mask
        return self.capture.run(group.probes, lambda: self.model(input_ids=ids, attention_mask=mask, **extra))


def run_batches(loaded: LoadedModel, plan: Plan, batch_size: int, run: Run, progress: bool) -> None:
    """Every batch of every group not done yet (``run.resume_at`` inputs are), in scan order."""
    forward = Forward(loaded, plan)
    bar = Progress(
        TextColumn("[bold]scan[/] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not progress,
        transient=False,
    )
    run.last_write = time.monotonic()
    with bar, torch.no_grad():
        note = f" (resumed at {run.resume_at})" if run.resume_at else ""
        task = bar.add_task(f"{plan.data.name} inputs{note}", total=len(plan.data), completed=run.resume_at)
        for group, first in zip(plan.groups, plan.starts, strict=True):
            if run.resume_at >= first + len(group.corpus):
                continue  # finished before an interruption
            bar.update(task, description=f"{group.corpus.name}: {', '.join(p.name for p in group.probes)}")
            _run_group(
                forward, loaded, group, run.resume_at - first, batch_size, run, plan, lambda n: bar.advance(task, n)
            )


def _run_group(
    forward: Forward,
    loaded: LoadedModel,
    group: Group,
    done: int,
    batch_size: int,
    run: Run,
    plan: Plan,
    advance: Callable[[int], None],
) -> None:
    """The group's batches after its first ``done`` inputs, in one engine session."""
    with observe(loaded.model, probes=group.probes, check_finite=True) as session:
        session.layers = run.layers  # record_layer fills the dict that checkpoints save
        for batch in _batches(loaded, group.corpus, max(0, done), batch_size, group.offset):
            _one_batch(forward, group, batch, session, run, plan)
            advance(len(batch.samples))
            run.save_if_due()


def _batches(loaded: LoadedModel, corpus: Corpus, skip: int, batch_size: int, offset: int = 0) -> Iterator[Batch]:
    """The batches of ``corpus`` after its first ``skip`` inputs (a multiple of ``batch_size``: the
    batches of an unbroken run), padded with the tokenizer's pad id. ``offset``: the corpus index of
    its first input (a shard's slice), so that inputs keep their index in the whole corpus."""
    device = input_device(loaded.model)  # a device-mapped model takes its inputs where its first module is
    pad = pad_id(loaded.tokenizer)  # not the config's ids: a tokenizer-less model pads with 0, as ever
    rest = Corpus(corpus.name, corpus.samples[skip:], corpus.description)
    left = seq2seq.left_pad(loaded)  # an encoder-decoder pads its source and its target on the right
    for start, ids, mask in rest.batches(batch_size, pad, left_pad=left, device=device):
        start += skip
        samples = list(corpus.samples[start : start + ids.shape[0]])
        if seq2seq.is_prepared(samples):
            inputs = collate_seq2seq(samples, pad, device)
        else:
            inputs = collate(samples, ids.shape[1], left, device)
        yield Batch(corpus.name, start + offset, samples, ids, mask, left, inputs)


def _one_batch(forward: Forward, group: Group, batch: Batch, session: Any, run: Run, plan: Plan) -> None:
    for p in group.probes:
        p.begin(batch)
    t0 = time.perf_counter()
    outputs = forward(group, batch, session)  # the engine calls update and commit meanwhile
    run.forward_time += time.perf_counter() - t0
    for p in group.probes:
        p.end(batch, outputs)
    del outputs
    run.completed(len(batch.samples), plan.probes)
