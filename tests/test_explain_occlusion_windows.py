"""occlusion's windows (``Occlusion(window=W, stride=S)``, ``--occlusion-window``/``--occlusion-stride``).

Window k of a row of n real tokens covers its tokens [k S, min(k S + W, n)) for k = 0 .. ceil((n - W) / S)
(Captum's ``Occlusion`` along the tokens: the last window cut off at the row's end); a token's value is
the mean of y(x) - y(x with the window replaced) over the windows that cover it. See docs/methods/occlusion.md.

What is checked, and how exactly:
- window=1 is the leave-one-out of before, bit for bit: its old loop (over the batch's columns) is
  written here and compared with ``torch.equal`` on padded and unpadded batches;
- which tokens each forward replaces, and the mean over the covering windows, exactly: a stand-in
  score whose values are sums of powers of two (every sum and difference exact in float64) replaces the
  model, and the brute force below (the windows grown until one reaches the row's end) gives the same
  numbers bit for bit;
- the values on tiny Llama (a log-probability target) and BERT (a class logit) equal a brute force
  written here (eager attention, float64, one row at a time, no headmap class), padded batches
  included. Bound: the rounding that differs is the attention's (transformers' eager attention, the
  brute force, takes its softmax in float32 even in a float64 model; headmap's routes sum in another
  order, and its engine's softmax may be float32 too), at most that of a float32 attention,
  ``eager_bound(T)``, relative to the magnitudes at the target (tests/bounds.py, with its stated
  gain-at-most-one assumption). A log-probability's absolute error is the relative
  error e of its probability (up to e / (1 - e)); a class logit w . h + b moves by at most
  e (|w| . |h| + |b|), h the pooled vector. Each value is a mean of differences of two such targets, so
  it is off by at most the sum of the two bounds (a mean is never further off than its worst term),
  plus float64's own rounding of the sum and the division, gamma(windows + 1, U64) of the largest drop;
- forwards = the longest row's windows + 1, counted; progress reaches the on_layer channel per forward;
- the CLI: bad values are one line and exit 2, the values are those of the API, and --resume with
  another --occlusion-window is refused naming it.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from bounds import U64, batch_bound, eager_bound, gamma
from cli_runner import assert_one_line_error, run
from test_explain import _brute_target, _model

import headmap.explain as E
from headmap.errors import OptionError
from headmap.explain import _flash
from headmap.explain.folder import CHECKPOINT, run_explain

FILL = 0  # the baseline token of every test here (the batches' pad id)


def _job(model, target: str, rows: list[list[int]]):
    return E.make_job(model, E.parse_target(target, model, None), rows, pad=FILL)


def _rows(lengths, seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 97, (n,), generator=gen).tolist() for n in lengths]


def brute_windows(n: int, window: int, stride: int) -> list[range]:
    """The windows over n tokens, grown one stride at a time until one reaches the end (cut off there)."""
    starts = [0]
    while starts[-1] + window < n:
        starts.append(starts[-1] + stride)
    return [range(s, min(s + window, n)) for s in starts]


def brute_mean(n: int, window: int, stride: int, drop) -> torch.Tensor:
    """Each token's mean of drop(w) over the windows w that cover it (float64)."""
    total = torch.zeros(n, dtype=torch.float64)
    count = torch.zeros(n, dtype=torch.float64)
    for w in brute_windows(n, window, stride):
        d = drop(w)
        for j in w:
            total[j] += d
            count[j] += 1
    assert (count > 0).all()  # every token covered
    return total / count


def old_leave_one_out(job) -> torch.Tensor:
    """occlusion's attribute() before windows existed (the loop over the batch's columns), verbatim."""
    out = torch.zeros(job.ids.shape, dtype=torch.float64, device=job.ids.device)
    fast = _flash.plain_usable(job)
    with torch.no_grad():
        base = _flash.score(job, fast=fast).double()
        for j in range(job.ids.shape[1]):
            real = job.mask[:, j].bool()
            if not bool(real.any()):
                continue
            ids = job.ids.clone()
            ids[real, j] = job.pad
            out[:, j] = (base - _flash.score(job, ids=ids, fast=fast).double()) * real
    return out


def _real(job, values: torch.Tensor, b: int) -> torch.Tensor:
    return values[b][job.mask[b].bool()]


# -- window=1 is the leave-one-out of before ----------------------------------------------------------


@pytest.mark.parametrize(
    "kind,target,lengths",
    [("llama", "token:5", (11, 7, 3)), ("llama", "token:5", (9, 9)), ("bert", "class:1", (11, 7, 3))],
    ids=["llama-padded", "llama-unpadded", "bert-padded"],
)
def test_window_one_is_the_old_leave_one_out_bit_for_bit(kind, target, lengths):
    model = _model(kind).double()
    rows = _rows(lengths)
    new = E.Occlusion(window=1, stride=1).attribute(_job(model, target, rows))
    old = old_leave_one_out(_job(model, target, rows))
    assert torch.equal(new, old)  # the same forwards on the same numbers
    assert torch.equal(E.Occlusion().attribute(_job(model, target, rows)), new)


def test_leave_one_out_keeps_its_parameters_and_windows_show_theirs():
    assert E.Occlusion().params() == {"token": None}  # fingerprints and explain.json as before
    assert E.Occlusion(window=4).params() == {"token": None, "window": 4, "stride": 4}
    assert E.Occlusion(window=4, stride=3, token=7).params() == {"token": 7, "window": 4, "stride": 3}


# -- which tokens each forward replaces, and the mean, exactly ---------------------------------------


class PowersOfTwo:
    """A stand-in for the model's score: y(ids) = -sum of 2^(real index) over the replaced real tokens of
    each row (exact in float64 for these lengths), recording which real tokens each forward replaced."""

    def __init__(self, job):
        self.job = job
        self.replaced: list[list[list[int]]] = []  # per forward, per row

    def __call__(self, job, ids=None, embeds=None, fast=None):
        ids = job.ids if ids is None else ids
        out = torch.zeros(ids.shape[0], dtype=torch.float64)
        this = []
        for b in range(ids.shape[0]):
            real = torch.nonzero(job.mask[b]).flatten()
            hit = [i for i, col in enumerate(real.tolist()) if int(ids[b, col]) != int(job.ids[b, col])]
            this.append(hit)
            out[b] = -sum(2.0**i for i in hit)
        self.replaced.append(this)
        return out


CASES = [  # (lengths, window, stride): T a multiple of the window or not, overlaps, rows shorter than the window
    ((12,), 4, 4),
    ((11,), 4, 4),
    ((11,), 4, 3),
    ((11,), 3, 1),
    ((11, 7, 3), 4, 2),
    ((11, 7, 3), 5, 5),
    ((4, 2), 8, 3),
]


@pytest.mark.parametrize("side", ["llama", "bert"])  # left and right padding
@pytest.mark.parametrize("lengths,window,stride", CASES)
def test_windows_and_their_mean_exactly(monkeypatch, side, lengths, window, stride):
    model = _model(side).double()
    job = _job(model, "token:5" if side == "llama" else "class:1", _rows(lengths))
    fake = PowersOfTwo(job)
    monkeypatch.setattr(_flash, "score", fake)
    got = E.Occlusion(window=window, stride=stride).attribute(job)
    per_row = [brute_windows(n, window, stride) for n in lengths]
    assert len(fake.replaced) == 1 + max(len(w) for w in per_row)  # y(x), then one forward per window
    for b, n in enumerate(lengths):
        wins = per_row[b]
        done = [f[b] for f in fake.replaced[1:]]
        assert done == [list(w) for w in wins] + [[]] * (len(done) - len(wins))  # its windows, in order
        want = brute_mean(n, window, stride, lambda w: sum(2.0**i for i in w))
        assert torch.equal(_real(job, got, b), want)  # sums of powers of two: every step exact
        assert (got[b][~job.mask[b].bool()] == 0).all()  # padding: never replaced, no value
        assert fake.replaced[0][b] == []


def test_forwards_and_progress(monkeypatch):
    model = _model("llama").double()
    job = _job(model, "token:5", _rows((11, 7)))
    seen = []
    job.on_layer = lambda method, done, total: seen.append((method, done, total))
    real_score = _flash.score
    count = [0]

    def counting(*args, **kwargs):
        count[0] += 1
        return real_score(*args, **kwargs)

    monkeypatch.setattr(_flash, "score", counting)
    E.Occlusion(window=4, stride=3).attribute(job)
    windows = len(brute_windows(11, 4, 3))  # 4: [0,4) [3,7) [6,10) [9,11)
    assert windows == 4 and count[0] == windows + 1
    assert seen == [("occlusion", k, windows) for k in range(1, windows + 1)]
    count[0] = 0
    E.Occlusion().attribute(_job(model, "token:5", _rows((11, 7))))
    assert count[0] == 11 + 1  # leave-one-out: T + 1


# -- the values against a brute force on the models --------------------------------------------------


def _brute_y(model, ids: list[int], target: str) -> tuple[float, float]:
    """(y, the magnitude its rounding is relative to) on one unpadded row, eager, float64."""
    with torch.no_grad():
        y, _, _ = _brute_target(model, ids, target)
        if target.startswith("class"):
            c = int(target.split(":")[1])
            pooled = model.bert(torch.tensor([ids]))[1][0]
            w, b = model.classifier.weight[c], model.classifier.bias[c]
            return float(y), float((w.abs() * pooled.abs()).sum() + b.abs())
    return float(y), 1.0  # a log-probability: absolute error = the probability's relative error


def brute_occlusion(model, ids: list[int], target: str, window: int, stride: int):
    """(values, bound) of one row by the definition, eager and float64, no headmap class."""
    y, mag = _brute_y(model, ids, target)
    errs, drops = [], []

    def drop(w: range) -> float:
        x = list(ids)
        for j in w:
            x[j] = FILL
        y_w, mag_w = _brute_y(model, x, target)
        errs.append(mag + mag_w)
        drops.append(abs(y - y_w))
        return y - y_w

    values = brute_mean(len(ids), window, stride, drop)
    e = eager_bound(len(ids))
    bound = e / (1 - e) * max(errs) + gamma(len(errs) + 1, U64) * max(drops)
    return values, bound


@pytest.mark.parametrize("kind,target", [("llama", "token:5"), ("bert", "class:1")])
@pytest.mark.parametrize(
    "lengths,window,stride",
    [((11,), 4, 4), ((11,), 4, 3), ((12,), 3, 1), ((11, 7, 3), 4, 2), ((11, 8), 3, 3)],
    ids=["tail", "overlap-tail", "stride1", "padded", "padded-tail"],
)
def test_values_equal_the_brute_force(kind, target, lengths, window, stride):
    model = _model(kind).double()
    rows = _rows(lengths, seed=2)
    job = _job(model, target, rows)
    got = E.Occlusion(window=window, stride=stride).attribute(job)
    for b, ids in enumerate(rows):
        want, bound = brute_occlusion(model, ids, target, window, stride)
        diff = (_real(job, got, b) - want).abs().max()
        assert float(diff) <= bound, (float(diff), bound)
        assert float(want.abs().max()) > 100 * bound  # the check can tell windows apart


def test_the_api_takes_windows_and_a_batch_equals_one_by_one():
    model = _model("llama").double()
    rows = _rows((11, 7, 9), seed=3)
    method = E.Occlusion(window=3, stride=2)
    together = E.explain(model, None, rows, target="token:5", methods=[method], batch_size=3)
    alone = E.explain(model, None, rows, target="token:5", methods=[method], batch_size=1)
    order = ["sample", "position"]
    together, alone = (f.sort_values(order, ignore_index=True) for f in (together, alone))
    # one batch against three: the batch size changes every matmul's blocking (batch_bound over the MLP's
    # 64 terms) and the route (padding: the engine's; one row alone: the fused kernel), whose attention
    # differs by at most a float32 attention's rounding (eager_bound), as in test_values_equal_the_brute_force;
    # log-probability targets (magnitude 1), two per value
    e = eager_bound(11) + batch_bound(64)
    assert float((together.value - alone.value).abs().max()) <= 2 * e / (1 - e) + gamma(6, U64)


# -- bad values --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw,needle",
    [
        ({"window": 0}, "window of at least 1"),
        ({"window": True}, "window of at least 1"),
        ({"window": 4, "stride": 0}, "stride of at least 1"),
        ({"window": 4, "stride": 5}, "leaves tokens that no window covers"),
        ({"stride": 2}, "leaves tokens that no window covers"),
    ],
)
def test_bad_values_are_refused(kw, needle):
    with pytest.raises(OptionError, match=needle):
        E.Occlusion(**kw)


TEXTS = ["the cat sat on the mat and looked at the door", "birds fly south", "ice is cold", "she reads"]


def _cli(model_dir, out, *extra):
    texts = [a for t in TEXTS for a in ("--text", t)]
    return ["explain", str(model_dir), *texts, "--methods", "saliency,occlusion", "--out", str(out),
            "--no-progress", "--seed", "3", *extra]  # fmt: skip


@pytest.mark.parametrize(
    "extra,needles",
    [
        (["--occlusion-window", "0"], ["--occlusion-window must be at least 1"]),
        (["--occlusion-window", "-3"], ["--occlusion-window must be at least 1"]),
        (["--occlusion-window", "4", "--occlusion-stride", "0"], ["--occlusion-stride must be at least 1"]),
        (["--occlusion-window", "4", "--occlusion-stride", "5"], ["--occlusion-stride 5", "at most the window"]),
        (["--occlusion-stride", "2"], ["--occlusion-stride 2", "--occlusion-window 1"]),
        (["--methods", "saliency", "--occlusion-window", "4"], ["--occlusion-window", "no occlusion"]),
    ],
)
def test_cli_refuses_bad_values(monkeypatch, capsys, tiny_llama_dir, tmp_path, extra, needles):
    out = tmp_path / "ex"
    code, _, err = run(monkeypatch, capsys, *_cli(tiny_llama_dir, out, *extra))
    assert_one_line_error(code, err, *needles)
    assert not out.exists()  # refused before anything is written


def test_cli_windows_equal_the_api(monkeypatch, capsys, tiny_llama_dir, tmp_path):
    from headmap.models import load_model

    out = tmp_path / "ex"
    code, _, err = run(
        monkeypatch, capsys, *_cli(tiny_llama_dir, out, "--occlusion-window", "3", "--occlusion-stride", "2")
    )
    assert code == 0, err
    meta = json.loads((out / "explain.json").read_text())
    assert meta["methods"]["occlusion"] == {"token": None, "window": 3, "stride": 2}
    got = pd.read_parquet(out / "attributions.parquet")
    got = got[got.method == "occlusion"].sort_values(["sample", "position"], ignore_index=True)
    loaded = load_model(str(tiny_llama_dir))
    want = E.explain(loaded.model, loaded.tokenizer, TEXTS, methods=[E.Occlusion(window=3, stride=2)])
    want = want.sort_values(["sample", "position"], ignore_index=True)
    assert (got.value.to_numpy() == want.value.to_numpy()).all()  # the same batches, the same arithmetic


class Stop(KeyboardInterrupt):
    """Ctrl-C after the first batch (raised from the progress callback, once the batch is written)."""


def test_resume_with_another_window_is_refused_naming_it(monkeypatch, capsys, tiny_llama_dir, tmp_path):
    out = tmp_path / "ex"

    def stop(done: int, total: int) -> None:
        raise Stop

    seen = []
    with pytest.raises(Stop):
        run_explain(
            str(tiny_llama_dir), text=TEXTS, methods="saliency,occlusion", out=out, seed=3, occlusion_window=2,
            progress=stop, on_layer=lambda m, d, t: seen.append((m, d, t)),
        )  # fmt: skip
    from transformers import AutoTokenizer

    n = len(AutoTokenizer.from_pretrained(tiny_llama_dir)(TEXTS[0])["input_ids"])
    windows = len(brute_windows(n, 2, 2))
    assert seen == [("occlusion", k, windows) for k in range(1, windows + 1)]  # the first batch's forwards
    kept = {p.name: p.read_bytes() for p in (out / CHECKPOINT).iterdir()}
    for extra, needle in (
        (["--occlusion-window", "3"], "--occlusion-window: the checkpoint has 2, this run 3"),
        (["--occlusion-window", "2", "--occlusion-stride", "1"], "--occlusion-stride: the checkpoint has 2"),
        ([], "--occlusion-window: the checkpoint has 2, this run 1"),
    ):
        code, _, err = run(monkeypatch, capsys, *_cli(tiny_llama_dir, out, "--resume", *extra))
        assert_one_line_error(code, err, "cannot resume", "methods differs", needle, "--overwrite")
        assert {p.name: p.read_bytes() for p in (out / CHECKPOINT).iterdir()} == kept
    code, stdout, err = run(monkeypatch, capsys, *_cli(tiny_llama_dir, out, "--resume", "--occlusion-window", "2"))
    assert code == 0, err
    assert "resumed: 1 of 4 batches were done" in stdout
    whole = tmp_path / "whole"
    code, _, err = run(monkeypatch, capsys, *_cli(tiny_llama_dir, whole, "--occlusion-window", "2"))
    assert code == 0, err
    for name in ("attributions.parquet", "faithfulness.parquet"):  # resumed = uninterrupted
        pd.testing.assert_frame_equal(pd.read_parquet(out / name), pd.read_parquet(whole / name), check_exact=True)


# -- Captum, where it is installed (never installed by the tests) -------------------------------------


@pytest.mark.parametrize("n,window,stride", [(12, 4, 4), (11, 4, 4), (11, 4, 3), (11, 3, 1)])
def test_equal_to_captum_occlusion(n, window, stride):
    captum = pytest.importorskip("captum.attr")
    model = _model("llama").double()
    (ids,) = _rows((n,), seed=4)
    job = _job(model, "token:5", [ids])
    got = E.Occlusion(window=window, stride=stride).attribute(job)[0]

    def forward(x: torch.Tensor) -> torch.Tensor:  # x: token ids as floats, the occluded ones = FILL
        return torch.stack([_brute_target(model, row.long().tolist(), "token:5")[0] for row in x])

    with torch.no_grad():
        want = captum.Occlusion(forward).attribute(
            torch.tensor([ids], dtype=torch.float64), sliding_window_shapes=(window,), strides=stride, baselines=FILL
        )[0]
    _, bound = brute_occlusion(model, ids, "token:5", window, stride)
    assert float((got - want).abs().max()) <= bound
