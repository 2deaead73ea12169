"""Writes the high-resolution demo's world to disk as a LLaVA project (detail pictures, and motion clips).

Detail (``write_hires_world``, pictures of ``hires_scenes``)::

    images/*.png      96x96 pictures
    stage1.json       LLaVA JSON, one caption per training picture
    stage2.json       LLaVA JSON, four-turn Q&A per training picture (detail, corner, colour, shape; random order)
    clip.json         [[image, caption], ...]: stage 0's CLIP pairs, each training picture (coarse caption) and
                      its tag's tile at full resolution (``tiles/*.png``, the pattern named)
    test.jsonl        held-out rows {"id", "type", "question", "image", "answer", "options"}

Motion (``write_motion``, clips of ``motion``), under the same folder::

    images/motion/*.png       48x48 frames, FRAMES per clip
    motion.json               LLaVA JSON, ``"video": [frame paths]`` + ``<video>``, two turns per clip
    motion_test.jsonl         held-out rows with ``"video"`` and, for the single-frame control, ``"frame"``

The held-out pictures and clips are new draws, checked not to repeat a training one; each type's answers come
equally often (balanced, so an image-blind answerer scores exactly chance). Same arguments, same bytes.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from .hires_scenes import (
    ASK_HIRES, HIRES_TYPES, answer_cells, coarse_caption, detail_caption, detail_turns, draw_detail,
    random_detail_scene, scene_for, tag_tile, tile_caption,
)
from .motion import FRAMES, MIDDLE, MOTION_TYPES, ask_clip, clip_turns, draw_clip, random_clip
from .scenes import make_conversation


@dataclass
class HiresPaths:
    root: Path
    image_folder: Path
    stage1: Path
    stage2: Path
    clip: Path
    test: Path


@dataclass
class MotionPaths:
    train: Path
    test: Path
    image_folder: Path


def _balanced(cells: list, n: int, rng: random.Random) -> list:
    """`cells` repeated to at least `n` rows (whole repetitions), shuffled."""
    design = [c for _ in range(-(-n // len(cells))) for c in cells]
    rng.shuffle(design)
    return design


def write_hires_world(out_dir: str | Path, seed: int = 0, n_train: int = 3000, n_test: int = 60) -> HiresPaths:
    """Write the detail world under `out_dir`: `n_train` training pictures (a caption and a four-turn
    conversation each), and per scored type `n_test` held-out rows, rounded up to whole repetitions of its
    answers (60 is a multiple of 3, 4 and 5: every type gets exactly 60)."""
    out = Path(out_dir)
    images, tiles = out / "images", out / "images" / "tiles"
    tiles.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    stage1, stage2, clip, seen = [], [], [], set()
    for i in range(n_train):
        scene = random_detail_scene(rng)
        seen.add(scene)
        name, tile = f"hires_{i:05d}.png", f"tiles/hires_{i:05d}.png"
        picture = draw_detail(scene)
        picture.save(images / name, format="PNG")
        tag_tile(picture, scene.corner).save(images / tile, format="PNG")
        stage1.append({"id": f"cap-{i:05d}", "image": name, "conversations": [
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": detail_caption(scene, rng)}]})
        stage2.append({"id": f"qa-{i:05d}", "image": name,
                       "conversations": make_conversation(detail_turns(scene, rng), "<image>\n")})
        clip += [[name, coarse_caption(scene)], [tile, tile_caption(scene)]]

    test = []
    for qtype in HIRES_TYPES:
        for k, answer in enumerate(_balanced(answer_cells(qtype), n_test, rng)):
            scene = scene_for(qtype, answer, rng)
            while scene in seen:
                scene = scene_for(qtype, answer, rng)
            name = f"test_{qtype}_{k:04d}.png"
            draw_detail(scene).save(images / name, format="PNG")
            q, a, options = ASK_HIRES[qtype](scene)
            test.append({"id": f"test-{qtype}-{k:04d}", "type": qtype, "question": "<image>\n" + q, "image": name,
                         "answer": a, "options": options})

    paths = HiresPaths(out, images, out / "stage1.json", out / "stage2.json", out / "clip.json", out / "test.jsonl")
    paths.stage1.write_text(json.dumps(stage1, indent=1) + "\n")
    paths.stage2.write_text(json.dumps(stage2, indent=1) + "\n")
    paths.clip.write_text(json.dumps(clip, indent=1) + "\n")
    paths.test.write_text("".join(json.dumps(r) + "\n" for r in test))
    return paths


def clip_pairs(paths: HiresPaths) -> list[tuple[Path, str]]:
    """(image path, caption) pairs of `clip.json`: what stage 0's CLIP is trained on."""
    return [(paths.image_folder / name, caption) for name, caption in json.loads(paths.clip.read_text())]


def write_motion(out_dir: str | Path, seed: int = 0, n_train: int = 1200, n_test: int = 60) -> MotionPaths:
    """Write the motion clips under `out_dir` (next to the detail world): `n_train` training clips, half
    moving and half growing or shrinking, and `n_test` held-out rows per motion type (balanced answers)."""
    out = Path(out_dir)
    frames_dir = out / "images" / "motion"
    frames_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed + 7919)  # its own stream: writing clips never changes the detail world

    def save(clip, stem: str) -> list[str]:
        names = [f"motion/{stem}_{k}.png" for k in range(FRAMES)]
        for frame, name in zip(draw_clip(clip), names):
            frame.save(out / "images" / name, format="PNG")
        return names

    train, seen = [], set()
    for i in range(n_train):
        clip = random_clip(rng, MOTION_TYPES[i % 2])
        seen.add(clip)
        train.append({"id": f"clip-{i:05d}", "video": save(clip, f"clip_{i:05d}"),
                      "conversations": make_conversation(clip_turns(clip, rng), "<video>\n")})
    rng.shuffle(train)

    test = []
    for kind in MOTION_TYPES:
        options = ask_clip(random_clip(random.Random(0), kind))[2]
        for k, answer in enumerate(_balanced(options, n_test, rng)):
            clip = random_clip(rng, kind, answer)
            while clip in seen:
                clip = random_clip(rng, kind, answer)
            names = save(clip, f"test_{kind}_{k:04d}")
            q, a, opts = ask_clip(clip)
            test.append({"id": f"test-{kind}-{k:04d}", "type": kind, "question": "<video>\n" + q, "video": names,
                         "frame": names[MIDDLE], "answer": a, "options": opts})

    paths = MotionPaths(out / "motion.json", out / "motion_test.jsonl", out / "images")
    paths.train.write_text(json.dumps(train, indent=1) + "\n")
    paths.test.write_text("".join(json.dumps(r) + "\n" for r in test))
    return paths


def single_frame_rows(rows: list[dict]) -> list[dict]:
    """The single-frame control of motion rows: the same question about the clip's middle frame as an image."""
    return [{**{k: v for k, v in r.items() if k not in ("video", "frame")}, "image": r["frame"],
             "question": r["question"].replace("<video>", "<image>")} for r in rows]
