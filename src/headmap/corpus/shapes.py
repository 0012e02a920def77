"""Built-in image corpus ``shapes``: coloured squares, circles and triangles on plain backgrounds, made by
code (Pillow, seeded, offline), each with a question whose answer is known (colour, count or position).

An image is a grid of 2 x 2 cells (top left, top right, bottom left, bottom right) on one plain
background colour; 1 to 4 cells hold a shape (square, circle or triangle) in one of four colours, drawn
inside its cell with a margin, so shapes never overlap. Questions cycle through three kinds:

- ``colour``: "What colour is the circle?" about a shape kind that occurs exactly once;
- ``count``: "How many triangles are there?" (the answer may be zero);
- ``position``: "Where is the red square?" about a (colour, shape) that occurs exactly once; the
  answer is the cell's name.

Each sample's ``info`` holds ``image`` (a PIL RGB image), ``question``, ``answer``, ``kind``, ``text``
(the prompt) and ``objects`` (colour, shape, cell, and the pixel box of each shape). ``ids`` are the
tokens of ``text`` alone: a model's processor puts the image tokens in (docs/multimodal.md).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from ..errors import CorpusError
from .registry import Built, register_corpus
from .tokens import encode
from .types import Sample

SHAPES_INPUTS = 12
SHAPES_SIZE = 64

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 200, 20),
}
BACKGROUNDS: tuple[tuple[int, int, int], ...] = ((255, 255, 255), (200, 200, 200), (20, 20, 20))
KINDS = ("square", "circle", "triangle")
CELLS = ("top left", "top right", "bottom left", "bottom right")
QUESTIONS = ("colour", "count", "position")
PLURAL = {"square": "squares", "circle": "circles", "triangle": "triangles"}
NUMBERS = ("zero", "one", "two", "three", "four")


@dataclass(frozen=True)
class Shape:
    colour: str
    kind: str
    cell: str
    box: tuple[int, int, int, int]  # left, top, right, bottom (pixels, inclusive)

    def as_dict(self) -> dict[str, Any]:
        return {"colour": self.colour, "shape": self.kind, "cell": self.cell, "box": list(self.box)}


def cell_box(cell: str, size: int) -> tuple[int, int, int, int]:
    """The pixel box a shape of ``cell`` is drawn in: the cell less a margin of an eighth of it."""
    half = size // 2
    col, row = CELLS.index(cell) % 2, CELLS.index(cell) // 2
    margin = max(1, half // 8)
    left, top = col * half + margin, row * half + margin
    return left, top, left + half - 2 * margin - 1, top + half - 2 * margin - 1


def draw(objects: list[Shape], size: int, background: tuple[int, int, int]):
    """The RGB picture of ``objects`` on ``background``."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), background)
    pen = ImageDraw.Draw(image)
    for shape in objects:
        fill = COLOURS[shape.colour]
        left, top, right, bottom = shape.box
        if shape.kind == "square":
            pen.rectangle(shape.box, fill=fill)
        elif shape.kind == "circle":
            pen.ellipse(shape.box, fill=fill)
        else:
            pen.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=fill)
    return image


def make_item(rng: random.Random, kind: str, size: int) -> dict[str, Any]:
    """One picture with a question of ``kind`` whose answer the drawn objects determine."""
    while True:
        cells = rng.sample(CELLS, rng.randint(1, 4))
        objects = [
            Shape(rng.choice(list(COLOURS)), rng.choice(KINDS), cell, cell_box(cell, size))
            for cell in sorted(cells, key=CELLS.index)
        ]
        kinds = [o.kind for o in objects]
        if kind == "count":
            target = rng.choice(KINDS)
            question = f"How many {PLURAL[target]} are there?"
            answer = NUMBERS[kinds.count(target)]
            break
        if kind == "colour":
            once = [k for k in KINDS if kinds.count(k) == 1]
            if not once:
                continue
            target = rng.choice(once)
            question = f"What colour is the {target}?"
            answer = next(o.colour for o in objects if o.kind == target)
            break
        pairs = [(o.colour, o.kind) for o in objects]
        unique = [o for o in objects if pairs.count((o.colour, o.kind)) == 1]
        if not unique:
            continue
        chosen = rng.choice(unique)
        question = f"Where is the {chosen.colour} {chosen.kind}?"
        answer = chosen.cell
        break
    background = rng.choice(BACKGROUNDS)
    return {
        "image": draw(objects, size, background),
        "question": question,
        "answer": answer,
        "kind": kind,
        "background": list(background),
        "objects": [o.as_dict() for o in objects],
        "text": f"Question: {question} Answer in a few words.",
    }


def shapes_items(limit: int = SHAPES_INPUTS, seed: int = 0, size: int = SHAPES_SIZE) -> list[dict[str, Any]]:
    """``limit`` pictures with questions (kinds in turn: colour, count, position), the same for the same seed."""
    if size < 16:
        raise CorpusError(f"shapes: size {size} is too small to draw shapes; use size >= 16")
    rng = random.Random(f"headmap-shapes-{seed}")
    return [make_item(rng, QUESTIONS[i % len(QUESTIONS)], size) for i in range(limit)]


@register_corpus("shapes", {"size": ("int", "side of each square picture in pixels; default 64")})
def build_shapes(tokenizer: Any, *, max_length: int, limit: int | None, seed: int, vocab_size: int | None, options):
    size = options.get("size", SHAPES_SIZE)
    items = shapes_items(limit or SHAPES_INPUTS, seed, size)
    samples = []
    for item in items:
        ids = encode(tokenizer, item["text"])
        if len(ids) > max_length:
            raise CorpusError(
                f"corpus 'shapes' needs {len(ids)} text tokens per question but --max-length is {max_length}; "
                f"use --max-length >= {len(ids)} (the image tokens come on top, from the model's processor)"
            )
        samples.append(Sample(ids, item))
    return Built(samples, {"size": size}, {"seed": seed, "source": "drawn by headmap.corpus.shapes (Pillow)"})
