"""What a scan of image inputs needs: the model's processor, the prepared corpus, and probes that key by tower.

An image corpus (``shapes``, or a JSONL file with ``"image"``) is prepared by the model's own processor
(:func:`headmap.corpus.images.prepare_images`): the processor given with the model
(``scan(model, tokenizer=processor)``), else ``AutoProcessor`` from the model's folder or hub id. A
model without an image processor is refused by name before anything runs.

Image inputs run the model's vision tower as well as its language model, and a vision tower numbers its
layers from 0 like the text model (docs/multimodal.md): only probes that key what they keep by tower
(``Probe.tower_aware``) may read them.

A vision encoder alone (ViT, CLIP or SigLIP vision: ``main_input_name == "pixel_values"``) reads an image
corpus as ``pixel_values`` only, prepared by its image processor (``AutoProcessor`` from its folder gives
one); the corpus's text is not read, and a corpus without images is refused by name.
"""

from __future__ import annotations

from typing import Any

from ..corpus import Corpus
from ..corpus.images import has_images, prepare_images, prepare_pixels
from ..errors import CorpusError
from ..models import LoadedModel


def is_processor(obj: Any) -> bool:
    """Whether ``obj`` is a multimodal processor (it holds an image processor and a tokenizer)."""
    return getattr(obj, "image_processor", None) is not None and getattr(obj, "tokenizer", None) is not None


def vision_only(loaded: LoadedModel | Any) -> bool:
    """Whether the model is a vision encoder alone: it reads ``pixel_values`` and no text (ViT, CLIP vision)."""
    model = getattr(loaded, "model", loaded)
    encdec = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
    return getattr(model, "main_input_name", None) == "pixel_values" and not encdec


def _image_processor(obj: Any) -> bool:
    """Whether ``obj`` is an image processor (of a vision encoder alone)."""
    return obj is not None and callable(obj) and hasattr(obj, "preprocess") and not hasattr(obj, "tokenizer")


def processor_for(loaded: LoadedModel) -> Any:
    """The model's processor with an image processor; CorpusError when the model has none."""
    proc = loaded.extra.get("processor")
    if proc is None:
        where = loaded.path if loaded.source in ("folder", "builtin") else loaded.model_id
        if loaded.source in ("folder", "builtin", "hub") and where:
            from transformers import AutoProcessor

            kw = {"revision": loaded.revision} if loaded.revision else {}
            try:
                proc = AutoProcessor.from_pretrained(where, **kw)
            except Exception:  # noqa: BLE001  (no processor files: any of several errors)
                proc = None
    if vision_only(loaded) and _image_processor(getattr(proc, "image_processor", proc)):
        return getattr(proc, "image_processor", proc)
    if proc is None or not is_processor(proc):
        model_type = getattr(getattr(loaded.model, "config", None), "model_type", "?")
        raise CorpusError(
            f"model {loaded.model_id} ({model_type}) has no image processor, so it cannot read an image corpus "
            "(it reads text only, or its folder lacks the processor files); scan it on a text corpus, or use a "
            "vision-language model"
        )
    return proc


def prepare(corpus: Corpus, loaded: LoadedModel, max_length: int) -> Corpus:
    """``corpus`` as the model's inputs when it holds images (else as it is; a vision encoder refuses it)."""
    if vision_only(loaded):
        model_type = getattr(loaded.model.config, "model_type", "?")
        if not has_images(corpus):
            raise CorpusError(
                f"model {loaded.model_id} ({model_type}) is a vision encoder: it reads images only, and corpus "
                f"'{corpus.name}' holds none; use --corpus shapes or a JSONL file of "
                '{"image": "picture.png", "text": "..."} lines (the text is not read)'
            )
        return prepare_pixels(corpus, processor_for(loaded), loaded.model)
    if not has_images(corpus):
        return corpus
    return prepare_images(corpus, processor_for(loaded), max_length, loaded.model)


def tower_blind(probe: Any, data: Corpus) -> str | None:
    """Why ``probe`` cannot read the image inputs ``data`` (None when it can)."""
    if not has_images(data):
        return None
    if probe.needs.corpus in ("repeats", "needle", "items", "spans"):
        return (
            "its positions index the text tokens of its corpus, and image inputs run the vision tower too, whose "
            "layers are numbered like the text model's (docs/multimodal.md)"
        )
    if probe.tower_aware:  # declared on the Probe base class (probes/base.py)
        return None
    return (
        "it keeps its sums by layer alone, and image inputs run the vision tower too, whose layers are numbered "
        "like the text model's (docs/multimodal.md)"
    )
