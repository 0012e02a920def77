"""Image inputs: reading pictures named by a JSONL corpus, and preparing image corpora with the model's processor.

A corpus holds images when its samples carry ``info["image"]`` (one PIL image or a list of them) and
``info["text"]`` (the prompt): the built-in ``shapes`` corpus, or a JSONL file whose lines read
``{"image": "file.png" | ["a.png", "b.png"], "text": "..."}`` (paths relative to the JSONL file).
Pictures are opened with Pillow while the corpus is read, so that a missing file or one that is not
an image stops the scan before its first forward pass.

:func:`prepare_images` turns such a corpus into the model's inputs with the model's own processor
(``AutoProcessor``): the prompt goes through the processor's chat template where it has one (a user turn
with the images, then the text, and the generation prompt), else the processor's image token is put
before the text once per image. Every prepared sample keeps:

- ``ids``: the processor's token ids, image tokens included;
- ``info["model_inputs"]``: the other tensors the processor made for it (``pixel_values``,
  ``image_grid_thw``, ``token_type_ids``, ...), which a scan's batch hands to the model
  (:func:`collate`);
- ``info["spans"]``: ``prompt`` (the tokens before the first image token), ``image`` (from the first
  image token to the last) and ``text`` (the tokens after the last), each ``[start, end)``; a span
  that holds no token is left out;
- ``info["image_runs"]``: per image, ``[start, end)`` of its image tokens, and ``info["image_grid"]``:
  per image, the (rows, columns) its tokens form over the picture (from ``image_grid_thw`` and the merge
  size where the processor gives them, else the factorisation of the token count closest to the
  picture's aspect ratio).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import CorpusError
from .types import Corpus, Sample

IMAGE_SPANS = ("prompt", "image", "text")


def has_images(samples: Any) -> bool:
    """Whether the inputs carry images (the first sample's ``info`` has ``image``)."""
    items = getattr(samples, "samples", samples)
    try:
        first = items[0]
    except (IndexError, TypeError):
        return False
    return "image" in (getattr(first, "info", None) or {})


def images_of(info: dict[str, Any]) -> list[Any]:
    """The PIL images of a sample's ``info`` (one image or a list)."""
    value = info.get("image")
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def open_image(path: Path, where: str) -> Any:
    """The RGB picture at ``path``; CorpusError naming ``where`` when it is missing or not an image."""
    from PIL import Image, UnidentifiedImageError

    if not path.exists():
        raise CorpusError(f"{where}: image file {path} does not exist; image paths are relative to the JSONL file")
    if not path.is_file():
        raise CorpusError(f"{where}: image {path} is not a file")
    try:
        with Image.open(path) as picture:
            picture.load()
            return picture.convert("RGB")
    except Image.DecompressionBombError as exc:
        raise CorpusError(f"{where}: image {path} is too large to read safely ({exc}); use a smaller picture") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise CorpusError(f"{where}: {path} is not an image Pillow can read ({exc}); name a PNG or JPEG file") from None


def read_images(value: Any, folder: Path, where: str) -> list[Any]:
    """The pictures a JSONL line's ``"image"`` names (a path or a list of paths, relative to ``folder``)."""
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise CorpusError(f'{where}: "image" must be a file name or a non-empty list of file names (got {value!r})')
    return [open_image((folder / Path(n).expanduser()), where) for n in names]


# -- the model's processor ---------------------------------------------------------------------------


def image_token_id(processor: Any, model: Any = None) -> int | None:
    """The id of the processor's image placeholder token (else the model config's), or None."""
    for owner in (processor, getattr(model, "config", None)):
        for name in ("image_token_id", "image_token_index"):
            value = getattr(owner, name, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    token = getattr(processor, "image_token", None)
    tok = getattr(processor, "tokenizer", None)
    if isinstance(token, str) and tok is not None:
        value = tok.convert_tokens_to_ids(token)
        if isinstance(value, int) and value != getattr(tok, "unk_token_id", None):
            return value
    return None


def prompt_for(processor: Any, text: str, images: int) -> str:
    """The prompt the processor reads: the chat template's user turn (images, then text) where the
    processor has a template, else the image token once per image before the text."""
    if getattr(processor, "chat_template", None):
        content = [{"type": "image"} for _ in range(images)] + [{"type": "text", "text": text}]
        chat = [{"role": "user", "content": content}]
        return processor.apply_chat_template(chat, add_generation_prompt=True)
    token = getattr(processor, "image_token", None) or ""
    return token * images + text


def _grid(count: int, picture: Any) -> tuple[int, int]:
    """(rows, columns) with rows * columns == count, the aspect closest to the picture's."""
    width, height = getattr(picture, "size", (1, 1))
    aspect = height / max(width, 1)
    best = (1, count)
    for rows in range(1, count + 1):
        if count % rows == 0:
            cols = count // rows
            if abs(math.log(rows / cols / aspect)) < abs(math.log(best[0] / best[1] / aspect)):
                best = (rows, cols)
    return best


def _runs(ids: list[int], token: int) -> list[list[int]]:
    runs: list[list[int]] = []
    for i, t in enumerate(ids):
        if t != token:
            continue
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return runs


def layout(ids: list[int], token: int, pictures: list[Any], grid_thw: torch.Tensor | None, merge: int) -> dict:
    """``spans``, ``image_runs`` and ``image_grid`` of one prepared input (see the module's doc)."""
    where = [i for i, t in enumerate(ids) if t == token]
    spans: dict[str, list[int]] = {}
    if where:
        first, last = where[0], where[-1] + 1
        for name, (a, b) in zip(IMAGE_SPANS, ((0, first), (first, last), (last, len(ids))), strict=True):
            if b > a:
                spans[name] = [a, b]
    runs = _runs(ids, token)
    n = len(pictures)
    if grid_thw is not None and len(grid_thw) == n:
        grids = [(int(h) // merge, int(w) // merge) for _, h, w in grid_thw.tolist()]
    elif n and len(where) % n == 0:
        grids = [_grid(len(where) // n, p) for p in pictures]
    else:
        grids = []
    if len(runs) != n and grids and sum(r * c for r, c in grids) == len(where):
        # images side by side (no token between them): cut the one run per image
        runs, at = [], 0
        for r, c in grids:
            runs.append([where[at], where[at + r * c - 1] + 1])
            at += r * c
    return {"spans": spans, "image_runs": runs, "image_grid": [list(g) for g in grids]}


def prepare_images(
    corpus: Corpus, processor: Any, max_length: int, model: Any = None, name: str | None = None
) -> Corpus:
    """The corpus as the model's inputs, prepared by ``processor`` (see the module's doc).

    CorpusError when an input with its image tokens is longer than ``max_length`` (an image's tokens
    cannot be cut) or the processor fails on an input.
    """
    token = image_token_id(processor, model)
    if token is None:
        raise CorpusError(
            "the model's processor names no image token (image_token_id); headmap cannot find the image in its inputs"
        )
    merge = int(getattr(getattr(processor, "image_processor", None), "merge_size", 1) or 1)
    samples: list[Sample] = []
    for index, sample in enumerate(corpus.samples):
        info = dict(sample.info or {})
        pictures = images_of(info)
        text = info.get("text")
        if not isinstance(text, str) or not pictures:
            raise CorpusError(f"input {index} of corpus '{corpus.name}' has no image or no text; every line needs both")
        try:
            prompt = prompt_for(processor, text, len(pictures))
            made = processor(text=[prompt], images=pictures, return_tensors="pt")
        except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as exc:
            raise CorpusError(
                f"input {index} of corpus '{corpus.name}': the model's processor cannot prepare it ({exc})"
            ) from None
        ids = made["input_ids"][0].tolist()
        if len(ids) > max_length:
            raise CorpusError(
                f"input {index} of corpus '{corpus.name}' has {len(ids)} tokens with its image(s) but --max-length is "
                f"{max_length}; an image's tokens cannot be cut: use --max-length >= {len(ids)}"
            )
        if token not in ids:
            raise CorpusError(
                f"input {index} of corpus '{corpus.name}': the processor put no image token ({token}) in the input"
            )
        extra = {
            k: v for k, v in made.items() if k not in ("input_ids", "attention_mask") and isinstance(v, torch.Tensor)
        }
        info.update(layout(ids, token, pictures, extra.get("image_grid_thw"), merge))
        info["model_inputs"] = extra
        samples.append(Sample(ids, info))
    desc = dict(corpus.description)
    desc.update({"tokens": sum(len(s.ids) for s in samples), "processor": type(processor).__name__})
    return Corpus(name or corpus.name, samples, desc)


def prepare_pixels(corpus: Corpus, image_processor: Any, model: Any, name: str | None = None) -> Corpus:
    """The image corpus as the inputs of a vision encoder alone (ViT, CLIP or SigLIP vision): each sample's
    one picture prepared by ``image_processor`` into ``info["model_inputs"]["pixel_values"]``; its text is
    not read. ``ids`` stand for the encoder's tokens (the patches, and the class token where the model has
    one), so that a batch's width and the corpus's token count are the encoder's."""
    config = getattr(model, "config", None)
    patch = getattr(config, "patch_size", None)
    embeddings = getattr(model, "embeddings", None) or getattr(getattr(model, "vision_model", None), "embeddings", None)
    cls = int(any(hasattr(embeddings, n) for n in ("cls_token", "class_embedding")))
    samples: list[Sample] = []
    for index, sample in enumerate(corpus.samples):
        info = dict(sample.info or {})
        pictures = images_of(info)
        if len(pictures) != 1:
            raise CorpusError(
                f"input {index} of corpus '{corpus.name}' has {len(pictures)} images; a vision encoder reads one "
                "image per input: give each JSONL line one image"
            )
        try:
            made = image_processor(images=pictures, return_tensors="pt")
        except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as exc:
            raise CorpusError(
                f"input {index} of corpus '{corpus.name}': the model's image processor cannot prepare it ({exc})"
            ) from None
        pixels = made["pixel_values"]
        height, width = pixels.shape[-2:]
        tokens = (height // patch) * (width // patch) + cls if isinstance(patch, int) and patch > 0 else 1
        info["model_inputs"] = {"pixel_values": pixels}
        samples.append(Sample([0] * tokens, info))
    desc = dict(corpus.description)
    desc.update({"tokens": sum(len(s.ids) for s in samples), "processor": type(image_processor).__name__})
    return Corpus(name or corpus.name, samples, desc)


def collate(samples: Sequence[Sample], width: int, left_pad: bool, device: Any) -> dict[str, torch.Tensor]:
    """The processor tensors of a batch's inputs, for the model: per-token tensors ([1, T]) padded with 0
    like the ids to ``width``, every other tensor concatenated along its first axis."""
    extras = [s.info.get("model_inputs") for s in samples]
    if not extras or any(e is None for e in extras):
        return {}
    out: dict[str, torch.Tensor] = {}
    for key in extras[0]:
        parts = [e[key] for e in extras]
        per_token = all(
            p.dim() >= 2 and p.shape[0] == 1 and p.shape[1] == len(s.ids) for p, s in zip(parts, samples, strict=True)
        )
        if per_token:
            rows = []
            for p, s in zip(parts, samples, strict=True):
                pad = torch.zeros((1, width - len(s.ids), *p.shape[2:]), dtype=p.dtype)
                rows.append(torch.cat([pad, p] if left_pad else [p, pad], dim=1))
            out[key] = torch.cat(rows, dim=0).to(device)
            continue
        if any(p.shape[1:] != parts[0].shape[1:] for p in parts):
            raise CorpusError(
                f"the inputs of one batch give '{key}' of different shapes ({[tuple(p.shape) for p in parts]}); "
                "use --batch-size 1 or the same number of images per input"
            )
        out[key] = torch.cat(parts, dim=0).to(device)
    return out
