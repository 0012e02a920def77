"""Steering: run a model with attention edits on.

    with headmap.steer(model, edits=["ablate:heads=[[18,6]]"]):
        model.generate(...)

A steering session is an engine session with edits and no probes, so it composes with
:func:`headmap.observe`: an atlas measured inside ``steer`` measures the edited attention.

:func:`compare` (what ``headmap steer`` prints) generates greedily without and with edits, from a text
prompt or, for a vision-language model, from a prompt with pictures; :func:`compare_corpus` does so for
each input of an image corpus. Pictures are prepared by the model's own processor exactly as the image
corpora of a scan are (:func:`headmap.corpus.prepare_images`); see docs/multimodal.md.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .edits import Edit, make_edits
from .engine.session import Session
from .specs import is_whole


def prepare(edits: Iterable[Edit], tokenizer: Any, prompt: str | None = None) -> None:
    """Let each edit resolve what needs the tokenizer (:meth:`Edit.prepare`): text spans found in
    ``prompt`` (a positional span checked to fit it), text-file references of mean ablation tokenised."""
    for edit in edits:
        edit.prepare(tokenizer, prompt)


def steer(
    model: Any,
    edits: str | Edit | Iterable[str | Edit],
    atlas: Any = None,
    tokenizer: Any = None,
    prompt: str | None = None,
) -> Session:
    """A context manager that runs ``model`` with ``edits`` (Edit objects or specs) applied.

    ``atlas`` (an Atlas or a run folder of ``headmap scan``) resolves heads rules such as
    ``"top 5% retrieval"``. With ``tokenizer`` (and ``prompt``), text spans are found in the prompt and
    text-file references of mean ablation are tokenised. Edits are checked against the model (their
    layers and heads must exist) when the ``with`` block starts: :class:`~headmap.errors.EditError`.
    An attention output that turns NaN or infinite under the edits raises
    :class:`~headmap.errors.NumericalError` naming the edits, the layer and the head.
    """
    objs = make_edits(edits, atlas=atlas)
    if tokenizer is not None:
        prepare(objs, tokenizer, prompt)
    return Session(model, edits=objs, check_finite=True)


@dataclass
class Comparison:
    """Greedy generations of one prompt without and with edits (what ``headmap steer`` prints).

    For a vision-language model's image input, ``images`` names the pictures (the ``--image`` paths) and
    ``item`` the corpus input they came from (``"shapes input 3"``, ``"images.jsonl line 2"``); ``prompt`` is
    the text the model's processor put after the images in its chat template."""

    model_id: str
    prompt: str
    edits: list[str]  # each edit described, heads resolved
    without: str
    steered: str
    without_ids: list[int] = field(default_factory=list)
    steered_ids: list[int] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    item: str | None = None
    answer: str | None = None  # the corpus's known answer (shapes), where it has one

    @property
    def identical(self) -> bool:
        return self.without_ids == self.steered_ids


#: The length an input may have when the model's config gives no limit of positions.
NO_LIMIT = 1_000_000_000


def needs_image(edit: Edit) -> bool:
    """Whether ``edit`` acts on an input's image tokens only (``pai``, ``var``, ``scale_span:span=image``, ...):
    the edits that say they act on attention to positions of the language model (``allowed_towers``)."""
    return edit.allowed_towers() == ("text",)


def _check_options(max_new_tokens: Any) -> None:
    from .errors import OptionError

    if not is_whole(max_new_tokens) or max_new_tokens < 1:
        raise OptionError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")


def _image_paths(images: Any) -> list[Any]:
    """``images`` as a list (paths or PIL images); a path that is missing or no file is refused here, before
    the model loads."""
    from .errors import CorpusError, OptionError

    items = [images] if isinstance(images, (str, Path)) or hasattr(images, "convert") else list(images)
    if not items:
        raise OptionError("--image names no picture; give --image PATH (repeat it for several pictures)")
    for item in items:
        if isinstance(item, (str, Path)):
            path = Path(item).expanduser()
            if not path.exists():
                raise CorpusError(f"--image {item}: the file does not exist; give the path of a PNG or JPEG picture")
            if not path.is_file():
                raise CorpusError(f"--image {item} is not a file; give the path of a PNG or JPEG picture")
        elif not hasattr(item, "convert"):
            raise OptionError(f"images must be file paths or PIL images, got {type(item).__name__}")
    return items


def _load(model: Any, tokenizer: Any, dtype: str, device: str, placement: dict[str, Any]) -> Any:
    """The causal model to steer (loaded, or wrapped with its tokenizer; a VLM's processor may be given as
    ``tokenizer``), refused when it cannot generate or has no tokenizer."""
    from .errors import ModelError
    from .models import is_causal_lm, load_model, wrap_model

    if isinstance(model, str) or model is None:
        loaded = load_model(model, dtype=dtype, device=device, **placement)
    else:
        processor = None
        if getattr(tokenizer, "image_processor", None) is not None and getattr(tokenizer, "tokenizer", None):
            processor, tokenizer = tokenizer, tokenizer.tokenizer  # a VLM's processor given as its tokenizer
        loaded = wrap_model(model, tokenizer)
        if processor is not None:
            loaded.extra["processor"] = processor
    if loaded.tokenizer is None:
        raise ModelError("steering a prompt needs the model's tokenizer: pass tokenizer=")
    net = loaded.model
    if not is_causal_lm(net.config) or not hasattr(net, "generate"):
        raise ModelError(
            f"{loaded.model_id} is not a causal language model (model type {net.config.model_type}); "
            "headmap steer compares generations, use headmap.steer in Python for other models"
        )
    return loaded


def _processor(loaded: Any) -> Any:
    """The model's processor with an image processor (the one image corpora of a scan use); CorpusError
    saying the model has none."""
    from .errors import CorpusError
    from .scan.images import processor_for

    try:
        return processor_for(loaded)
    except CorpusError:
        model_type = getattr(loaded.model.config, "model_type", "?")
        given = "pass its processor as tokenizer=, " if loaded.source == "object" else ""
        raise CorpusError(
            f"model {loaded.model_id} ({model_type}) has no image processor, so it cannot read --image or an image "
            f"--corpus (it reads text only, or its folder lacks the processor files); {given}steer it with --prompt "
            "alone, or use a vision-language model"
        ) from None


def _check_spans(objs: list[Edit], ids: list[int], where: str) -> None:
    """Spans of edits on a processor's input (image tokens included): ``span=image`` or token positions that
    fit it; a span of prompt text is refused (its tokens sit after the chat template and the image tokens).
    Read from the edits' ``span=`` parameter (docs/steering.md, "Spans"), whatever their class."""
    from .errors import EditError

    for edit in objs:
        span = getattr(edit, "span", None)
        if span is None or getattr(edit, "is_image_span", False):
            continue
        if isinstance(span, str):
            raise EditError(
                f"{edit.label}: span {span!r} is text, which headmap steer locates in a text prompt only; on "
                "an image input give span=image or [start, end] token positions of the processor's input"
            )
        if isinstance(span, tuple) and len(span) == 2 and span[1] > len(ids):
            raise EditError(
                f"{edit.label}: span [{span[0]}, {span[1]}] is outside {where}, which has {len(ids)} "
                "tokens with its image tokens"
            )


def _generate_both(net: Any, tok: Any, objs: list[Edit], inputs: dict[str, Any], max_new_tokens: int):
    """Greedy token ids of ``inputs`` without and with ``objs`` (both under the engine)."""
    import torch

    from .engine.session import observe
    from .models import pad_id

    settings = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": pad_id(tok, net)}
    width = inputs["input_ids"].shape[1]

    def generate() -> list[int]:
        with torch.no_grad():
            out = net.generate(**inputs, **settings)
        return out[0, width:].tolist()

    with observe(net, check_finite=True):
        plain = generate()
    with Session(net, edits=objs, check_finite=True):  # NaN from an edit: an error naming it, not empty text
        steered = generate()
    return plain, steered


def _image_inputs(sample: Any, device: Any) -> dict[str, Any]:
    """The model's inputs of one prepared image sample: its ids, a mask of ones and the processor's tensors."""
    import torch

    from .corpus.images import collate

    ids = torch.tensor([sample.ids])
    enc: dict[str, Any] = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
    enc.update(collate([sample], len(sample.ids), True, device))
    return enc


def _compare_images(loaded: Any, objs: list[Edit], corpus: Any, max_new_tokens: int) -> list[Comparison]:
    """Each input of the image ``corpus`` prepared by the model's processor (:func:`prepare_images`), then
    generated without and with ``objs``; every input is prepared and checked before anything is generated."""
    from .corpus.images import has_images, prepare_images
    from .errors import CorpusError
    from .models import input_device

    if not has_images(corpus):
        raise CorpusError(
            f"corpus '{corpus.name}' holds no images; --corpus takes an image corpus (shapes, or a JSONL file of "
            '{"image": ..., "text": ...} lines), and a text prompt goes with --prompt'
        )
    proc = _processor(loaded)
    net = loaded.model
    tok = loaded.tokenizer
    ready = prepare_images(corpus, proc, loaded.max_length or NO_LIMIT, net)
    for index, sample in enumerate(ready.samples):
        _check_spans(objs, sample.ids, f"input {index}")
    prepare(objs, tok, None)  # what needs no prompt (mean-ablation references)
    for edit in objs:
        edit.bind(net)  # heads exist, rules resolved, means fitted: before anything is generated
    dev = input_device(net)
    results = []
    for index, sample in enumerate(ready.samples):
        plain, steered = _generate_both(net, tok, objs, _image_inputs(sample, dev), max_new_tokens)
        info = sample.info
        results.append(
            Comparison(
                model_id=loaded.model_id,
                prompt=info["text"],
                edits=[e.describe() for e in objs],
                without=tok.decode(plain, skip_special_tokens=True),
                steered=tok.decode(steered, skip_special_tokens=True),
                without_ids=plain,
                steered_ids=steered,
                images=[str(p) for p in info.get("image_paths", [])],
                item=_item_name(corpus, index, info),
                answer=info.get("answer") if isinstance(info.get("answer"), str) else None,
            )
        )
    return results


def _item_name(corpus: Any, index: int, info: dict[str, Any]) -> str | None:
    """The corpus input ``index`` by name (``shapes input 0``, ``images.jsonl line 2``); None for --image."""
    kind = corpus.description.get("kind")
    if kind == "images":
        return None
    name = corpus.description.get("name", corpus.name)
    if kind == "file" and "line" in info:
        return f"{name} line {info['line']}"
    return f"{name} input {index}"


def _no_image(objs: list[Edit], net: Any, ids: list[int]) -> None:
    """Refuse an edit that acts on image tokens only (:func:`needs_image`) on a prompt that has none."""
    from .edits.span import config_image_token_id
    from .errors import EditError

    token = config_image_token_id(net)
    for edit in objs:
        if needs_image(edit) and token not in ids:
            raise EditError(
                f"{edit.label}: it acts on the image tokens, but input 0 has no image token (id {token}) in its ids; "
                "give an input with an image (--image PATH with --prompt, or an image --corpus)"
            )


def compare(
    model: Any,
    edits: str | Edit | Iterable[str | Edit],
    prompt: str,
    max_new_tokens: int = 30,
    atlas: Any = None,
    tokenizer: Any = None,
    dtype: str = "float32",
    device: str = "cpu",
    device_map: str | dict[str, Any] | None = None,
    max_memory: str | dict[Any, Any] | None = None,
    offload_folder: str | Path | None = None,
    images: Any = None,
) -> Comparison:
    """Generate greedily from ``prompt`` without and with ``edits``; both runs use the headmap engine.

    ``model`` is a model object (then pass its ``tokenizer``, or a vision-language model's processor) or
    anything :func:`headmap.load_model` loads. ``images`` (a path, a PIL image, or a list of them): pictures
    for a vision-language model, read with Pillow and put before ``prompt`` by the model's own processor
    with its chat template, as the image corpora of a scan are (:func:`headmap.corpus.prepare_images`).
    Every input is checked before anything is generated: the options, the images (files Pillow reads), the
    edit specs, the atlas, the model (a causal language model; with ``images``, one with an image
    processor), the spans (found in the prompt) and the heads (they must exist in the model); an edit of
    image tokens only (``pai``, ``var``, ``span=image``) on a prompt without an image is refused.
    ``device_map``, ``max_memory``, ``offload_folder``: model parallel placement of a model headmap loads
    (:func:`headmap.load_model`); a model object keeps its own placement.
    """
    from .corpus import Corpus, Sample
    from .corpus.images import open_image
    from .errors import OptionError
    from .models import input_device

    if not isinstance(prompt, str) or not prompt.strip():
        raise OptionError("--prompt is empty; give the text to continue")
    _check_options(max_new_tokens)
    pictures = None
    if images is not None:
        items = _image_paths(images)
        names = [str(p) if isinstance(p, (str, Path)) else f"image {i}" for i, p in enumerate(items)]
        pictures = [
            open_image(Path(p).expanduser(), f"--image {p}") if isinstance(p, (str, Path)) else p.convert("RGB")
            for p in items
        ]
    objs = make_edits(edits, atlas=atlas)
    placed = {"device_map": device_map, "max_memory": max_memory, "offload_folder": offload_folder}
    loaded = _load(model, tokenizer, dtype, device, placed)
    if pictures is not None:
        one = Sample([], {"image": pictures, "text": prompt, "image_paths": names})
        corpus = Corpus("--image", [one], {"name": "--image", "kind": "images"})
        return _compare_images(loaded, objs, corpus, max_new_tokens)[0]
    net, tok = loaded.model, loaded.tokenizer
    prepare(objs, tok, prompt)
    for edit in objs:
        edit.bind(net)  # heads exist, rules resolved, means fitted: before anything is generated
    dev = input_device(net)  # a device-mapped model takes its inputs where its first module is
    enc = tok(prompt, return_tensors="pt")
    enc = {k: v.to(dev) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    _no_image(objs, net, enc["input_ids"][0].tolist())
    plain, steered = _generate_both(net, tok, objs, enc, max_new_tokens)
    return Comparison(
        model_id=loaded.model_id,
        prompt=prompt,
        edits=[e.describe() for e in objs],
        without=tok.decode(plain, skip_special_tokens=True),
        steered=tok.decode(steered, skip_special_tokens=True),
        without_ids=plain,
        steered_ids=steered,
    )


def compare_corpus(
    model: Any,
    edits: str | Edit | Iterable[str | Edit],
    corpus: Any,
    limit: int | None = None,
    max_new_tokens: int = 30,
    atlas: Any = None,
    tokenizer: Any = None,
    dtype: str = "float32",
    device: str = "cpu",
    device_map: str | dict[str, Any] | None = None,
    max_memory: str | dict[Any, Any] | None = None,
    offload_folder: str | Path | None = None,
    seed: int = 0,
) -> list[Comparison]:
    """:func:`compare` on each input of an image corpus: ``shapes[:...]``, a JSONL file of
    ``{"image": ..., "text": ...}`` lines, or a :class:`~headmap.corpus.Corpus` whose samples carry
    ``info["image"]`` and ``info["text"]``; the first ``limit`` inputs. Each input's pictures and text are
    prepared by the model's processor exactly as for a scan (:func:`headmap.corpus.prepare_images`), and all
    of them are prepared and checked before anything is generated. One :class:`Comparison` per input, its
    ``item`` naming it (``"shapes input 0"``, ``"images.jsonl line 2"``)."""
    from .corpus import load_corpus
    from .errors import OptionError

    _check_options(max_new_tokens)
    if limit is not None and (not is_whole(limit) or limit < 1):
        raise OptionError(f"--limit must be at least 1, got {limit}")
    objs = make_edits(edits, atlas=atlas)
    placed = {"device_map": device_map, "max_memory": max_memory, "offload_folder": offload_folder}
    loaded = _load(model, tokenizer, dtype, device, placed)
    _processor(loaded)  # a model without an image processor is refused before the corpus is read
    if hasattr(corpus, "samples"):
        data = corpus if limit is None else type(corpus)(corpus.name, list(corpus.samples)[:limit], corpus.description)
    else:
        data = load_corpus(corpus, loaded.tokenizer, loaded.max_length or NO_LIMIT, limit=limit, seed=seed)
    return _compare_images(loaded, objs, data, max_new_tokens)
