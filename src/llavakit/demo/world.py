"""Writes the offline demo's synthetic world (``llavakit.demo.scenes``) to disk as a LLaVA project and reads it back.

The files are what a real LLaVA project has on disk, so the demo goes through the same readers and
``data check``:

    images/*.png    the pictures
    stage1.json     LLaVA JSON, one caption per training image (human ``<image>`` / gpt caption)
    stage2.json     LLaVA JSON, multi-turn Q&A; two-image samples use ``images`` and interleaved markers
    test.jsonl      held-out eval rows {"id", "type", "question", "image"|"images", "answer", "options"}

Held-out scenes are disjoint from training scenes: a scene's key is everything that decides its
pixels, and a held-out scene whose key occurs in training is drawn again. The world's scene and
question names (``Scene``, ``COLOURS``, ``QUESTION_TYPES``, ``chance_by_type``, ...) stay importable
from here.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

# Re-exported: callers import the world's scene and question names from this module.
from .scenes import (  # noqa: F401
    ASK, CELL, COLOURS, COLUMN_WORDS, COUNTS, GRID, IMAGE_SIZE, NUMBER_WORDS, PLURAL, QUESTION_TYPES,
    ROW_WORDS, SHAPES, SIZES, TWO_IMAGE_PREFIX, Scene, make_conversation, scene_grid, make_scenes, single_image_turns,
    two_image_turns, ask, caption, chance_by_type, draw, position_words, random_scene,
)


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


def write_world(out_dir: str | Path, seed: int = 0, n_train: int = 4000, n_test: int = 60,
                two_image_fraction: float = 0.5, turns: int = 6, one_object_fraction: float | None = None,
                position_extra: int = 0) -> WorldPaths:
    """Write the world under ``out_dir`` and return its paths.

    n_train: single-image training scenes, one ``turns``-turn conversation each in stage2.json;
    ``two_image_fraction * n_train`` two-image conversations (two new scenes each) are added. Every
    training image gets a caption in stage1.json.
    one_object_fraction: the share of single-image training scenes with one object (the only scenes
    "where" questions are asked about); None (the demo's default) draws the count uniformly from 1-4
    like every other attribute. position_extra: extra two-turn conversations per one-object training
    scene asking only where the object is (both axes, random order); 0 by default. Both are for
    experiments on the "where" skill (docs/demo.md records what they did).
    n_test: held-out rows per question type, rounded up to whole repetitions of the type's balanced
    design (see ``scene_grid``). The same arguments always give byte-identical files.
    """
    out = Path(out_dir)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    seen: set[tuple] = set()

    def save(scene: Scene, name: str) -> str:
        draw(scene).save(images / name, format="PNG")
        return name

    stage1, stage2 = [], []

    def save_train(scene: Scene, name: str) -> str:  # every training image also gets a stage-1 caption
        seen.add(_key(scene))
        stage1.append({"id": f"cap-{name.rsplit('.', 1)[0]}", "image": save(scene, name), "conversations": [
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": caption(scene, rng)}]})
        return name

    one_object = []
    for i in range(n_train):
        if one_object_fraction is None:
            scene = random_scene(rng)
        else:
            scene = random_scene(rng, count=1 if rng.random() < one_object_fraction else rng.choice(COUNTS[1:]))
        name = save_train(scene, f"train_{i:05d}.png")
        conv = make_conversation(single_image_turns(scene, rng, turns), "<image>\n")
        stage2.append({"id": f"qa-{i:05d}", "image": name, "conversations": conv})
        if scene.count == 1:
            one_object.append((i, scene, name))

    for i, scene, name in one_object:  # where-questions only (see position_extra above)
        for j in range(position_extra):
            where = [ASK["position"](scene, "h")[:2], ASK["position"](scene, "v")[:2]]
            rng.shuffle(where)
            stage2.append({"id": f"pos-{i:05d}-{j}", "image": name,
                           "conversations": make_conversation(where, "<image>\n")})

    # Two-image conversations: a comparison from the held-out design's cells, then follow-ups.
    cells = scene_grid("two_image")
    for j in range(int(round(two_image_fraction * n_train))):
        key, answer = rng.choice(cells)
        scenes, variant = make_scenes("two_image", key, answer, rng)
        names = [save_train(s, f"pair_{j:05d}_{k}.png") for k, s in enumerate(scenes)]
        conv = make_conversation(two_image_turns(scenes, variant, rng, turns), TWO_IMAGE_PREFIX)
        stage2.append({"id": f"qa2-{j:05d}", "images": names, "conversations": conv})
    rng.shuffle(stage2)

    # Held-out rows: each type's balanced design, repeated, in a shuffled order; fresh scenes only.
    test = []
    for qtype in QUESTION_TYPES:
        grid = scene_grid(qtype)
        reps = -(-n_test // len(grid))
        design = [cell for _ in range(reps) for cell in grid]
        rng.shuffle(design)
        for k, (key, answer) in enumerate(design):
            while True:
                scenes, variant = make_scenes(qtype, key, answer, rng)
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


def text_corpus(stage1_json: str | Path, stage2_json: str | Path) -> list[str]:
    """The world's text for pretraining the LM: each stage-2 conversation with every image marker
    replaced by that image's stage-1 caption, one sample per line-group.

    Like a real LLM's pretraining text, this teaches the words and, in plain language, the skills
    the questions need (reading a colour off a description, comparing two counts, checking a claim);
    stage 1 then teaches the projector to "describe" an image to the LM, stage 2 to answer from it.
    """
    captions = {s["image"]: s["conversations"][-1]["value"] for s in read_json(stage1_json)}
    texts = []
    for sample in read_json(stage2_json):
        names = iter(sample["images"] if "images" in sample else [sample["image"]])
        lines = []
        for human, gpt in zip(sample["conversations"][::2], sample["conversations"][1::2]):
            question = re.sub(r"<image>", lambda _: captions[next(names)], human["value"])
            lines.append(f"{question} {gpt['value']}")
        texts.append("\n".join(lines))
    return texts
