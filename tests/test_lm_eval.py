"""lm-evaluation-harness runs a tiny local task through the ``headmap`` model type, with and without edits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from bounds import batch_bound

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install headmap[lm-eval])")

from headmap.evaluation import evaluate, load_task, score_options  # noqa: E402
from headmap.models import load_model  # noqa: E402

ITEMS = [
    {"id": "a", "context": "The capital of France is", "options": [" Paris", " Rome", " a cat"], "answer": 0},
    {"id": "b", "context": "Two plus two is", "options": [" four", " seven"], "answer": 0},
    {"id": "c", "context": "Snow is", "options": [" green", " white", " loud", " fast"], "answer": 1},
    {"id": "d", "context": "Fire is", "options": [" cold", " hot"], "answer": 1},
    {"id": "e", "context": "The sky is", "options": [" blue", " square"], "answer": 0},
]

TASK_YAML = """\
task: headmap_tiny_mc
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

TEXT_YAML = """\
task: headmap_tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: text
metric_list:
  - metric: word_perplexity
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lm-eval-task")
    data = folder / "items.jsonl"
    data.write_text("".join(json.dumps(it) + "\n" for it in ITEMS), encoding="utf-8")
    texts = folder / "texts.jsonl"
    texts.write_text(json.dumps({"text": "the river runs under three old bridges in the town"}) + "\n")
    cache = folder / "cache"
    (folder / "tiny_mc.yaml").write_text(TASK_YAML.format(data=data, cache=cache), encoding="utf-8")
    (folder / "tiny_ppl.yaml").write_text(TEXT_YAML.format(data=texts, cache=cache), encoding="utf-8")
    return folder


def run(task_dir: Path, model_args: dict, tasks: list[str]) -> dict:
    from lm_eval.tasks import TaskManager

    import headmap.evaluation.lm_eval  # noqa: F401  (registers the model type)

    return lm_eval.simple_evaluate(
        model="headmap",
        model_args=model_args,
        tasks=tasks,
        task_manager=TaskManager(include_path=str(task_dir)),
        bootstrap_iters=0,
        log_samples=True,
    )


def _loglikelihoods(results: dict, task: str) -> list[list[float]]:
    by_doc: dict[int, list[float]] = {}
    for sample in sorted(results["samples"][task], key=lambda s: s["doc_id"]):
        by_doc[sample["doc_id"]] = [float(r[0][0]) for r in sample["resps"]]
    return [by_doc[k] for k in sorted(by_doc)]


def test_headmap_model_type_scores_a_local_task(task_dir, tiny_llama_dir):
    """The harness's multiple-choice scores equal headmap's own (same log-likelihoods, same accuracy),
    and an ablation reaches the harness's numbers."""
    results = run(task_dir, {"pretrained": str(tiny_llama_dir), "batch_size": 2}, ["headmap_tiny_mc"])
    lm = load_model(str(tiny_llama_dir))
    task = load_task(task_dir / "items.jsonl")
    want = score_options(lm.model, lm.tokenizer, task.items)
    got = _loglikelihoods(results, "headmap_tiny_mc")
    for g, w in zip(got, want, strict=True):
        # other batch sizes, options of at most 4 tokens, logits of the tiny Llama below 1: a log-probability
        # moves by at most twice the largest logit change (tests/test_evaluate.py, LOGPROB):
        # 4 * 2 * batch_bound(64) ~ 1.1e-3 (was rtol=atol=1e-5)
        np.testing.assert_allclose(g, w, rtol=0, atol=4 * 2 * batch_bound(64))
    mine = evaluate(lm.model, lm.tokenizer, task)
    # both a float64 mean of 0/1 over 5 items
    assert results["results"]["headmap_tiny_mc"]["acc,none"] == pytest.approx(mine.accuracy_base)

    from headmap.edits import Ablate

    spec = "ablate:heads=[[0,0],[0,1],[1,2]]:mode=zero"
    edited = run(task_dir, {"pretrained": str(tiny_llama_dir), "edits": spec}, ["headmap_tiny_mc"])
    want_edit = score_options(lm.model, lm.tokenizer, task.items, edits=[Ablate(heads=[[0, 0], [0, 1], [1, 2]])])
    got_edit = _loglikelihoods(edited, "headmap_tiny_mc")
    for g, w in zip(got_edit, want_edit, strict=True):
        np.testing.assert_allclose(g, w, rtol=0, atol=4 * 2 * batch_bound(64))  # as above
    assert not np.allclose(np.concatenate(got_edit), np.concatenate(got))
    assert lm.model.config._attn_implementation != "headmap"


def test_rolling_loglikelihood_and_generation(task_dir, tiny_llama_dir):
    from lm_eval.api.instance import Instance

    import headmap.evaluation.lm_eval as adapter

    results = run(task_dir, {"pretrained": str(tiny_llama_dir), "max_length": 8}, ["headmap_tiny_ppl"])
    assert np.isfinite(results["results"]["headmap_tiny_ppl"]["word_perplexity,none"])
    model = adapter.HeadmapLM(pretrained=str(tiny_llama_dir), max_length=8)
    text = "the river runs under three old bridges in the town"
    rolled = model.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])[0]
    # windows of 8 tokens: the same total as scoring every token after the prefix in one pass with enough room
    wide = adapter.HeadmapLM(pretrained=model.lm, max_length=64)
    once = wide.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])[0]
    assert np.isfinite(rolled) and np.isfinite(once) and rolled != once  # less context per token
    from headmap.evaluation import score_token_pairs

    tokens = model._toks.plain(text)
    prefix = model.eot_token_id if model.tokenizer.bos_token_id is None else model.tokenizer.bos_token_id
    single = score_token_pairs(model.model, [([prefix], tokens)])[0].logprob
    # one window: the prefix, then every token; other batching, each token's log-probability within
    # 2 * batch_bound(64) (logits below 1), summed over the text's tokens (was rel=1e-5)
    assert once == pytest.approx(single, abs=len(tokens) * 2 * batch_bound(64))
    out = model.generate_until([Instance("generate_until", {}, ("the river", {"until": ["\n"], "max_gen_toks": 4}), 0)])
    assert isinstance(out[0], str)
