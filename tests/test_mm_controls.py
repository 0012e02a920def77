"""Random-head controls of an edit of another tower are drawn from that tower (docs/methods/random_heads.md).

The tiny random VLMs of tests/mm_models.py have a language model of 2 layers x 4 heads and a vision tower of
2 layers x 2 heads (here also 3 vision layers: a layer number the language model lacks). An edit with
``tower=vision`` must get controls from the vision tower's layers and head counts, never the heads it names,
and a draw that cannot be made there (more heads than the vision layer has unedited) is refused in one line,
exit 2, where the language model's counts would have allowed it.
"""

from __future__ import annotations

import json

import pytest
import torch
from cli_runner import assert_one_line_error, run
from mm_models import _seeded, _text, _vision, build_idefics3, build_llava, save_llava

from headmap.edits import Ablate, Vhr
from headmap.errors import EditError
from headmap.evaluation import draw_controls, model_heads, random_like

pytestmark = pytest.mark.filterwarnings("ignore:.*torchvision.*")

SEEDS = range(20)


def llava_with_vision_layers(layers: int):
    """The tiny Llava with ``layers`` vision layers (2 heads each) and the usual 2 x 4 language model."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    cfg = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", **_vision(num_hidden_layers=layers)),
        text_config=dict(model_type="llama", **_text()),
        image_token_index=90,
        image_seq_length=16,
        vision_feature_layer=-1,
    )
    return _seeded(LlavaForConditionalGeneration, cfg, 21)


@pytest.fixture(scope="module", params=["llava", "idefics3"])
def vlm(request) -> torch.nn.Module:
    return (build_llava if request.param == "llava" else build_idefics3)()[0]


def test_model_heads_per_tower(vlm):
    assert model_heads(vlm) == [(la, h) for la in range(2) for h in range(4)]  # the language model, as before
    assert model_heads(vlm, "text") == model_heads(vlm)
    assert model_heads(vlm, "vision") == [(la, h) for la in range(2) for h in range(2)]


@pytest.mark.parametrize("kind", [Ablate, Vhr])
def test_layer_matched_controls_of_a_vision_edit_stay_in_the_vision_tower(vlm, kind):
    edit = kind(heads=[[1, 0]], tower="vision")
    picks = [random_like([edit], vlm, s)[0] for s in SEEDS]
    # vision layer 1 has heads 0 and 1; head 0 is edited, so every draw is head 1 (the language model's heads
    # 1, 2 and 3 of layer 1 would be three choices)
    assert all(p.heads == [(1, 1)] for p in picks)
    assert all(p.tower == "vision" and type(p) is kind for p in picks)
    assert edit.heads == [(1, 0)]  # the edit itself is left as it was


def test_uniform_controls_of_a_vision_edit_draw_from_every_vision_layer():
    model = llava_with_vision_layers(3)
    edit = Ablate(heads=[[0, 1]], tower="vision")
    drawn = {h for s in range(60) for h in random_like([edit], model, s, "uniform")[0].heads}  # seeded: fixed draws
    # every unedited vision head (3 layers x 2 heads, less (0, 1)) and nothing else: layer 2 exists only in the
    # vision tower, heads 2 and 3 only in the language model
    assert drawn == {(0, 0), (1, 0), (1, 1), (2, 0), (2, 1)}
    layered = {h for s in SEEDS for h in random_like([Ablate(heads=[[2, 0]], tower="vision")], model, s)[0].heads}
    assert layered == {(2, 1)}


def test_each_edit_draws_from_its_own_tower(vlm):
    text, vision = Ablate(heads=[[1, 0], [1, 1]]), Ablate(heads=[[1, 0]], tower="vision")
    draws = draw_controls([text, vision], vlm, 20)
    assert [d.draw for d in draws] == list(range(20))
    text_heads = {h for d in draws for h in d.edits[0].heads}
    vision_heads = {h for d in draws for h in d.edits[1].heads}
    assert text_heads == {(1, 2), (1, 3)}  # the text edit's own heads are never drawn
    assert vision_heads == {(1, 1)}  # vision (1, 0) is edited; text (1, 0) being edited does not take it
    assert all(d.edits[0].tower is None and d.edits[1].tower == "vision" for d in draws)


def test_impossible_vision_draws_are_refused(vlm):
    both = Ablate(heads=[[0, 0], [0, 1]], tower="vision")  # the language model's layer 0 would have 2 free heads
    with pytest.raises(EditError, match=r"^cannot draw 2 random heads in layer 0 of the vision tower: it has only 0"):
        random_like([both], vlm, 0)
    every = Ablate(heads=[[0, 0], [0, 1], [1, 0], [1, 1]], tower="vision")
    with pytest.raises(EditError, match=r"^cannot draw 4 random heads of the vision tower: the edits leave only 0"):
        random_like([every], vlm, 0, "uniform")
    with pytest.raises(EditError, match="cannot tell the layers and heads of the model's encoder tower"):
        model_heads(vlm, "encoder")


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return save_llava(tmp_path_factory.mktemp("llava") / "llava")


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    path = tmp_path_factory.mktemp("task") / "t.jsonl"
    lines = [
        {"context": f"what colour is the circle {i}", "options": [" red", " blue"], "answer": i % 2} for i in range(4)
    ]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_eval_draws_vision_controls(monkeypatch, capsys, llava_dir, task, tmp_path):
    out = tmp_path / "eval"
    code, stdout, err = run(
        monkeypatch, capsys, "eval", str(llava_dir), "--task", str(task), "--random-heads", "4",
        "--edit", "vhr:heads=[[1,0]]:tower=vision:factor=2", "--out", str(out),
    )  # fmt: skip
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    controls = summary["random_controls"]
    assert [c["draw"] for c in controls] == [0, 1, 2, 3]
    assert all(c["heads"] == [[1, 1]] for c in controls)
    assert "L1H1 of the vision tower" in stdout


def test_eval_refuses_an_impossible_vision_control_in_one_line(monkeypatch, capsys, llava_dir, task, tmp_path):
    out = tmp_path / "eval"
    code, _, err = run(
        monkeypatch, capsys, "eval", str(llava_dir), "--task", str(task),
        "--edit", "ablate:heads=[[0,0],[0,1]]:tower=vision:mode=zero", "--out", str(out),
    )  # fmt: skip
    assert_one_line_error(code, err, "cannot draw 2 random heads in layer 0 of the vision tower")
    assert not out.exists()  # refused before anything ran or was written
