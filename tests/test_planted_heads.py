"""Planted heads: a tiny causal model trained here grows a previous-token head and an induction head.

A 2-layer Llama (4 heads per layer, RoPE) is trained from scratch with plain PyTorch (AdamW, the
default ``sdpa`` attention, no headmap) on BOS + r + r, where r is n distinct random tokens and n
changes from batch to batch, so that no head can find the earlier copy by position alone. The way to
predict the second copy is the two-layer induction circuit (Elhage et al. 2021; Olsson et al. 2022):
a layer-0 head that attends to the previous token, read by a layer-1 head that attends to the token
after the earlier copy of the current one.

Left alone, every head of a layer learns the same job (all four layer-1 heads become induction heads,
0.99-1.0 each), so a group-lasso penalty on each head's weights prunes the redundant ones: on the
output projection from the start, on q, k, v and o together once the circuit has formed. One head
per job survives, the pruned ones fall to uniform attention. BOS is the padding id, so its embedding
stays zero; with a learned BOS embedding, 3 seeds in 10 lost every head before the circuit formed.

Measured over seeds 0-19 (1200 steps, 30-36 s on one CPU thread): the top prev_token head
0.67-0.77 (runner-up 0.117, uniform attention), the top induction head 0.77-0.95 (runner-up 0.051,
uniform), second-copy loss 0.002-0.021 against 3.43-3.52 on the first copy (chance: ln 31 = 3.43).

The scan must rank the surviving heads first, and its numbers must equal a brute-force computation
from eager ``output_attentions``. Nothing is cached on disk: the model is trained once per module.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from bounds import eager_bound
from transformers import LlamaConfig, LlamaForCausalLM

import headmap
from headmap.corpus import Corpus, Sample
from headmap.probes.induction import InductionProbe
from headmap.probes.prev_token import PrevTokenProbe
from headmap.probes.retrieval import RetrievalProbe

pytestmark = pytest.mark.slow

SEED = 0
VOCAB = 32  # token 0 is BOS; r draws n distinct tokens from 1..31
BOS = 0
OFFSET = 1  # the BOS before the first copy
LAYERS, HEADS, HEAD_DIM, HIDDEN = 2, 4, 32, 64
TRAIN_LENGTHS = (4, 16)  # n is drawn per batch from this range (inclusive)
EVAL_LENGTH = 12
BATCH = 32
STEPS = 1200
LR = 3e-3
WARMUP = 100
LASSO = 0.03  # group-lasso weight per head
LASSO_FROM = 300  # o_proj alone before this step, q, k, v and o after it (the circuit has formed by then)
EVAL_INPUTS = 32


def repeats(gen: torch.Generator, batch: int, n: int) -> torch.Tensor:
    """[batch, 1 + 2n]: BOS, then r (n distinct tokens from 1..VOCAB-1), then r again."""
    r = torch.rand(batch, VOCAB - 1, generator=gen).argsort(dim=-1)[:, :n] + 1
    return torch.cat([torch.full((batch, 1), BOS, dtype=torch.long), r, r], dim=1)


def head_lasso(model: LlamaForCausalLM, all_weights: bool) -> torch.Tensor:
    """Sum over heads of the L2 norm of the head's weights: o_proj's columns, plus its q/k/v rows."""
    total = torch.zeros(())
    for layer in model.model.layers:
        attn = layer.self_attn
        sq = attn.o_proj.weight.view(HIDDEN, HEADS, HEAD_DIM).pow(2).sum((0, 2))
        if all_weights:
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                sq = sq + proj.weight.view(HEADS, HEAD_DIM, HIDDEN).pow(2).sum((1, 2))
        total = total + sq.add(1e-12).sqrt().sum()  # 1e-12 keeps sqrt's gradient finite at 0: not a tolerance
    return total


@dataclass
class Trained:
    model: LlamaForCausalLM
    seconds: float
    final_loss: float


def train(seed: int = SEED, steps: int = STEPS) -> Trained:
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=64,
        bos_token_id=BOS,
        eos_token_id=BOS,
        pad_token_id=BOS,  # BOS's embedding stays zero
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a second thread gains little here and loses much when the core is busy
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config)
            gen = torch.Generator().manual_seed(seed)
            opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / WARMUP))
            model.train()
            started = time.perf_counter()
            for step in range(steps):
                n = int(torch.randint(TRAIN_LENGTHS[0], TRAIN_LENGTHS[1] + 1, (1,), generator=gen))
                x = repeats(gen, BATCH, n)
                logits = model(input_ids=x).logits
                loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1))
                penalty = LASSO * head_lasso(model, all_weights=step >= LASSO_FROM)
                opt.zero_grad()
                (loss + penalty).backward()
                opt.step()
                sched.step()
            seconds = time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return Trained(model, seconds, float(loss.detach()))


@pytest.fixture(scope="module")
def trained() -> Trained:
    return train()


@pytest.fixture(scope="module")
def eval_ids() -> torch.Tensor:
    """Held-out inputs: a generator the training never used, n fixed at EVAL_LENGTH."""
    return repeats(torch.Generator().manual_seed(10_000 + SEED), EVAL_INPUTS, EVAL_LENGTH)


@pytest.fixture(scope="module")
def atlas(trained, eval_ids) -> headmap.Atlas:
    info = {"repeat_length": EVAL_LENGTH, "offset": OFFSET}
    corpus = Corpus(
        "planted-repeats",
        [Sample(row.tolist(), dict(info)) for row in eval_ids],
        {"name": "planted-repeats", "inputs": len(eval_ids), **info},
    )
    probes = [PrevTokenProbe(), InductionProbe(repeat_length=EVAL_LENGTH, offset=OFFSET)]
    return headmap.scan(trained.model, probes=probes, corpus=corpus, batch_size=8, progress=False)


def top_two(atlas: headmap.Atlas, probe: str) -> tuple[dict, dict]:
    top = atlas.top(probe, k=2)
    return top.iloc[0].to_dict(), top.iloc[1].to_dict()


def test_training_grew_in_context_copying(trained, eval_ids):
    """The second copy is predicted from the first: its loss falls far below the first copy's (~ln 31)."""
    model = trained.model
    assert model.config._attn_implementation == "sdpa"  # trained with transformers' default, not headmap
    n = EVAL_LENGTH
    with torch.no_grad():
        logits = model(input_ids=eval_ids).logits
    nll = -torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, eval_ids[:, 1:, None]).squeeze(-1)  # of token t + 1
    first = nll[:, 0:n].mean().item()  # tokens 1..n: r, nothing to copy from
    second = nll[:, n + 1 : 2 * n].mean().item()  # tokens n + 2..2n: r again, after its first token
    assert first > 3.0, f"first copy should be near chance (ln 31 = 3.43), got {first:.3f}"
    assert second < 0.1, (
        f"in-context copying did not form: loss {second:.3f} on the second copy vs {first:.3f} on the first "
        f"(trained {trained.seconds:.1f} s, last batch loss {trained.final_loss:.3f})"
    )


@pytest.mark.parametrize(
    ("probe", "layer", "floor"),
    [("prev_token", 0, 0.6), ("induction", 1, 0.6)],
)
def test_scan_ranks_the_planted_head_first(atlas, probe, layer, floor):
    """One head per job: the previous-token head in layer 0, the induction head in layer 1, far ahead of the rest.

    Over 20 seeds the top head measured prev_token 0.67-0.77 and induction 0.77-0.95, every other head
    0.117 and 0.051 (uniform attention): the floors, a margin of 0.45 and a 4x ratio leave room for another
    machine's arithmetic to take the training down a slightly different path.
    """
    first, second = top_two(atlas, probe)
    report = f"{probe}: top {first}, runner-up {second}\n{atlas.grid(probe).round(3)}"
    assert first["layer"] == layer, report
    assert first["value"] > floor, report
    assert first["value"] - second["value"] > 0.45 and first["value"] > 4 * second["value"], report
    assert first["n"] == EVAL_INPUTS, report


def test_the_two_planted_heads_are_different_heads(atlas):
    """The induction head does not attend to the previous token, nor the previous-token head to the next copy."""
    grids = {p: atlas.grid(p).to_numpy() for p in ("prev_token", "induction")}
    prev_head = np.unravel_index(grids["prev_token"].argmax(), grids["prev_token"].shape)
    ind_head = np.unravel_index(grids["induction"].argmax(), grids["induction"].shape)
    assert grids["induction"][prev_head] < 0.1 and grids["prev_token"][ind_head] < 0.25


def brute_force(model: LlamaForCausalLM, ids: torch.Tensor) -> dict[str, np.ndarray]:
    """prev_token and induction [layers, heads] from eager ``output_attentions``, by hand (no probe code)."""
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            atts = model(input_ids=ids, output_attentions=True).attentions
    finally:
        model.set_attn_implementation(before)
    a = torch.stack(atts).double().numpy()  # [layers, batch, heads, T, T]
    n, t = EVAL_LENGTH, ids.shape[1]
    prev = np.stack([a[..., i, i - 1] for i in range(1, t)], axis=-1)  # [layers, batch, heads, rows]
    rows = range(OFFSET + n + 1, OFFSET + 2 * n)  # the second copy after its first token
    ind = np.stack([a[..., i, i - n + 1] for i in rows], axis=-1)
    # mean over the rows of each input, then over inputs
    return {"prev_token": prev.mean(-1).mean(1), "induction": ind.mean(-1).mean(1)}


def test_planted_heads_equal_brute_force(trained, eval_ids, atlas):
    expected = brute_force(trained.model, eval_ids)
    assert trained.model.config._attn_implementation == "sdpa"
    for probe, want in expected.items():
        got = atlas.grid(probe).to_numpy()
        assert got.shape == (LAYERS, HEADS)
        # engine vs the model's own attention: two layers, heads of 32 dimensions, at most 32 keys:
        # eager_bound(32, LAYERS, HEAD_DIM) ~ 3.1e-5 (tests/bounds.py; was 1e-5)
        np.testing.assert_allclose(got, want, atol=eager_bound(32, LAYERS, HEAD_DIM), rtol=0, err_msg=probe)
        assert np.unravel_index(got.argmax(), got.shape) == np.unravel_index(want.argmax(), want.shape)


def test_the_induction_head_is_the_retrieval_head(trained, eval_ids, atlas):
    """Needle = tokens r[m : m + k] of the first copy; the prompt stops after r[:m] of the second copy.

    The trained model answers by induction, copying the needle token by token while decoding, so the
    retrieval probe in generation mode (the paper's) must find the induction head, and only it.
    """
    m, k = 4, 5
    samples = []
    for row in eval_ids[:16].tolist():
        prompt = row[: OFFSET + EVAL_LENGTH + m]
        needle = [OFFSET + m, OFFSET + m + k]
        samples.append(Sample(prompt, {"needle_span": needle, "answer_ids": row[needle[0] : needle[1]]}))
    corpus = Corpus("planted-needle", samples, {"name": "planted-needle"})
    probe = RetrievalProbe()
    found = headmap.scan(trained.model, probes=[probe], corpus=corpus, batch_size=8, progress=False)
    assert probe.reproduced >= 12, f"the model reproduced only {probe.reproduced} of 16 needles"
    first, second = top_two(found, "retrieval")
    top = atlas.top("induction", k=1)
    induction = (int(top["layer"][0]), int(top["head"][0]))
    assert (first["layer"], first["head"]) == induction, found.grid("retrieval").round(3)
    assert first["value"] > 0.8 and second["value"] < 0.3, found.grid("retrieval").round(3)


def copy_losses(model: LlamaForCausalLM, ids: torch.Tensor, edits=()) -> tuple[float, float]:
    """Mean next-token loss on the first copy and on the second copy (after its first token), with ``edits`` on."""
    n = EVAL_LENGTH
    with torch.no_grad():
        if edits:
            with headmap.steer(model, edits):
                logits = model(input_ids=ids).logits
        else:
            logits = model(input_ids=ids).logits
    nll = -torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return nll[:, 0:n].mean().item(), nll[:, n + 1 : 2 * n].mean().item()


def test_ablating_the_induction_head_removes_in_context_copying(trained, eval_ids, atlas):
    """Zeroing the induction head's output (found by the scan) undoes copying; zeroing another layer-1 head does not.

    Every other layer-1 head is tried, which includes the random one the issue asks for.
    """
    from headmap.edits import Ablate

    model = trained.model
    top = atlas.top("induction", k=1)
    induction = (int(top["layer"][0]), int(top["head"][0]))
    first, second = copy_losses(model, eval_ids)
    assert second < 0.1 < first
    ab_first, ab_second = copy_losses(model, eval_ids, [Ablate(heads=[induction], mode="zero")])
    report = f"induction head {induction}: second copy {second:.3f} -> {ab_second:.3f}, first copy {ab_first:.3f}"
    assert ab_second > 0.5 * ab_first, report
    others = [(1, h) for h in range(HEADS) if (1, h) != induction]
    for head in others:
        o_first, o_second = copy_losses(model, eval_ids, [Ablate(heads=[head], mode="zero")])
        assert o_second < 0.3, f"ablating {head} (not the induction head) broke copying: {o_second:.3f}; {report}"
    # the circuit's other half: without the previous-token head, the induction head has nothing to match
    prev = atlas.top("prev_token", k=1)
    p_first, p_second = copy_losses(model, eval_ids, [Ablate(heads=[(int(prev["layer"][0]), int(prev["head"][0]))])])
    assert p_second > 0.5 * p_first, f"previous-token head ablated: second copy {p_second:.3f}; {report}"
    assert model.config._attn_implementation == "sdpa"  # the session put the model back


# -- importance and retrieval accuracy (headmap.evaluation) ---------------------------


def _second_copy(ids: torch.Tensor) -> list:
    """Samples whose loss is the second copy after its first token (what only the circuit can predict)."""
    span = [OFFSET + EVAL_LENGTH + 1, OFFSET + 2 * EVAL_LENGTH]
    return [Sample(row.tolist(), {"loss_span": span}) for row in ids]


def test_importance_finds_the_planted_circuit(trained, eval_ids, atlas):
    """Zeroing either planted head sends the second-copy loss to chance (ln 31 = 3.43); no other head matters.

    The previous-token head feeds the induction head's keys (K-composition), so ablating it breaks the same
    circuit: the two deltas tie within their standard errors (3.41 and 3.39 at seed 0), and which of the two
    is larger is not a property of the model. The induction head is one of the two, and both stand far above
    every pruned head, by ablation and by gradient importance.
    """
    from headmap.evaluation.importance import head_importance

    frame = head_importance(trained.model, None, _second_copy(eval_ids), batch_size=8)
    assert trained.model.config._attn_implementation == "sdpa"
    top = atlas.top("induction", k=1)
    induction = (int(top["layer"][0]), int(top["head"][0]))
    top = atlas.top("prev_token", k=1)
    previous = (int(top["layer"][0]), int(top["head"][0]))
    by_delta = frame.sort_values("ablation_delta", ascending=False)
    first_two = {(int(r.layer), int(r.head)) for r in by_delta.head(2).itertuples()}
    report = by_delta.round(4).to_string()
    assert first_two == {induction, previous}, report
    assert frame.attrs["base_loss"] < 0.1, report
    circuit = frame.set_index(["layer", "head"])
    for head in (induction, previous):
        assert circuit.loc[head, "ablation_delta"] > 3.0, report
        assert circuit.loc[head, "grad_importance"] > 0.005, report
    rest = by_delta.iloc[2:]
    assert rest.ablation_delta.abs().max() < 0.05, report
    assert circuit.loc[induction, "grad_importance"] > 10 * rest.grad_importance.max(), report


def test_ablating_the_induction_head_stops_retrieval(trained, eval_ids, atlas):
    """Needle accuracy (greedy answer = the needle) falls from nearly all to none without the induction head,
    and does not move when as many random other heads are zeroed."""
    from headmap.corpus import Corpus
    from headmap.edits import Ablate
    from headmap.evaluation import needle_accuracy, random_like

    m, k = 4, 5
    samples = []
    for row in eval_ids.tolist():
        needle = [OFFSET + m, OFFSET + m + k]
        samples.append(Sample(row[: OFFSET + EVAL_LENGTH + m], {"answer_ids": row[needle[0] : needle[1]]}))
    needles = Corpus("planted-needle", samples, {})
    top = atlas.top("induction", k=1)
    induction = [[int(top["layer"][0]), int(top["head"][0])]]
    prev = atlas.top("prev_token", k=1)
    edit = Ablate(heads=induction)
    result = needle_accuracy(trained.model, None, [edit], needles=needles, bootstrap=500)
    assert result.accuracy_base >= 0.75, result.items
    assert result.accuracy_edit == 0.0 and result.ci[1] < -0.5, result.items
    # a control that avoids the circuit: heads drawn from the pruned ones
    control = random_like([edit], trained.model, seed=0)[0]
    circuit = {tuple(induction[0]), (int(prev["layer"][0]), int(prev["head"][0]))}
    if not set(control.heads) & circuit:
        same = needle_accuracy(trained.model, None, [control], needles=needles, bootstrap=500)
        assert same.accuracy_edit == same.accuracy_base
