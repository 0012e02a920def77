"""What a scan of an encoder-decoder model needs: its inputs (pairs or audio), its feature extractor, its probes.

An encoder-decoder (``config.is_encoder_decoder``: T5, BART, Whisper) runs three towers in every forward
call, ``encoder``, ``decoder`` and ``cross`` (docs/multimodal.md), each numbering its layers from 0. Its
corpus is prepared by :func:`headmap.corpus.pairs.prepare_seq2seq`: source/target pairs, or plain text
read as pairs whose target is the text itself, for a text model; audio (``tones``, or a JSONL file with
``"audio"``) for a model that reads ``input_features`` (Whisper), through the model's feature extractor
(the processor given with the model, else ``AutoFeatureExtractor`` from its folder or hub id). The
decoder is teacher-forced on the target. Inputs are padded on the right (encoder and decoder), and only
probes that key what they keep by tower (``Probe.tower_aware``) may read them. Without ``--probes`` the
scan runs the encoder-decoder default set (:func:`headmap.probes.encoder_decoder_probe_names`).
"""

from __future__ import annotations

from typing import Any

from ..corpus import Corpus
from ..corpus.audio import has_audio
from ..corpus.images import has_images
from ..corpus.pairs import has_pairs, prepare_seq2seq
from ..errors import CorpusError
from ..models import LoadedModel


def is_seq2seq(loaded: LoadedModel | Any) -> bool:
    """Whether the model is an encoder-decoder (``config.is_encoder_decoder``)."""
    model = getattr(loaded, "model", loaded)
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def reads_audio(loaded: LoadedModel) -> bool:
    """Whether the model's encoder reads audio features (``main_input_name == "input_features"``)."""
    return getattr(loaded.model, "main_input_name", None) == "input_features"


def left_pad(loaded: LoadedModel) -> bool:
    """Whether a scan pads on the left: a causal model's inputs, never an encoder-decoder's."""
    return loaded.is_causal and not is_seq2seq(loaded)


def audio_corpus(loaded: LoadedModel) -> str | None:
    """The corpus a scan reads when none is named: ``tones`` for a model that reads audio, else None."""
    return "tones" if is_seq2seq(loaded) and reads_audio(loaded) else None


def _model_name(loaded: LoadedModel) -> str:
    model_type = getattr(getattr(loaded.model, "config", None), "model_type", "?")
    return f"{loaded.model_id} ({model_type})"


def feature_extractor_for(loaded: LoadedModel) -> Any:
    """The model's audio feature extractor; CorpusError when it has none."""
    proc = loaded.extra.get("processor")
    found = getattr(proc, "feature_extractor", None) or loaded.extra.get("feature_extractor")
    if found is None:
        where = loaded.path if loaded.source in ("folder", "builtin") else loaded.model_id
        if loaded.source in ("folder", "builtin", "hub") and where:
            from transformers import AutoFeatureExtractor

            kw = {"revision": loaded.revision} if loaded.revision else {}
            try:
                found = AutoFeatureExtractor.from_pretrained(where, **kw)
            except Exception:  # noqa: BLE001  (no feature extractor files: any of several errors)
                found = None
    if found is None or not callable(found):
        raise CorpusError(
            f"model {_model_name(loaded)} has no audio feature extractor (its folder lacks preprocessor_config.json), "
            "so it cannot read an audio corpus; pass its processor with the model, or save the feature extractor "
            "beside the weights"
        )
    return found


def prepare(data: Corpus, loaded: LoadedModel, max_length: int, strict: bool = False) -> Corpus:
    """``data`` as the encoder-decoder's inputs; a pair or audio corpus given to another model is refused."""
    if not is_seq2seq(loaded):
        if has_pairs(data) or has_audio(data):
            what = "source/target pairs" if has_pairs(data) else "audio"
            raise CorpusError(
                f"corpus '{data.name}' holds {what}, which an encoder-decoder model reads (T5, BART, Whisper); "
                f"model {_model_name(loaded)} is not one: scan it on a text corpus"
            )
        return data
    if has_images(data):
        raise CorpusError(f"corpus '{data.name}' holds images, and model {_model_name(loaded)} reads no image")
    extractor = None
    if reads_audio(loaded):
        if not has_audio(data):
            raise CorpusError(
                f"model {_model_name(loaded)} reads audio, and corpus '{data.name}' holds none: use --corpus tones, "
                'or a JSONL file of {"audio": "clip.wav", "text": "..."} lines'
            )
        extractor = feature_extractor_for(loaded)
    elif has_audio(data):
        raise CorpusError(
            f"corpus '{data.name}' holds audio, and model {_model_name(loaded)} reads text: scan it on "
            'source/target pairs (a JSONL file of {"source": "...", "target": "..."} lines) or on text'
        )
    limit = getattr(loaded.model.config, "max_target_positions", None)
    return prepare_seq2seq(
        data, loaded.tokenizer, loaded.model, max_length, extractor, strict=strict, decoder_limit=limit
    )


def is_prepared(data: Any) -> bool:
    """Whether the inputs were prepared for an encoder-decoder (the first sample has ``decoder_ids``)."""
    items = data.samples if isinstance(data, Corpus) else data
    try:
        first = items[0]
    except (IndexError, TypeError):
        return False
    return "decoder_ids" in (getattr(first, "info", None) or {})


def tower_blind(probe: Any, data: Corpus) -> str | None:
    """Why ``probe`` cannot read the encoder-decoder inputs ``data`` (None when it can, or they are not such)."""
    if not is_prepared(data):
        return None
    if probe.needs.corpus in ("repeats", "needle", "items", "spans", "images"):
        return "its positions index the tokens of its own corpus, and an encoder-decoder reads a source and a target"
    if probe.tower_aware:
        return None
    return (
        "it keeps its sums by layer alone, and an encoder-decoder runs an encoder, a decoder and cross-attention, "
        "whose layers are all numbered from 0 (docs/multimodal.md)"
    )
