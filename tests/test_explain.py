"""Attribution methods against brute force written here (eager ``output_attentions`` and autograd).

Every model runs in float64 and the brute force computes in float64 throughout; headmap's recomputed
attention (``row_product``) is float64 too. The one difference left is the engine's forward, whose
softmax is float32 (attention.py rounds the logits to float32). Layer 1's queries and keys come from
the embeddings by the same float64 operations in both, so layer 1's probabilities agree to ~1e-16
(e_1 = 0). Layer 1's float32 softmax carries a relative error of at most (T + 2) 2^-24 <= 8.4e-7 per
probability (T <= 12 here: the logit's rounding, exp, and the sum of T terms); it reaches layer 2's
logits through the residual stream as a perturbation |Δs_2|, and layer 2's probabilities then carry a
relative error e_2 <= 2 |Δs_2|.

Rollout: r^T M with M = 0.5 A + 0.5 I row-stochastic is non-expansive in l1, and an entrywise relative
error e on A moves r^T M by at most e / 2 in l1 (rows of A sum to 1): |Δr|_max <= |Δr|_1 <= (e_1 + e_2) / 2
= e_2 / 2. Estimating |Δs_2| from the sizes in these random models (initializer_range 0.02: an attention
output ~0.2, the first norm's gain ~50 on a residual of RMS ~0.02, logits ~0.05): |Δs_2| <~ 8.4e-7 x 0.2
x 50 x 0.05 ~ 4e-7, so |Δr| <~ 4e-7 < 1e-6, the issue's bound, used below.

attn_grad: r^T (I + Ā), Ā = mean_h (dA ⊙ A)^+; the same count with dA's relative error (also ~e_2, from
the same forward) gives |Δr|_1 <= |r|_1 max_i |Ā_i|_1 2 e_2, with |r|_1 and |Ā_i|_1 below 1.1 on these
models: <~ 1e-6. Measured (this machine): at most 6.3e-9 (rollout, Mistral) and 2.2e-9 (attn_grad, Gemma 2).
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import tiny
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    Gemma2Config,
    Gemma2ForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)

import headmap.explain as E
from headmap.errors import HeadmapError, ModelError, OptionError
from headmap.models import pad_id

LENGTHS = (7, 12, 9)  # one padded batch: the shorter inputs carry padding


def _model(kind: str):
    if kind == "mistral":
        torch.manual_seed(0)
        cfg = MistralConfig(
            vocab_size=97,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            sliding_window=4,  # shorter than the inputs: the window is part of the test
            attn_implementation="eager",
        )
        return MistralForCausalLM(cfg).eval()
    if kind == "gemma2":  # logit softcap (tanh) and sliding-window layers alternating with full ones
        torch.manual_seed(0)
        cfg = Gemma2Config(
            vocab_size=97,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            sliding_window=4,
            attn_logit_softcapping=0.5,  # small, so that the cap bends the logits of these tiny models
            query_pre_attn_scalar=8,
            attn_implementation="eager",
        )
        return Gemma2ForCausalLM(cfg).eval()
    if kind == "bert":
        torch.manual_seed(0)
        cfg = BertConfig(
            vocab_size=97,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_labels=3,
            attn_implementation="eager",
        )
        return BertForSequenceClassification(cfg).eval()
    return tiny(kind)[0]


CASES = [
    ("llama", "next"),
    ("mistral", "contrast:3,7"),
    ("gemma2", "token:5"),
    ("gpt2", "token:11"),
    ("bert", "class:1"),
]


def _inputs(seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 97, (n,), generator=gen).tolist() for n in LENGTHS]


def _brute_target(model, ids: list[int], target: str, embeds=None):
    """(y, attentions, embeds) on one unpadded input with eager attention, y from the logits by hand."""
    x = torch.tensor([ids])
    if embeds is None:
        embeds = model.get_input_embeddings()(x).detach()
    embeds = embeds.requires_grad_(True)
    out = model(inputs_embeds=embeds, output_attentions=True)
    logits = out.logits[0]
    kind, _, arg = target.partition(":")
    if kind == "class":
        y = logits[int(arg)]
    elif kind == "contrast":
        a, b = (int(t) for t in arg.split(","))
        y = logits[-1, a] - logits[-1, b]
    else:
        logp = logits[-1].log_softmax(-1)
        y = logp[int(logp.argmax())] if kind == "next" else logp[int(arg)]
    return y, out.attentions, embeds


def _row(model, ids: list[int], target: str) -> int:
    return 0 if target.startswith("class") else len(ids) - 1


def brute_rollout(model, ids, target):
    with torch.no_grad():
        _, attns, _ = _brute_target(model, ids, target)
    n = len(ids)
    r = torch.zeros(n, dtype=torch.float64)
    r[_row(model, ids, target)] = 1
    for a in reversed(attns):
        r = r @ (0.5 * a[0].mean(0) + 0.5 * torch.eye(n, dtype=torch.float64))
    return r


def brute_attn_grad(model, ids, target):
    y, attns, _ = _brute_target(model, ids, target)
    grads = torch.autograd.grad(y, attns)
    n = len(ids)
    rel = torch.eye(n, dtype=torch.float64)
    for a, g in zip(attns, grads, strict=True):
        rel = rel + (g[0] * a[0]).clamp(min=0).mean(0) @ rel
    return rel[_row(model, ids, target)].detach()


def brute_saliency(model, ids, target):
    y, _, x = _brute_target(model, ids, target)
    (g,) = torch.autograd.grad(y, x)
    return (g * x).norm(dim=-1)[0].detach()


def brute_ig(model, ids, target, steps):
    if target == "next":  # the token explained is the prediction on the input, fixed along the path
        with torch.no_grad():
            target = f"token:{int(model(torch.tensor([ids])).logits[0, -1].argmax())}"
    x = model.get_input_embeddings()(torch.tensor([ids])).detach()
    total = torch.zeros_like(x)
    for k in range(steps):
        y, _, point = _brute_target(model, ids, target, embeds=(k + 0.5) / steps * x)
        total += torch.autograd.grad(y, point)[0]
    return (x * total / steps).sum(-1)[0]


def _by_sample(frame, method):
    sub = frame[frame.method == method]
    return [torch.tensor(g.sort_values("position").value.to_numpy()) for _, g in sub.groupby("sample")]


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def case(request):
    kind, target = request.param
    model = _model(kind).double()
    rows = _inputs()
    frame = E.explain(
        model,
        None,
        rows,
        target=target,
        methods=["rollout", "attn_grad", "saliency", E.IntegratedGradients(steps=8)],
        batch_size=len(rows),
    )
    assert model.config._attn_implementation == "eager"  # the session put eager back
    return model, target, rows, frame


def test_rollout_equals_brute_force(case):
    model, target, rows, frame = case
    for ids, got in zip(rows, _by_sample(frame, "rollout"), strict=True):
        want = brute_rollout(model, ids, target)
        assert torch.allclose(got, want, rtol=0, atol=1e-6)  # bound derived in the module docstring
        assert abs(float(got.sum()) - 1.0) < 1e-12  # rows of a product of row-stochastic matrices sum to 1


def test_attn_grad_equals_brute_force(case):
    model, target, rows, frame = case
    for ids, got in zip(rows, _by_sample(frame, "attn_grad"), strict=True):
        want = brute_attn_grad(model, ids, target)
        assert torch.allclose(got, want, rtol=0, atol=1e-6)  # see the module docstring


def test_saliency_and_ig_equal_hand_autograd(case):
    """Gradients through the float32-softmax forward carry a relative error of order e_2 (module docstring,
    <~ 1e-6) in each term; a token's value sums its embedding's terms, which cancel, so the error is
    relative to the largest value of the input, not to each value: tolerance 1e-5 x max |value|."""
    model, target, rows, frame = case
    for ids, sal, ig in zip(
        rows, _by_sample(frame, "saliency"), _by_sample(frame, "integrated_gradients"), strict=True
    ):
        for got, want in ((sal, brute_saliency(model, ids, target)), (ig, brute_ig(model, ids, target, steps=8))):
            assert torch.allclose(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))


def test_ig_completeness_gap_shrinks_with_steps():
    """On GPT-2 (position embeddings added after the token embedding): with a zero baseline, the path of a
    scale-invariant first norm (Llama's RMSNorm) puts the whole change near a = 0, where few points fall."""
    model = _model("gpt2").double()
    gaps = []
    for steps in (2, 8, 32):
        frame = E.explain(model, None, _inputs(), methods=[E.IntegratedGradients(steps=steps)], batch_size=3)
        gaps.append(sum(frame.attrs["integrated_gradients_gap"]))
    assert gaps[0] > gaps[1] > gaps[2]  # the midpoint rule's error falls as 1/m^2 for a smooth path
    assert gaps[2] < gaps[0] / 10


def test_batch_equals_one_by_one():
    model = _model("gpt2").double()
    rows = _inputs(seed=3)
    methods = ["rollout", "attn_grad", "saliency", "occlusion", "last_layer_attention"]
    together = E.explain(model, None, rows, target="next", methods=methods, batch_size=3)
    alone = E.explain(model, None, rows, target="next", methods=methods, batch_size=1)
    order = ["sample", "method", "position"]
    together = together.sort_values(order, ignore_index=True)
    alone = alone.sort_values(order, ignore_index=True)
    # the same float64 arithmetic on the same rows; padding changes only the order of a few sums (1e-12)
    assert (together.drop(columns="value") == alone.drop(columns="value")).all().all()
    assert float((together.value - alone.value).abs().max()) < 1e-9


def test_last_layer_attention_and_occlusion_by_hand():
    model = _model("llama").double()
    ids = _inputs()[1]
    frame = E.explain(model, None, [ids], target="token:5", methods=["last_layer_attention", "occlusion"])
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_attentions=True)
        want = out.attentions[-1][0, :, -1].mean(0)
        base = out.logits[0, -1].log_softmax(-1)[5]
        occl = []
        for j in range(len(ids)):
            x = list(ids)
            x[j] = pad_id(None, model)  # occlusion's baseline token: the pad id (here the config's eos)
            occl.append(float(base - model(torch.tensor([x])).logits[0, -1].log_softmax(-1)[5]))
    (got,) = _by_sample(frame, "last_layer_attention")
    assert torch.allclose(got, want, rtol=0, atol=1e-6)  # one layer of the rollout bound
    (got,) = _by_sample(frame, "occlusion")
    assert torch.allclose(got, torch.tensor(occl, dtype=torch.float64), rtol=1e-5, atol=1e-9)


def test_long_input_runs_in_small_blocks():
    """A block budget far below one T x T matrix: the same numbers (blocks change no sum's terms)."""
    import headmap

    model = _model("llama").double()
    rows = [torch.randint(1, 97, (200,), generator=torch.Generator().manual_seed(5)).tolist()]
    full = E.explain(model, None, rows, methods=["rollout", "attn_grad"])
    headmap.engine_config.budget_bytes = 4 * 4 * 200 * 3 * 8  # 8 rows per block
    small = E.explain(model, None, rows, methods=["rollout", "attn_grad"])
    assert float((full.value - small.value).abs().max()) < 1e-12


# -- bad input -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama(tiny_llama_dir):
    from transformers import AutoTokenizer, LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(tiny_llama_dir).eval(), AutoTokenizer.from_pretrained(tiny_llama_dir)


def test_token_that_is_several_tokens(tiny_llama):
    model, tok = tiny_llama
    with pytest.raises(OptionError, match=r"is \d+ tokens for this tokenizer \('un.*\+"):
        E.explain(model, tok, ["a text"], target="token:unbelievableness")


def test_class_index_past_the_labels():
    with pytest.raises(OptionError, match="has 3 labels"):
        E.explain(_model("bert"), None, [[1, 2, 3]], target="class:3")


def test_class_on_a_model_without_a_head(tiny_llama):
    model, tok = tiny_llama
    with pytest.raises(ModelError, match="no classification head"):
        E.explain(model, tok, ["a text"], target="class:0")


def test_next_on_a_classifier():
    with pytest.raises(ModelError, match="needs a causal language model"):
        E.explain(_model("bert"), None, [[1, 2, 3]], target="next")


def test_contrast_of_identical_tokens(tiny_llama):
    model, tok = tiny_llama
    with pytest.raises(OptionError, match="same token"):
        E.explain(model, tok, ["a text"], target="contrast:cat,cat")


def test_integrated_gradients_with_zero_steps():
    with pytest.raises(OptionError, match="steps >= 1"):
        E.IntegratedGradients(steps=0)


def test_empty_text(tiny_llama):
    model, tok = tiny_llama
    with pytest.raises(OptionError, match="text 1 is empty"):
        E.explain(model, tok, ["a text", "  "])
    with pytest.raises(OptionError, match="text 0 is empty"):
        E.explain(model, tok, [[]])


def test_unknown_method_and_target(tiny_llama):
    model, tok = tiny_llama
    with pytest.raises(OptionError, match="unknown method 'lime'"):
        E.explain(model, tok, ["a text"], methods=["lime"])
    with pytest.raises(OptionError, match="unknown target"):
        E.explain(model, tok, ["a text"], target="previous")


def test_attention_method_on_a_model_without_attention():
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    model = MambaForCausalLM(MambaConfig(vocab_size=97, hidden_size=16, num_hidden_layers=2, state_size=4)).eval()
    with pytest.raises(ModelError, match="rollout reads attention through the headmap engine"):
        E.explain(model, None, [[1, 2, 3]], methods=["saliency", "rollout"])
    frame = E.explain(model, None, [[1, 2, 3]], methods=["saliency"])  # gradients need no attention
    assert len(frame) == 3 and frame.value.notna().all()


def test_every_error_is_a_headmap_error():
    for cls in (OptionError, ModelError):
        assert issubclass(cls, HeadmapError)


def test_model_is_not_changed():
    model = _model("llama")
    before = copy.deepcopy(model.state_dict())
    E.explain(model, None, _inputs(), methods=list(E.METHODS), batch_size=3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    model.train()
    E.explain(model, None, _inputs()[:1], methods=["saliency"])
    assert model.training  # explained in eval mode, the mode put back


def test_span_target_sums_the_generated_tokens():
    """span:2 on a prompt of n tokens: the input is the prompt and the first generated token g1; y is
    log p(g1 | prompt) + log p(g2 | prompt, g1); rollout starts from the sum of the two rows."""
    model = _model("llama").double()
    prompt = _inputs()[0]
    with torch.no_grad():
        g1 = int(model(torch.tensor([prompt])).logits[0, -1].argmax())
        g2 = int(model(torch.tensor([prompt + [g1]])).logits[0, -1].argmax())
    ids = prompt + [g1]
    frame = E.explain(model, None, [prompt], target="span:2", methods=["rollout", "saliency"])
    (roll,) = _by_sample(frame, "rollout")
    (sal,) = _by_sample(frame, "saliency")
    assert len(roll) == len(ids)
    with torch.no_grad():
        attns = model(torch.tensor([ids]), output_attentions=True).attentions
    r = torch.zeros(len(ids), dtype=torch.float64)
    r[-2:] = 1
    for a in reversed(attns):
        r = r @ (0.5 * a[0].mean(0) + 0.5 * torch.eye(len(ids), dtype=torch.float64))
    assert torch.allclose(roll, r, rtol=0, atol=2e-6)  # two rows: twice the one-row bound of the docstring
    x = model.get_input_embeddings()(torch.tensor([ids])).detach().requires_grad_(True)
    logp = model(inputs_embeds=x).logits[0].log_softmax(-1)
    (g,) = torch.autograd.grad(logp[-2, g1] + logp[-1, g2], x)
    assert torch.allclose(sal, (g * x).norm(dim=-1)[0].detach(), rtol=1e-5, atol=1e-9)


def test_span_needs_a_positive_length():
    with pytest.raises(OptionError, match="span:K needs"):
        E.explain(_model("llama"), None, [[1, 2, 3]], target="span:0")


def test_layer_progress_of_attention_methods():
    model = _model("llama")
    seen = []
    E.explain(
        model, None, _inputs()[:1], methods=["rollout", "attn_grad", "saliency"], on_layer=lambda *a: seen.append(a)
    )
    assert seen == [("rollout", 1, 2), ("rollout", 2, 2), ("attn_grad", 1, 2), ("attn_grad", 2, 2)]


def test_texts_past_the_position_limit_are_cut_with_a_warning():
    model = _model("gpt2")  # n_positions 64
    with pytest.warns(UserWarning, match="1 text\\(s\\) longer than the model's position limit \\(64 tokens\\)"):
        frame = E.explain(model, None, [list(range(1, 81)), [1, 2, 3]], methods=["rollout"])
    assert frame.groupby("sample").size().tolist() == [64, 3]
    with pytest.warns(UserWarning, match="longer than --max-length \\(5 tokens\\)"):
        frame = E.explain(model, None, [list(range(1, 9))], methods=["rollout"], max_length=5)
    assert len(frame) == 5
