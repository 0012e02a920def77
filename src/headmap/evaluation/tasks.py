"""Multiple-choice tasks: JSONL files (one item per line) and the shipped ``mc_dev`` / ``mc_test``.

A line is ``{"id": "q1", "context": "Question: ...\\nAnswer:", "options": [" yes", " no"], "answer": 0}``
(``id`` optional). Every way a line can be wrong raises :class:`~headmap.errors.TaskError` naming the
file and the line.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

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


@dataclass
class Task:
    name: str
    path: str
    items: list[TaskItem]

    def __len__(self) -> int:
        return len(self.items)


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
    return TaskItem(str(ident), context, list(options), int(answer), number)
