"""Evaluation with and without edits: multiple-choice tasks scored by log-likelihood, needle retrieval.

A *task* is a JSONL file, one item per line::

    {"id": "q1", "context": "Question: ...\\nAnswer:", "options": [" yes", " no"], "answer": 0}

(``id`` is optional). Each option is scored by the sum of the log-probabilities of its tokens
given the context; the prediction is the option with the highest sum (``acc``, the primary
metric, as lm-evaluation-harness's ``acc``). ``acc_norm`` divides each sum by the option's length
in UTF-8 bytes first (lm-evaluation-harness's ``acc_norm``). Shipped tasks: ``mc_dev`` (40
items) and ``mc_test`` (80 items), easy 2-4-option questions written for headmap
(``headmap/data/tasks/``); tune on ``mc_dev``, report on ``mc_test``.

Base and edited runs both go through the headmap engine (the edited one with the edits), so the
only difference between the two is the edits: a neutral edit gives identical predictions.

The comparison is paired: every item is scored with and without the edits; every interval comes
from ``stats`` (exact binomial, exact McNemar; a cluster bootstrap and a sign test over clusters
when items share a needle, a haystack or a document), with its number of independent units.
RULER-style tasks (``ruler``) are generated offline by name (``niah_single:lengths=512:n=200``);
``heldout`` checks that selection, tuning and testing read disjoint needles, haystacks and items.

``needle_accuracy`` scores retrieval: the fraction of ``needle`` inputs (``headmap.corpus``)
whose greedy answer reproduces the needle's number exactly.

Rooms: ``tasks`` (task files), ``scoring`` (log-likelihood scoring, the paired bootstrap comparison,
``evaluate``), ``editing`` (edits from specs), ``controls`` (random-head controls), ``needle``
(retrieval accuracy), ``tuning`` (factors chosen on dev, reported on test), ``runs`` (the checked
runs behind ``headmap eval`` and ``headmap tune``), ``importance`` and ``lm_eval`` (the
lm-evaluation-harness adapter; imported on its own).
"""

from __future__ import annotations

from .. import stats
from . import heldout, ruler
from .controls import (
    DEFAULT_CONTROLS,
    ControlDraw,
    RandomControls,
    draw_controls,
    model_heads,
    random_head_controls,
    random_like,
    with_heads,
)
from .editing import build_edits, describe_edits, prepare_edits
from .needle import greedy_answers, load_needles, needle_accuracy
from .runs import EvalRun, TuneRun, run_eval, run_tune, write_results
from .scoring import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_BOOTSTRAP,
    Comparison,
    Continuation,
    EvalResult,
    Predictions,
    bootstrap_indices,
    compare,
    encode_pair,
    engine_with,
    evaluate,
    predict,
    prefix_id,
    score_options,
    score_token_pairs,
)
from .tasks import BUILTIN_TASKS, Task, TaskItem, is_ruler, load_task, parse_ruler_spec, ruler_task, task_from_items
from .tuning import EditFactory, TuneResult, check_grid, parse_grid, tune

__all__ = [
    "BUILTIN_TASKS",
    "DEFAULT_CONTROLS",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_BOOTSTRAP",
    "Comparison",
    "Continuation",
    "ControlDraw",
    "EditFactory",
    "EvalResult",
    "EvalRun",
    "Predictions",
    "RandomControls",
    "Task",
    "TaskItem",
    "TuneResult",
    "TuneRun",
    "bootstrap_indices",
    "build_edits",
    "check_grid",
    "compare",
    "describe_edits",
    "draw_controls",
    "encode_pair",
    "engine_with",
    "evaluate",
    "greedy_answers",
    "heldout",
    "is_ruler",
    "load_needles",
    "load_task",
    "model_heads",
    "needle_accuracy",
    "parse_grid",
    "parse_ruler_spec",
    "predict",
    "prefix_id",
    "prepare_edits",
    "random_head_controls",
    "random_like",
    "run_eval",
    "ruler",
    "ruler_task",
    "run_tune",
    "score_options",
    "score_token_pairs",
    "stats",
    "task_from_items",
    "tune",
    "with_heads",
    "write_results",
]
