"""The probe contract: what a probe declares (:class:`Needs`) and the hooks a scan calls (:class:`Probe`).

A probe receives blocks of complete attention rows from the engine (``update``) and keeps sums
and counts only, so that batches, inputs and processes merge exactly. Scores follow
docs/methods/README.md: first averaged within an input, then across inputs, each input weighing the same;
every score carries its number of inputs ``n`` and the standard error of the mean over inputs.

A scan knows no probe by name: it reads each probe class's :class:`Needs` and calls the hooks of
:class:`Probe`, each of which has a default. The shared bases live beside this file:
``head.py`` (:class:`~headmap.probes.head.HeadMeanProbe`, per-head means over query rows),
``token.py`` (:class:`~headmap.probes.token.TokenProbe`, per-token arrays) and ``repeat.py``
(:class:`~headmap.probes.repeat.RepeatProbe`, probes read on a sequence repeated twice).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..corpus import Batch
from ..engine.block import Block, QKView

#: What a sample's ``info`` must hold for each kind of corpus a probe may require, and how to get one.
CORPUS_KINDS: dict[str, tuple[str, str]] = {
    "repeats": ("repeat_length", "inputs made of a random sequence repeated twice (--corpus repeats)"),
    "needle": ("needle_span", "needle-in-a-haystack inputs (--corpus needle)"),
    "items": ("items", "inputs made of several items (--corpus items)"),
    "spans": ("spans", "inputs with named spans (a JSONL corpus with spans)"),
    "images": ("image", 'image inputs (--corpus shapes, or a JSONL corpus whose lines hold "image")'),
}


@dataclass(frozen=True)
class Needs:
    """Everything a probe class declares to a scan, in one place (``needs = Needs(...)`` on the class).

    A scan plans, schedules and runs the forward passes from these fields alone.
    """

    #: What the inputs must carry: None (any text), "repeats", "needle", "items", "spans" or "images"
    #: (:data:`CORPUS_KINDS`); checked by :meth:`Probe.applies_to`.
    corpus: str | None = None
    #: Built-in corpus the probe reads when the user names none (None: the scan's default, ``text``).
    default_corpus: str | None = None
    #: The probe's definition needs a causal (decoder) model; a scan refuses it on an encoder.
    causal: bool = False
    #: The probe drives its own forward passes (e.g. generation): the scan calls
    #: :meth:`Probe.run` instead of one forward per batch, and gives the probe a group of its own.
    drives_model: bool = False
    #: :meth:`Probe.end` reads ``outputs.hidden_states`` (the forward runs with ``output_hidden_states=True``).
    hidden_states: bool = False
    #: :meth:`Probe.end` reads ``outputs.hidden_norms``: per layer, the l2 norm of every token's residual
    #: stream entering that layer, [B, W] float64 (a scan records them with hooks, without keeping the
    #: states; when it cannot find the layers it runs with ``output_hidden_states=True`` instead).
    hidden_norms: bool = False
    #: The engine calls :meth:`Probe.update_qk` once per attention call with the queries and keys.
    qk: bool = False
    #: Part of the default probe set (``headmap scan`` without ``--probes``).
    default: bool = True
    #: The name of the probe's parameter that counts the first inputs it keeps maps of for the report
    #: (None: none); a scan's ``--map-inputs`` sets it unless the user gave it (docs/multimodal.md).
    map_inputs: str | None = None

    def __post_init__(self) -> None:
        if self.corpus is not None and self.corpus not in CORPUS_KINDS:
            raise ValueError(f"Needs.corpus must be None or one of {', '.join(CORPUS_KINDS)} (got {self.corpus!r})")


class _NeedsField:
    """A field of ``needs`` read under the name it had before :class:`Needs` (``Probe.causal_only``...).

    Read-only on a class; on an instance, assigning replaces that instance's ``needs``. Declare
    ``needs`` instead of setting these names in a class body.
    """

    def __init__(self, field: str) -> None:
        self.field = field

    def __get__(self, obj: Any, cls: type | None = None) -> Any:
        return getattr((obj if obj is not None else cls).needs, self.field)

    def __set__(self, obj: Any, value: Any) -> None:
        obj.needs = dataclasses.replace(obj.needs, **{self.field: value})


#: The former names of the fields of :class:`Needs`.
_FORMER_NAMES = {
    "requires": "corpus",
    "default_corpus": "default_corpus",
    "causal_only": "causal",
    "generates": "drives_model",
    "needs_hidden_states": "hidden_states",
    "needs_hidden_norms": "hidden_norms",
    "reads_qk": "qk",
    "default": "default",
}


class Probe:
    """Base probe. Subclasses set ``name``, declare ``needs`` and implement ``update``.

    The hooks, in the order a scan calls them (each has a default here; override what applies):

    1. ``applies_to(corpus)`` while planning: None when the probe can read the corpus, else why not.
    2. ``prepare(corpus)`` once, before the first batch, with the corpus the probe reads.
    3. For every batch: ``begin(batch)``; then either ``run(model, batch, session)`` (``needs.drives_model``)
       or one forward pass, during which the engine calls ``update_qk(view)`` once per attention call
       (``needs.qk``), ``update(block)`` for every block of every layer and ``commit()`` once the
       forward returns; then ``end(batch, outputs)`` with the model's outputs (None after ``run``).
       Between batches the scan may save ``state_dict()``; a resumed scan calls ``load_state_dict``
       before its first batch.
    4. After the last batch: ``warnings()`` (messages the scan emits), then the rows of the tables:
       ``head_rows()`` (heads.parquet), ``token_frame()`` (tokens.parquet), ``map_frame()``
       (maps.parquet), ``image_frame()`` (images.parquet) and ``params()`` (meta.json).
    """

    name: ClassVar[str] = ""
    #: What the probe needs from a scan (corpus, model kind, forward outputs); see :class:`Needs`.
    needs: ClassVar[Needs] = Needs()
    #: The probe keys what it keeps by ``block.tower`` as well as by layer (or reads one tower on
    #: purpose), so it may see the blocks of every tower of a multimodal model. A vision tower numbers its
    #: layers from 0 like the text model, so a probe keyed by layer alone would mix the two: a scan whose
    #: inputs run more than one tower (image inputs on a VLM) refuses such a probe. Head-mean probes
    #: (:class:`~headmap.probes.head.HeadMeanProbe`) are tower-aware; their rows carry ``tower``.
    tower_aware: ClassVar[bool] = False
    #: The probe computes its statistic from a call's queries, keys and the log-sum-exp of every
    #: attention row (``update_fused(view)``), so the engine may run the call with one fused kernel
    #: instead of blocks when every probe of the session is fused (:mod:`headmap.engine.fused`).
    fused: ClassVar[bool] = False

    # the fields of ``needs`` under their former names, for reading (``Probe.causal_only``, ...)
    requires = _NeedsField("corpus")
    default_corpus = _NeedsField("default_corpus")
    causal_only = _NeedsField("causal")
    generates = _NeedsField("drives_model")
    needs_hidden_states = _NeedsField("hidden_states")
    needs_hidden_norms = _NeedsField("hidden_norms")
    #: read by the engine (any observer with ``reads_qk = True`` gets ``update_qk``)
    reads_qk = _NeedsField("qk")
    default = _NeedsField("default")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        stale = [n for n in _FORMER_NAMES if n in cls.__dict__ and not isinstance(cls.__dict__[n], _NeedsField)]
        if stale:
            fields = ", ".join(f"{_FORMER_NAMES[n]}=..." for n in stale)
            raise TypeError(
                f"probe class {cls.__name__} sets {', '.join(stale)}; declare needs = Needs({fields}) instead"
            )
        if not isinstance(cls.needs, Needs):
            raise TypeError(f"probe class {cls.__name__}: needs must be a headmap.probes.Needs")

    # -- 1, 2: planning ----------------------------------------------------------------------
    def applies_to(self, samples: Any) -> str | None:
        """None when the probe can read these inputs; else why not (one sentence, for the user).

        The default checks ``needs.corpus`` against the first sample's ``info``.
        """
        if self.needs.corpus is None:
            return None
        key, hint = CORPUS_KINDS[self.needs.corpus]
        items = list(getattr(samples, "samples", samples))
        if not items or key not in (items[0].info or {}):
            return f"{self.name} needs {hint}"
        return None

    def prepare(self, corpus: Any) -> None:
        """Called once before the first batch with the corpus the probe reads (e.g. to read its layout).

        Raise :class:`~headmap.errors.ProbeError` when the corpus does not fit.
        """

    # -- 3: every batch ----------------------------------------------------------------------
    def begin(self, batch: Batch) -> None:
        """Called by a scan before the forward pass of ``batch``."""

    def run(self, model: Any, batch: Batch, session: Any) -> None:
        """Drive the model over ``batch`` (``needs.drives_model``) under the engine ``session``."""
        raise NotImplementedError(f"probe {self.name or type(self).__name__} declares drives_model but has no run()")

    def update_qk(self, view: QKView) -> None:
        """Queries and keys of one attention call (``needs.qk``), before its blocks."""
        raise NotImplementedError(f"probe {self.name or type(self).__name__} declares qk but has no update_qk()")

    def update(self, block: Block) -> None:
        """One block of complete attention rows (``block.probs``)."""
        raise NotImplementedError

    def update_fused(self, view: QKView) -> None:
        """One attention call run by a fused kernel (``fused = True``), in place of its blocks.

        ``view`` is the call's :class:`~headmap.engine.block.QKView` with ``lse`` [B, H, Tq] (each row's
        log-sum-exp of the scaled logits, float32 or float64) and ``output``; also ``tower``,
        ``is_cross`` and ``is_causal``. The call's mask is plain (causal or full, no padding).
        """
        raise NotImplementedError(f"probe {self.name or type(self).__name__} declares fused but has no update_fused()")

    def commit(self) -> None:
        """Close the inputs seen since the last commit (called after each forward by default)."""

    def end(self, batch: Batch, outputs: Any) -> None:
        """Called by a scan after the forward pass of ``batch`` (after ``commit``)."""

    def state_dict(self) -> dict[str, np.ndarray]:
        """The committed state as named numpy arrays (copies), for checkpoints.

        Only what :meth:`commit` has folded in; sums of inputs not yet committed are not part of
        it. A scan calls this after every batch, so keep it cheap. Loading the result into a fresh
        probe of the same parameters with :meth:`load_state_dict` and going on must give exactly
        the totals of a probe that never stopped. A probe that does not implement the pair makes
        its scans non-resumable (the scan warns and writes no checkpoint).
        """
        raise NotImplementedError(f"probe {self.name or type(self).__name__} cannot save its state")

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Replace the probe's committed state by ``state`` (from :meth:`state_dict`)."""
        raise NotImplementedError(f"probe {self.name or type(self).__name__} cannot load a saved state")

    # -- 4: after the last batch -------------------------------------------------------------
    def warnings(self) -> list[str]:
        """Messages for the user about the run as a whole (the scan emits each as a warning)."""
        return []

    def head_rows(self) -> list[dict[str, Any]]:
        """Rows of ``heads.parquet`` (``probe, metric, layer, head, kv_head, value, stderr, n``)."""
        return []

    def token_frame(self) -> Any:
        """Rows of ``tokens.parquet`` as a pandas DataFrame with columns
        ``sample, position, token_id, metric, layer, value`` (the scan adds ``token``); None if none."""
        return None

    def map_frame(self) -> Any:
        """Rows of ``maps.parquet`` as a pandas DataFrame
        (``sample, layer, head, row_bin, col_bin, length, value``); None if none."""
        return None

    def image_frame(self) -> Any:
        """Rows of ``images.parquet`` as a pandas DataFrame
        (``sample, image, layer, head, row, col, value``: attention over an image's token grid); None if none."""
        return None

    def params(self) -> dict[str, Any]:
        """Parameters that define the probe, written to meta.json."""
        return {}


def supports_state(probe: Probe) -> bool:
    """True when the probe implements both ``state_dict`` and ``load_state_dict``."""
    cls = type(probe)
    return cls.state_dict is not Probe.state_dict and cls.load_state_dict is not Probe.load_state_dict
