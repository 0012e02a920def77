"""``headmap explain --resume`` (issue 13): a stopped explanation keeps its finished batches and goes on
from them; the tables then equal an uninterrupted run's, compared exactly (every batch is formed and
computed as one process forms it, and the random-order control of each batch is drawn after the draws
of the batches before it, replayed by their shapes where a batch is skipped). A different run in the
folder is refused in one line naming the field, and nothing already written is lost.
"""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
from cli_runner import assert_one_line_error, run
from tiny_models import tiny

from headmap.explain import IntegratedGradients
from headmap.explain.api import explain_and_measure, merge, plan, run_batches
from headmap.explain.folder import CHECKPOINT, FINGERPRINT, run_explain

TEXTS = [
    "the cat sat on the mat",
    "birds fly south in winter",
    "a dog",
    "rain falls on the quiet town at night",
    "ice is cold",
    "two plus two is four",
    "she reads a book",
]
METHODS = "rollout,attn_grad,saliency,integrated_gradients"
TABLES = ("attributions.parquet", "faithfulness.parquet")


class Stop(KeyboardInterrupt):
    """Ctrl-C after some batches (raised from the progress callback, once the batch is written)."""


def stop_after(batches: int):
    seen = [0]

    def progress(done: int, total: int) -> None:
        seen[0] += 1
        if seen[0] == batches:
            raise Stop

    return progress


def explain_into(model_dir, out, **kw):
    options = {"text": TEXTS, "methods": METHODS, "steps": 4, "batch_size": 2, "out": out, "seed": 3, **kw}
    return run_explain(str(model_dir), **options)


def assert_same_tables(a, b) -> None:
    for name in TABLES:
        one, two = pd.read_parquet(a / name), pd.read_parquet(b / name)
        assert len(one) > 0
        pd.testing.assert_frame_equal(one, two, check_exact=True)
    meta_a, meta_b = (json.loads((x / "explain.json").read_text()) for x in (a, b))
    assert meta_a["integrated_gradients_gap"] == meta_b["integrated_gradients_gap"]
    assert meta_a["fingerprint"] == meta_b["fingerprint"]


@pytest.mark.parametrize("target", ["next", "span:2"])
def test_stopped_and_resumed_equals_uninterrupted(tiny_llama_dir, tmp_path, target):
    explain_into(tiny_llama_dir, tmp_path / "one", target=target)
    out = tmp_path / "two"
    with pytest.raises(Stop):
        explain_into(tiny_llama_dir, out, target=target, progress=stop_after(2))
    folder = out / CHECKPOINT
    assert (folder / FINGERPRINT).is_file()
    assert sorted(p.name for p in folder.glob("batch-*.json")) == ["batch-000000.json", "batch-000001.json"]
    assert not (out / "attributions.parquet").exists()
    resumed = explain_into(tiny_llama_dir, out, target=target, resume=True)
    assert resumed.meta["resumed_batches"] == 2 and resumed.meta["batches"] == 4
    assert_same_tables(tmp_path / "one", out)
    assert not folder.exists()  # the checkpoint goes once the tables are written


def test_any_subset_of_done_batches_gives_the_same_tables():
    """The library half, on tiny_models' Llama: batches skipped in any pattern, then merged, equal one run."""
    model, _ = tiny("llama")
    texts = [[5, 6, 7, 8, 9], [3, 4], [10, 11, 12, 13, 14, 15, 16], [20, 21, 22], [30, 31, 32, 33]]
    methods = ["rollout", "saliency", IntegratedGradients(steps=4)]
    attributions, faith = explain_and_measure(model, None, texts, methods=methods, batch_size=2, seed=5)
    work = plan(model, None, texts, methods=methods, batch_size=2)
    every = run_batches(model, None, work, 5)
    for keep in ({0}, {1}, {2}, {0, 2}):
        done = {i: every[i] for i in keep}
        computed = []
        again = run_batches(model, None, work, 5, done=done, on_batch=computed.append)
        assert sorted(r.index for r in computed) == sorted(set(range(3)) - keep)
        frame, merged = merge(work, again, 5)
        pd.testing.assert_frame_equal(frame, attributions, check_exact=True)
        pd.testing.assert_frame_equal(merged.frame(), faith, check_exact=True)


def test_resume_without_a_checkpoint_runs_and_a_finished_run_is_kept(tiny_llama_dir, tmp_path):
    out = tmp_path / "ex"
    first = explain_into(tiny_llama_dir, out, resume=True)  # nothing to resume: a new run
    assert first.meta["resumed_batches"] == 0
    before = {name: (out / name).read_bytes() for name in TABLES}
    again = explain_into(tiny_llama_dir, out, resume=True)
    assert again.meta.get("nothing_to_resume")
    assert {name: (out / name).read_bytes() for name in TABLES} == before


def test_limit_takes_the_first_texts(tiny_llama_dir, tmp_path):
    done = explain_into(tiny_llama_dir, tmp_path / "ex", limit=3)
    assert sorted(done.attributions["sample"].unique()) == [0, 1, 2]
    assert done.meta["fingerprint"]["limit"] == 3 and done.meta["fingerprint"]["texts"]["count"] == 3


@pytest.fixture(scope="module")
def stopped_once(tiny_llama_dir, tmp_path_factory):
    """A run folder stopped after its first batch (made once; each test works on a copy)."""
    out = tmp_path_factory.mktemp("stopped") / "ex"
    with pytest.raises(Stop):
        explain_into(tiny_llama_dir, out, progress=stop_after(1))
    return out


@pytest.fixture
def stopped(stopped_once, tmp_path):
    out = tmp_path / "ex"
    shutil.copytree(stopped_once, out)
    return out, {p.name: p.read_bytes() for p in (out / CHECKPOINT).iterdir()}


def _cli(model_dir, out, *extra):
    texts = [a for t in TEXTS for a in ("--text", t)]
    return ["explain", str(model_dir), *texts, "--methods", METHODS, "--steps", "4", "--batch-size", "2",
            "--seed", "3", "--out", str(out), "--no-progress", *extra]  # fmt: skip


def test_an_interrupted_run_is_refused_without_resume(monkeypatch, capsys, tiny_llama_dir, stopped):
    out, kept = stopped
    code, _, err = run(monkeypatch, capsys, *_cli(tiny_llama_dir, out))
    assert_one_line_error(code, err, "interrupted explanation", "--resume", "another folder")
    assert {p.name: p.read_bytes() for p in (out / CHECKPOINT).iterdir()} == kept
    code, stdout, err = run(monkeypatch, capsys, *_cli(tiny_llama_dir, out, "--resume"))
    assert code == 0, err
    assert "resumed: 1 of 4 batches were done" in stdout
    assert (out / "attributions.parquet").is_file() and not (out / CHECKPOINT).exists()


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        (["--seed", "4"], "--seed differs"),
        (["--target", "token:cat"], "target differs"),
        (["--steps", "5"], "methods differs"),
        (["--max-length", "3"], "--max-length differs"),
        (["--limit", "5"], "--limit differs"),
        (["--dtype", "bfloat16"], "dtype differs"),
    ],
)
def test_a_different_run_is_refused_naming_the_field(monkeypatch, capsys, tiny_llama_dir, stopped, extra, field):
    out, kept = stopped
    code, _, err = run(monkeypatch, capsys, *_cli(tiny_llama_dir, out, "--resume"), *extra)
    assert_one_line_error(code, err, "cannot resume", field, "--overwrite")
    assert {p.name: p.read_bytes() for p in (out / CHECKPOINT).iterdir()} == kept
    assert not (out / "attributions.parquet").exists()


def test_other_texts_are_refused(monkeypatch, capsys, tiny_llama_dir, stopped):
    out, kept = stopped
    argv = _cli(tiny_llama_dir, out, "--resume")
    argv[argv.index(TEXTS[0])] = "the cat sat on a mat"
    code, _, err = run(monkeypatch, capsys, *argv)
    assert_one_line_error(code, err, "cannot resume", "texts differs")
    assert {p.name: p.read_bytes() for p in (out / CHECKPOINT).iterdir()} == kept


def test_overwrite_starts_over(tiny_llama_dir, stopped, tmp_path):
    out, _ = stopped
    done = explain_into(tiny_llama_dir, out, overwrite=True)
    assert done.meta["resumed_batches"] == 0
    assert not (out / CHECKPOINT).exists()
    explain_into(tiny_llama_dir, tmp_path / "one")
    assert_same_tables(tmp_path / "one", out)
