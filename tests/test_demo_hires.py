"""`llavakit demo --hires`: a fine detail only tiles show, its control, the motion clips, and the pipeline's plumbing.

What the demo's claims rest on: the tag's pattern is gone once a picture is shrunk to the encoder's size (so the
base-resolution control *cannot* read it) and is plain at full resolution; the held-out split is balanced (so
blind answers score exactly chance); the single frame of the motion control carries nothing about the answer; the
two stage-2 recipes differ only in the image policy; and a run writes both models and their scores.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from llavakit.demo import hires_scenes as hs
from llavakit.demo import motion
from llavakit.demo.hires_world import single_frame_rows, write_hires_world, write_motion
from llavakit.demo.tiny import tiny_image_processor


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("hires_world")
    return write_hires_world(root, seed=5, n_train=24, n_test=12), write_motion(root, seed=5, n_train=10, n_test=8)


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int64)


# --- the detail ----------------------------------------------------------------------------------------
def test_the_pattern_is_gone_at_base_resolution_and_plain_in_the_tiles():
    processor = tiny_image_processor("clip", 48)  # the demo CLIP's own image processor (PIL path)
    rng = random.Random(0)
    for _ in range(20):
        scene = hs.random_detail_scene(rng)
        pictures = [hs.draw_detail(dataclasses.replace(scene, pattern=p)) for p in hs.PATTERNS]
        shrunk = [processor(p, return_tensors="np")["pixel_values"][0] for p in pictures]  # [3, 48, 48] normalised
        full = [_pixels(hs.tag_tile(p, scene.corner)) for p in pictures]
        for i in range(3):
            for j in range(i + 1, 3):
                # shrunk: at most 2 grey levels apart anywhere (1/255 is ~0.015 after CLIP's std ~0.27)
                assert np.abs(shrunk[i] - shrunk[j]).max() <= 2 / 255 / 0.26 + 1e-6
                assert np.abs(full[i] - full[j]).max() >= 60  # the tile shows the lines


def test_tag_sits_in_its_corner_and_the_big_shape_stays_clear_of_it():
    rng = random.Random(1)
    for corner in hs.CORNERS:
        scene = hs.random_detail_scene(rng, corner=corner, colour="red")
        x, y = hs.tag_box(corner)
        px = _pixels(hs.draw_detail(scene))
        tag = px[y:y + hs.TAG, x:x + hs.TAG, 0]
        assert tag.max() - tag.min() > 60  # lines
        rest = px.copy()
        rest[y:y + hs.TAG, x:x + hs.TAG] = scene.background
        red = (rest[..., 0] - rest[..., 1]) > 60
        ys, xs = np.nonzero(red)
        assert hs.OBJECT_LO <= min(xs.min(), ys.min()) and max(xs.max(), ys.max()) < hs.OBJECT_HI


def test_world_files_validate_and_the_held_out_split_is_balanced(world):
    from llavakit.data.formats import load_conversations
    from llavakit.data.validate import validate

    paths, _ = world
    for f in (paths.stage1, paths.stage2):
        convs, problems = load_conversations(f, image_folder=paths.image_folder, on_error="collect")
        assert not [p for p in validate((convs, problems), check_images=True) if p.severity == "error"]
    rows = [json.loads(line) for line in paths.test.read_text().splitlines()]
    for qtype in hs.HIRES_TYPES:
        mine = [r for r in rows if r["type"] == qtype]
        assert len({r["question"] for r in mine}) == 1  # one text per type: balance = chance for any blind answerer
        counts = Counter(r["answer"] for r in mine)
        assert set(counts) == set(mine[0]["options"]) and len(set(counts.values())) == 1, counts
        for r in mine:
            with Image.open(paths.image_folder / r["image"]) as im:
                assert im.size == (hs.HIRES_SIZE, hs.HIRES_SIZE)
    for name, caption in json.loads(paths.clip.read_text()):
        with Image.open(paths.image_folder / name) as im:
            assert im.size == ((48, 48) if name.startswith("tiles/") else (96, 96))
        assert caption


def test_same_seed_same_bytes(tmp_path, world):
    paths, _ = world
    again = write_hires_world(tmp_path, seed=5, n_train=24, n_test=12)
    for a, b in ((again.stage2, paths.stage2), (again.test, paths.test), (again.clip, paths.clip)):
        assert a.read_bytes() == b.read_bytes()
    for name in ("hires_00003.png", "tiles/hires_00003.png", "test_detail_0002.png"):
        assert (again.image_folder / name).read_bytes() == (paths.image_folder / name).read_bytes()


def test_tiles_multiply_the_tokens_as_the_recipes_say():
    from llavakit.demo.hires import hires_recipes
    from llavakit.model.anyres import anyres_token_count

    recipes = {k: yaml.safe_load(p.read_text()) for k, p in hires_recipes().items()}
    tiled, control = recipes["stage2_anyres"], recipes["stage2_base"]
    pins = tiled["model"]["image_grid_pinpoints"]
    assert anyres_token_count(hs.HIRES_SIZE, hs.HIRES_SIZE, pins, 48, 3) == 9 + 36 + 6
    # the control is the same run but for the image policy (and its output folder)
    assert tiled["model"].pop("image_tokens") == "anyres" and control["model"].pop("image_tokens") == "base"
    tiled["model"].pop("image_grid_pinpoints")
    tiled["train"].pop("output_dir"), control["train"].pop("output_dir")
    tiled["data"].pop("max_length"), control["data"].pop("max_length")
    assert tiled == control
    assert recipes["stage1"]["model"]["image_tokens"] == "base"


# --- motion --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, answers", [("motion", motion.DIRECTIONS), ("growth", motion.GROWTH)])
def test_the_middle_frame_says_nothing_about_the_answer(kind, answers):
    for seed in range(30):
        clips = [motion.random_clip(random.Random(seed), kind, a) for a in answers]
        frames = [motion.draw_clip(c) for c in clips]
        middles = {f[motion.MIDDLE].tobytes() for f in frames}
        assert len(middles) == 1  # the same rng draws give the same middle frame whatever the answer
        assert len({f[0].tobytes() for f in frames}) == len(answers)  # the clips themselves differ
        for c in clips:
            for x0, y0, s in motion.frame_boxes(c):
                assert s > 4 and x0 >= 0 and y0 >= 0 and x0 + s <= 48 and y0 + s <= 48


def test_motion_rows_list_their_frames(world):
    _, m = world
    train = json.loads(m.train.read_text())
    assert {r["conversations"][1]["value"] for r in train} <= set(motion.DIRECTIONS + motion.GROWTH)
    for r in train:
        assert len(r["video"]) == motion.FRAMES and r["conversations"][0]["value"].startswith("<video>\n")
        assert all((m.image_folder / f).is_file() for f in r["video"])
    rows = [json.loads(line) for line in m.test.read_text().splitlines()]
    for kind in motion.MOTION_TYPES:
        mine = [r for r in rows if r["type"] == kind]
        counts = Counter(r["answer"] for r in mine)
        assert len(set(counts.values())) == 1 and set(counts) == set(mine[0]["options"]), counts
    single = single_frame_rows(rows)
    assert all(s["image"] == r["video"][motion.MIDDLE] and s["question"].startswith("<image>\n") and "video" not in s
               for s, r in zip(single, rows))


# --- the pipeline ------------------------------------------------------------------------------------
def test_a_few_steps_of_the_whole_run_write_both_models_and_their_scores(tmp_path):
    import llavakit
    from llavakit.demo.hires import HiresScale, run_hires_demo

    few = HiresScale(world={"n_train": 64, "n_test": 12}, motion={"n_train": 4, "n_test": 4},
                     lm={"steps": 3, "batch_size": 8}, clip={"steps": 3, "batch_size": 16},
                     stage1=["--train.max_steps=2", "--train.batch_size=8"],
                     stage2=["--train.max_steps=2", "--train.batch_size=8"])
    out = tmp_path / "hires"
    metrics = run_hires_demo(out, seed=0, scale=few, say=lambda *a, **k: None, motion=True)
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert metrics["mode"] == "hires" and metrics["motion"]["trained"] is True
    assert set(metrics["motion"]["types"]) == set(motion.MOTION_TYPES)
    assert set(metrics["motion"]["types"]["growth"]) == {"with_video", "blind", "single_frame", "chance"}
    assert {p: m["image_tokens"] for p, m in metrics["policies"].items()} == {"anyres": 51, "base": 9}
    for m in metrics["policies"].values():
        assert list(m["types"]) == list(hs.HIRES_TYPES)
        assert m["types"]["detail"]["chance"] == pytest.approx(1 / 3, abs=1e-4)
    for name in ("loss_stage1.png", "loss_stage2_anyres.png", "loss_stage2_base.png", "predictions_anyres.jsonl",
                 "predictions_base.jsonl", "predictions_motion.jsonl", "loss_stage2_motion.png",
                 "sample_conversation.txt"):
        assert (out / name).is_file(), name
    _, tiled = llavakit.load(out / "model_anyres")
    _, control = llavakit.load(out / "model_base")
    assert tiled.image_tokens == "anyres" and tiled.image_token_counts([(96, 96)]) == [51]
    assert control.image_tokens == "base" and control.image_token_counts([(96, 96)]) == [9]
    # what each model's processor feeds the encoder: the three patterns differ only in the tag's own tile
    scene = hs.random_detail_scene(random.Random(2), corner="bottom left")
    pictures = [hs.draw_detail(dataclasses.replace(scene, pattern=p)) for p in hs.PATTERNS]
    tiles = [tiled.preprocess_images([p]) for p in pictures]  # [5, 3, 48, 48]: base tile, then the 2x2 grid
    controls = [control.preprocess_images([p]) for p in pictures]  # [1, 3, 48, 48]
    same = 2 / 255 / 0.26 + 1e-6  # 2 grey levels after CLIP's normalisation
    for i, j in ((0, 1), (0, 2), (1, 2)):
        diff = (tiles[i] - tiles[j]).abs().amax(dim=(1, 2, 3))
        assert diff[[0, 1, 2, 4]].max() <= same and diff[3] > 60 / 255 / 0.28, diff  # bottom left = grid tile 3
        assert (controls[i] - controls[j]).abs().max() <= same


def test_cli_refuses_hires_with_another_llm_and_motion_without_hires(capsys):
    import argparse

    from llavakit.demo import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    assert cli.run(parser.parse_args(["--hires", "--llm", "smollm2", "--out", "unused"])) == 2
    assert "--hires" in capsys.readouterr().err
    assert cli.run(parser.parse_args(["--motion", "--out", "unused"])) == 2
    assert "--motion goes with --hires" in capsys.readouterr().err


# --- learning (slow) -----------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skip(reason="not yet measured: --scale small has never been run, and the full run learned the detail on "
                         "seed 0 but not on seed 1 (docs/demo.md); enable once a small scale that learns it is found")
def test_small_hires_run_reads_the_detail_with_tiles_only(tmp_path):
    """`--scale small`: the tiled model reads the pattern far above chance, the base-resolution control does not,
    and neither does better than chance blind."""
    from llavakit.demo.hires import run_hires_demo

    metrics = run_hires_demo(tmp_path / "hires", seed=0, scale="small", say=lambda *a, **k: None)
    anyres, base = (metrics["policies"][p]["types"]["detail"] for p in ("anyres", "base"))
    assert anyres["with_image"] >= anyres["chance"] + 0.3, metrics["policies"]
    assert base["with_image"] <= base["chance"] + 0.2, metrics["policies"]
    for m in metrics["policies"].values():
        for t in m["types"].values():
            assert t["blind"] <= t["chance"] + 0.1, metrics["policies"]
