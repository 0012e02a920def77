"""``retrieval``: equal to a brute-force greedy decoding with eager ``output_attentions``.

A tiny random Llama over a 6-token vocabulary, so that every token the model emits occurs many
times in the prompt and heads do "copy" by the paper's criterion (argmax key inside the needle and
holding the emitted token). In ``generate`` mode the answer is set to the model's own greedy
continuation (so every input counts as reproduced) and in ``teacher`` mode to fixed tokens; both
must equal a brute force that decodes without a KV cache, reads eager attentions of the last row,
and applies the definition of docs/methods/retrieval.md directly. A prompt of a different length in the same batch
checks left padding and positions; a small engine budget splits the prefill into several blocks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from bounds import U64, gamma
from transformers import LlamaConfig, LlamaForCausalLM

import headmap
from headmap.corpus import Corpus, Sample
from headmap.errors import ProbeError
from headmap.probes.retrieval import RetrievalProbe

VOCAB = 6
STEPS = 4


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(3)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(cfg).eval()


def prompts(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [[0] + torch.randint(1, VOCAB, (n - 1,), generator=gen).tolist() for n in lengths]


def eager_greedy(model, ids, steps):
    seq = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([seq])).logits
            out.append(int(logits[0, -1].argmax()))
            seq.append(out[-1])
    return out


def brute_force(model, prompt, answer, span, teacher):
    """[L, H] copied needle positions / needle length, straight from the definition."""
    s, e = span
    seq = list(prompt)
    layers = model.config.num_hidden_layers
    heads = model.config.num_attention_heads
    copied = [[set() for _ in range(heads)] for _ in range(layers)]
    with torch.no_grad():
        for t in range(len(answer)):
            out = model(torch.tensor([seq]), output_attentions=True)
            w = answer[t] if teacher else int(out.logits[0, -1].argmax())
            for layer in range(layers):
                row = out.attentions[layer][0, :, -1, :]  # [H, keys]
                for h in range(heads):
                    j = int(row[h].argmax())
                    if s <= j < e and prompt[j] == w:
                        copied[layer][h].add(j)
            seq.append(w)
    return np.array([[len(c) / (e - s) for c in layer] for layer in copied])


def corpus(model, lengths, teacher, answers=None):
    samples = []
    for k, ids in enumerate(prompts(lengths)):
        answer = answers[k] if answers else eager_greedy(model, ids, STEPS)
        span = (1, len(ids) - 2)
        samples.append(Sample(ids, {"needle_span": list(span), "answer_ids": answer, "answer": str(answer)}))
    return Corpus("needle-test", samples, {"name": "needle-test", "kind": "test"})


@pytest.mark.parametrize("mode", ["generate", "teacher"])
@pytest.mark.parametrize("budget", [None, 4096])
def test_retrieval_equals_brute_force(model, mode, budget):
    teacher = mode == "teacher"
    answers = [[1, 2, 3, 4], [5, 5, 1], [2, 3, 2, 1]] if teacher else None
    data = corpus(model, [23, 31, 17], teacher, answers)
    old = headmap.engine_config.budget_bytes
    if budget:
        headmap.engine_config.budget_bytes = budget
    try:
        atlas = headmap.scan(model, probes=[RetrievalProbe(mode=mode)], corpus=data, batch_size=2, progress=False)
    finally:
        headmap.engine_config.budget_bytes = old
    expected = np.stack(
        [brute_force(model, s.ids, s.info["answer_ids"], s.info["needle_span"], teacher) for s in data.samples]
    )  # [inputs, L, H]
    grid = atlas.heads.pivot(index="layer", columns="head", values="value").to_numpy()
    # scores are ratios of whole counts (<= 1); both sides average 3 of them in float64: gamma(4, U64)
    np.testing.assert_allclose(grid, expected.mean(axis=0), atol=gamma(4, U64))
    assert expected.max() > 0  # some head copies, so the comparison is not of zeros
    assert set(atlas.heads.n) == {3}
    se = atlas.heads.pivot(index="layer", columns="head", values="stderr").to_numpy()
    # the probe's variance is sum(x^2) - n mean^2 in float64 (values <= 1, n = 3): off by gamma(2n + 2, U64) *
    # n / (n - 1) at most, and a square root of an error e is at most sqrt(e) (was 1e-12, not a bound when the
    # spread is near 0)
    np.testing.assert_allclose(se, expected.std(axis=0, ddof=1) / np.sqrt(3), atol=np.sqrt(gamma(8, U64) * 3 / 2 / 3))
    assert atlas.meta["probes"]["retrieval"] == {"mode": mode}


def test_generate_mode_skips_inputs_the_model_did_not_reproduce(model):
    data = corpus(model, [23, 31, 17], teacher=False)
    data.samples[1].info["answer_ids"] = [(t + 1) % VOCAB for t in data.samples[1].info["answer_ids"]]
    atlas = headmap.scan(model, probes=[RetrievalProbe()], corpus=data, batch_size=3, progress=False)
    assert set(atlas.heads.n) == {2}
    kept = [data.samples[0], data.samples[2]]
    expected = np.mean(
        [brute_force(model, s.ids, s.info["answer_ids"], s.info["needle_span"], False) for s in kept], axis=0
    )
    grid = atlas.heads.pivot(index="layer", columns="head", values="value").to_numpy()
    np.testing.assert_allclose(grid, expected, atol=gamma(4, U64))  # as above: a float64 mean of whole-count ratios


def test_no_reproduction_warns_and_scores_nothing(model):
    data = corpus(model, [23], teacher=False)
    data.samples[0].info["answer_ids"] = [(t + 1) % VOCAB for t in data.samples[0].info["answer_ids"]]
    with pytest.warns(UserWarning, match="reproduced the needle in 0 of 1"):
        atlas = headmap.scan(model, probes=[RetrievalProbe()], corpus=data, progress=False)
    assert set(atlas.heads.n) == {0}


def test_bad_mode_and_missing_needle_are_refused(model):
    with pytest.raises(ProbeError, match="mode must be one of generate, teacher"):
        RetrievalProbe(mode="greedy")
    plain = Corpus("plain", [Sample([0, 1, 2, 3])], {"name": "plain"})
    with pytest.raises(ProbeError, match="retrieval cannot read corpus 'plain'.*needle"):
        headmap.scan(model, probes="retrieval", corpus=plain, progress=False)


def test_retrieval_state_round_trip(model):
    data = corpus(model, [23, 31], teacher=False)
    probe = RetrievalProbe()
    headmap.scan(model, probes=[probe], corpus=data, progress=False)
    again = RetrievalProbe()
    again.load_state_dict(probe.state_dict())
    assert again.head_rows() == probe.head_rows()
    assert (again.instances, again.reproduced) == (probe.instances, probe.reproduced) == (2, 2)
