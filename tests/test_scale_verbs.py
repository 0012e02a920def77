"""Model parallel for the verbs other than scan (issue 13): steer, eval, tune, compress and explain take
``--device-map``/``--max-memory``/``--offload-folder`` (one shared declaration, headmap.cli.options) and
``device_map=`` in Python, and give the results of a single-device run.

As in tests/test_scale_device_map.py, a map that sends layers to "cpu" and to "disk" runs accelerate's
hooks on this CPU machine exactly as across GPUs: offloaded weights are read back bit for bit from disk
before each layer's forward, on the same device, in the same dtype and the same order of operations, so
every result is compared for equality, not within a bound.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

import headmap
from headmap import cli
from headmap.evaluation import run_eval, run_tune
from headmap.models import load_model
from headmap.steer import compare

PROMPT = "The cat sat on the mat and the dog ran far away"
EDITS = ["ablate:heads=[[0,1],[1,2]]:mode=zero"]
ITEMS = [
    {"id": "a", "context": "The capital of France is", "options": [" Paris", " Rome", " a cat"], "answer": 0},
    {"id": "b", "context": "Two plus two is", "options": [" four", " seven"], "answer": 0},
    {"id": "c", "context": "Snow is", "options": [" green", " white", " loud", " fast"], "answer": 1},
    {"id": "d", "context": "Question: is fire hot?\nAnswer: ", "options": ["yes", "no"], "answer": 0},
    {"id": "e", "context": "A very long context " * 6 + "ends here", "options": [" ok", " not ok at all"], "answer": 1},
]


def device_map(offload: str = "disk") -> dict[str, str]:
    return {
        "model.embed_tokens": "cpu",
        "model.rotary_emb": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": offload,
        "model.norm": "cpu",
        "lm_head": "disk",
    }


@pytest.fixture(scope="module")
def task_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("verbs") / "task.jsonl"
    path.write_text("".join(json.dumps(it) + "\n" for it in ITEMS), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def map_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("verbs") / "map.json"
    path.write_text(json.dumps(device_map()))
    return path


@pytest.fixture(scope="module")
def mapped(tiny_llama_dir, tmp_path_factory):
    """The tiny model with layer 1 and the LM head offloaded to disk."""
    return load_model(str(tiny_llama_dir), device_map=device_map(), offload_folder=tmp_path_factory.mktemp("off"))


@pytest.fixture(scope="module")
def plain(tiny_llama_dir):
    return load_model(str(tiny_llama_dir))


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["headmap", *args])
    try:
        cli.main()
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def test_the_map_really_offloads(mapped):
    assert {p.device.type for p in mapped.model.model.layers[1].parameters()} == {"meta"}
    assert {p.device.type for p in mapped.model.lm_head.parameters()} == {"meta"}
    assert {p.device.type for p in mapped.model.model.layers[0].parameters()} == {"cpu"}


# -- steer ---------------------------------------------------------------------------------------------


def test_steer_generations_equal_single_device(tiny_llama_dir, tmp_path):
    one = compare(str(tiny_llama_dir), EDITS, PROMPT, max_new_tokens=8)
    two = compare(
        str(tiny_llama_dir), EDITS, PROMPT, max_new_tokens=8, device_map=device_map(), offload_folder=tmp_path
    )
    assert len(one.without_ids) == 8
    assert (two.without_ids, two.steered_ids) == (one.without_ids, one.steered_ids)


def test_steer_logits_of_a_model_loaded_with_a_map_equal_single_device(plain, mapped):
    """The Python API: headmap.load_model(device_map=...) gives a model headmap.steer takes as it is."""
    enc = plain.tokenizer([PROMPT, "Snow is"], return_tensors="pt", padding=True)
    logits = []
    for lm in (plain, mapped):
        with torch.no_grad(), headmap.steer(lm.model, EDITS):
            logits.append(lm.model(**enc).logits)
    assert torch.equal(logits[0], logits[1])
    with torch.no_grad():
        unedited = plain.model(**enc).logits
    assert not torch.equal(unedited, logits[0])  # the edit does something: the equality above is not vacuous


def test_steer_cli_with_a_map_file(monkeypatch, capsys, tiny_llama_dir, map_file):
    argv = ["steer", str(tiny_llama_dir), "--prompt", PROMPT, "--edit", EDITS[0], "--max-new-tokens", "4"]
    code, one, err = run_cli(monkeypatch, capsys, *argv)
    assert code == 0, err
    code, two, err = run_cli(monkeypatch, capsys, *argv, "--device-map", str(map_file))
    assert code == 0, err
    assert two == one


# -- eval and tune --------------------------------------------------------------------------------------


def test_eval_items_equal_single_device(tiny_llama_dir, task_file, tmp_path):
    kw = {"random_heads": 2, "bootstrap": 100, "batch_size": 2}
    one = run_eval(str(tiny_llama_dir), str(task_file), EDITS, **kw)
    two = run_eval(str(tiny_llama_dir), str(task_file), EDITS, device_map=device_map(), offload_folder=tmp_path, **kw)
    assert len(one.items) == len(ITEMS)
    pd.testing.assert_frame_equal(one.items, two.items, check_exact=True)
    assert one.summary == two.summary


def test_needle_eval_equal_single_device(tiny_llama_dir, tmp_path):
    kw = {"task": "needle:lengths=64:depths=0,1", "limit": 3, "bootstrap": 100, "max_length": 64}
    one = run_eval(str(tiny_llama_dir), edits=EDITS, random_heads=0, **kw)
    two = run_eval(
        str(tiny_llama_dir), edits=EDITS, random_heads=0, device_map="auto", max_memory="cpu=30KB,disk=1GB", **kw
    )
    pd.testing.assert_frame_equal(one.items, two.items, check_exact=True)


def test_tune_equal_single_device(tiny_llama_dir, tmp_path):
    dev, test = tmp_path / "dev.jsonl", tmp_path / "test.jsonl"
    dev.write_text("".join(json.dumps(it) + "\n" for it in ITEMS[:3]))
    test.write_text("".join(json.dumps(it) + "\n" for it in ITEMS[3:]))
    template = ["scale_first_token:heads=[[0,1]]:factor={f}"]
    kw = {"grid": "0.5,1,2", "bootstrap": 100}
    one = run_tune(str(tiny_llama_dir), str(dev), str(test), template, **kw)
    two = run_tune(
        str(tiny_llama_dir), str(dev), str(test), template, device_map=device_map(), offload_folder=tmp_path, **kw
    )
    pd.testing.assert_frame_equal(one.result.dev, two.result.dev, check_exact=True)
    pd.testing.assert_frame_equal(one.result.test.items, two.result.test.items, check_exact=True)


# -- compress -------------------------------------------------------------------------------------------


def test_compress_kept_entries_equal_single_device(plain, mapped):
    """The Python API: headmap.presses.compress on a model loaded with a map keeps the same cache entries."""
    from headmap.presses import compress, make_press

    enc = plain.tokenizer([PROMPT], return_tensors="pt")
    kept = []
    for lm in (plain, mapped):
        with torch.no_grad(), compress(lm.model, make_press("snapkv", ratio=0.5, window=4)) as run:
            lm.model(**enc, use_cache=True)
        kept.append(run.kept)
    assert sorted(kept[0]) == [0, 1]
    for layer in kept[0]:
        assert torch.equal(kept[0][layer], kept[1][layer])
        assert not bool(kept[0][layer].all())  # half the cache goes: the comparison is not of all-True masks


def test_compress_cli_generations_equal_single_device(monkeypatch, capsys, tiny_llama_dir, map_file, tmp_path):
    task = tmp_path / "needles.jsonl"
    task.write_text(
        "".join(
            json.dumps(
                {
                    "context": f"The code of room {i} is {1000 + 37 * i}. " * 3,
                    "question": f"Room {i}?",
                    "answer": str(1000 + 37 * i),
                }
            )
            + "\n"
            for i in range(3)
        )  # fmt: skip
    )
    argv = ["compress", str(tiny_llama_dir), "--press", "snapkv:window=4", "--press", "streaming:sinks=2",
            "--ratio", "0.5", "--task", str(task), "--limit", "3", "--max-new-tokens", "4"]  # fmt: skip
    code, _, err = run_cli(monkeypatch, capsys, *argv, "--out", str(tmp_path / "one"))
    assert code == 0, err
    code, _, err = run_cli(monkeypatch, capsys, *argv, "--out", str(tmp_path / "two"), "--device-map", str(map_file))
    assert code == 0, err
    one, two = (pd.read_parquet(tmp_path / d / "compress.parquet") for d in ("one", "two"))
    cols = ["press", "ratio", "item", "output", "correct", "cache_bytes", "full_bytes", "length"]
    assert len(one) == 3 * 3
    pd.testing.assert_frame_equal(one[cols], two[cols], check_exact=True)


# -- explain --------------------------------------------------------------------------------------------


def test_explain_attributions_equal_single_device(tiny_llama_dir, tmp_path):
    from headmap.explain.folder import run_explain

    kw = {"text": [PROMPT, "Snow is white and"], "methods": "rollout,attn_grad,saliency,integrated_gradients",
          "steps": 4}  # fmt: skip
    one = run_explain(str(tiny_llama_dir), out=tmp_path / "one", **kw)
    two = run_explain(
        str(tiny_llama_dir), out=tmp_path / "two", device_map=device_map(), offload_folder=tmp_path / "off", **kw
    )
    assert len(one.attributions) > 0
    pd.testing.assert_frame_equal(one.attributions, two.attributions, check_exact=True)
    pd.testing.assert_frame_equal(one.faithfulness, two.faithfulness, check_exact=True)


def test_explain_api_takes_a_model_loaded_with_a_map(plain, mapped):
    texts = [PROMPT]
    one = headmap.explain(plain.model, plain.tokenizer, texts, methods=["saliency", "rollout"])
    two = headmap.explain(mapped.model, mapped.tokenizer, texts, methods=["saliency", "rollout"])
    pd.testing.assert_frame_equal(one, two, check_exact=True)


# -- bad input: the checks of load_model, on every verb -------------------------------------------------


def _verb_args(verb: str, model: Path, task: Path, out: Path) -> list[str]:
    return {
        "steer": ["steer", str(model), "--prompt", PROMPT, "--edit", EDITS[0]],
        "eval": ["eval", str(model), "--task", str(task), "--out", str(out)],
        "tune": ["tune", str(model), "--edit-template", "scale_first_token:heads=[[0,1]]:factor={f}", "--out",
                 str(out)],
        "compress": ["compress", str(model), "--press", "knorm", "--out", str(out)],
        "explain": ["explain", str(model), "--text", PROMPT, "--out", str(out)],
    }[verb]  # fmt: skip


BAD = {
    "missing module": ({**device_map("cpu"), "model.layers.7": "cpu"}, None, ["model.layers.7", "lacks"]),
    "no such device": ({**device_map("cpu"), "model.layers.1": "cuda:3"}, None, ["model.layers.1", "cuda:3"]),
    "budget below a layer": ("auto", "cpu=1KB", ["one layer", "KiB", "at least"]),
}


@pytest.mark.parametrize("verb", ["steer", "eval", "tune", "compress", "explain"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_placement_is_one_line_and_exit_2(monkeypatch, capsys, tiny_llama_dir, task_file, tmp_path, verb, case):
    where, budget, needles = BAD[case]
    if isinstance(where, dict):
        file = tmp_path / "map.json"
        file.write_text(json.dumps(where))
        where = str(file)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = [*_verb_args(verb, tiny_llama_dir, task_file, out), "--device-map", where]
    if budget is not None:
        args += ["--max-memory", budget]
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0]
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


def test_one_declaration_of_the_placement_options():
    """The five commands read --device-map, --max-memory and --offload-folder from headmap.cli.options."""
    import typer

    from headmap.cli import options
    from headmap.cli.app import help_text

    group = typer.main.get_command(cli.app)
    ctx = SimpleNamespace()
    for name in ("scan", "steer", "eval", "tune", "compress", "explain"):
        command = group.get_command(ctx, name)
        params = {p.name: p for p in command.params}
        for key in ("device_map", "max_memory", "offload_folder"):
            assert key in params, f"{name} lacks --{key.replace('_', '-')}"
        assert params["max_memory"].help == help_text(options.MaxMemory.__metadata__[0].help)


# -- TokenProbe._track across devices -------------------------------------------------------------------


class OtherDevice(torch.Tensor):
    """A CPU tensor that stands for one on a second device, as a later layer's tensors are under a device map
    over several GPUs: an operation that mixes it with plain tensors raises, as CUDA does for tensors on
    cuda:0 and cuda:1; ``.to(device=...)`` is the copy to the plain tensors' device and returns a plain
    tensor. Honest limits: it cannot tell devices apart by name (every device here is the CPU), so it checks
    that every combination goes through ``.to`` of the pending state's device, not a real transfer."""

    moved_to: list = []  # noqa: RUF012  (the devices .to was asked for, in order)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to:
            device = kwargs.get("device", next((a for a in args[1:] if isinstance(a, (str, torch.device))), None))
            if device is not None:
                cls.moved_to.append(torch.device(device))
                with torch._C.DisableTorchFunctionSubclass():
                    return torch.Tensor.to(args[0].as_subclass(torch.Tensor), *args[1:], **kwargs)
        flat = [*args, *kwargs.values()]
        flat += [x for a in args if isinstance(a, (list, tuple)) for x in a]
        tensors = [a for a in flat if isinstance(a, torch.Tensor)]
        if any(type(t) is torch.Tensor for t in tensors) and any(isinstance(t, cls) for t in tensors):
            raise RuntimeError("Expected all tensors to be on the same device (stand-in: a second device)")
        return super().__torch_function__(func, types, args, kwargs)


def _block(layer: int, valid: torch.Tensor, item_start: torch.Tensor, q_pos: torch.Tensor, wrap: bool):
    def put(t):
        return t.as_subclass(OtherDevice) if wrap else t

    return SimpleNamespace(layer=layer, query_valid=put(valid), item_start=put(item_start), q_pos=put(q_pos))


def test_token_probe_tracks_layers_on_two_devices():
    from headmap.probes.received import ReceivedProbe

    valid = torch.tensor([[False, True, True, True], [True, True, True, False]])
    item_start = torch.tensor([1, 0], dtype=torch.int32)
    q_pos = torch.arange(4)
    with pytest.raises(RuntimeError, match="same device"):  # the stand-in catches a mix, as CUDA would
        torch.equal(item_start.long(), item_start.long().as_subclass(OtherDevice))
    probe = ReceivedProbe()
    OtherDevice.moved_to.clear()
    pend = probe._track(_block(0, valid, item_start, q_pos, wrap=False))  # layer 0: the first device
    pend = probe._track(_block(1, valid, item_start, q_pos, wrap=True))  # layer 1: another device
    assert type(pend.item_start) is torch.Tensor and type(pend.last) is torch.Tensor  # state stays home
    assert pend.last.tolist() == [3, 2] and pend.layers == {0, 1}
    assert OtherDevice.moved_to and set(OtherDevice.moved_to) == {pend.last.device}
    # a second forward (other item starts) on the other device is still told apart
    with pytest.raises(headmap.HeadmapError, match="second forward"):
        probe._track(_block(1, valid, torch.tensor([2, 0], dtype=torch.int32), q_pos, wrap=True))
