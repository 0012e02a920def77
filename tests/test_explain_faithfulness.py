"""Faithfulness curves and agreement: properties that pin the definitions (docs/methods/faithfulness.md)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tiny_models import tiny

import headmap.explain as E
from headmap.explain.faithfulness import FRACTIONS, _spearman, _top_overlap
from headmap.models import pad_id


def _rows():
    gen = torch.Generator().manual_seed(4)
    return [torch.randint(1, 97, (n,), generator=gen).tolist() for n in (10, 14, 8, 12)]


@pytest.fixture(scope="module")
def run():
    model = tiny("llama")[0].double()
    rows = _rows()
    attributions, faith = E.explain_and_measure(
        model, None, rows, target="token:7", methods=["occlusion", "saliency", "rollout"], batch_size=2
    )
    return model, rows, attributions, faith


def test_deleting_the_top_occlusion_token_removes_exactly_its_occlusion_value(run):
    """With k = 1 (the smallest fraction on inputs under 100 tokens), the deletion curve of occlusion's
    order is y(x) - y(x with its top token replaced), which is occlusion's largest value by definition."""
    _, rows, attributions, faith = run
    occl = attributions[attributions.method == "occlusion"]
    want = occl.groupby("sample").value.max().to_numpy()
    point = faith[(faith.method == "occlusion") & (faith.metric == "deletion") & (faith.fraction == FRACTIONS[0])]
    assert math.isclose(float(point.value.iloc[0]), float(want.mean()), rel_tol=1e-9, abs_tol=1e-12)
    assert math.isclose(float(point.stderr.iloc[0]), float(want.std(ddof=1) / math.sqrt(len(rows))), rel_tol=1e-9)
    assert int(point.n.iloc[0]) == len(rows)


def test_comprehensiveness_by_hand(run):
    model, rows, attributions, faith = run
    pad = pad_id(None, model)
    per_input = []
    with torch.no_grad():
        for s, ids in enumerate(rows):
            v = attributions[(attributions.method == "saliency") & (attributions["sample"] == s)].value.to_numpy()
            order = np.argsort(-v, kind="stable")

            def y(seq):
                return float(model(torch.tensor([seq])).logits[0, -1].log_softmax(-1)[7])

            base, points = y(ids), []
            for f in FRACTIONS:
                k = max(1, math.ceil(f * len(ids)))
                x = list(ids)
                for j in order[:k]:
                    x[j] = pad
                points.append(base - y(x))
            per_input.append(np.mean(points))
    got = faith[(faith.method == "saliency") & (faith.metric == "comprehensiveness")]
    # eager here, the engine there: the same float64 model, float32 softmax in the engine (see test_explain.py)
    assert math.isclose(float(got.value.iloc[0]), float(np.mean(per_input)), rel_tol=1e-5, abs_tol=1e-8)


def test_every_method_and_the_random_control_have_both_curves(run):
    _, _, _, faith = run
    for method in ("occlusion", "saliency", "rollout", "random"):
        for metric in ("deletion", "insertion"):
            sub = faith[(faith.method == method) & (faith.metric == metric)]
            assert sorted(sub.fraction) == sorted(FRACTIONS)
        for metric in ("comprehensiveness", "sufficiency"):
            assert len(faith[(faith.method == method) & (faith.metric == metric)]) == 1
    tests = faith[faith.metric == "p_above_random"]
    assert set(tests.method) == {"occlusion", "saliency", "rollout"}
    assert ((tests.value > 0) & (tests.value <= 1)).all()


def test_agreement_rows(run):
    _, _, _, faith = run
    pairs = faith[faith.metric.isin(["spearman", "top5_overlap"])]
    assert len(pairs) == 6  # 3 pairs x 2 measures
    assert pairs.value.between(-1, 1).all()
    assert set(zip(pairs.method, pairs.other, strict=True)) == {
        ("occlusion", "saliency"),
        ("occlusion", "rollout"),
        ("saliency", "rollout"),
    }


def test_spearman_and_overlap_definitions():
    a = np.array([0.1, 0.5, 0.3, 0.9])
    assert _spearman(a, a * 3 + 1) == 1.0
    assert math.isclose(_spearman(a, -a), -1.0)
    assert math.isnan(_spearman(a, np.ones(4)))  # a constant has no ranking
    assert _top_overlap(a, a, 2) == 1.0
    assert _top_overlap(a, -a, 2) == 0.0
    assert _top_overlap(a, a, 10) == 1.0  # k is capped at the number of tokens
