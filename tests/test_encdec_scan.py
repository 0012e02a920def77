"""``headmap scan`` of encoder-decoders end to end: source/target pairs (T5, BART), audio (Whisper on ``tones``).

The tiny random T5, BART and Whisper of tests/mm_models.py are saved with a word-level tokenizer built in
code (and Whisper's feature extractor, default classes with small sizes), so that the CLI loads them like
real checkpoints. Checked: rows of every tower (``encoder``, ``decoder``, ``cross``) and of
``cross_alignment``, each equal to the same probes called directly on the same batches; the report's
alignment maps against eager ``output_attentions``; the audio corpus (WAV reading, resampling, ``tones``);
every bad input as one line and exit code 2.
"""

from __future__ import annotations

import json
import wave
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from bounds import eager_bound
from cli_runner import assert_one_line_error, run
from mm_models import save_seq2seq

import headmap
from headmap.corpus import load_corpus, pad_batch
from headmap.corpus.audio import read_wav, resample, tones_items, write_wav
from headmap.corpus.pairs import collate_seq2seq, prepare_seq2seq, teacher_forced
from headmap.probes import encoder_decoder_probe_names, make_probes

PAIRS = [
    {"source": "translate : the cat sat on the mat .", "target": "le chat est assis sur le tapis ."},
    {"source": "the dog ran", "target": "le chien a couru"},
    {"source": "translate : the cat", "target": "le chat"},
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("seq2seq")
    return {name: save_seq2seq(name, root / name) for name in ("t5", "bart", "whisper")}


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    return path


def direct_rows(folder: Path, corpus: str, names: list[str], batch: int, limit: int | None) -> pd.DataFrame:
    """The head rows of probes ``names`` called directly under the engine, on the scan's batches: the corpus
    prepared for the model, encoder and decoder padded on the right, one forward per batch."""
    from transformers import (
        AutoConfig,
        AutoFeatureExtractor,
        AutoModelForSeq2SeqLM,
        AutoTokenizer,
        WhisperForConditionalGeneration,
    )

    config = AutoConfig.from_pretrained(folder)
    audio = config.model_type == "whisper"
    cls = WhisperForConditionalGeneration if audio else AutoModelForSeq2SeqLM
    model = cls.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    extractor = AutoFeatureExtractor.from_pretrained(folder) if audio else None
    data = prepare_seq2seq(load_corpus(corpus, tok, 512, limit=limit), tok, model, 512, extractor)
    probes = make_probes(names)
    with torch.no_grad(), headmap.observe(model, probes=probes):
        for start in range(0, len(data.samples), batch):
            samples = data.samples[start : start + batch]
            inputs = collate_seq2seq(samples, tok.pad_token_id, "cpu")
            if not audio:
                inputs["input_ids"], inputs["attention_mask"] = pad_batch(
                    [s.ids for s in samples], tok.pad_token_id, left_pad=False
                )
            model(**inputs)
    return pd.DataFrame([r for p in probes for r in p.head_rows()])


def assert_rows_equal(heads: pd.DataFrame, direct: pd.DataFrame) -> None:
    key = ["probe", "metric", "tower", "layer", "head"]
    got = heads.set_index(key).sort_index()
    want = direct.set_index(key).sort_index()
    assert list(got.index) == list(want.index)
    # the same engine on the same batches and weights: the same operations, so the same numbers bit for bit
    np.testing.assert_array_equal(got["value"].to_numpy(), want["value"].to_numpy())
    np.testing.assert_array_equal(got["n"].to_numpy(), want["n"].to_numpy())


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_pairs_scan_has_every_tower_and_equals_the_probes_called_directly(
    name, folders, pairs_file, monkeypatch, capsys, tmp_path
):
    out = tmp_path / "run"
    code, _, err = run(
        monkeypatch, capsys, "scan", str(folders[name]), "--corpus", str(pairs_file), "--batch-size", "2",
        "--out", str(out), "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    heads = pd.read_parquet(out / "heads.parquet")
    assert set(heads.tower) == {"encoder", "decoder", "cross"}
    cross = heads[heads.probe == "cross_alignment"]
    assert set(cross.tower) == {"cross"} and set(cross.metric) == {"cross_entropy", "cross_monotonicity"}
    assert len(cross) == 2 * 2 * 4  # two metrics, two cross layers, four heads
    for probe in set(heads.probe) - {"cross_alignment"}:  # a head-mean probe: one set of rows per tower
        assert set(heads[heads.probe == probe].tower) == {"encoder", "decoder", "cross"}, probe
    assert (heads[heads.metric == "cross_entropy"].n == len(PAIRS)).all()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["architecture"]["causal"] is False and meta["corpus"]["seq2seq"] == "pairs"
    assert set(meta["architecture"]["towers"]) == {"encoder", "decoder", "cross"}
    assert sorted(set(heads.probe)) == sorted(encoder_decoder_probe_names()), meta["skipped_probes"]
    assert_rows_equal(heads, direct_rows(folders[name], str(pairs_file), encoder_decoder_probe_names(), 2, None))


def test_whisper_tones_scan_and_report_maps(folders, monkeypatch, capsys, tmp_path):
    out = tmp_path / "run"
    code, _, err = run(
        monkeypatch, capsys, "scan", str(folders["whisper"]), "--limit", "3", "--batch-size", "2",
        "--probes", "sink,entropy,cross_alignment", "--out", str(out), "--report", "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    heads = pd.read_parquet(out / "heads.parquet")
    assert set(heads.tower) == {"encoder", "decoder", "cross"}
    assert set(heads[heads.probe == "cross_alignment"].tower) == {"cross"}
    meta = json.loads((out / "meta.json").read_text())
    assert meta["corpus"]["name"] == "tones" and meta["corpus"]["seq2seq"] == "audio"
    assert_rows_equal(heads, direct_rows(folders["whisper"], "tones", ["sink", "entropy", "cross_alignment"], 2, 3))
    page = (out / "report.html").read_text(encoding="utf-8")
    section = page[page.index('id="alignment-section"') :].split("</section>")[0]
    assert section.count('<img alt="L') == 6  # two cross layers of four heads, the six most monotonic drawn
    assert "No maps" not in section


def test_alignment_maps_equal_eager_cross_attentions(folders):
    """The report's maps of input 0 against eager ``cross_attentions`` of that input alone."""
    from headmap.report.alignment import alignment_maps, chosen_heads, first_input

    atlas = headmap.scan(str(folders["whisper"]), probes="cross_alignment", limit=2, batch_size=2, progress=False)
    meta = dict(atlas.meta, model_source="folder", model_path=str(folders["whisper"]))
    loaded, sample, why = first_input(meta)
    assert why is None, why
    maps = alignment_maps(loaded, sample)
    inputs = collate_seq2seq([sample], 1, "cpu")
    with torch.no_grad():
        ref = loaded.model.__class__.from_pretrained(folders["whisper"], attn_implementation="eager").eval()
        eager = ref(**inputs, output_attentions=True).cross_attentions
    assert sorted(maps) == list(range(len(eager)))
    # four encoder and two decoder attention calls before the last cross layer, keys <= 16
    bound = eager_bound(keys=16, layers=6)
    for layer, attn in enumerate(eager):
        assert maps[layer].shape == tuple(attn[0].shape)
        assert np.abs(maps[layer] - attn[0].double().numpy()).max() <= bound
        np.testing.assert_allclose(maps[layer].sum(-1), 1.0, atol=bound * 16)  # rows are distributions
    chosen = chosen_heads(atlas.heads)
    mono = [m for _, _, m, _ in chosen]
    assert len(chosen) == 6 and mono == sorted(mono, reverse=True)


# -- the audio corpus ---------------------------------------------------------------------------------


def test_tones_are_seeded_and_hold_the_frequencies_they_name():
    a, b = tones_items(3, seed=1), tones_items(3, seed=1)
    assert all(np.array_equal(x["audio"], y["audio"]) for x, y in zip(a, b, strict=True))
    assert [x["kind"] for x in a] == ["tone", "chirp", "two tones"]
    tone = a[0]
    (start, end), rate = tone["segments"][0], tone["sampling_rate"]
    clip = tone["audio"][int(start * rate) : int(end * rate)]
    spectrum = np.abs(np.fft.rfft(clip))
    peak = np.argmax(spectrum) * rate / len(clip)
    assert abs(peak - tone["frequencies"][0]) <= rate / len(clip)  # within one FFT bin
    assert str(tone["frequencies"][0]) in tone["text"]
    assert np.all(tone["audio"][: int(start * rate)] == 0)  # silence before the onset
    assert not np.array_equal(tones_items(3, seed=2)[0]["audio"], tone["audio"])


def test_wav_round_trip_and_resampling(tmp_path):
    rate = 8000
    t = np.arange(rate) / rate
    sine = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    path = write_wav(tmp_path / "a.wav", sine, rate)
    back, got_rate = read_wav(path, "test")
    assert got_rate == rate
    assert np.abs(back - sine).max() <= 1 / 32767  # 16-bit quantisation: half a step, and rounding
    up = resample(back, rate, 16000)
    assert len(up) == 16000
    peak = np.argmax(np.abs(np.fft.rfft(up))) * 16000 / len(up)
    assert peak == 440  # an exact bin: one second of audio
    assert resample(back, rate, rate) is not None and np.array_equal(resample(back, rate, rate), back)


def test_jsonl_audio_lines_are_resampled_to_the_extractor_rate(folders, tmp_path):
    from transformers import AutoFeatureExtractor, AutoTokenizer

    item = tones_items(1, seed=3, rate=8000)[0]
    write_wav(tmp_path / "clip.wav", item["audio"], 8000)
    (tmp_path / "audio.jsonl").write_text(json.dumps({"audio": "clip.wav", "text": item["text"]}) + "\n")
    tok = AutoTokenizer.from_pretrained(folders["whisper"])
    extractor = AutoFeatureExtractor.from_pretrained(folders["whisper"])
    model, _ = __import__("mm_models").build_whisper()
    data = prepare_seq2seq(load_corpus(str(tmp_path / "audio.jsonl"), tok, 64), tok, model, 64, extractor)
    sample = data.samples[0]
    clip, _ = read_wav(tmp_path / "clip.wav", "test")
    want = extractor(resample(clip, 8000, 16000), sampling_rate=16000, return_tensors="pt")["input_features"]
    assert torch.equal(sample.info["model_inputs"]["input_features"], want)
    labels = tok(item["text"])["input_ids"]
    assert sample.info["decoder_ids"] == [0, *labels[:-1]]  # teacher forcing: labels shifted behind the start
    assert teacher_forced([0, 5, 2], 0) == [0, 5]  # labels that begin with the start token keep it once


# -- bad input ----------------------------------------------------------------------------------------


def _bad_wav(tmp_path: Path, rate: int) -> Path:
    with wave.open(str(tmp_path / "low.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"\x00\x00" * 100)
    return tmp_path / "low.wav"


@pytest.mark.parametrize(
    "case",
    ["missing", "not_wav", "no_text", "low_rate", "audio_to_t5", "text_to_whisper", "pairs_to_decoder", "causal"],
)
def test_bad_input_is_one_line_and_exit_2(case, folders, pairs_file, monkeypatch, capsys, tmp_path, request):
    out = tmp_path / "run"
    jsonl = tmp_path / "audio.jsonl"
    model = str(folders["whisper"])
    extra: list[str] = []
    if case == "missing":
        jsonl.write_text(json.dumps({"audio": "nope.wav", "text": "a tone"}) + "\n")
        needles = ("nope.wav", "does not exist")
    elif case == "not_wav":
        (tmp_path / "fake.wav").write_text("not audio")
        jsonl.write_text(json.dumps({"audio": "fake.wav", "text": "a tone"}) + "\n")
        needles = ("fake.wav", "not a WAV file")
    elif case == "no_text":
        write_wav(tmp_path / "ok.wav", np.zeros(1600), 16000)
        jsonl.write_text(json.dumps({"audio": "ok.wav"}) + "\n")
        needles = ('no "text"',)
    elif case == "low_rate":
        _bad_wav(tmp_path, 500)
        jsonl.write_text(json.dumps({"audio": "low.wav", "text": "a tone"}) + "\n")
        needles = ("sample rate 500",)
    elif case == "audio_to_t5":
        model = str(folders["t5"])
        jsonl = "tones"
        needles = ("holds audio", "reads text")
    elif case == "text_to_whisper":
        jsonl = str(pairs_file)
        needles = ("reads audio", "--corpus tones")
    elif case == "pairs_to_decoder":
        model = str(request.getfixturevalue("tiny_llama_dir"))
        jsonl = str(pairs_file)
        needles = ("source/target pairs", "not one")
    else:
        model, jsonl, extra = str(folders["bart"]), str(pairs_file), ["--probes", "sink,fai"]
        needles = ("fai", "encoder-decoder")
    code, _, err = run(
        monkeypatch, capsys, "scan", model, "--corpus", str(jsonl), "--out", str(out), "--no-progress", *extra
    )
    assert_one_line_error(code, err, *needles)
    assert not out.exists() or not any(out.iterdir())


def test_interrupted_whisper_scan_resumes_to_the_same_rows(folders, tmp_path, monkeypatch):
    """cross_alignment and the per-tower head sums survive a checkpoint: an interrupted scan of audio, resumed,
    writes the rows of a scan that never stopped, bit for bit."""
    from transformers import WhisperForConditionalGeneration

    from headmap.errors import ScanInterrupted

    kwargs = dict(probes="sink,cross_alignment", limit=5, batch_size=2, progress=False)
    full = headmap.scan(str(folders["whisper"]), out=tmp_path / "full", **kwargs)
    out = tmp_path / "run"
    calls = {"n": 0}
    forward = WhisperForConditionalGeneration.forward

    def stop_third(self, *args, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return forward(self, *args, **kw)

    with monkeypatch.context() as m:
        m.setattr(WhisperForConditionalGeneration, "forward", stop_third)
        with pytest.raises(ScanInterrupted) as info:
            headmap.scan(str(folders["whisper"]), out=out, checkpoint_every_s=3600.0, **kwargs)
    assert info.value.inputs_done == 4
    resumed = headmap.scan(str(folders["whisper"]), out=out, resume=True, **kwargs)
    assert resumed.meta["resumed_from"] == [4]
    key = ["probe", "metric", "tower", "layer", "head"]
    a, b = full.heads.sort_values(key).reset_index(drop=True), resumed.heads.sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)
