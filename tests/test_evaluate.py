"""Evaluation: task files, option scoring against a brute-force computation, paired bootstrap, tuning, CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from bounds import batch_bound
from cli_runner import assert_only_error_line, run

from headmap.corpus import Corpus, Sample
from headmap.edits import Edit
from headmap.errors import OptionError, TaskError
from headmap.evaluation import (
    BUILTIN_TASKS,
    Task,
    TaskItem,
    check_grid,
    compare,
    draw_controls,
    evaluate,
    load_task,
    needle_accuracy,
    parse_grid,
    predict,
    random_head_controls,
    random_like,
    score_options,
    stats,
    tune,
)
from headmap.models import load_model

# The seeded tiny Llama of tests/conftest.py (random weights of std 0.02) has logits below 1 in absolute value,
# so a relative bound on its logits is also an absolute one. A log-probability moves by at most twice the
# largest logit change (log-sum-exp is 1-Lipschitz in the max norm, minus the target's logit); the
# vocabulary's sum runs in the same order on both sides (the same kernel on rows of the same length), so it
# adds no difference to first order. Other batch sizes block every matmul differently: batch_bound(64)
# (tests/bounds.py; hidden 32, MLP 64, at most 64 keys).
LOGPROB = 2 * batch_bound(64)  # per scored token

ITEMS = [
    {"id": "a", "context": "The capital of France is", "options": [" Paris", " Rome", " a cat"], "answer": 0},
    {"id": "b", "context": "Two plus two is", "options": [" four", " seven"], "answer": 0},
    {"id": "c", "context": "Snow is", "options": [" green", " white", " loud", " fast"], "answer": 1},
    {"id": "d", "context": "Question: is fire hot?\nAnswer: ", "options": ["yes", "no"], "answer": 0},
    {"id": "e", "context": "A very long context " * 6 + "ends here", "options": [" ok", " not ok at all"], "answer": 1},
]


class ZeroHeads(Edit):
    """Zero the outputs of the named heads (the test's own ablation)."""

    def edit_output(self, block, out):
        return torch.where(self.head_mask(block, out), torch.zeros_like(out), out)


class Neutral(Edit):
    """Touches every head and changes nothing."""


def write_task(folder: Path, items=ITEMS, name: str = "task.jsonl") -> Path:
    path = folder / name
    path.write_text("".join(json.dumps(it) + "\n" for it in items), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load_model(str(tiny_llama_dir))


# -- task files ------------------------------------------------------------------------------------


def test_builtin_tasks_are_disjoint_and_well_formed():
    dev, test = load_task("mc_dev"), load_task("mc_test")
    assert (len(dev), len(test)) == (40, 80)
    assert not {it.id for it in dev.items} & {it.id for it in test.items}
    assert not {it.context for it in dev.items} & {it.context for it in test.items}
    for item in dev.items + test.items:
        assert 2 <= len(item.options) <= 4 and 0 <= item.answer < len(item.options)
        assert len(set(item.options)) == len(item.options)
    answers = np.bincount([it.answer for it in dev.items + test.items])
    assert answers.min() >= 15  # the right option is not always in one place
    assert set(BUILTIN_TASKS) == {"mc_dev", "mc_test"}


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("{not json", "line 2: not valid JSON"),
        ('["a", "b"]', "line 2: a JSON object is needed"),
        ('{"context": "x", "options": [" a", " b"]}', "line 2: the object has no 'answer'"),
        ('{"options": [" a", " b"], "answer": 0}', "line 2: the object has no 'context'"),
        ('{"context": "x", "options": [], "answer": 0}', 'line 2: "options" has 0 option(s)'),
        ('{"context": "x", "options": [" a"], "answer": 0}', 'line 2: "options" has 1 option(s)'),
        ('{"context": "x", "options": [" a", ""], "answer": 0}', "line 2: option 1 must be a non-empty string"),
        ('{"context": "x", "options": " a b", "answer": 0}', 'line 2: "options" must be a list'),
        ('{"context": "x", "options": [" a", " b"], "answer": 2}', 'line 2: "answer" 2 is out of range'),
        ('{"context": "x", "options": [" a", " b"], "answer": -1}', 'line 2: "answer" -1 is out of range'),
        ('{"context": "x", "options": [" a", " b"], "answer": "0"}', 'line 2: "answer" must be a whole number'),
        ('{"context": "x", "options": [" a", " b"], "answer": 0.5}', 'line 2: "answer" must be a whole number'),
        ('{"context": "x", "options": [" a", " b"], "answer": true}', 'line 2: "answer" must be a whole number'),
        ('{"context": 3, "options": [" a", " b"], "answer": 0}', 'line 2: "context" must be a string'),
        ('{"id": "a", "context": "x", "options": [" a", " b"], "answer": 0}', "id 'a' is already used on line 1"),
    ],
)
def test_a_bad_line_is_named(tmp_path, line, needle):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ITEMS[0]) + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(TaskError) as exc:
        load_task(path)
    assert needle in str(exc.value) and str(path) in str(exc.value)


def test_blank_lines_count_in_line_numbers(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(ITEMS[0]) + "\n\n\n{oops\n", encoding="utf-8")
    with pytest.raises(TaskError, match="line 4"):
        load_task(path)


def test_missing_empty_and_non_utf8_task_files(tmp_path):
    with pytest.raises(TaskError, match="does not exist"):
        load_task(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(TaskError, match="is empty"):
        load_task(tmp_path / "empty.jsonl")
    (tmp_path / "latin.jsonl").write_bytes(b'{"context": "caf\xe9"}\n')
    with pytest.raises(TaskError, match="not UTF-8"):
        load_task(tmp_path / "latin.jsonl")
    with pytest.raises(TaskError, match="is a folder"):
        load_task(tmp_path)


def test_limit_keeps_the_first_items(tmp_path):
    task = load_task(write_task(tmp_path), limit=2)
    assert [it.id for it in task.items] == ["a", "b"]


# -- scoring ---------------------------------------------------------------------------------------


def brute_force_logprobs(model, tokenizer, item) -> list[float]:
    """Each option on its own, no padding, the model's own attention: sum of log p(option tokens)."""
    out = []
    for option in item["options"]:
        context = item["context"].rstrip()
        cont = item["context"][len(context) :] + option
        ctx_ids = tokenizer(context, add_special_tokens=True)["input_ids"]
        if tokenizer.sep_token_id is not None and ctx_ids[-1] == tokenizer.sep_token_id:
            ctx_ids = ctx_ids[:-1]  # the MiniLM tokenizer closes every text with [SEP]
        cont_ids = tokenizer(cont, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([ctx_ids + cont_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
        n = len(cont_ids)
        targets = ids[0, -n:]
        out.append(float(logp[-n - 1 : -1].gather(-1, targets[:, None]).sum()))
    return out


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_option_scores_equal_a_brute_force_sum(tiny, tmp_path, batch_size):
    """Left padding, position ids and logits_to_keep do not change a score: it equals each option alone."""
    task = load_task(write_task(tmp_path))
    got = score_options(tiny.model, tiny.tokenizer, task.items, batch_size=batch_size)
    for item, scores in zip(ITEMS, got, strict=True):
        want = brute_force_logprobs(tiny.model, tiny.tokenizer, item)
        # options of at most 4 tokens: 4 * LOGPROB ~ 1.1e-3 (was rtol=atol=1e-4, i.e. up to 4e-3 on these scores)
        np.testing.assert_allclose(scores, want, rtol=0, atol=4 * LOGPROB)
    assert tiny.model.config._attn_implementation != "headmap"  # the session was closed


def test_neutral_edit_changes_nothing_and_ablation_changes_scores(tiny, tmp_path):
    task = load_task(write_task(tmp_path))
    base = score_options(tiny.model, tiny.tokenizer, task.items)
    same = score_options(tiny.model, tiny.tokenizer, task.items, edits=[Neutral()])
    assert same == base
    ablated = score_options(tiny.model, tiny.tokenizer, task.items, edits=[ZeroHeads(heads=[(0, 0), (1, 2)])])
    assert not np.allclose(np.concatenate(ablated), np.concatenate(base))


def test_evaluate_reports_paired_accuracy_and_items(tiny, tmp_path):
    task = load_task(write_task(tmp_path))
    result = evaluate(tiny.model, tiny.tokenizer, task, [ZeroHeads(heads=[(0, 1), (1, 3)])], bootstrap=500, seed=3)
    items = result.items
    assert list(items.id) == [it["id"] for it in ITEMS]
    assert {"pred_base", "pred_edit", "correct_base", "correct_edit", "logprobs_base", "logprobs_edit"} <= set(items)
    # float64 means of 0/1 over 5 items, computed the same way: pytest.approx's rel 1e-6 is far above gamma(5, U64)
    assert result.accuracy_base == pytest.approx(items.correct_base.mean())
    assert result.accuracy_edit == pytest.approx(items.correct_edit.mean())
    assert result.difference == pytest.approx(result.accuracy_edit - result.accuracy_base)
    low, high = result.ci
    assert low <= result.difference <= high
    for row, item in zip(items.itertuples(), ITEMS, strict=True):
        lps = json.loads(row.logprobs_base)
        assert len(lps) == len(item["options"]) and row.pred_base == int(np.argmax(lps))
    again = evaluate(tiny.model, tiny.tokenizer, task, [ZeroHeads(heads=[(0, 1), (1, 3)])], bootstrap=500, seed=3)
    assert again.ci == result.ci  # seeded
    neutral = evaluate(tiny.model, tiny.tokenizer, task, [Neutral()], bootstrap=500)
    # nothing changed, but 5 items cannot show that nothing would: the interval is McNemar's (Bonett-Price)
    # for 0 gained and 0 lost of 5, never the zero-width [0, 0] of a percentile bootstrap (issue 10)
    assert neutral.difference == 0 and neutral.ci == _pair(stats.mcnemar_counts(0, 0, len(ITEMS)).difference)
    assert neutral.ci[0] < 0 < neutral.ci[1]
    assert neutral.acc.units == len(ITEMS) and neutral.acc.clusters is None
    assert result.summary()["acc"]["n"] == len(ITEMS)


def _pair(interval):
    return (interval.low, interval.high)


def test_compare_takes_every_interval_from_stats():
    """Independent items: Clopper-Pearson accuracies, exact McNemar with Bonett-Price's interval
    (the percentile bootstrap it replaced gave [0, 0] for no change; issue 10)."""
    base = np.array([1, 0, 0, 1, 0, 0, 1, 0, 1, 0] * 3, dtype=bool)
    edit = base.copy()
    edit[[1, 2, 4]] = True  # three items gained
    c = compare(base, edit, resamples=4000, seed=1)
    assert (c.n, c.gained, c.lost, c.units, c.clusters) == (30, 3, 0, 30, None)
    assert c.difference == pytest.approx(0.1)  # 3/30 in float64: one rounding, far inside approx's rel 1e-6
    assert c.ci_base == _pair(stats.clopper_pearson(12, 30)) and c.ci_edit == _pair(stats.clopper_pearson(15, 30))
    assert c.ci_difference == _pair(stats.mcnemar_counts(3, 0, 30).difference)
    assert c.p_value == stats.mcnemar_counts(3, 0, 30).p_value
    # 2 * (1/2)^3 through exp(log-factorials): a few roundings of log k!, k <= 3 (rel 1e-12 is far above them)
    assert c.p_value == pytest.approx(0.25, rel=1e-12)
    assert c.test == "exact McNemar" and c.as_dict()["units"] == 30
    same = compare(base, base)
    assert same.difference == 0.0 and same.ci_difference[0] < 0 < same.ci_difference[1]
    full = compare(np.ones(30, bool), np.ones(30, bool))
    assert full.ci_base == _pair(stats.clopper_pearson(30, 30)) and full.ci_base[0] < 0.885  # [0.884, 1]
    with pytest.raises(ValueError):
        compare([], [])


def test_compare_with_clusters_resamples_clusters():
    """6 needles x 5 depths, all lost: the units are the 6 needles (sign test p = 1/32), not 30 items."""
    base, edit = np.ones(30, bool), np.zeros(30, bool)
    clusters = [f"needle{k // 5}" for k in range(30)]
    c = compare(base, edit, resamples=500, seed=2, clusters=clusters)
    assert (c.units, c.clusters, c.n) == (6, 6, 30)
    assert c.p_value == pytest.approx(1 / 32, rel=1e-12)  # two-sided 2 * (1/2)^6 via log-factorials (as above)
    assert c.ci_difference == _pair(stats.cluster_difference(base, edit, clusters, resamples=500, seed=2))
    assert c.ci_difference[1] > -1.0  # never the zero-width [-1, -1]
    assert c.units_text() == "30 items, 6 clusters"


def test_needle_accuracy_on_given_needles(tiny):
    """Needles whose answer is what the model generates anyway count as right; others do not."""
    prompts = [[101, 2023, 2003, 1037], [101, 2178, 7953], [101, 1996, 2034, 2171, 2003]]
    pad = tiny.tokenizer.pad_token_id
    from headmap.evaluation import greedy_answers

    samples = [Sample(p, {"answer_ids": [0, 0, 0]}) for p in prompts]
    generated = greedy_answers(tiny.model, samples, pad, batch_size=2)
    alone = [greedy_answers(tiny.model, [s], pad)[0] for s in samples]
    assert generated == alone  # padding does not change a greedy answer
    samples = [
        Sample(p, {"answer_ids": g if k != 1 else [t + 1 for t in g], "depth": 0.5, "context_length": len(p)})
        for k, (p, g) in enumerate(zip(prompts, generated, strict=True))
    ]
    corpus = Corpus("given", samples, {})
    result = needle_accuracy(tiny.model, tiny.tokenizer, [Neutral()], needles=corpus, bootstrap=200)
    assert list(result.items.correct_base) == [True, False, True]
    assert result.accuracy_base == result.accuracy_edit == pytest.approx(2 / 3)  # a float64 mean of 3 items


def test_needle_corpus_end_to_end(tiny):
    result = needle_accuracy(
        tiny.model, tiny.tokenizer, [ZeroHeads(heads=[(1, 0)])], corpus="needle:lengths=96:depths=0,1", max_length=128
    )
    assert len(result.items) == 2 and result.kind == "needle"
    assert set(result.items.columns) >= {"answer", "pred_base", "pred_edit", "correct_base", "correct_edit"}


def test_random_controls_avoid_the_named_heads(tiny):
    edit = ZeroHeads(heads=[(0, 0), (1, 2), (1, 3)])
    drawn = [random_like([edit], tiny.model, seed)[0] for seed in range(5)]
    for d in drawn:
        assert len(d.heads) == 3 and not set(d.heads) & set(edit.heads)
        assert d._layers == {la for la, _ in d.heads}
    assert drawn[0].heads == random_like([edit], tiny.model, 0)[0].heads  # seeded
    assert edit.heads == [(0, 0), (1, 2), (1, 3)]  # the original is untouched


def test_the_random_head_experiment_is_a_library_call(tiny, tmp_path):
    """draw_controls + random_head_controls: what ``headmap eval --random-heads`` reports, computed here."""
    task = load_task(write_task(tmp_path))
    edits = [ZeroHeads(heads=[(0, 1), (1, 2)])]
    draws = draw_controls(edits, tiny.model, 3)
    assert [d.draw for d in draws] == [0, 1, 2]
    base = predict(tiny.model, tiny.tokenizer, task)
    edited = evaluate(tiny.model, tiny.tokenizer, task, edits, bootstrap=300, base=base)

    def score(control_edits):
        return evaluate(tiny.model, tiny.tokenizer, task, control_edits, bootstrap=300, base=base)

    controls = random_head_controls(edited, draws, score, 300, 0)
    for d in controls.draws:
        assert not set(d.edits[0].heads) & {(0, 1), (1, 2)} and len(d.edits[0].heads) == 2
        assert controls.items[f"correct_random{d.draw}"].tolist() == score(d.edits).items["correct_edit"].tolist()
    mean = np.mean([controls.items[f"correct_random{d.draw}"].to_numpy(float) for d in draws], axis=0)
    assert controls.versus == compare(mean, edited.items["correct_edit"].to_numpy(float), 300, 0)
    assert controls.mean_difference == pytest.approx(np.mean([d.result.acc.difference for d in draws]), abs=0)
    summary = controls.summary()
    assert [c["draw"] for c in summary["random_controls"]] == [0, 1, 2]
    assert summary["random_controls"][1]["heads"] == [list(h) for h in draws[1].edits[0].heads]
    assert summary["edit_vs_random"] == controls.versus.as_dict()
    assert list(controls.items.columns[: len(edited.items.columns)]) == list(edited.items.columns)


# -- tuning ----------------------------------------------------------------------------------------


def _split(tmp_path):
    dev = write_task(tmp_path, ITEMS[:3], "dev.jsonl")
    test = write_task(tmp_path, ITEMS[3:], "test.jsonl")
    return load_task(dev), load_task(test)


def test_tuning_chooses_on_dev_only(tiny, tmp_path):
    """The factor is chosen before the test split is read: another test split gives the same choice,
    and the test split is scored only with the chosen factor (and without edits)."""
    dev, test = _split(tmp_path)
    seen: list[float] = []

    class Scale(Edit):
        def __init__(self, f):
            super().__init__(heads=[(0, 0), (1, 1)])
            self.f = f

        def edit_output(self, block, out):
            return torch.where(self.head_mask(block, out), out * self.f, out)

    def factory(f):
        seen.append(f)
        return [Scale(f)] if f != 1.0 else []

    grid = [0.0, 0.5, 3.0]
    result = tune(tiny.model, tiny.tokenizer, dev, test, [factory], grid, bootstrap=200)
    assert list(result.dev.factor) == [0.0, 0.5, 1.0, 3.0] and len(result.chosen) == 1  # neutral included
    best = max(result.dev.itertuples(), key=lambda r: (r.dev_accuracy, r.dev_p_answer))
    neutral = result.dev[result.dev.factor == 1.0].iloc[0]
    assert result.chosen == ([best.factor] if best.dev_accuracy > neutral.dev_accuracy else [1.0])
    # dev: the neutral factor, then every other factor once; test: the chosen factor only
    assert seen[:4] == [1.0, 0.0, 0.5, 3.0] and seen[4:] == [result.chosen[0]]
    other = Task("other", str(tmp_path / "elsewhere.jsonl"), [TaskItem("z", "Ice is", [" cold", " hot"], 0)])
    assert tune(tiny.model, tiny.tokenizer, dev, other, [factory], grid, bootstrap=200).chosen == result.chosen
    assert len(result.test.items) == len(test)


def test_tuning_refuses_the_same_split(tiny, tmp_path):
    dev, _ = _split(tmp_path)
    with pytest.raises(OptionError, match="same file"):
        tune(tiny.model, tiny.tokenizer, dev, dev, [lambda f: []], [1.0])
    with pytest.raises(OptionError, match=r"\{f\}"):
        tune(tiny.model, tiny.tokenizer, dev, "mc_test", ["scale_first_token:factor=2"], [1.0])


def test_predict_probability_of_the_answer(tiny, tmp_path):
    task = load_task(write_task(tmp_path))
    pred = predict(tiny.model, tiny.tokenizer, task)
    for p, lps, item in zip(pred.p_answer, pred.logprobs, ITEMS, strict=True):
        soft = np.exp(lps) / np.exp(lps).sum()
        # both in float64 from the same log-probabilities: a softmax of at most 4 terms, gamma(8, U64) << 1e-6
        assert p == pytest.approx(soft[item["answer"]], rel=1e-6)


# -- command line ----------------------------------------------------------------------------------


def test_cli_eval_with_an_edit_and_random_controls(monkeypatch, capsys, tiny_llama_dir, tmp_path):
    task = write_task(tmp_path)
    out = tmp_path / "out"
    code, stdout, err = run(
        monkeypatch, capsys, "eval", str(tiny_llama_dir), "--task", str(task),
        "--edit", "ablate:heads=[[0,1],[1,2]]:mode=zero",
        "--random-heads", "2", "--bootstrap", "300", "--out", str(out),
    )  # fmt: skip
    assert code == 0, err
    assert "base" in stdout and "random 1" in stdout and "acc_norm" in stdout
    # progress on stderr, one line per condition: base, edited, then each control
    progress = [line for line in err.splitlines() if line.startswith(("base:", "condition "))]
    assert progress[0].startswith(f"base: {len(ITEMS)} items")
    assert [line.split(":")[0] for line in progress[1:]] == [
        "condition 1/3 (edited)", "condition 2/3 (control 1/2)", "condition 3/3 (control 2/2)"
    ]  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["acc"]["n"] == len(ITEMS) and len(summary["random_controls"]) == 2
    assert summary["edits"] == ["ablate(mode=zero) on 2 heads: L0H1, L1H2"]
    import pandas as pd

    items = pd.read_csv(out / "items.csv")
    assert list(items.id) == [it["id"] for it in ITEMS]
    assert {"correct_random0", "correct_random1"} <= set(items.columns)
    assert pd.read_parquet(out / "items.parquet").shape == items.shape


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (json.dumps(ITEMS[0]) + "\n" + json.dumps(ITEMS[1])[:-3] + "\n", "line 2: not valid JSON"),
        (json.dumps({**ITEMS[1], "answer": 5}) + "\n", 'line 1: "answer" 5 is out of range'),
    ],
)
def test_cli_bad_task_file_is_one_line_and_exit_2(monkeypatch, capsys, tiny_llama_dir, tmp_path, content, needle):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    code, _, err = run(monkeypatch, capsys, "eval", str(tiny_llama_dir), "--task", str(path))
    assert_only_error_line(code, err, needle)


def test_cli_bad_edit_and_options_exit_2(monkeypatch, capsys, tiny_llama_dir, tmp_path):
    task = write_task(tmp_path)
    for args, needle in [
        (["--edit", "nonsense:x=1"], "unknown edit"),
        (["--random-heads", "2"], "--random-heads"),
        (["--edit", "ablate:heads=[[9,0]]"], "does not exist"),
    ]:
        code, _, err = run(monkeypatch, capsys, "eval", str(tiny_llama_dir), "--task", str(task), *args)
        assert code == 2 and needle in err, (args, err)


def test_cli_tune(monkeypatch, capsys, tiny_llama_dir, tmp_path):
    dev = write_task(tmp_path, ITEMS[:3], "dev.jsonl")
    test = write_task(tmp_path, ITEMS[3:], "test.jsonl")
    out = tmp_path / "tuned"
    code, stdout, err = run(
        monkeypatch, capsys, "tune", str(tiny_llama_dir), "--task-dev", str(dev), "--task-test", str(test),
        "--edit-template", "scale_first_token:heads=[[0,0],[1,1]]:factor={f}", "--grid", "0.5,1,2",
        "--bootstrap", "200", "--out", str(out),
    )  # fmt: skip
    assert code == 0, err
    assert "held-out test" in stdout and "chosen for group 0" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dev_task"] == "dev.jsonl" and summary["test_task"] == "test.jsonl"
    assert len(summary["dev"]) == 3 and summary["test"]["acc"]["n"] == 2
    assert (out / "dev.csv").is_file() and (out / "items.csv").is_file()
    code, _, err = run(monkeypatch, capsys, "tune", str(tiny_llama_dir), "--task-dev", str(dev), "--task-test",
                       str(dev), "--edit-template", "scale_first_token:factor={f}")  # fmt: skip
    assert code == 2 and "same file" in err
    code, _, err = run(
        monkeypatch, capsys, "tune", str(tiny_llama_dir), "--edit-template", "scale_first_token:factor=2"
    )
    assert code == 2 and "{f}" in err


# -- faults: one line, exit 2, nothing written, before the model loads ------------------------------


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a command loads the model: the refusals below must come before."""

    def boom(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad option was refused")

    monkeypatch.setattr("headmap.evaluation.runs.load_model", boom)


def test_eval_refuses_batch_size_0(monkeypatch, capsys, tiny_llama_dir, tmp_path, no_model_load):
    task = write_task(tmp_path)
    out = tmp_path / "out"
    for size in ("0", "-3"):
        code, _, err = run(
            monkeypatch, capsys, "eval", str(tiny_llama_dir), "--task", str(task), "--batch-size", size,
            "--out", str(out),
        )  # fmt: skip
        assert_only_error_line(code, err, f"--batch-size must be at least 1 (got {size})")
    assert not out.exists()


def test_tune_names_the_grid_value_that_is_not_finite(monkeypatch, capsys, tiny_llama_dir, tmp_path, no_model_load):
    dev = write_task(tmp_path, ITEMS[:3], "dev.jsonl")
    test = write_task(tmp_path, ITEMS[3:], "test.jsonl")
    template = "scale_first_token:heads=[[0,0]]:factor={f}"
    for grid, bad in [("0.5,nan", "'nan'"), ("inf,1", "'inf'"), ("1,-Infinity", "'-Infinity'")]:
        code, _, err = run(
            monkeypatch, capsys, "tune", str(tiny_llama_dir), "--task-dev", str(dev), "--task-test", str(test),
            "--edit-template", template, "--grid", grid,
        )  # fmt: skip
        assert_only_error_line(code, err, f"--grid: {bad} is not a finite number")
    with pytest.raises(OptionError, match=r"--grid: nan is not a finite number"):
        check_grid([0.5, float("nan")])
    assert parse_grid(" 0.5, 1,2 ") == [0.5, 1.0, 2.0]


def unwritable_outs(tmp_path) -> list[tuple[Path, str]]:
    """(an --out that cannot be written, what the error says) for every kind this machine can make."""
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder\n")
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere" / "deeper")
    outs = [(a_file, "is a file"), (Path("/proc/headmap_run"), "/proc"), (dangling, "dangling")]
    if os.geteuid() != 0:  # root writes into a read-only folder
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        outs.append((locked / "run", "not writable"))
    return outs


def test_eval_and_tune_refuse_an_unwritable_out_before_the_model_loads(
    monkeypatch, capsys, tiny_llama_dir, tmp_path, no_model_load
):
    task = write_task(tmp_path)
    dev = write_task(tmp_path, ITEMS[:3], "dev.jsonl")
    test = write_task(tmp_path, ITEMS[3:], "test.jsonl")
    for out, needle in unwritable_outs(tmp_path):
        before = sorted(p.name for p in tmp_path.iterdir())
        code, _, err = run(monkeypatch, capsys, "eval", str(tiny_llama_dir), "--task", str(task), "--out", str(out))
        assert_only_error_line(code, err, "--out", needle)
        code, _, err = run(
            monkeypatch, capsys, "tune", str(tiny_llama_dir), "--task-dev", str(dev), "--task-test", str(test),
            "--edit-template", "scale_first_token:heads=[[0,0]]:factor={f}", "--out", str(out),
        )  # fmt: skip
        assert_only_error_line(code, err, "--out", needle)
        assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    assert (tmp_path / "a-file").read_text() == "not a folder\n"


def test_options_of_a_long_context_read_it_once_and_score_as_before(tiny, monkeypatch):
    """Options of one context of >= SHARED_MIN_CONTEXT tokens read the context once (one forward over it,
    then every option on a copy of its KV cache): the scores equal the one-pass-per-option ones, with and
    without edits, for options of different lengths (right padding in the shared pass)."""
    from headmap.evaluation import scoring

    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    context = " ".join(words[(3 * k) % len(words)] for k in range(90)) + ". The answer is"
    items = [TaskItem(id="long", context=context, options=[" 7", " 12 34", " seven hundred and two", " x"], answer=0)]
    calls = []
    forward = type(tiny.model).forward

    def counting(self, *args, **kwargs):
        calls.append(int(kwargs["input_ids"].shape[1]))
        return forward(self, *args, **kwargs)

    for edits in ([], [ZeroHeads(heads=[(0, 1), (1, 0)])]):
        monkeypatch.setattr(scoring, "SHARED_MIN_CONTEXT", 10**9)  # off: one pass per option
        plain = score_options(tiny.model, tiny.tokenizer, items, edits=edits)
        monkeypatch.setattr(scoring, "SHARED_MIN_CONTEXT", 64)
        monkeypatch.setattr(type(tiny.model), "forward", counting)
        calls.clear()
        shared = score_options(tiny.model, tiny.tokenizer, items, edits=edits)
        monkeypatch.setattr(type(tiny.model), "forward", forward)
        n_ctx = calls[0]
        assert n_ctx >= 64 and calls[1:] == [3]  # the context once, then all options at once (longest: 4 tokens)
        # the same sums in another order: keys up to ~100, continuation of at most 4 tokens
        np.testing.assert_allclose(shared[0], plain[0], rtol=0, atol=4 * 2 * batch_bound(128))
    # the ablation still changes the scores on the shared path
    assert not np.allclose(shared[0], score_options(tiny.model, tiny.tokenizer, items)[0])
