"""Audio inputs: WAV files read with the standard library, resampling with numpy, and the built-in ``tones`` corpus.

A corpus holds audio when its samples carry ``info["audio"]`` (a 1-D float32 numpy array in [-1, 1]),
``info["sampling_rate"]`` (its rate in Hz) and ``info["text"]`` (the transcript the decoder reads,
teacher-forced): the built-in ``tones`` corpus, or a JSONL file whose lines read
``{"audio": "clip.wav", "text": "..."}`` (paths relative to the JSONL file). A WAV file is read with
:mod:`wave` and numpy (8-, 16- or 32-bit integer PCM, any number of channels, averaged to mono) while
the corpus is read, so that a missing or unreadable file stops the scan before its first forward pass.
A model's feature extractor prepares it (:mod:`headmap.corpus.pairs`); audio of another rate is first
resampled to the extractor's rate (:func:`resample`, band-limited, by the FFT).

``tones`` (made by code, seeded, offline): clips of ``ms`` milliseconds (default 1000) at ``rate`` Hz
(default 16000), in turn

- ``tone``: a sine of one frequency between an onset and an offset, silence around it;
- ``chirp``: a sine whose frequency moves linearly from one value to another over the clip's middle;
- ``two tones``: one frequency, a gap, then another.

Each sample's ``info`` holds ``audio``, ``sampling_rate``, ``kind``, ``frequencies`` (Hz),
``segments`` (``[start_s, end_s]`` of each sound) and ``text`` (e.g. ``"a tone of 440 hertz"``).
"""

from __future__ import annotations

import random
import wave
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CorpusError
from .registry import Built, register_corpus
from .tokens import encode
from .types import Sample

TONES_INPUTS = 6
TONES_RATE = 16000
TONES_MS = 1000
#: the frequencies tones are drawn from (Hz): whole numbers, so that a transcript names them exactly
TONE_FREQUENCIES = (220, 330, 440, 550, 660, 880, 1100, 1320)
TONE_KINDS = ("tone", "chirp", "two tones")
#: rates a clip may have (Hz): below it nothing speech-like survives, above it no extractor reads it
MIN_RATE, MAX_RATE = 1000, 384000


def has_audio(samples: Any) -> bool:
    """Whether the inputs carry audio (the first sample's ``info`` has ``audio``)."""
    items = getattr(samples, "samples", samples)
    try:
        first = items[0]
    except (IndexError, TypeError):
        return False
    return "audio" in (getattr(first, "info", None) or {})


def read_wav(path: Path, where: str) -> tuple[np.ndarray, int]:
    """(mono float32 samples in [-1, 1], rate) of the WAV file at ``path``; CorpusError naming ``where``."""
    if not path.exists():
        raise CorpusError(f"{where}: audio file {path} does not exist; audio paths are relative to the JSONL file")
    if not path.is_file():
        raise CorpusError(f"{where}: audio {path} is not a file")
    try:
        with wave.open(str(path), "rb") as wav:
            channels, width, rate, frames = wav.getnchannels(), wav.getsampwidth(), wav.getframerate(), wav.getnframes()
            raw = wav.readframes(frames)
    except (wave.Error, EOFError, OSError) as exc:
        raise CorpusError(f"{where}: {path} is not a WAV file Python's wave module can read ({exc})") from None
    kinds = {1: (np.uint8, 128.0, 128.0), 2: (np.int16, 0.0, 32768.0), 4: (np.int32, 0.0, 2147483648.0)}
    if width not in kinds:
        raise CorpusError(f"{where}: {path} has {8 * width}-bit samples; headmap reads 8-, 16- or 32-bit PCM WAV")
    kind, centre, scale = kinds[width]
    data = np.frombuffer(raw, dtype=np.dtype(kind).newbyteorder("<"))
    if len(data) < channels:
        raise CorpusError(f"{where}: {path} holds no audio frame")
    audio = ((data[: len(data) // channels * channels].astype(np.float64) - centre) / scale).reshape(-1, channels)
    return audio.mean(axis=1).astype(np.float32), int(rate)


def write_wav(path: Path, audio: np.ndarray, rate: int) -> Path:
    """Write mono ``audio`` (floats in [-1, 1]) as a 16-bit PCM WAV file at ``rate`` Hz."""
    pcm = np.clip(np.round(np.asarray(audio, dtype=np.float64) * 32767.0), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(int(rate))
        wav.writeframes(pcm.tobytes())
    return path


def check_rate(rate: Any, where: str) -> int:
    """``rate`` when it is a whole number of Hz a feature extractor can read, else CorpusError."""
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or not MIN_RATE <= rate <= MAX_RATE:
        raise CorpusError(
            f"{where}: sample rate {rate!r} Hz cannot be read; headmap reads audio at {MIN_RATE} to {MAX_RATE} Hz"
        )
    return int(rate)


def resample(audio: np.ndarray, rate: int, target: int) -> np.ndarray:
    """``audio`` at ``rate`` Hz resampled to ``target`` Hz (band-limited, by the FFT); as it is when equal."""
    if rate == target or len(audio) == 0:
        return np.asarray(audio, dtype=np.float32)
    n = len(audio)
    m = max(1, round(n * target / rate))
    spectrum = np.fft.rfft(np.asarray(audio, dtype=np.float64))
    keep = min(len(spectrum), m // 2 + 1)
    out = np.zeros(m // 2 + 1, dtype=np.complex128)
    out[:keep] = spectrum[:keep]
    return (np.fft.irfft(out, n=m) * (m / n)).astype(np.float32)


# -- the built-in tones corpus -----------------------------------------------------------------------


def _sine(freq_hz: np.ndarray, rate: int) -> np.ndarray:
    """A sine whose instantaneous frequency is ``freq_hz`` (one value per sample)."""
    return np.sin(2 * np.pi * np.cumsum(freq_hz) / rate)


def _envelope(n: int, rate: int) -> np.ndarray:
    """Ramps of 5 ms at both ends, so that a sound starts and stops without a click."""
    ramp = min(n // 2, max(1, rate // 200))
    env = np.ones(n)
    env[:ramp] = np.linspace(0, 1, ramp, endpoint=False)
    env[n - ramp :] = np.linspace(1, 0, ramp, endpoint=False)
    return env


def tone_item(rng: random.Random, kind: str, rate: int, ms: int) -> dict[str, Any]:
    """One clip of ``kind`` with its transcript and the timing of its sounds."""
    n = max(1, rate * ms // 1000)
    audio = np.zeros(n)
    f1, f2 = rng.sample(TONE_FREQUENCIES, 2)
    amp = rng.uniform(0.3, 0.8)
    if kind == "two tones":
        cut = [round(n * x) for x in (0.1, 0.45, 0.55, 0.9)]
        parts = [(cut[0], cut[1], f1), (cut[2], cut[3], f2)]
        text = f"two tones of {f1} and {f2} hertz"
    else:
        a, b = round(n * rng.uniform(0.05, 0.3)), round(n * rng.uniform(0.7, 0.95))
        parts = [(a, b, (f1, f2) if kind == "chirp" else f1)]
        text = f"a chirp from {f1} to {f2} hertz" if kind == "chirp" else f"a tone of {f1} hertz"
    for a, b, f in parts:
        freq = np.linspace(f[0], f[1], b - a) if isinstance(f, tuple) else np.full(b - a, float(f))
        audio[a:b] = amp * _sine(freq, rate) * _envelope(b - a, rate)
    return {
        "audio": audio.astype(np.float32),
        "sampling_rate": rate,
        "kind": kind,
        "frequencies": [f1, f2] if kind != "tone" else [f1],
        "segments": [[a / rate, b / rate] for a, b, _ in parts],
        "text": text,
    }


def tones_items(limit: int = TONES_INPUTS, seed: int = 0, rate: int = TONES_RATE, ms: int = TONES_MS) -> list[dict]:
    """``limit`` clips (kinds in turn: tone, chirp, two tones), the same for the same seed."""
    check_rate(rate, "tones")
    if ms < 50:
        raise CorpusError(f"tones: ms {ms} is too short for a sound; use ms >= 50")
    rng = random.Random(f"headmap-tones-{seed}")
    return [tone_item(rng, TONE_KINDS[i % len(TONE_KINDS)], rate, ms) for i in range(limit)]


@register_corpus(
    "tones",
    {
        "rate": ("int", f"sample rate in Hz; default {TONES_RATE}"),
        "ms": ("int", f"length of each clip in milliseconds; default {TONES_MS}"),
    },
)
def build_tones(tokenizer: Any, *, max_length: int, limit: int | None, seed: int, vocab_size: int | None, options):
    rate, ms = options.get("rate", TONES_RATE), options.get("ms", TONES_MS)
    samples = []
    for item in tones_items(limit or TONES_INPUTS, seed, rate, ms):
        ids = encode(tokenizer, item["text"])
        if len(ids) > max_length:
            raise CorpusError(
                f"corpus 'tones' needs {len(ids)} tokens per transcript but --max-length is {max_length}; "
                f"use --max-length >= {len(ids)}"
            )
        samples.append(Sample(ids, item))
    return Built(samples, {"rate": rate, "ms": ms}, {"seed": seed, "source": "made by headmap.corpus.audio (numpy)"})
