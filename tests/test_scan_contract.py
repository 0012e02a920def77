"""The probe contract as a scan uses it, and the probes a scan refuses before any work.

- ``scan(probes="")`` / ``headmap scan --probes ''`` is a ProbeError (exit 2), not the default set;
- a scan reads what a probe class declares (``Needs``) and calls the hooks of ``Probe``:
  ``prepare(corpus)`` once before the first batch, ``run`` for a probe that drives the model,
  ``warnings()`` after the last batch; it names no probe in its own code.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

import headmap
from headmap import cli
from headmap.errors import ProbeError
from headmap.probes import PROBES, Needs, Probe

SCAN_DIR = Path(headmap.__file__).parent / "scan"


@pytest.fixture
def corpus_file(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("the cat sat on the mat\n\nand the dog sat on the log\nbirds fly south in winter\n")
    return path


# -- no probe named ------------------------------------------------------------------------------


@pytest.mark.parametrize("probes", ["", "   ", []])
def test_no_probe_named_is_an_error_before_the_model_loads(tmp_path, probes):
    out = tmp_path / "run"
    missing_model = str(tmp_path / "no-such-model")  # checked after the probes: the error must be about them
    with pytest.raises(ProbeError, match="no probe named; leave --probes out for the default set") as err:
        headmap.scan(missing_model, probes=probes, out=out, progress=False)
    assert "sink" in str(err.value) and "retrieval" in str(err.value)  # the names to choose from
    assert not out.exists()


def test_cli_empty_probes_exits_2_with_one_line(monkeypatch, capsys, tiny_llama_dir, tmp_path):
    out = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["headmap", "scan", str(tiny_llama_dir), "--probes", "", "--out", str(out)])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("headmap: error:")]
    assert len(errors) == 1 and "no probe named" in errors[0] and "--probes" in errors[0], err
    assert "Traceback" not in err and not out.exists()


# -- the contract --------------------------------------------------------------------------------


class Spy(Probe):
    """Records which hooks a scan calls, with what."""

    name = "spy"
    needs = Needs(hidden_norms=True)

    def __init__(self) -> None:
        self.prepared: list[str] = []
        self.begun = 0
        self.blocks = 0
        self.norms: list[int] = []

    def prepare(self, corpus) -> None:
        self.prepared.append(corpus.name)

    def begin(self, batch) -> None:
        self.begun += 1

    def update(self, block) -> None:
        self.blocks += 1

    def end(self, batch, outputs) -> None:
        self.norms.append(len(outputs.hidden_norms))

    def warnings(self) -> list[str]:
        return [f"spy saw {self.begun} batches"]


class Driver(Probe):
    """A probe that drives the model itself (``needs.drives_model``): the scan calls run, not a forward."""

    name = "driver"
    needs = Needs(drives_model=True)

    def __init__(self) -> None:
        self.runs: list[int] = []
        self.outputs: list[object] = []

    def run(self, model, batch, session) -> None:
        self.runs.append(len(batch.samples))

    def update(self, block) -> None:
        raise AssertionError("no forward runs for a probe that drives the model")

    def end(self, batch, outputs) -> None:
        self.outputs.append(outputs)


def test_scan_calls_the_declared_hooks(tiny_llama_dir, corpus_file):
    spy, driver = Spy(), Driver()
    with pytest.warns(UserWarning, match=r"spy saw \d+ batches") as caught:
        atlas = headmap.scan(
            str(tiny_llama_dir), probes=[spy, driver], corpus=str(corpus_file), batch_size=2, progress=False
        )
    groups = atlas.meta["corpus"]["groups"]  # the driver reads the same corpus in a group of its own
    assert [g["probes"] for g in groups] == [["spy"], ["driver"]]
    inputs = groups[0]["inputs"]
    batches = -(-inputs // 2)
    assert inputs >= 2 and f"spy saw {batches} batches" in str(caught[0].message)
    assert spy.prepared == [atlas.meta["probe_corpora"]["spy"]]  # once, with the corpus it reads
    assert spy.begun == batches and spy.blocks > 0
    layers = atlas.meta["architecture"]["layers"]
    assert spy.norms == [layers + 1] * batches  # hidden norms, L + 1 entries as hidden_states has
    assert sum(driver.runs) == inputs and driver.outputs == [None] * batches


def test_old_scheduling_flags_are_refused_with_the_replacement():
    with pytest.raises(TypeError, match=r"declare needs = Needs\(causal=\.\.\.\)"):

        class Old(Probe):
            name = "old"
            causal_only = True


def test_needs_are_readable_under_their_former_names():
    for cls in PROBES.values():
        needs = cls.needs
        assert (cls.causal_only, cls.requires, cls.default_corpus, cls.default) == (
            needs.causal,
            needs.corpus,
            needs.default_corpus,
            needs.default,
        )
        assert (cls.generates, cls.needs_hidden_states, cls.needs_hidden_norms, cls.reads_qk) == (
            needs.drives_model,
            needs.hidden_states,
            needs.hidden_norms,
            needs.qk,
        )


def test_the_scan_names_no_probe():
    names = set(PROBES) | {cls.__name__ for cls in PROBES.values()} | {"RepeatProbe", "TokenProbe", "HeadMeanProbe"}
    probe_attributes = {a for cls in PROBES.values() for a in (*dir(cls), *vars(cls()))} - set(dir(object))
    flags = "causal_only|requires|default_corpus|generates|needs_hidden_states|needs_hidden_norms|reads_qk"
    former = rf"(?<!needs)\.({flags})\b"
    for path in sorted(SCAN_DIR.glob("*.py")):
        text = path.read_text()
        found = sorted(n for n in names if re.search(rf"\b{n}\b", text))
        assert not found, f"{path.name} names probes: {found}"
        assert not re.search(former, text), f"{path.name} reads a former scheduling flag instead of needs"
        looked_up = set(re.findall(r"(?:hasattr|getattr)\(\s*[\w.]+\s*,\s*\"(\w+)\"", text))
        assert not looked_up & probe_attributes, f"{path.name} looks probes up with hasattr/getattr"
