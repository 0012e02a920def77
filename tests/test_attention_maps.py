"""``attention_maps``: average-pooled attention maps equal a brute-force pooling of eager ``output_attentions``.

Tiny random Llama (GQA, left padding), GPT-2 and BERT (right padding), padded batches of inputs
shorter and longer than ``bins``, several blocks per layer, two forward passes; state round trips;
a scan writes ``maps.parquet`` and reads it back.
"""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd
import pytest
import tiny_models
import torch
from bounds import TINY_EAGER, gamma

import headmap
from headmap.atlas import MAPS_SCHEMA, Atlas, bin_sizes
from headmap.errors import ProbeError
from headmap.probes import PROBES, AttentionMapsProbe, default_probe_names, make_probes

KINDS = ["llama", "gpt2", "bert"]
LENGTHS = [9, 14, 5, 12, 3]
BINS = 4

tiny = functools.cache(tiny_models.tiny)


@functools.cache
def eager(kind: str) -> list[list[np.ndarray]]:
    """Per input, per layer: [H, T, T] float64 eager attention among the input's real tokens."""
    model, side = tiny(kind)
    ids, mask = tiny_models.padded_batch(LENGTHS, side)
    with torch.no_grad():
        atts = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    out = []
    for b in range(ids.shape[0]):
        real = torch.nonzero(mask[b]).flatten()
        out.append([a[b][:, real][:, :, real].double().numpy() for a in atts])
    return out


def brute_force_map(a: np.ndarray, bins: int) -> np.ndarray:
    """Average pooling of an [H, T, T] attention array into [H, n, n], n = min(bins, T), by loops."""
    heads, t, _ = a.shape
    n = min(bins, t)
    out = np.zeros((heads, n, n))
    cells = np.zeros((n, n))
    for i in range(t):
        for j in range(t):
            r, c = i * n // t, j * n // t
            out[:, r, c] += a[:, i, j]
            cells[r, c] += 1
    return out / cells[None]


def run_probe(kind: str, probe: AttentionMapsProbe, rows_per_block: int = 2) -> AttentionMapsProbe:
    model, side = tiny(kind)
    ids, mask = tiny_models.padded_batch(LENGTHS, side)
    headmap.engine_config.budget_bytes = ids.shape[0] * 4 * ids.shape[1] * 4 * rows_per_block
    with torch.no_grad(), headmap.observe(model, probes=[probe]):
        model(input_ids=ids[:3], attention_mask=mask[:3])  # two forward passes, two commits
        model(input_ids=ids[3:], attention_mask=mask[3:])
    return probe


@pytest.mark.parametrize("kind", KINDS)
def test_maps_equal_brute_force(kind):
    probe = run_probe(kind, AttentionMapsProbe(samples=4, bins=BINS))
    maps = probe.maps()
    assert sorted(maps) == [0, 1, 2, 3]  # the first four inputs, across both forward passes
    for sample, (length, layers) in maps.items():
        assert length == LENGTHS[sample]
        expected = eager(kind)[sample]
        assert sorted(layers) == list(range(len(expected)))
        for layer, grid in layers.items():
            want = brute_force_map(expected[layer], BINS)
            assert grid.shape == want.shape == (4, min(BINS, length), min(BINS, length))
            # cell means of probabilities, engine vs eager: TINY_EAGER (tests/bounds.py; was rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(grid, want, rtol=0, atol=TINY_EAGER)
            # each row of cells, weighted by its column widths, holds the rows' whole attention
            widths = bin_sizes(length, grid.shape[-1])
            # a softmax row of at most 14 keys sums to 1 within gamma(14 + 2) (two roundings per term, the sum);
            # the cell means and their weighted sum round as much again (was rtol=1e-5)
            row_sum = 2 * gamma(max(LENGTHS) + 2)
            np.testing.assert_allclose((grid * widths[None, None, :]).sum(-1), 1.0, rtol=0, atol=row_sum)


def test_short_inputs_get_one_bin_per_token():
    probe = run_probe("llama", AttentionMapsProbe(samples=5, bins=8))
    length, layers = probe.maps()[4]  # 3 tokens < 8 bins: the full 3 x 3 attention
    assert length == 3
    # engine vs eager: TINY_EAGER (tests/bounds.py; was rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(layers[1], eager("llama")[4][1], rtol=0, atol=TINY_EAGER)
    assert (np.triu(layers[1][0], 1) == 0).all()  # causal: nothing above the diagonal (masked keys are exact 0)


def test_block_size_does_not_change_the_maps():
    one = run_probe("gpt2", AttentionMapsProbe(samples=2, bins=BINS), rows_per_block=1).maps()
    many = run_probe("gpt2", AttentionMapsProbe(samples=2, bins=BINS), rows_per_block=64).maps()
    for sample in one:
        for layer in one[sample][1]:
            # other block shapes reorder the attention's sums: TINY_EAGER (was rtol=1e-6, atol=1e-8)
            np.testing.assert_allclose(one[sample][1][layer], many[sample][1][layer], rtol=0, atol=TINY_EAGER)


def test_map_frame_and_state_round_trip():
    probe = run_probe("llama", AttentionMapsProbe(samples=2, bins=BINS))
    frame = probe.map_frame()
    assert list(frame.columns) == MAPS_SCHEMA.names
    assert len(frame) == 2 * 2 * 4 * BINS * BINS  # samples x layers x heads x cells
    assert set(frame["length"]) == {9, 14}
    state = probe.state_dict()
    assert all(isinstance(v, np.ndarray) for v in state.values())
    fresh = AttentionMapsProbe(samples=2, bins=BINS)
    fresh.load_state_dict(state)
    pd.testing.assert_frame_equal(fresh.map_frame(), frame, check_exact=True)
    with pytest.raises(ValueError, match="not a state of probe attention_maps"):
        AttentionMapsProbe(bins=2).load_state_dict(state)  # 4 x 4 maps for a probe of 2 bins


def test_resumed_probe_continues_numbering():
    """Without a scan's begin(), inputs are numbered in the order seen, also after load_state_dict."""
    model, side = tiny("llama")
    ids, mask = tiny_models.padded_batch(LENGTHS, side)
    first = AttentionMapsProbe(samples=5, bins=BINS)
    with torch.no_grad(), headmap.observe(model, probes=[first]):
        model(input_ids=ids[:2], attention_mask=mask[:2])
    second = AttentionMapsProbe(samples=5, bins=BINS)
    second.load_state_dict(first.state_dict())
    with torch.no_grad(), headmap.observe(model, probes=[second]):
        model(input_ids=ids[2:], attention_mask=mask[2:])
    straight = run_probe("llama", AttentionMapsProbe(samples=5, bins=BINS)).maps()
    got = second.maps()
    assert sorted(got) == sorted(straight) == [0, 1, 2, 3, 4]
    for sample in got:
        for layer in got[sample][1]:
            # resumed against straight, possibly blocked otherwise: TINY_EAGER (was rtol=1e-6, atol=1e-8)
            np.testing.assert_allclose(got[sample][1][layer], straight[sample][1][layer], rtol=0, atol=TINY_EAGER)


def test_generation_steps_are_not_pooled():
    model, _ = tiny("llama")
    probe = AttentionMapsProbe(samples=3, bins=BINS)
    ids = torch.randint(2, 97, (1, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), headmap.observe(model, probes=[probe]):
        model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    maps = probe.maps()
    assert list(maps) == [0] and maps[0][0] == 6  # the prefill only


def test_parameters_and_registry():
    assert PROBES["attention_maps"] is AttentionMapsProbe
    assert "attention_maps" in default_probe_names(causal=True) and "attention_maps" in default_probe_names(False)
    (probe,) = make_probes("attention_maps:samples=3:bins=8")
    assert probe.params() == {"samples": 3, "bins": 8}
    for bad in ("bins=0", "bins=1000", "samples=-1", "bins=2.5", "samples=true"):
        with pytest.raises(ProbeError, match="attention_maps"):
            make_probes(f"attention_maps:{bad}")


def test_scan_writes_and_loads_maps(tiny_llama_dir, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat sat on the mat by the door\nbirds fly south\nthe dog sat on the log all day long\n")
    out = tmp_path / "run"
    atlas = headmap.scan(
        str(tiny_llama_dir), probes="sink,attention_maps:bins=4", corpus=corpus, out=out, batch_size=2, progress=False
    )
    assert (out / "maps.parquet").is_file()
    assert set(atlas.maps["sample"]) == {0, 1}  # samples=2 by default
    assert set(atlas.maps["layer"]) == {0, 1} and set(atlas.maps["head"]) == {0, 1, 2, 3}
    loaded = Atlas.load(out)
    pd.testing.assert_frame_equal(loaded.maps, atlas.maps, check_exact=True)
    again = headmap.scan(str(tiny_llama_dir), probes="sink", corpus=corpus, out=out, overwrite=True, progress=False)
    assert again.maps.empty and not (out / "maps.parquet").exists()  # the stale table is removed


def test_interrupted_scan_resumes_to_the_same_maps(tiny_llama_dir, tmp_path, monkeypatch):
    from transformers import LlamaForCausalLM

    from headmap.errors import ScanInterrupted

    corpus = tmp_path / "c.txt"
    words = "the cat sat on a mat while dogs ran through fields of wheat".split()
    corpus.write_text("\n".join(" ".join(words[: 3 + 2 * i]) for i in range(6)) + "\n")
    kwargs = dict(probes="attention_maps:samples=5:bins=4", corpus=corpus, batch_size=2, progress=False)
    straight = headmap.scan(str(tiny_llama_dir), out=tmp_path / "straight", **kwargs)
    out = tmp_path / "resumed"
    original = LlamaForCausalLM.forward
    calls = []

    def interrupting(self, *args, **kw):
        calls.append(1)
        if len(calls) == 3:  # during the third batch: two batches are checkpointed
            raise KeyboardInterrupt
        return original(self, *args, **kw)

    with monkeypatch.context() as m:
        m.setattr(LlamaForCausalLM, "forward", interrupting)
        with pytest.raises(ScanInterrupted):
            headmap.scan(str(tiny_llama_dir), out=out, checkpoint_every_s=0, **kwargs)
    resumed = headmap.scan(str(tiny_llama_dir), out=out, resume=True, **kwargs)
    assert resumed.meta["resumed_from"] == [4]
    assert sorted(set(resumed.maps["sample"])) == [0, 1, 2, 3, 4]
    pd.testing.assert_frame_equal(resumed.maps, straight.maps, check_exact=True)
