"""Multiple-choice tasks: JSONL files (one item per line) and the shipped ``mc_dev`` / ``mc_test``.

A line is ``{"id": "q1", "context": "Question: ...\\nAnswer:", "options": [" yes", " no"], "answer": 0}``
(``id`` optional). A line may carry a ``cluster`` (the independent unit the item shares with others:
its needle, haystack or document; the statistics resample clusters) and, for the held-out check,
``needle``/``needles``/``haystack``/``paragraphs`` (what :mod:`headmap.evaluation.ruler` writes). Every
way a line can be wrong raises :class:`~headmap.errors.TaskError` naming the file and the line.

A RULER-style task is named with its options, ``niah_single:lengths=512,1024:n=200:seed=1:echo=true``
(:func:`parse_ruler_spec`), and generated for the model's tokenizer once it is loaded (:func:`ruler_task`).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import OptionError, TaskError

BUILTIN_TASKS = {"mc_dev": "data/tasks/mc_dev.jsonl", "mc_test": "data/tasks/mc_test.jsonl"}


@dataclass
class TaskItem:
    """One multiple-choice item: the context, its options, the index of the right one."""

    id: str
    context: str
    options: list[str]
    answer: int
    line: int = 0
    cluster: str | None = None  # the independent unit (needle, haystack, document) the item shares
    info: dict[str, Any] = field(default_factory=dict)  # needle, needles, haystack, paragraphs (held-out check)


@dataclass
class Task:
    name: str
    path: str
    items: list[TaskItem]

    def __len__(self) -> int:
        return len(self.items)

    def clusters(self, units: str = "auto") -> list[str] | None:
        """The cluster id of every item, or None where the items are the independent units.

        ``units``: ``auto`` (clusters when the items carry them), ``clusters`` (required: TaskError naming
        the field ``cluster`` and the first item without one) or ``items`` (ignore clusters).
        """
        if units not in UNITS:
            raise OptionError(f"--units must be one of {', '.join(UNITS)} (got {units!r})")
        if units == "items":
            return None
        have = [it.cluster is not None for it in self.items]
        if not any(have) and units == "auto":
            return None
        if not all(have):
            item = self.items[have.index(False)]
            raise TaskError(
                f"task {self.name}: item {item.id!r}{f' (line {item.line})' if item.line else ''} has no cluster id "
                f'(field "cluster"): the cluster statistics need one on every item (the needle, haystack or '
                "document it shares with others); add it, or pass --units items to treat the items as independent"
            )
        return [str(it.cluster) for it in self.items]


#: How the statistics count independent units: auto (clusters when the items carry them), clusters, items.
UNITS = ("auto", "clusters", "items")


# -- RULER-style tasks by name -----------------------------------------------------------------------

#: option -> (kind, what it sets) of a RULER-style task spec.
RULER_OPTIONS = {
    "lengths": ("ints", "context lengths in tokens, comma-separated (default 4096; at most the model's limit)"),
    "n": ("int", "number of items (default: the paired sample size for a 2-point difference, 2026)"),
    "seed": ("int", "seed of the needles and haystacks (default 0)"),
    "echo": ("bool", "end the prompt with the needle's own words (default false: the question does not)"),
    "per_haystack": ("int", "items in a row that share one haystack (default 4)"),
    "text": ("range", "share of the shipped prose the haystacks read, e.g. 0.5-1 (default 0-1)"),
}


def is_ruler(spec: str | Path) -> bool:
    """Whether ``spec`` names a RULER-style task (``niah_single``, ``variable_tracking:n=200``, ...)."""
    from .ruler import TASKS

    return isinstance(spec, str) and spec.split(":", 1)[0] in TASKS and not Path(spec).exists()


def parse_ruler_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``niah_single:lengths=512,1024:n=200:seed=1`` -> ("niah_single", keyword arguments of
    :func:`headmap.evaluation.ruler.generate`); OptionError naming an unknown option or a bad value."""
    from .ruler import ECHO_TASKS, TASKS

    name, *parts = spec.split(":")
    if name not in TASKS:
        raise OptionError(f"unknown RULER-style task {name!r}; choose one of: {', '.join(TASKS)}")
    out: dict[str, Any] = {}
    for part in parts:
        key, eq, value = part.partition("=")
        key = key.strip()
        if not eq or key not in RULER_OPTIONS:
            known = ", ".join(f"{k} ({v[1]})" for k, v in RULER_OPTIONS.items())
            raise OptionError(f"task {spec!r}: {part!r} is not an option of {name}; options are key=value: {known}")
        kind = RULER_OPTIONS[key][0]
        try:
            if kind == "ints":
                parsed: Any = [int(v) for v in value.split(",") if v.strip()]
                if not parsed:
                    raise ValueError
            elif kind == "int":
                parsed = int(value)
            elif kind == "bool":
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                parsed = value.lower() in ("true", "1", "yes")
            else:
                lo, _, hi = value.partition("-")
                parsed = (float(lo), float(hi))
        except ValueError:
            raise OptionError(
                f"task {spec!r}: {key}={value!r} is not a valid {kind} ({RULER_OPTIONS[key][1]})"
            ) from None
        if kind in ("int",) and parsed < (0 if key == "seed" else 1):
            raise OptionError(f"task {spec!r}: {key} must be at least {0 if key == 'seed' else 1} (got {parsed})")
        out[{"text": "text_range"}.get(key, key)] = parsed
    if out.get("echo") and name not in ECHO_TASKS:
        raise OptionError(f"task {spec!r}: echo applies to {', '.join(ECHO_TASKS)}, not to {name}")
    return name, out


def ruler_task(
    spec: str, tokenizer: Any, max_length: int | None = None, limit: int | None = None, exclude: Any = None
) -> Task:
    """The RULER-style task ``spec`` generated for ``tokenizer`` (every item with its cluster, needles and
    haystack); ``max_length`` is the model's limit (a longer length is refused), ``limit`` caps ``n``."""
    from . import ruler

    name, kwargs = parse_ruler_spec(spec)
    if limit is not None:
        kwargs["n"] = min(kwargs.get("n", ruler.DEFAULT_ITEMS), limit)
    generated = ruler.generate(name, tokenizer, max_length=max_length, exclude=exclude, **kwargs)
    return task_from_items(spec, [g.to_dict() for g in generated])


def task_from_items(name: str, items: list[dict[str, Any]], path: str = "") -> Task:
    """A Task from item dicts (``context``, ``options``, ``answer``, optional ``id``, ``cluster`` ...)."""
    out = []
    for k, obj in enumerate(items):
        out.append(
            TaskItem(
                str(obj.get("id", f"item-{k}")),
                obj["context"],
                list(obj["options"]),
                int(obj["answer"]),
                0,
                _cluster_of(obj, name, k + 1),
                {f: obj[f] for f in INFO_FIELDS if f in obj},
            )
        )
    return Task(name, path or name, out)


#: Fields an item may carry for the held-out check (headmap.evaluation.ruler writes them all).
INFO_FIELDS = ("needle", "needles", "haystack", "paragraphs", "target_length", "depth", "echo")


def _cluster_of(obj: dict[str, Any], where: str, number: int) -> str | None:
    value = obj.get("cluster")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int) or (isinstance(value, str) and not value.strip()):
        raise TaskError(
            f'{where}, line {number}: "cluster" must be a non-empty string or a whole number (got {value!r})'
        )
    return str(value)


def _task_source(spec: str | Path) -> tuple[str, str, bytes]:
    """(name, path, bytes) of a built-in task or a task file."""
    spec = str(spec)
    if spec in BUILTIN_TASKS:
        resource = resources.files("headmap").joinpath(BUILTIN_TASKS[spec])
        return spec, str(resource), resource.read_bytes()
    path = Path(spec).expanduser()
    if not path.exists():
        builtin = ", ".join(BUILTIN_TASKS)
        raise TaskError(
            f"task file {path} does not exist; pass a JSONL file (one item per line: "
            f'{{"context": "...", "options": ["...", "..."], "answer": 0}}) or a built-in task: {builtin}'
        )
    if path.is_dir():
        raise TaskError(f"task {path} is a folder; pass a JSONL file with one item per line")
    return path.name, str(path), path.read_bytes()


def load_task(spec: str | Path, limit: int | None = None) -> Task:
    """Read a task: a built-in name (``mc_dev``, ``mc_test``) or a JSONL file.

    Every way a line can be wrong raises :class:`TaskError` naming the file and the line: not
    JSON, not an object, a missing or mistyped field, fewer than two options, an empty option, an
    answer that is not a whole number or is out of range, a repeated id.
    """
    if limit is not None and limit < 1:
        raise OptionError(f"--limit must be at least 1 (got {limit})")
    if is_ruler(spec):
        raise TaskError(
            f"task {spec!r} is a RULER-style task generated for a model's tokenizer: use "
            "headmap.evaluation.tasks.ruler_task(spec, tokenizer) (headmap eval --task does this)"
        )
    name, path, data = _task_source(spec)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TaskError(f"task file {path} is not UTF-8 (bad byte at offset {exc.start}); convert it") from exc
    items: list[TaskItem] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(text.lstrip("\ufeff").splitlines(), start=1):
        if not raw.strip():
            continue
        item = _parse_item(path, number, raw, len(items))
        if item.id in seen:
            raise TaskError(f"task file {path}, line {number}: id {item.id!r} is already used on line {seen[item.id]}")
        seen[item.id] = number
        items.append(item)
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise TaskError(f"task file {path} is empty (no non-blank line); put one JSON item per line")
    return Task(name, path, items)


def _parse_item(path: str, number: int, raw: str, index: int) -> TaskItem:
    where = f"task file {path}, line {number}"
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise TaskError(
            f'{where}: not valid JSON ({exc.msg}, column {exc.colno}); each line is one object like {{"context": '
            '"...", "options": ["...", "..."], "answer": 0}'
        ) from None
    if not isinstance(obj, dict):
        raise TaskError(f"{where}: a JSON object is needed (got {type(obj).__name__})")
    missing = [k for k in ("context", "options", "answer") if k not in obj]
    if missing:
        raise TaskError(f"{where}: the object has no {', '.join(repr(m) for m in missing)}")
    context, options, answer = obj["context"], obj["options"], obj["answer"]
    if not isinstance(context, str):
        raise TaskError(f'{where}: "context" must be a string (got {type(context).__name__})')
    if not isinstance(options, list):
        raise TaskError(f'{where}: "options" must be a list of strings (got {type(options).__name__})')
    if len(options) < 2:
        raise TaskError(f'{where}: "options" has {len(options)} option(s); an item needs at least 2')
    for k, option in enumerate(options):
        if not isinstance(option, str) or not option.strip():
            raise TaskError(f"{where}: option {k} must be a non-empty string (got {option!r})")
    if isinstance(answer, bool) or not isinstance(answer, int):
        if isinstance(answer, float) and answer.is_integer():
            answer = int(answer)
        else:
            raise TaskError(f'{where}: "answer" must be a whole number, the index of the right option (got {answer!r})')
    if not 0 <= answer < len(options):
        raise TaskError(
            f'{where}: "answer" {answer} is out of range: the item has {len(options)} options, '
            f"so the answer index must be 0 to {len(options) - 1}"
        )
    ident = obj.get("id", f"line-{number}")
    if not isinstance(ident, str | int) or isinstance(ident, bool):
        raise TaskError(f'{where}: "id" must be a string or a whole number (got {ident!r})')
    if not context.strip():
        warnings.warn(f"{where}: the context is empty; options are scored unconditionally", stacklevel=3)
    cluster = _cluster_of(obj, where.rsplit(", line", 1)[0], number)
    return TaskItem(
        str(ident), context, list(options), int(answer), number, cluster, {f: obj[f] for f in INFO_FIELDS if f in obj}
    )
