"""Edits prepare themselves for a prompt (``Edit.prepare``), and the edits package uses only the engine's
public API: steering no longer branches on edit classes, and no edit imports an engine module directly."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest
import tiny_models

import headmap
from headmap.edits import Ablate, Edit, ScaleSpan
from headmap.errors import EditError
from headmap.steer import compare, prepare

tiny = functools.cache(tiny_models.tiny)
EDITS_DIR = Path(headmap.__file__).parent / "edits"


class Recording(Edit):
    """An edit defined outside headmap that needs the tokenizer: steering must call its prepare."""

    name = "recording"

    def __init__(self) -> None:
        super().__init__(heads=[(0, 0)])
        self.prepared: list[tuple[object, str | None]] = []

    def prepare(self, tokenizer, prompt=None) -> None:
        self.prepared.append((tokenizer, prompt))


class FakeTokenizer:
    is_fast = False

    def __call__(self, text, add_special_tokens=True, return_tensors=None):
        return {"input_ids": list(range(len(text.split())))}


def test_steer_calls_prepare_of_any_edit():
    model = tiny("llama")[0]
    tok = FakeTokenizer()
    edit = Recording()
    with headmap.steer(model, [edit], tokenizer=tok, prompt="the cat sat"):
        pass
    assert edit.prepared == [(tok, "the cat sat")]


def test_compare_calls_prepare_once_before_generating(tiny_llama_dir):
    edit = Recording()
    compare(str(tiny_llama_dir), [edit], "the cat sat", max_new_tokens=2)
    assert len(edit.prepared) == 1 and edit.prepared[0][1] == "the cat sat"


def test_prepare_is_a_no_op_by_default():
    edit = headmap.edits.Temperature(heads=[(0, 0)], tau=2.0)
    before = dict(vars(edit))
    edit.prepare(FakeTokenizer(), "the cat sat")
    assert vars(edit) == before


def test_span_edit_prepares_its_positions():
    edit = ScaleSpan(heads=[(0, 0)], span=[1, 3], factor=2.0)
    prepare([edit], FakeTokenizer(), "the cat sat on")  # 4 tokens: the span fits
    with pytest.raises(EditError, match="outside the prompt, which has 2 tokens"):
        ScaleSpan(heads=[(0, 0)], span=[1, 3], factor=2.0).prepare(FakeTokenizer(), "the cat")
    edit.prepare(FakeTokenizer(), None)  # no prompt (evaluation over many items): nothing to check


def test_ablate_prepares_a_reference_file(tmp_path):
    ref = tmp_path / "ref.txt"
    ref.write_text("one two\n\nthree four five\n")
    seen = []

    def tok(line, return_tensors=None):
        seen.append(line)
        return {"input_ids": line}

    edit = Ablate(heads=[(0, 0)], mode="mean", reference=str(ref))
    edit.prepare(tok, "any prompt")
    assert seen == ["one two", "three four five"] and edit.reference == [{"input_ids": s} for s in seen]
    with pytest.raises(EditError, match="reference file .* does not exist"):
        Ablate(heads=[(0, 0)], mode="mean", reference=str(tmp_path / "none.txt")).prepare(tok)


def test_steering_does_not_branch_on_edit_classes():
    tree = ast.parse((Path(headmap.__file__).parent / "steer.py").read_text())
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    assert not names & {"Ablate", "SpanEdit"}, "steer.py names edit classes: let the edit prepare itself"


def test_edits_use_only_the_engine_public_api():
    """edits/ import the engine package (its __init__ exports), never one of its modules, nor its registry."""
    for path in sorted(EDITS_DIR.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level >= 1:
                parts = node.module.split(".")
                if parts[0] == "engine":
                    assert parts == ["engine"], f"{path.name} imports headmap.{node.module}"
                    assert "registry" not in {a.name for a in node.names}, f"{path.name} imports the registry"
