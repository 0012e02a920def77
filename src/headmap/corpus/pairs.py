"""Encoder-decoder inputs: source/target pairs and audio with its transcript, prepared for a seq2seq model.

A corpus of pairs is a JSONL file whose lines read ``{"source": "...", "target": "..."}`` (T5, BART,
Marian: the encoder reads the source, the decoder the target); an audio corpus is the built-in
``tones`` or a JSONL file of ``{"audio": "clip.wav", "text": "..."}`` lines (Whisper: the encoder reads
the audio, the decoder the text) (:mod:`headmap.corpus.audio`). A plain text corpus given to a text
encoder-decoder is read as pairs whose target is the source itself (a denoising autoencoder's task).

:func:`prepare_seq2seq` makes the model's inputs. The decoder is **teacher-forced**: with ``labels`` the
target's token ids (the tokenizer's own special tokens included), its input is ``labels`` shifted right
by one, behind the model's ``decoder_start_token_id`` (unless ``labels`` already begins with it, as
Whisper's do): what the model reads when it is trained on the pair. Every prepared sample keeps

- ``ids``: the encoder's token ids (text), or the decoder's (audio, which has no encoder tokens);
- ``info["decoder_ids"]``: the decoder's input ids;
- ``info["model_inputs"]``: for audio, ``input_features`` ([1, mel bins, frames]) from the model's
  feature extractor, at the extractor's rate (the audio resampled first when needed).

:func:`collate_seq2seq` batches them: ``decoder_input_ids`` right-padded with the pad id, its
``decoder_attention_mask``, and the features concatenated.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CorpusError
from .audio import check_rate, has_audio, read_wav, resample
from .tokens import Tokens, encode
from .types import Corpus, Sample

__all__ = ["collate_seq2seq", "has_pairs", "is_seq2seq_line", "jsonl_seq2seq", "prepare_seq2seq", "teacher_forced"]


def has_pairs(samples: Any) -> bool:
    """Whether the inputs are source/target pairs (the first sample's ``info`` has ``source``)."""
    items = getattr(samples, "samples", samples)
    try:
        first = items[0]
    except (IndexError, TypeError):
        return False
    return "source" in (getattr(first, "info", None) or {})


def is_seq2seq_line(obj: dict[str, Any]) -> bool:
    """Whether a JSONL object is a pair (``source``) or an audio line (``audio``)."""
    return "source" in obj or "audio" in obj


def _text(obj: dict[str, Any], key: str, where: str, example: str) -> str:
    if key not in obj:
        raise CorpusError(f'{where}: the object has no "{key}"; lines read like {example}')
    value = obj[key]
    if not isinstance(value, str) or not value.strip():
        raise CorpusError(f'{where}: "{key}" must be a non-empty string')
    return value


def jsonl_seq2seq(toks: Tokens, path: Path, line: int, obj: dict[str, Any]) -> Sample:
    """The sample of one JSONL line holding ``source`` (a pair) or ``audio`` (a clip and its text)."""
    where = f"corpus file {path}, line {line}"
    if "image" in obj or "spans" in obj:
        raise CorpusError(f'{where}: "image" and "spans" cannot be given with "source" or "audio"')
    if "audio" in obj:
        if "source" in obj:
            raise CorpusError(f'{where}: give "source" (text pairs) or "audio" (a clip), not both')
        text = _text(obj, "text", where, '{"audio": "clip.wav", "text": "..."}')
        name = obj["audio"]
        if not isinstance(name, str) or not name.strip():
            raise CorpusError(f'{where}: "audio" must be the name of a WAV file (got {name!r})')
        audio, rate = read_wav(path.parent / Path(name).expanduser(), where)
        check_rate(rate, where)
        return Sample(encode(toks.tok, text), {"line": line, "audio": audio, "sampling_rate": rate, "text": text})
    example = '{"source": "...", "target": "..."}'
    source, target = _text(obj, "source", where, example), _text(obj, "target", where, example)
    return Sample(encode(toks.tok, source), {"line": line, "source": source, "target": target})


def teacher_forced(labels: list[int], start: int) -> list[int]:
    """The decoder input of ``labels``: shifted right by one behind ``start`` (kept when labels begin with it)."""
    if labels and labels[0] == start:
        return list(labels[:-1]) if len(labels) > 1 else list(labels)
    return [start, *labels[:-1]]


def decoder_start(model: Any, tokenizer: Any) -> int:
    """The model's ``decoder_start_token_id`` (else the tokenizer's BOS, else pad, else 0)."""
    config = getattr(model, "config", None)
    for value in (
        getattr(config, "decoder_start_token_id", None),
        getattr(getattr(model, "generation_config", None), "decoder_start_token_id", None),
        getattr(tokenizer, "bos_token_id", None),
        getattr(tokenizer, "pad_token_id", None),
    ):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return 0


def _cut(ids: list[int], max_length: int, what: str, index: int, name: str, strict: bool) -> tuple[list[int], int]:
    if len(ids) <= max_length:
        return ids, 0
    if strict:
        raise CorpusError(
            f"input {index} of corpus '{name}': its {what} has {len(ids)} tokens but --max-length is {max_length}; "
            f"raise --max-length or shorten it"
        )
    return ids[:max_length], 1


def prepare_seq2seq(
    corpus: Corpus,
    tokenizer: Any,
    model: Any,
    max_length: int,
    feature_extractor: Any = None,
    strict: bool = False,
    decoder_limit: int | None = None,
) -> Corpus:
    """``corpus`` as the inputs of encoder-decoder ``model`` (see the module's doc).

    Pairs and plain text need a text encoder; audio needs ``feature_extractor``. Sources and targets longer
    than ``max_length`` (targets: ``decoder_limit``, default ``max_length``) are cut (``strict``: refused).
    """
    start = decoder_start(model, tokenizer)
    dec_max = min(max_length, decoder_limit or max_length)
    samples: list[Sample] = []
    cut = 0
    audio, pairs = has_audio(corpus), has_pairs(corpus)
    for index, sample in enumerate(corpus.samples):
        info = dict(sample.info or {})
        if ("audio" in info) != audio:
            raise CorpusError(f"input {index} of corpus '{corpus.name}': some inputs hold audio and some do not")
        if audio:
            text = info.get("text")
            if not isinstance(text, str) or not text.strip():
                raise CorpusError(f"input {index} of corpus '{corpus.name}' has no text; every audio line needs one")
            dec, c = _cut(teacher_forced(encode(tokenizer, text), start), dec_max, "text", index, corpus.name, strict)
            info["model_inputs"] = {"input_features": features(info, feature_extractor, index, corpus.name)}
            info["decoder_ids"] = dec
            samples.append(Sample(dec, info))
            cut += c
            continue
        source = info.get("source")
        target = info.get("target")
        if pairs and source is None:
            raise CorpusError(f"input {index} of corpus '{corpus.name}': some lines hold \"source\" and some do not")
        plain = source is None
        if plain:  # plain text: the target is the source itself
            target = "" if info.get("text") is None else str(info.get("text"))
            ids = list(sample.ids)
        else:
            ids = encode(tokenizer, source)
        if not isinstance(target, str) or not ids:
            raise CorpusError(f"input {index} of corpus '{corpus.name}' has no source or no target")
        ids, c1 = _cut(ids, max_length, "source", index, corpus.name, strict)
        labels = list(sample.ids) if plain else encode(tokenizer, target)
        dec, c2 = _cut(teacher_forced(labels, start), dec_max, "target", index, corpus.name, strict)
        info["decoder_ids"] = dec
        samples.append(Sample(ids, info))
        cut += c1 or c2
    if not samples:
        raise CorpusError(f"corpus '{corpus.name}' holds no input")
    desc = dict(corpus.description)
    desc.update(
        {
            "tokens": sum(len(s.ids) for s in samples),
            "decoder_tokens": sum(len(s.info["decoder_ids"]) for s in samples),
            "seq2seq": "audio" if audio else "pairs" if has_pairs(corpus) else "text",
            "decoder_start_token_id": start,
        }
    )
    if cut:
        desc["truncated"] = max(int(desc.get("truncated") or 0), cut)
    if audio:
        desc["feature_extractor"] = type(feature_extractor).__name__
    return Corpus(corpus.name, samples, desc)


def features(info: dict[str, Any], extractor: Any, index: int, name: str) -> torch.Tensor:
    """``input_features`` [1, mel bins, frames] of one clip, at the extractor's rate."""
    target = int(getattr(extractor, "sampling_rate", 0) or 0)
    rate = check_rate(info.get("sampling_rate"), f"input {index} of corpus '{name}'")
    clip = np.asarray(info["audio"], dtype=np.float32)
    if target:
        clip = resample(clip, rate, target)
        rate = target
    try:
        made = extractor(clip, sampling_rate=rate, return_tensors="pt")
    except (ValueError, TypeError, RuntimeError) as exc:
        raise CorpusError(
            f"input {index} of corpus '{name}': the model's feature extractor cannot prepare it ({exc})"
        ) from None
    values = made.get("input_features")
    if values is None:
        raise CorpusError(f"the model's feature extractor ({type(extractor).__name__}) makes no input_features")
    return values


def collate_seq2seq(samples: Sequence[Sample], pad: int, device: Any) -> dict[str, torch.Tensor]:
    """``decoder_input_ids`` and ``decoder_attention_mask`` (right padding with ``pad``) of a batch of prepared
    inputs, and their other tensors (``input_features``) concatenated along the first axis."""
    rows = [s.info["decoder_ids"] for s in samples]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    out = {"decoder_input_ids": ids.to(device), "decoder_attention_mask": mask.to(device)}
    extras = [s.info.get("model_inputs") for s in samples]
    if extras and all(e is not None for e in extras):
        for key in extras[0]:
            parts = [e[key] for e in extras]
            if any(p.shape[1:] != parts[0].shape[1:] for p in parts):
                raise CorpusError(
                    f"the inputs of one batch give '{key}' of different shapes ({[tuple(p.shape) for p in parts]}); "
                    "use --batch-size 1"
                )
            out[key] = torch.cat(parts, dim=0).to(device)
    return out
