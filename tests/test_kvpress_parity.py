"""headmap's presses keep kvpress's entries where the two define the same thing (issue 11, point 4).

kvpress is not a dependency of headmap: ``python bench/compress.py`` installs kvpress 0.5.x into
``<repo root>/.venv-kvpress/`` (with its own transformers), and this test runs kvpress there, in a
child process (tests/kvpress_kept.py, which never imports headmap), on a tiny random Llama (GQA)
saved here. Without that venv the whole module is skipped. See docs/compress.md ("Same kept entries").

- snapkv, pyramidkv, streaming, knorm: the same kept entries, per layer and kv head, exactly, with
  both libraries' default parameters (checked equal first), budgets of at most the window included
  (both pad the window's scores with the best earlier score + 1, so only window keys are kept there);
- h2o: kvpress's ``ObservedAttentionPress`` divides each key's attention sum by the number of queries
  that see it (``T - j``, a mean; docs/methods/presses/h2o.md); headmap's recorded sums divided so
  keep exactly kvpress's entries, so that division is the only difference.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from bounds import batch_bound

from headmap.presses import compress, make_press

ROOT = Path(__file__).resolve().parent.parent
CHILD = Path(__file__).resolve().parent / "kvpress_kept.py"
LENGTHS = (96, 200, 320)
RATIOS = (0.25, 0.5, 0.75)
VOCAB = 512
#: weights drawn with std 0.3 (transformers' default, 0.02, gives near-uniform attention, whose scores
#: crowd together); then the scores at each budget's boundary are apart by 1e-4 relative or more
INIT = 0.3


#: kvpress and headmap compute the same scores by different code (kvpress re-projects the window's
#: queries; other transformers), so they may round differently: per tests/bounds.py, LAYER_STAGES sums
#: per layer of at most max(T, MLP width 128) terms, relative to the score. Exact equality is asserted
#: except for an entry at the budget's boundary whose kvpress score is within this of the boundary score
#: (a rounding tie: none occurs on the machine where this was written)
def rounding(length: int) -> float:
    return batch_bound(max(length, 128))


SAME = ("snapkv", "pyramidkv", "streaming", "knorm")
#: headmap's parameter -> kvpress's dataclass field, for the defaults that must agree
DEFAULTS = {
    "snapkv": {"window": "window_size", "kernel": "kernel_size"},
    "pyramidkv": {"window": "window_size", "kernel": "kernel_size", "beta": "beta"},
    "streaming": {"sinks": "n_sink"},
    "knorm": {},
    "h2o": {},
}


def _roots() -> list[Path]:
    """This checkout's root and, in a git worktree, the main checkout's (where the bench may have run)."""
    roots = [ROOT]
    try:
        common = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--path-format=absolute", "--git-common-dir"],
            capture_output=True, text=True, timeout=30,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        common = ""
    if common and Path(common).name == ".git" and Path(common).parent != ROOT:
        roots.append(Path(common).parent)
    return roots


def kvpress_python() -> tuple[str | None, str]:
    """(python of a venv that imports kvpress, '') or (None, why not)."""
    tried = []
    for root in _roots():
        python = root / ".venv-kvpress" / "bin" / "python"
        tried.append(str(python))
        if python.exists():
            check = subprocess.run([str(python), "-c", "import kvpress"], capture_output=True, timeout=300)
            if check.returncode == 0:
                return str(python), ""
    return None, (
        f"kvpress is not installed (tried {', '.join(tried)}); `python bench/compress.py` installs it into "
        "<repo root>/.venv-kvpress/ once"
    )


KV_PYTHON, WHY = kvpress_python()
pytestmark = pytest.mark.skipif(KV_PYTHON is None, reason=WHY)


def _build(folder: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512, architectures=["LlamaForCausalLM"],
        initializer_range=INIT,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """T -> (model folder, ids [1, T], kvpress's npz as a dict)."""
    folder = tmp_path_factory.mktemp("parity-llama")
    _build(folder)
    out = {}
    for length in LENGTHS:
        # distinct tokens: a repeated token has the same layer-0 key up to a rotation, so knorm would tie
        ids = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(length))[None, :length]
        np.save(folder / f"ids{length}.npy", ids.numpy())
        npz = folder / f"kvpress{length}.npz"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}  # the child must not see headmap
        done = subprocess.run(
            [KV_PYTHON, str(CHILD), str(folder), str(folder / f"ids{length}.npy"), str(npz),
             ",".join(str(r) for r in RATIOS)],
            capture_output=True, text=True, env=env, timeout=600,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        with np.load(npz) as data:
            out[length] = (folder, ids, dict(data))
    return out


def assert_same(ours: np.ndarray, theirs: np.ndarray, scores: np.ndarray, where: str) -> None:
    """The same kept entries, or different ones only at a rounding tie of kvpress's ``scores``."""
    for b, h in {(int(b), int(h)) for b, h, _ in zip(*np.nonzero(ours != theirs), strict=True)}:
        edge = scores[b, h][theirs[b, h]].min()  # kvpress's lowest kept score
        moved = scores[b, h][ours[b, h] != theirs[b, h]]
        tol = rounding(ours.shape[-1]) * abs(edge)
        assert (np.abs(moved - edge) <= tol).all(), f"{where}: {int((ours[b, h] != theirs[b, h]).sum())} entries differ"


def _headmap(folder: Path, ids: torch.Tensor, name: str, ratio: float):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa", dtype=torch.float32).eval()
    with compress(model, make_press(name, ratio=ratio), record_scores=True) as run, torch.no_grad():
        model(ids, use_cache=True)
    return run


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_defaults_agree(runs, name):
    """Parity is claimed for both libraries' defaults: check they are the same numbers."""
    kv = next(iter(runs.values()))[2]
    press = make_press(name, ratio=0.5)
    for ours, theirs in DEFAULTS[name].items():
        assert getattr(press, ours) == kv[f"defaults/{name}/{theirs}"].item(), (name, ours, theirs)


@pytest.mark.parametrize("name", SAME)
def test_same_kept_entries(runs, name):
    """Exactly kvpress's entries (up to a rounding tie of kvpress's scores at the budget's edge, which
    :func:`assert_same` bounds), on every length, ratio and layer; for snapkv and pyramidkv this
    includes layers whose budget is at most the 64-key window, where both keep window keys only."""
    small = 0
    for length, (folder, ids, kv) in runs.items():
        for ratio in RATIOS:
            run = _headmap(folder, ids, name, ratio)
            assert sorted(run.kept) == [0, 1]
            for layer, kept in run.kept.items():
                where = f"{name} T={length} ratio={ratio} layer {layer}"
                theirs = kv[f"{name}/{ratio}/{layer}"]
                ours = kept.numpy()
                assert ours.shape == theirs.shape == (1, 2, length), where
                budget = int(theirs.sum(-1).max())
                assert (ours.sum(-1) == budget).all() and (theirs.sum(-1) == budget).all(), where
                assert_same(ours, theirs, kv[f"{name}/{ratio}/{layer}/scores"], where)
                if name in ("snapkv", "pyramidkv") and budget <= 64 < length:
                    assert ours[..., : length - 64].sum() == 0, f"{where}: window keys only"
                    small += 1
    if name in ("snapkv", "pyramidkv"):
        assert small > 0, "a budget of at most the window should occur here (e.g. snapkv T=200 ratio 0.75)"


@pytest.mark.parametrize("length", LENGTHS)
def test_h2o_differs_only_by_kvpress_mean(runs, length):
    """headmap's h2o sums over the queries; kvpress's ObservedAttentionPress takes the mean over the
    T - j queries that see key j. Dividing headmap's recorded sums by T - j and taking the top
    int(T (1 - ratio)) reproduces kvpress's kept entries exactly."""
    folder, ids, kv = runs[length]
    seen_by = torch.arange(length, 0, -1, dtype=torch.float64)  # queries i >= j: T - j
    differ = 0
    for ratio in RATIOS:
        run = _headmap(folder, ids, "h2o", ratio)
        budget = int(length * (1 - ratio))
        for layer, sums in run.scores.items():
            theirs = torch.from_numpy(kv[f"h2o/{ratio}/{layer}"])
            mean = sums / seen_by
            ours = torch.zeros_like(theirs)
            ours.scatter_(-1, mean.topk(budget, dim=-1).indices, True)
            where = f"h2o as a mean, T={length} ratio={ratio} layer {layer}"
            assert_same(ours.numpy(), theirs.numpy(), kv[f"h2o/{ratio}/{layer}/scores"], where)
            differ += int((run.kept[layer] != theirs).sum())
    assert differ > 0, "headmap's sums and kvpress's means should choose differently somewhere"
