"""Scenes and questions of the offline demo's synthetic visual-instruction world, deterministic by seed.

A *scene* is a small picture (48x48 px, a 3x3 grid of 16 px cells) holding 1-4 copies of one shape
in one colour and one size, each in its own cell with a little jitter. ``llavakit.demo.world`` writes
scenes and their questions to disk as a real LLaVA project.

Question types: colour, shape, position, count, yesno, two_image. Answers are one word or digit, so
scoring is exact match on normalised text. Training conversations also ask a few questions that are
not scored (object size; count and size of each image of a pair): they teach the parts that the
scored comparisons are built from.

Chance. Every question has a known option set (stored as ``options``) and the generator draws the
answer uniformly from it, so a guesser that sees the question but not the image is right with
probability 1/len(options); ``chance_by_type`` averages that over a type's rows. The held-out split
is moreover an exactly balanced design (``scene_grid``): every distinct question text appears equally
often with each of its answers. So *any* image-blind answerer (a function of the question text
alone, e.g. the model shown a blank image) scores exactly chance there, even the best one (each
question text answered with its most frequent answer).
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable

from PIL import Image, ImageDraw


IMAGE_SIZE = 48
GRID = 3  # cells per side
CELL = IMAGE_SIZE // GRID  # 16 px: with a patch-16 encoder each cell is exactly one patch

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 165, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 25),
    "purple": (145, 55, 190),
}
SHAPES = ("circle", "square", "triangle", "cross")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
SIZES = {"small": 9, "large": 14}  # object side in px (fits in a 16 px cell)
COUNTS = (1, 2, 3, 4)
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
COLUMN_WORDS = ("left", "center", "right")
ROW_WORDS = ("top", "middle", "bottom")

QUESTION_TYPES = ("colour", "shape", "position", "count", "yesno", "two_image")
TWO_IMAGE_PREFIX = "First image: <image>\nSecond image: <image>\n"


# --- scenes ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    size: str
    cells: tuple[tuple[int, int], ...]  # (row, col) of each object, sorted
    offsets: tuple[tuple[int, int], ...]  # (dx, dy) of each object inside its cell
    tint: tuple[int, int, int]  # per-image jitter added to the colour
    background: int  # grey level of the background

    @property
    def count(self) -> int:
        return len(self.cells)


def random_scene(rng: random.Random, shape: str | None = None, colour: str | None = None,
                 count: int | None = None, cell: tuple[int, int] | None = None, size: str | None = None) -> Scene:
    """A scene with the given attributes fixed and everything else drawn from ``rng``."""
    shape = shape or rng.choice(SHAPES)
    colour = colour or rng.choice(list(COLOURS))
    count = count or rng.choice(COUNTS)
    size = size or rng.choice(list(SIZES))
    all_cells = [(r, c) for r in range(GRID) for c in range(GRID)]
    cells = [cell] if cell is not None else rng.sample(all_cells, count)
    if len(cells) != count:
        raise ValueError("a fixed cell only makes sense for a one-object scene")
    room = CELL - SIZES[size]
    offsets = [(rng.randint(0, room), rng.randint(0, room)) for _ in cells]
    order = sorted(range(count), key=lambda i: cells[i])
    tint = tuple(rng.randint(-20, 20) for _ in range(3))
    return Scene(shape, colour, size, tuple(cells[i] for i in order), tuple(offsets[i] for i in order),
                 tint, rng.randint(225, 255))


def draw(scene: Scene) -> Image.Image:
    """Render a scene as a 48x48 RGB image."""
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (scene.background,) * 3)
    d = ImageDraw.Draw(img)
    fill = tuple(max(0, min(255, v + t)) for v, t in zip(COLOURS[scene.colour], scene.tint))
    s = SIZES[scene.size]
    for (row, col), (dx, dy) in zip(scene.cells, scene.offsets):
        draw_shape(d, scene.shape, col * CELL + dx, row * CELL + dy, s, fill)
    return img


def draw_shape(d: ImageDraw.ImageDraw, shape: str, x0: int, y0: int, s: int, fill: tuple[int, int, int]) -> None:
    """One shape of side `s` px with its top-left corner at (x0, y0) (also the high-resolution demo's big object)."""
    x1, y1 = x0 + s - 1, y0 + s - 1
    if shape == "circle":
        d.ellipse([x0, y0, x1, y1], fill=fill)
    elif shape == "square":
        d.rectangle([x0, y0, x1, y1], fill=fill)
    elif shape == "triangle":
        d.polygon([(x0 + (s - 1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:  # cross: a plus sign with arms one third of the size thick
        t0, t1 = x0 + s // 3, x0 + s - 1 - s // 3
        u0, u1 = y0 + s // 3, y0 + s - 1 - s // 3
        d.rectangle([t0, y0, t1, y1], fill=fill)
        d.rectangle([x0, u0, x1, u1], fill=fill)


def position_words(cell: tuple[int, int]) -> str:
    row, col = cell
    if (row, col) == (1, 1):
        return "in the center"
    return f"at the {ROW_WORDS[row]} {COLUMN_WORDS[col]}"


def caption(scene: Scene, rng: random.Random) -> str:
    """A one-sentence description: count, size, colour, shape, and where each object is."""
    noun = scene.shape if scene.count == 1 else PLURAL[scene.shape]
    what = f"{NUMBER_WORDS[scene.count]} {scene.size} {scene.colour} {noun}"
    where = [position_words(c) for c in scene.cells]
    what += " " + (where[0] if len(where) == 1 else ", ".join(where[:-1]) + " and " + where[-1])
    text = rng.choice(["{}.", "A picture of {}.", "There is {}." if scene.count == 1 else "There are {}."])
    text = text.format(what)
    return text[0].upper() + text[1:]


# --- questions -------------------------------------------------------------------------------------
# Each question is a pure function of its scene(s) and a *variant* (the part of the question text that
# is not decided by the scene). It returns (question text without image markers, answer, options).

def _colour_q(scene: Scene, variant=None):
    q = "What colour is the object?" if scene.count == 1 else "What colour are the objects?"
    return q, scene.colour, list(COLOURS)


def _shape_q(scene: Scene, variant=None):
    q = "What shape is the object?" if scene.count == 1 else "What shape are the objects?"
    return q, scene.shape, list(SHAPES)


def _position_q(scene: Scene, variant: str):  # variant: "h" (left/center/right) or "v" (top/middle/bottom)
    if scene.count != 1:
        raise ValueError("position questions need a one-object scene")
    row, col = scene.cells[0]
    if variant == "h":
        return "Is the object on the left, in the center or on the right?", COLUMN_WORDS[col], list(COLUMN_WORDS)
    return "Is the object at the top, in the middle or at the bottom?", ROW_WORDS[row], list(ROW_WORDS)


def _count_q(scene: Scene, variant=None):
    return f"How many {PLURAL[scene.shape]} are there?", str(scene.count), [str(c) for c in COUNTS]


def _yesno_q(scene: Scene, variant: tuple[str, str]):  # variant: the (colour, shape) asked about
    colour, shape = variant
    yes = (scene.colour, scene.shape) == (colour, shape)
    return f"Is there a {colour} {shape} in the image?", "yes" if yes else "no", ["yes", "no"]


def _two_image_q(scenes: tuple[Scene, Scene], variant: tuple[str, str]):
    """variant ("more", shape): both scenes show `shape`, counts differ; ("bigger", ""): sizes differ."""
    a, b = scenes
    kind, value = variant
    if kind == "more":
        if not (a.shape == b.shape == value and a.count != b.count):
            raise ValueError("'more' needs two scenes of the named shape with different counts")
        q = f"Which image has more {PLURAL[value]}, the first or the second?"
        return q, "first" if a.count > b.count else "second", ["first", "second"]
    if kind == "bigger":
        if a.size == b.size:
            raise ValueError("'bigger' needs one scene of small and one of large objects")
        q = "Which image has bigger objects, the first or the second?"
        return q, "first" if a.size == "large" else "second", ["first", "second"]
    raise ValueError(f"unknown two-image variant {variant!r}")


ASK = {"colour": _colour_q, "shape": _shape_q, "position": _position_q, "count": _count_q,
       "yesno": _yesno_q, "two_image": _two_image_q}


def scene_grid(qtype: str) -> list[tuple]:
    """The held-out design of a type: every (variant-ish key, answer) cell, each used equally often.

    The key is whatever (besides the answer) decides the question text, so balancing over these
    cells balances answers within every distinct question text.
    """
    if qtype == "colour":
        return [(plural, c) for plural in (False, True) for c in COLOURS]
    if qtype == "shape":
        return [(plural, s) for plural in (False, True) for s in SHAPES]
    if qtype == "position":
        return [("h", w) for w in COLUMN_WORDS] + [("v", w) for w in ROW_WORDS]
    if qtype == "count":
        return [(s, str(n)) for s in SHAPES for n in COUNTS]
    if qtype == "yesno":
        return [((c, s), a) for c in COLOURS for s in SHAPES for a in ("yes", "no")]
    if qtype == "two_image":  # as many "bigger" as "more" rows (its one question text repeated)
        return ([(("more", s), a) for s in SHAPES for a in ("first", "second")]
                + [(("bigger", ""), a) for _ in SHAPES for a in ("first", "second")])
    raise ValueError(f"unknown question type {qtype!r}; valid: {list(QUESTION_TYPES)}")


def _other(rng: random.Random, options: Iterable[str], not_this: str) -> str:
    return rng.choice([o for o in options if o != not_this])


def _plural_count(rng: random.Random, plural: bool) -> int:
    return rng.choice(COUNTS[1:]) if plural else 1


def make_scenes(qtype: str, key, answer: str, rng: random.Random):
    """Scene(s) and variant for one held-out cell: returns (scenes, variant)."""
    if qtype == "colour":
        return [random_scene(rng, colour=answer, count=_plural_count(rng, key))], None
    if qtype == "shape":
        return [random_scene(rng, shape=answer, count=_plural_count(rng, key))], None
    if qtype == "position":
        words = COLUMN_WORDS if key == "h" else ROW_WORDS
        fixed = words.index(answer)
        other = rng.randrange(GRID)
        cell = (other, fixed) if key == "h" else (fixed, other)
        return [random_scene(rng, count=1, cell=cell)], key
    if qtype == "count":
        return [random_scene(rng, shape=key, count=int(answer))], None
    if qtype == "yesno":
        colour, shape = key if answer == "yes" else _something_else(rng, *key)
        return [random_scene(rng, shape=shape, colour=colour)], key
    if qtype == "two_image":
        kind, value = key
        if kind == "more":
            lo, hi = sorted(rng.sample(COUNTS, 2))
            counts = (hi, lo) if answer == "first" else (lo, hi)
            scenes = [random_scene(rng, shape=value, count=n) for n in counts]
        else:
            sizes = ("large", "small") if answer == "first" else ("small", "large")
            scenes = [random_scene(rng, size=z) for z in sizes]
        return scenes, key
    raise ValueError(f"unknown question type {qtype!r}; valid: {list(QUESTION_TYPES)}")


def ask(qtype: str, scenes: list[Scene], variant=None) -> tuple[str, str, list[str]]:
    """(question text with its image markers, answer, options) for scenes + variant."""
    if qtype == "two_image":
        q, a, opts = ASK[qtype](tuple(scenes), variant)
        return TWO_IMAGE_PREFIX + q, a, opts
    q, a, opts = ASK[qtype](scenes[0], variant)
    return q, a, opts


def _something_else(rng: random.Random, colour: str, shape: str) -> tuple[str, str]:
    """A (colour, shape) that differs from the given one in colour, in shape, or in both (1/3 each)."""
    mode = rng.randrange(3)
    return (_other(rng, COLOURS, colour) if mode != 1 else colour,
            _other(rng, SHAPES, shape) if mode != 0 else shape)


def single_image_turns(scene: Scene, rng: random.Random, turns: int) -> list[tuple[str, str]]:
    """``turns`` (question, answer) pairs about one scene, in random order.

    The pool holds every type that applies, yesno twice (one yes, one no) and position on both axes:
    checking a claim and locating an object are the slowest skills to learn, so they get the most
    examples.
    """
    pool = [("colour", None), ("shape", None), ("count", None),
            ("yesno", (scene.colour, scene.shape)), ("yesno", _something_else(rng, scene.colour, scene.shape))]
    if scene.count == 1:
        pool += [("position", "h"), ("position", "v")]
    pool.append(("size", None))
    return [_size_q(scene) if t == "size" else ASK[t](scene, v)[:2]
            for t, v in rng.sample(pool, min(turns, len(pool)))]


def _size_q(scene: Scene, where: str = "") -> tuple[str, str]:
    """A training-only question: the size of the objects (what "bigger" comparisons build on)."""
    verb, noun = ("Is", "object") if scene.count == 1 else ("Are", "objects")
    return f"{verb} the {noun}{where} small or large?", scene.size


def two_image_turns(scenes: list[Scene], variant, rng: random.Random, turns: int) -> list[tuple[str, str]]:
    """The comparison question ``variant`` first, then up to ``turns - 1`` others in random order:
    the other comparison when it applies, and questions about each image on its own, which teach
    the model to tell the two images apart."""
    a, b = scenes
    pool = []
    if variant[0] == "more" and a.size != b.size:
        pool.append(ASK["two_image"]((a, b), ("bigger", ""))[:2])
    elif variant[0] == "bigger" and a.shape == b.shape and a.count != b.count:
        pool.append(ASK["two_image"]((a, b), ("more", a.shape))[:2])
    for which, scene in (("first", a), ("second", b)):
        pool.append((f"How many {PLURAL[scene.shape]} are in the {which} image?", str(scene.count)))
        pool.append(_size_q(scene, f" in the {which} image"))
    return [ASK["two_image"]((a, b), variant)[:2]] + rng.sample(pool, min(turns - 1, len(pool)))


def make_conversation(turns: list[tuple[str, str]], prefix: str) -> list[dict]:
    conv = []
    for t, (q, a) in enumerate(turns):
        conv += [{"from": "human", "value": prefix + q if t == 0 else q}, {"from": "gpt", "value": a}]
    return conv


def chance_by_type(rows: Iterable[dict]) -> dict[str, float]:
    """Per type: mean of 1/len(options), the accuracy of guessing uniformly among the question's answers.

    The world draws answers uniformly from ``options`` (exactly balanced per question text on the
    held-out split), so this is also what any image-blind answerer can expect to score.
    """
    acc: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        acc[r["type"]].append(1.0 / len(r["options"]))
    return {t: round(math.fsum(v) / len(v), 6) for t, v in acc.items()}
