"""The offline demo's synthetic visual-instruction world, deterministic by seed.

A *scene* is a small picture (48x48 px, a 3x3 grid of 16 px cells) holding 1-4 copies of one shape
in one colour and one size, each in its own cell with a little jitter. From scenes we write what a
real LLaVA project has on disk, so the demo goes through the same readers and ``data check``:

    images/*.png    the pictures
    stage1.json     LLaVA JSON, one caption per image (human ``<image>`` / gpt caption)
    stage2.json     LLaVA JSON, multi-turn Q&A; two-image samples use ``images`` and interleaved markers
    test.jsonl      held-out eval rows {"id", "type", "question", "image"|"images", "answer", "options"}

Question types: colour, shape, position, count, yesno, two_image. Answers are one word or digit, so
scoring is exact match on normalised text.

Chance. Every question has a known option set (stored as ``options``) and the generator draws the
answer uniformly from it, so a guesser that sees the question but not the image is right with
probability 1/len(options); ``chance_by_type`` averages that over a type's rows. The held-out split
is moreover an exactly balanced design: every distinct question text appears equally often with
each of its answers. So *any* image-blind answerer (a function of the question text alone, e.g. the
model shown a blank image) scores exactly chance there, even the best one (each question text
answered with its most frequent answer).

Held-out scenes are disjoint from training scenes: a scene's key is everything that decides its
pixels, and a held-out scene whose key occurs in training is drawn again.
"""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
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
                 count: int | None = None, cell: tuple[int, int] | None = None) -> Scene:
    """A scene with the given attributes fixed and everything else drawn from ``rng``."""
    shape = shape or rng.choice(SHAPES)
    colour = colour or rng.choice(list(COLOURS))
    count = count or rng.choice(COUNTS)
    size = rng.choice(list(SIZES))
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
        x0, y0 = col * CELL + dx, row * CELL + dy
        x1, y1 = x0 + s - 1, y0 + s - 1
        if scene.shape == "circle":
            d.ellipse([x0, y0, x1, y1], fill=fill)
        elif scene.shape == "square":
            d.rectangle([x0, y0, x1, y1], fill=fill)
        elif scene.shape == "triangle":
            d.polygon([(x0 + (s - 1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
        else:  # cross: a plus sign with arms one third of the size thick
            t0, t1 = x0 + s // 3, x0 + s - 1 - s // 3
            u0, u1 = y0 + s // 3, y0 + s - 1 - s // 3
            d.rectangle([t0, y0, t1, y1], fill=fill)
            d.rectangle([x0, u0, x1, u1], fill=fill)
    return img


def position_words(cell: tuple[int, int]) -> str:
    row, col = cell
    if (row, col) == (1, 1):
        return "in the center"
    return f"at the {ROW_WORDS[row]} {COLUMN_WORDS[col]}"


def caption(scene: Scene, rng: random.Random) -> str:
    """A one-sentence description: count, size, colour, shape, and where a single object is."""
    noun = scene.shape if scene.count == 1 else PLURAL[scene.shape]
    what = f"{NUMBER_WORDS[scene.count]} {scene.size} {scene.colour} {noun}"
    if scene.count == 1:
        what += f" {position_words(scene.cells[0])}"
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
    """variant ("more", shape): both scenes show `shape`, counts differ; ("colour", c): one is c."""
    a, b = scenes
    kind, value = variant
    if kind == "more":
        if not (a.shape == b.shape == value and a.count != b.count):
            raise ValueError("'more' needs two scenes of the named shape with different counts")
        q = f"Which image has more {PLURAL[value]}, the first or the second?"
        return q, "first" if a.count > b.count else "second", ["first", "second"]
    if (a.colour == value) == (b.colour == value):
        raise ValueError("'colour' needs exactly one scene of the named colour")
    q = f"Which image has {value} objects, the first or the second?"
    return q, "first" if a.colour == value else "second", ["first", "second"]


ASK = {"colour": _colour_q, "shape": _shape_q, "position": _position_q, "count": _count_q,
       "yesno": _yesno_q, "two_image": _two_image_q}


def _grid(qtype: str) -> list[tuple]:
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
    if qtype == "two_image":
        return ([(("more", s), a) for s in SHAPES for a in ("first", "second")]
                + [(("colour", c), a) for c in COLOURS for a in ("first", "second")])
    raise ValueError(f"unknown question type {qtype!r}; valid: {list(QUESTION_TYPES)}")


def _other(rng: random.Random, options: Iterable[str], not_this: str) -> str:
    return rng.choice([o for o in options if o != not_this])


def _plural_count(rng: random.Random, plural: bool) -> int:
    return rng.choice(COUNTS[1:]) if plural else 1


def _make(qtype: str, key, answer: str, rng: random.Random):
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
        colour, shape = key
        if answer == "no":  # differ in colour, in shape, or in both
            mode = rng.randrange(3)
            colour = _other(rng, COLOURS, colour) if mode != 1 else colour
            shape = _other(rng, SHAPES, shape) if mode != 0 else shape
        return [random_scene(rng, shape=shape, colour=colour)], key
    if qtype == "two_image":
        kind, value = key
        if kind == "more":
            lo, hi = sorted(rng.sample(COUNTS, 2))
            counts = (hi, lo) if answer == "first" else (lo, hi)
            scenes = [random_scene(rng, shape=value, count=n) for n in counts]
        else:
            colours = (value, _other(rng, COLOURS, value))
            colours = colours if answer == "first" else colours[::-1]
            scenes = [random_scene(rng, colour=c) for c in colours]
        return scenes, key
    raise ValueError(f"unknown question type {qtype!r}; valid: {list(QUESTION_TYPES)}")


def ask(qtype: str, scenes: list[Scene], variant=None) -> tuple[str, str, list[str]]:
    """(question text with its image markers, answer, options) for scenes + variant."""
    if qtype == "two_image":
        q, a, opts = ASK[qtype](tuple(scenes), variant)
        return TWO_IMAGE_PREFIX + q, a, opts
    q, a, opts = ASK[qtype](scenes[0], variant)
    return q, a, opts


def _random_variant(qtype: str, scene: Scene, rng: random.Random, yes: bool | None = None):
    """A variant for a training question about an existing scene (answers stay ~uniform).

    For yesno, ``yes`` picks the answer (None: a fair coin); a "no" query differs from the scene in
    colour, in shape, or in both.
    """
    if qtype == "position":
        return rng.choice(["h", "v"])
    if qtype == "yesno":
        if yes if yes is not None else rng.random() < 0.5:
            return scene.colour, scene.shape
        mode = rng.randrange(3)
        colour = _other(rng, COLOURS, scene.colour) if mode != 1 else scene.colour
        shape = _other(rng, SHAPES, scene.shape) if mode != 0 else scene.shape
        return colour, shape
    return None


def _single_image_turns(scene: Scene, rng: random.Random, turns: int) -> list[tuple[str, object]]:
    """``turns`` (question type, variant) pairs about one scene, in random order.

    The pool holds every type that applies once, and yesno twice (one yes, one no): binding colour
    and shape to check a claim is the slowest skill to learn, so it gets the most examples.
    """
    yes_first = rng.random() < 0.5
    pool = [("colour", None), ("shape", None), ("count", None),
            ("yesno", _random_variant("yesno", scene, rng, yes=yes_first)),
            ("yesno", _random_variant("yesno", scene, rng, yes=not yes_first))]
    if scene.count == 1:
        pool.append(("position", _random_variant("position", scene, rng)))
    picked = rng.sample(pool, min(turns, len(pool)))
    return picked


# --- writing the world -----------------------------------------------------------------------------
@dataclass
class WorldPaths:
    root: Path
    image_folder: Path
    stage1: Path
    stage2: Path
    test: Path


def _key(scene: Scene) -> tuple:
    return (scene.shape, scene.colour, scene.size, scene.cells, scene.offsets, scene.tint, scene.background)


def write_world(out_dir: str | Path, seed: int = 0, n_train: int = 2000, n_test: int = 60,
                two_image_fraction: float = 0.3, turns: int = 3) -> WorldPaths:
    """Write the world under ``out_dir`` and return its paths.

    n_train: single-image training scenes (each gets a caption in stage1.json and one ``turns``-turn
    conversation in stage2.json); ``two_image_fraction * n_train`` two-image conversations are added.
    n_test: held-out rows per question type, rounded up to whole repetitions of the type's balanced
    design (see ``_grid``). The same arguments always give byte-identical files.
    """
    out = Path(out_dir)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    seen: set[tuple] = set()

    def save(scene: Scene, name: str) -> str:
        draw(scene).save(images / name, format="PNG")
        return name

    # Stage 1 + stage 2 single-image conversations share the training scenes.
    stage1, stage2 = [], []
    for i in range(n_train):
        scene = random_scene(rng)
        seen.add(_key(scene))
        name = save(scene, f"train_{i:05d}.png")
        stage1.append({"id": f"cap-{i:05d}", "image": name, "conversations": [
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": caption(scene, rng)}]})
        conv = []
        for t, (qtype, variant) in enumerate(_single_image_turns(scene, rng, turns)):
            q, a, _ = ask(qtype, [scene], variant)
            conv += [{"from": "human", "value": ("<image>\n" + q) if t == 0 else q}, {"from": "gpt", "value": a}]
        stage2.append({"id": f"qa-{i:05d}", "image": name, "conversations": conv})

    # Two-image conversations: a first question from the design, then the other kind when it applies.
    cells = _grid("two_image")
    for j in range(int(round(two_image_fraction * n_train))):
        key, answer = rng.choice(cells)
        scenes, variant = _make("two_image", key, answer, rng)
        for s in scenes:
            seen.add(_key(s))
        names = [save(s, f"pair_{j:05d}_{k}.png") for k, s in enumerate(scenes)]
        q, a, _ = ask("two_image", scenes, variant)
        conv = [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        a_s, b_s = scenes
        follow = None
        if variant[0] == "more" and a_s.colour != b_s.colour:
            follow = ("colour", rng.choice([a_s.colour, b_s.colour]))
        elif variant[0] == "colour" and a_s.shape == b_s.shape and a_s.count != b_s.count:
            follow = ("more", a_s.shape)
        if follow is not None:
            q2, a2, _ = ASK["two_image"](tuple(scenes), follow)
            conv += [{"from": "human", "value": q2}, {"from": "gpt", "value": a2}]
        stage2.append({"id": f"qa2-{j:05d}", "images": names, "conversations": conv})
    rng.shuffle(stage2)

    # Held-out rows: each type's balanced design, repeated, in a shuffled order; fresh scenes only.
    test = []
    for qtype in QUESTION_TYPES:
        grid = _grid(qtype)
        reps = -(-n_test // len(grid))
        design = [cell for _ in range(reps) for cell in grid]
        rng.shuffle(design)
        for k, (key, answer) in enumerate(design):
            while True:
                scenes, variant = _make(qtype, key, answer, rng)
                if not any(_key(s) in seen for s in scenes):
                    break
            q, a, options = ask(qtype, scenes, variant)
            assert a == answer, (qtype, key, answer, a)
            names = [save(s, f"test_{qtype}_{k:04d}_{m}.png") for m, s in enumerate(scenes)]
            row = {"id": f"test-{qtype}-{k:04d}", "type": qtype}
            if len(names) == 1:
                row.update(question="<image>\n" + q, image=names[0])
            else:
                row.update(question=q, images=names)
            row.update(answer=a, options=options)
            test.append(row)

    paths = WorldPaths(out, images, out / "stage1.json", out / "stage2.json", out / "test.jsonl")
    paths.stage1.write_text(json.dumps(stage1, indent=1) + "\n")
    paths.stage2.write_text(json.dumps(stage2, indent=1) + "\n")
    paths.test.write_text("".join(json.dumps(r) + "\n" for r in test))
    return paths


# --- reading it back (backbones, scoring) ------------------------------------------------------------
def read_json(path: str | Path) -> list[dict]:
    return json.loads(Path(path).read_text())


def read_test(path: str | Path) -> list[dict]:
    """The held-out rows of ``test.jsonl``."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def caption_pairs(stage1_json: str | Path, image_folder: str | Path) -> list[tuple[Path, str]]:
    """(image path, caption) for every stage-1 sample: the CLIP training pairs."""
    folder = Path(image_folder)
    return [(folder / s["image"], s["conversations"][-1]["value"]) for s in read_json(stage1_json)]


def text_corpus(*llava_jsons: str | Path) -> list[str]:
    """Plain text of training conversations (markers removed): one line per sample, for the LM.

    A turn pair becomes "question answer." so the LM learns the words, the questions and the answer
    vocabulary; it cannot learn the answers themselves, which depend on the image.
    """
    lines = []
    for path in llava_jsons:
        for sample in read_json(path):
            parts = [t["value"].replace("<image>", "").replace("First image:", "").replace("Second image:", "")
                     .strip() for t in sample["conversations"]]
            lines.append(" ".join(p for p in parts if p))
    return lines


def chance_by_type(rows: Iterable[dict]) -> dict[str, float]:
    """Per type: mean of 1/len(options), the accuracy of guessing uniformly among the question's answers.

    The world draws answers uniformly from ``options`` (exactly balanced per question text on the
    held-out split), so this is also what any image-blind answerer can expect to score.
    """
    acc: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        acc[r["type"]].append(1.0 / len(r["options"]))
    return {t: round(math.fsum(v) / len(v), 6) for t, v in acc.items()}
