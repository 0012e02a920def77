"""Evidence that can carry a claim (issue 10): RULER-style tasks by name, clusters on every item, the
needle question that does not repeat the needle, layer-matched controls ranked, the held-out check
against the atlas's corpus, and the bad inputs each refused in one line with exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cli_runner import assert_only_error_line, run

from headmap import stats
from headmap.corpus import load_corpus
from headmap.evaluation import heldout, parse_ruler_spec, random_like, ruler_task, run_eval
from headmap.evaluation.controls import RandomControls
from headmap.models import load_model

TASK = "niah_single:lengths=128:n=8:seed=3:per_haystack=4"


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load_model(str(tiny_llama_dir))


@pytest.fixture
def no_model_load(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad option was refused")

    monkeypatch.setattr("headmap.evaluation.runs.load_model", boom)


# -- tasks ----------------------------------------------------------------------------------------


def test_ruler_spec_options_and_errors():
    assert parse_ruler_spec("niah_single:lengths=512,1024:n=200:seed=1:echo=true:text=0.5-1") == (
        "niah_single",
        {"lengths": [512, 1024], "n": 200, "seed": 1, "echo": True, "text_range": (0.5, 1.0)},
    )
    assert parse_ruler_spec("variable_tracking") == ("variable_tracking", {})
    from headmap.errors import OptionError

    for bad, needle in [
        ("niah_single:n=0", "n must be at least 1"),
        ("niah_single:depth=3", "not an option"),
        ("variable_tracking:echo=true", "echo applies to"),
        ("niah_single:lengths=abc", "not a valid ints"),
    ]:
        with pytest.raises(OptionError, match=needle):
            parse_ruler_spec(bad)


def test_ruler_task_items_record_clusters_and_the_question_does_not_echo(tiny):
    task = ruler_task(TASK, tiny.tokenizer, tiny.max_length)
    assert len(task) == 8
    clusters = task.clusters()
    assert clusters is not None and len(set(clusters)) == 2  # 4 items per haystack
    for item in task.items:
        assert item.cluster == item.info["haystack"] and item.info["needles"]
        assert item.context.endswith("Answer:")  # not the needle's words
    echo = ruler_task(TASK + ":echo=true", tiny.tokenizer, tiny.max_length)
    assert all(it.context.endswith(f"Answer: One of the magic numbers of {it.info['needle'].split('=')[0]} is")
               for it in echo.items)  # fmt: skip


def test_needle_corpus_does_not_echo_by_default_and_lists_its_needles(tiny):
    corpus = load_corpus("needle:lengths=96:depths=0,1", tiny.tokenizer, 128)
    desc = corpus.description
    assert desc["needles"] == sorted({s.info["needle_id"] for s in corpus.samples})
    assert desc["haystacks"] and desc["paragraphs"]
    for s in corpus.samples:
        assert s.info["cluster"] == s.info["needle_id"] and not s.info["echo"]
    echo = load_corpus("needle:lengths=96:depths=0,1:echo=1", tiny.tokenizer, 128)
    assert all(s.info["echo"] for s in echo.samples)
    text = tiny.tokenizer.decode(echo.samples[0].ids).lower().replace(" ", "")
    assert text.endswith("answer:thesecretnumberof" + echo.samples[0].info["needle_id"].split("=")[0].lower() + "is")


def test_run_eval_on_a_ruler_task_counts_clusters(tiny_llama_dir, tmp_path):
    run = run_eval(
        str(tiny_llama_dir),
        TASK,
        ["ablate:heads=[[0,1],[1,2]]:mode=zero"],
        random_heads=3,
        bootstrap=200,
        power_effect=0.02,
    )
    power = run.summary["power"]
    base = run.summary["acc"]["accuracy_base"]
    kw = {"discordance": power["discordance"]} if power["discordance"] > 0.02 else {"accuracy": min(base, 0.98)}
    assert power["independent_items"] == stats.paired_sample_size(0.02, **kw).items
    acc = run.summary["acc"]
    assert (acc["n"], acc["units"], acc["clusters"]) == (8, 2, 2)
    assert acc["test"] == "exact sign test over clusters"
    assert run.items["cluster"].notna().all()
    assert run.summary["held_out"] == "not checked: no --atlas"
    rank = run.summary["control_rank"]
    assert rank["draws"] == 3 and rank["match"] == "layer" and 1 <= rank["rank_from_lowest"] <= 4
    for d in run.controls.draws:  # layer-matched: one head in layer 0, one in layer 1, none edited
        heads = d.edits[0].heads
        assert sorted(la for la, _ in heads) == [0, 1] and not {(0, 1), (1, 2)} & set(heads)


# -- statistics ------------------------------------------------------------------------------------


def test_the_default_number_of_items_is_the_sample_size():
    """2 points at 80% power, accuracy 0.70, correlation 0.75 (docs/methods/ruler.md): 2026 items."""
    from headmap.evaluation import ruler

    assert stats.paired_sample_size(0.02).items == ruler.DEFAULT_ITEMS == 2026


def test_control_rank():
    from headmap.evaluation.controls import ControlDraw

    class R:
        def __init__(self, d):
            self.acc = type("A", (), {"difference": d})()

    draws = [ControlDraw(k, [], R(d)) for k, d in enumerate([0.0, 0.0, -0.1, 0.05])]
    rc = RandomControls(draws, None, None, edited_difference=-0.5)
    assert rc.rank == (0, 0, 4)  # no control lowered accuracy as much
    assert rc.rank_p == pytest.approx(2 / 5)  # two-sided Monte Carlo p, (1 + 0) / (4 + 1) per tail
    assert rc.distribution()["median"] == 0.0 and rc.distribution()["min"] == -0.1


def test_uniform_controls_may_leave_the_layers(tiny):
    from headmap.edits import Ablate

    edit = Ablate(heads=[(1, 0), (1, 1)])
    layered = {la for s in range(10) for la, _ in random_like([edit], tiny.model, s)[0].heads}
    assert layered == {1}
    uniform = {la for s in range(10) for la, _ in random_like([edit], tiny.model, s, "uniform")[0].heads}
    assert uniform == {0, 1}  # 10 draws of 2 of the 6 other heads: all in layer 1 has chance (1/5)^10


# -- held-out discipline ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def needle_atlas(tiny_llama_dir, tmp_path_factory):
    """A scan of the tiny model on the needle corpus (seed 0): meta.json lists its needles."""
    import headmap

    out = tmp_path_factory.mktemp("atlas") / "run"
    headmap.scan(
        str(tiny_llama_dir), probes=["retrieval"], corpus="needle:lengths=96:depths=0,1", max_length=128, out=out
    )
    return out


def test_overlap_with_the_atlas_is_refused_then_recorded(monkeypatch, capsys, tiny_llama_dir, needle_atlas, tmp_path):
    meta = json.loads((needle_atlas / "meta.json").read_text())
    side = heldout.from_description(meta["corpus"])
    assert side.needles and side.paragraphs
    args = ["eval", str(tiny_llama_dir), "--task", "needle:lengths=96:depths=0,1", "--max-length", "128"]
    args += ["--atlas", str(needle_atlas), "--random-heads", "0"]
    out = tmp_path / "out"
    code, _, err = run(monkeypatch, capsys, *args, "--out", str(out))
    assert_only_error_line(code, err, "shared needles", sorted(side.needles)[0])
    assert not out.exists()  # nothing written
    code, stdout, err = run(monkeypatch, capsys, *args, "--allow-overlap", "--out", str(out))
    assert code == 0, err
    check = json.loads((out / "summary.json").read_text())["held_out"][0]
    assert check["allowed_overlap"] and not check["disjoint"] and check["shared"]["needles"] == len(side.needles)
    # a RULER-style task avoids the atlas's needles and prose: disjoint, and recorded so
    code, stdout, err = run(
        monkeypatch, capsys, "eval", str(tiny_llama_dir), "--task", TASK, "--atlas", str(needle_atlas),
        "--out", str(tmp_path / "ruler"),
    )  # fmt: skip
    assert code == 0, err
    check = json.loads((tmp_path / "ruler" / "summary.json").read_text())["held_out"][0]
    assert check["disjoint"] and "held-out check" in stdout


def test_tune_refuses_dev_and_test_that_share_items(monkeypatch, capsys, tiny_llama_dir, tmp_path, no_model_load):
    item = {"context": "The sky is", "options": [" blue", " green"], "answer": 0}
    (tmp_path / "dev.jsonl").write_text(json.dumps(item) + "\n")
    (tmp_path / "test.jsonl").write_text(json.dumps({**item, "id": "other"}) + "\n")
    code, _, err = run(
        monkeypatch, capsys, "tune", str(tiny_llama_dir), "--task-dev", str(tmp_path / "dev.jsonl"),
        "--task-test", str(tmp_path / "test.jsonl"), "--edit-template", "scale_first_token:factor={f}",
    )  # fmt: skip
    assert_only_error_line(code, err, "1 shared items", "--allow-overlap")


# -- bad input -------------------------------------------------------------------------------------


def test_items_without_clusters_when_the_statistics_need_them(
    monkeypatch, capsys, tiny_llama_dir, tmp_path, no_model_load
):
    items = [
        {"id": "a", "context": "x", "options": [" a", " b"], "answer": 0, "cluster": "h1"},
        {"id": "b", "context": "y", "options": [" a", " b"], "answer": 1},
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(it) + "\n" for it in items))
    code, _, err = run(monkeypatch, capsys, "eval", str(tiny_llama_dir), "--task", str(path))
    assert_only_error_line(code, err, "item 'b'", 'field "cluster"')
    path.write_text(json.dumps(items[1]) + "\n")
    code, _, err = run(monkeypatch, capsys, "eval", str(tiny_llama_dir), "--task", str(path), "--units", "clusters")
    assert_only_error_line(code, err, 'field "cluster"')


def test_power_analysis_with_effect_zero(monkeypatch, capsys, tiny_llama_dir, tmp_path, no_model_load):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"context": "x", "options": [" a", " b"], "answer": 0}) + "\n")
    code, _, err = run(monkeypatch, capsys, "eval", str(tiny_llama_dir), "--task", str(path), "--power-effect", "0")
    assert_only_error_line(code, err, "the effect size is 0")


def test_length_above_the_models_limit(monkeypatch, capsys, tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    code, _, err = run(
        monkeypatch, capsys, "eval", str(tiny_llama_dir), "--task", "niah_single:lengths=4096:n=4", "--out", str(out)
    )
    assert_only_error_line(code, err, "length 4096 is above the model's limit of 256 tokens")
    assert not out.exists()


def test_controls_that_cannot_be_drawn(monkeypatch, capsys, tiny_llama_dir, tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"context": "x", "options": [" a", " b"], "answer": 0}) + "\n")
    code, _, err = run(
        monkeypatch, capsys, "eval", str(tiny_llama_dir), "--task", str(path),
        "--edit", "ablate:heads=[[0,0],[0,1],[0,2]]:mode=zero",
    )  # fmt: skip
    assert_only_error_line(code, err, "cannot draw 3 random heads in layer 0: it has only 1 heads no edit names")


# -- lm-evaluation-harness -------------------------------------------------------------------------

TASK_YAML = """\
task: headmap_niah_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
output_type: multiple_choice
test_split: test
doc_to_text: context
doc_to_choice: options
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def test_harness_runs_a_generated_ruler_task(tiny, tiny_llama_dir, tmp_path):
    """A task YAML over a generated JSONL task: the harness's accuracy through the ``headmap`` model
    type equals headmap's own on the same file."""
    lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed")
    from lm_eval.tasks import TaskManager

    import headmap.evaluation.lm_eval  # noqa: F401  (registers the model type)
    from headmap.evaluation import evaluate, load_task, ruler

    data = ruler.write_jsonl(
        ruler.generate("niah_single", tiny.tokenizer, 6, [96], seed=5, max_length=tiny.max_length),
        tmp_path / "niah.jsonl",
    )
    (tmp_path / "niah.yaml").write_text(TASK_YAML.format(data=data, cache=tmp_path / "cache"), encoding="utf-8")
    results = lm_eval.simple_evaluate(
        model="headmap",
        model_args={"pretrained": str(tiny_llama_dir)},
        tasks=["headmap_niah_local"],
        task_manager=TaskManager(include_path=str(tmp_path)),
        bootstrap_iters=0,
    )
    mine = evaluate(tiny.model, tiny.tokenizer, load_task(data))
    assert mine.acc.clusters is not None  # the file's items carry their clusters
    # both a float64 mean of 0/1 over the same 6 items
    assert results["results"]["headmap_niah_local"]["acc,none"] == pytest.approx(mine.accuracy_base)
    assert np.isfinite(mine.acc.ci_difference).all()
    assert Path(data).read_text().count('"cluster"') == 6
