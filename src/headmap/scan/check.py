"""The checks a scan makes before anything heavy: options, the probes named, the model, the lengths.

Everything a user can get wrong is refused here, before the first forward pass, with a message
that says what to do.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..engine import check_supported
from ..errors import OptionError, ProbeError
from ..models import LoadedModel, load_model, pixel_tokenizer, wrap_model
from ..probes import PROBES, Probe, make_probes

DEFAULT_MAX_LENGTH = 512
#: Inputs that get maps in the report when ``--map-inputs`` is not given: the image overlays (the default
#: count of the probe that keeps them) and the encoder-decoder alignment maps.
MAP_INPUTS = 2


def named_probes(probes: str | Sequence[str] | Sequence[Probe] | None) -> list[Probe] | None:
    """The probes the user named, built; None when they named none (the default set, chosen with the model)."""
    if probes is None:
        return None
    items: Any = probes if isinstance(probes, str) else list(probes)
    if not (items.strip() if isinstance(items, str) else items):
        raise ProbeError(
            "no probe named; leave --probes out for the default set, or name probes from: " + ", ".join(sorted(PROBES))
        )
    if isinstance(items, list) and isinstance(items[0], Probe):
        return items
    return make_probes(items)


def map_inputs(value: Any, probes: Any, named: list[Probe] | None) -> int:
    """How many inputs get maps in the report (``--map-inputs``), and the probes that keep per-input maps
    (``needs.map_inputs``: the parameter that counts them) set to keep
    that many. ``value`` None: the count such a probe was given, else :data:`MAP_INPUTS`. OptionError when it is
    not a whole number >= 1, or when it disagrees with a count a probe was given (``NAME:samples=3`` in
    ``probes``, or a probe object)."""
    from ..specs import is_whole

    if value is not None and (not is_whole(value) or value < 1):
        raise OptionError(f"--map-inputs must be a whole number >= 1 (got {value!r})")
    keep = [p for p in named or () if p.needs.map_inputs]
    given = _given_count(probes, keep)
    if value is None:
        value = given[1] if given is not None else MAP_INPUTS
    elif given is not None and given[1] != value:
        raise OptionError(
            f"--map-inputs {value} and {given[0]}={given[1]} disagree: give one of them (both say how many inputs "
            "get maps in the report)"
        )
    for probe in keep:
        setattr(probe, probe.needs.map_inputs, int(value))
    return int(value)


def _given_count(probes: Any, keep: list[Probe]) -> tuple[str, int] | None:
    """(``NAME:param``, value) of the first probe of ``keep`` whose count the user gave (in a spec string, or a
    probe object), else None."""
    import re

    specs = [probes] if isinstance(probes, str) else list(probes or ())
    text = ",".join(x for x in specs if isinstance(x, str))
    objects = any(not isinstance(x, str) for x in specs)
    for probe in keep:
        param = probe.needs.map_inputs
        if objects or re.search(rf"\b{re.escape(probe.name)}:(?:[^,]*:)?{re.escape(param)}=", text):
            return f"{probe.name}:{param}", int(probe.params()[param])
    return None


def options(batch_size: int, checkpoint_every_s: float, out: str | Path | None, resume: bool) -> Path | None:
    """Check the numeric options and ``resume``; returns the output folder (None: no folder)."""
    if batch_size < 1:
        raise OptionError(f"--batch-size must be at least 1 (got {batch_size})")
    if not checkpoint_every_s >= 0:  # NaN too; inf: only when interrupted
        raise OptionError(f"--checkpoint-every must be a number of seconds >= 0 (got {checkpoint_every_s})")
    out_dir = Path(out) if out is not None else None
    if resume and out_dir is None:
        raise OptionError("resume=True needs out=..., the folder that holds the checkpoint")
    return out_dir


def shard(spec: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """``--shard i/n`` (0-based: 0/4 to 3/4) as (i, n); OptionError when malformed or out of range."""
    if spec is None:
        return None
    if isinstance(spec, str):
        index, slash, count = spec.strip().partition("/")
        try:
            if not slash:
                raise ValueError
            spec = (int(index), int(count))
        except ValueError:
            raise OptionError(f"--shard must be I/N, shard I (from 0) of N, e.g. 0/4 (got '{spec}')") from None
    index, count = spec
    if count < 1 or not 0 <= index < count:
        raise OptionError(f"--shard {index}/{count} is out of range: with N = {count} shards, I is 0 to {count - 1}")
    return int(index), int(count)


def load(
    model: Any, tokenizer: Any, dtype: str, device: str, progress: bool | None = None, **placement: Any
) -> LoadedModel:
    """The model (a name, a folder, a file or a model object), refused when the engine cannot run it.

    ``progress``: whether loading may show a progress bar (a GGUF's dequantization). ``placement``:
    ``device_map``, ``max_memory``, ``offload_folder`` (model parallel; see :func:`headmap.models.load_model`).
    """
    if model is None or isinstance(model, (str, Path)):
        loaded = load_model(
            str(model) if model is not None else None, dtype=dtype, device=device, progress=progress, **placement
        )
    else:
        if any(v is not None for v in placement.values()):
            raise OptionError(
                "device_map/max_memory place a model headmap loads; for a model object, load it with "
                "from_pretrained(device_map=...) yourself and pass it"
            )
        processor = None
        if _vision_only(model):  # ViT, CLIP or SigLIP vision alone: it reads pictures, no text
            processor, tokenizer = vision_processor(model, tokenizer), pixel_tokenizer()
        elif getattr(tokenizer, "image_processor", None) is not None and getattr(tokenizer, "tokenizer", None):
            processor, tokenizer = tokenizer, tokenizer.tokenizer  # a VLM's processor given as its tokenizer
        elif getattr(tokenizer, "feature_extractor", None) is not None and getattr(tokenizer, "tokenizer", None):
            processor, tokenizer = tokenizer, tokenizer.tokenizer  # Whisper's processor given as its tokenizer
        loaded = wrap_model(model, tokenizer)
        if processor is not None:
            loaded.extra["processor"] = processor
    check_supported(loaded.model)
    return loaded


def _vision_only(model: Any) -> bool:
    """Whether a model object is a vision encoder alone (ViT, CLIP or SigLIP vision: it reads ``pixel_values``)."""
    encdec = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
    return getattr(model, "main_input_name", None) == "pixel_values" and not encdec


def _is_image_processor(obj: Any) -> bool:
    return obj is not None and callable(obj) and hasattr(obj, "preprocess") and not hasattr(obj, "tokenizer")


def vision_processor(model: Any, given: Any = None) -> Any:
    """The image processor of a vision encoder passed as an object: ``given`` (an image processor, or a processor
    that holds one, passed as ``tokenizer=``), else ``AutoImageProcessor`` from the model's ``name_or_path`` (its
    folder or hub id, as ``headmap scan DIR`` reads the folder's); OptionError saying what to pass when neither
    is found."""
    held = getattr(given, "image_processor", None)
    for candidate in (held, given):
        if _is_image_processor(candidate):
            return candidate
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if name:
        from transformers import AutoImageProcessor

        try:
            found = AutoImageProcessor.from_pretrained(name)
        except Exception:  # noqa: BLE001  (no processor files, no hub: any of several errors)
            found = None
        if _is_image_processor(found):
            return found
    model_type = getattr(getattr(model, "config", None), "model_type", "?")
    reasons = [f"tokenizer= got a {type(given).__name__}, not an image processor"] if given is not None else []
    reasons.append(f"none could be loaded from {name}" if name else "none was passed, and the model names no folder")
    raise OptionError(
        f"the model ({model_type}) is a vision encoder alone: it reads pictures prepared by its image processor, "
        f"and {', and '.join(reasons)}; pass it: headmap.scan(model, tokenizer=AutoImageProcessor.from_pretrained(...))"
    )


def max_length(max_length: int | None, loaded: LoadedModel) -> int:
    """``max_length``, or the default (512, less when the model has fewer positions); checked."""
    if max_length is None:
        max_length = min(DEFAULT_MAX_LENGTH, loaded.max_length or DEFAULT_MAX_LENGTH)
    limit = loaded.max_length
    if max_length < 2:
        raise OptionError(f"--max-length must be at least 2 tokens (got {max_length})")
    if limit is not None and max_length > limit:
        raise OptionError(
            f"--max-length {max_length} exceeds the model's limit of {limit} positions; use at most {limit}"
        )
    return max_length


def model_kind(probes: Sequence[Probe], loaded: LoadedModel) -> None:
    """Refuse probes that need a causal model (``needs.causal``) on an encoder or an encoder-decoder."""
    from .seq2seq import is_seq2seq

    seq2seq = is_seq2seq(loaded)
    if loaded.is_causal and not seq2seq:
        return
    bad = [p.name for p in probes if p.needs.causal]
    if bad:
        kind = "an encoder-decoder (its decoder reads a target beside a source)" if seq2seq else "an encoder"
        raise ProbeError(
            f"probe(s) {', '.join(bad)} need a causal (decoder) model, and "
            f"{loaded.model.config.model_type} is {kind}; drop them from --probes"
        )
