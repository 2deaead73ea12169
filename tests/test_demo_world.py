"""The demo's synthetic world: determinism, file formats, labels that match the pixels, balance, splits."""

from __future__ import annotations

import hashlib
import random
from collections import Counter, defaultdict

import pytest
from PIL import Image

from llavakit.demo import world
from llavakit.demo.score import accuracy_by_type, blank_like, format_table, normalize


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    return world.write_world(tmp_path_factory.mktemp("world"), seed=3, n_train=60, n_test=8)


def _files(paths: world.WorldPaths) -> dict[str, bytes]:
    files = {p.name: p.read_bytes() for p in (paths.stage1, paths.stage2, paths.test)}
    files.update({f"images/{p.name}": p.read_bytes() for p in sorted(paths.image_folder.iterdir())})
    return files


def _images_of(sample: dict) -> list[str]:
    return sample["images"] if "images" in sample else [sample["image"]]


def test_same_seed_same_bytes_other_seed_other_world(tmp_path, small_world):
    again = world.write_world(tmp_path / "again", seed=3, n_train=60, n_test=8)
    assert _files(again) == _files(small_world)
    other = world.write_world(tmp_path / "other", seed=4, n_train=60, n_test=8)
    assert other.stage2.read_bytes() != small_world.stage2.read_bytes()


def test_stage1_is_llava_caption_json_with_every_training_image(small_world):
    samples = world.read_json(small_world.stage1)
    assert len({s["id"] for s in samples}) == len(samples)
    stage2_images = {n for s in world.read_json(small_world.stage2) for n in _images_of(s)}
    assert {s["image"] for s in samples} == stage2_images
    for s in samples:
        assert (small_world.image_folder / s["image"]).is_file()
        human, gpt = s["conversations"]
        assert human == {"from": "human", "value": "<image>"}
        assert gpt["from"] == "gpt" and gpt["value"] and "<image>" not in gpt["value"]


def test_stage2_turns_alternate_and_markers_match_images(small_world):
    samples = world.read_json(small_world.stage2)
    assert len({s["id"] for s in samples}) == len(samples)
    n_two = 0
    for s in samples:
        conv = s["conversations"]
        assert len(conv) >= 2 and len(conv) % 2 == 0
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
        names = _images_of(s)
        assert all((small_world.image_folder / n).is_file() for n in names)
        assert sum(t["value"].count("<image>") for t in conv) == len(names)
        assert conv[0]["value"].count("<image>") == len(names)  # images come with the first question
        assert all("<image>" not in t["value"] for t in conv[1::2])
        if "images" in s:
            n_two += 1
            assert len(names) == 2 and "image" not in s
    assert n_two == round(0.5 * 60)


def test_test_rows_schema_and_markers(small_world):
    rows = world.read_test(small_world.test)
    assert {r["type"] for r in rows} == set(world.QUESTION_TYPES)
    assert len({r["id"] for r in rows}) == len(rows)
    for r in rows:
        names = _images_of(r)
        assert r["question"].count("<image>") == len(names) == (2 if r["type"] == "two_image" else 1)
        assert all((small_world.image_folder / n).is_file() for n in names)
        assert r["answer"] in r["options"]
        assert r["answer"] == normalize(r["answer"])  # answers are already in scoring form


def test_held_out_design_is_balanced_within_every_question_text(small_world):
    rows = world.read_test(small_world.test)
    answers: dict[tuple, Counter] = defaultdict(Counter)
    options: dict[tuple, list] = {}
    for r in rows:
        key = (r["type"], r["question"])
        answers[key][r["answer"]] += 1
        options[key] = r["options"]
    for key, counts in answers.items():
        assert set(counts) == set(options[key]), key
        assert len(set(counts.values())) == 1, (key, counts)
    per_type = Counter(r["type"] for r in rows)
    assert all(n >= 8 for n in per_type.values())


def test_chance_is_uniform_over_options_and_any_blind_answerer_scores_it(small_world):
    rows = world.read_test(small_world.test)
    chance = world.chance_by_type(rows)
    assert chance == {"colour": 0.2, "shape": 0.25, "position": pytest.approx(1 / 3, abs=1e-6),
                      "count": 0.25, "yesno": 0.5, "two_image": 0.5}
    # Image-blind answerers: functions of the question text alone.
    rng = random.Random(0)
    for _ in range(5):
        table: dict[str, str] = {}
        preds = [table.setdefault(r["question"], rng.choice(r["options"])) for r in rows]
        got = accuracy_by_type(rows, preds)
        assert got == pytest.approx(chance, abs=1e-5)
    # The best blind answerer answers each question text with its most frequent answer: still chance.
    by_question: dict[str, Counter] = defaultdict(Counter)
    for r in rows:
        by_question[r["question"]][r["answer"]] += 1
    best = [by_question[r["question"]].most_common(1)[0][0] for r in rows]
    assert accuracy_by_type(rows, best) == pytest.approx(chance, abs=1e-5)


def _occupied_cells(img: Image.Image) -> set[tuple[int, int]]:
    """Cells holding a saturated (non-grey) pixel."""
    px = img.load()
    cells = set()
    for y in range(img.height):
        for x in range(img.width):
            r, g, b = px[x, y]
            if max(r, g, b) - min(r, g, b) > 60:
                cells.add((y // world.CELL, x // world.CELL))
    return cells


def _saturated_pixels(img: Image.Image) -> int:
    return sum(max(p) - min(p) > 60 for p in img.getdata())


def _mean_colour(img: Image.Image) -> tuple[float, float, float]:
    sat = [p for p in img.getdata() if max(p) - min(p) > 60]
    return tuple(sum(c[i] for c in sat) / len(sat) for i in range(3))


def _nearest_colour(rgb) -> str:
    return min(world.COLOURS, key=lambda n: sum((a - b) ** 2 for a, b in zip(world.COLOURS[n], rgb)))


def test_answers_match_the_pixels(small_world):
    rows = world.read_test(small_world.test)
    folder = small_world.image_folder
    for r in rows:
        imgs = [Image.open(folder / n).convert("RGB") for n in _images_of(r)]
        if r["type"] == "count":
            assert str(len(_occupied_cells(imgs[0]))) == r["answer"], r["id"]
        elif r["type"] == "colour":
            assert _nearest_colour(_mean_colour(imgs[0])) == r["answer"], r["id"]
        elif r["type"] == "position":
            (row, col), = _occupied_cells(imgs[0])
            assert r["answer"] in (world.ROW_WORDS[row], world.COLUMN_WORDS[col]), r["id"]
        elif r["type"] == "two_image" and "more" in r["question"]:
            first, second = (len(_occupied_cells(im)) for im in imgs)
            assert r["answer"] == ("first" if first > second else "second"), r["id"]
        elif r["type"] == "two_image":  # "bigger": more coloured pixels per object
            first, second = (_saturated_pixels(im) / len(_occupied_cells(im)) for im in imgs)
            assert r["answer"] == ("first" if first > second else "second"), r["id"]


@pytest.fixture(scope="module")
def where_world(tmp_path_factory):
    return world.write_world(tmp_path_factory.mktemp("where"), seed=3, n_train=60, n_test=8,
                             one_object_fraction=0.4, position_extra=2)


def test_where_conversations_cover_every_one_object_training_image(where_world):
    """position_extra=2: two two-turn where-conversations per one-object training image, both axes,
    answers read off the pixels."""
    small_world = where_world
    samples = world.read_json(small_world.stage2)
    where = [s for s in samples if s["id"].startswith("pos-")]
    single = {s["image"] for s in samples if s["id"].startswith("qa-")}
    one_object = {n for n in single
                  if len(_occupied_cells(Image.open(small_world.image_folder / n).convert("RGB"))) == 1}
    assert one_object and Counter(s["image"] for s in where) == {n: 2 for n in one_object}
    for s in where:
        (row, col), = _occupied_cells(Image.open(small_world.image_folder / s["image"]).convert("RGB"))
        asked = {q["value"].replace("<image>\n", ""): a["value"] for q, a in zip(s["conversations"][::2],
                                                                               s["conversations"][1::2])}
        assert asked == {"Is the object on the left, in the center or on the right?": world.COLUMN_WORDS[col],
                         "Is the object at the top, in the middle or at the bottom?": world.ROW_WORDS[row]}


def test_default_world_has_no_where_only_conversations(small_world):
    assert not [s for s in world.read_json(small_world.stage2) if s["id"].startswith("pos-")]


def test_held_out_images_are_disjoint_from_training(small_world):
    def pixels(name):
        return hashlib.sha256(Image.open(small_world.image_folder / name).convert("RGB").tobytes()).hexdigest()

    train = {n for s in world.read_json(small_world.stage1) + world.read_json(small_world.stage2) for n in _images_of(s)}
    test = {n for r in world.read_test(small_world.test) for n in _images_of(r)}
    assert train and test and not train & test
    assert not {pixels(n) for n in train} & {pixels(n) for n in test}


def test_text_corpus_reads_each_image_as_its_caption(small_world):
    texts = world.text_corpus(small_world.stage1, small_world.stage2)
    stage2 = world.read_json(small_world.stage2)
    assert len(texts) == len(stage2)
    assert all(t and "<image>" not in t for t in texts)
    captions = dict((p.name, c) for p, c in world.caption_pairs(small_world.stage1, small_world.image_folder))
    for sample, text in list(zip(stage2, texts))[:10]:
        conv = sample["conversations"]
        first = conv[0]["value"]
        for name in _images_of(sample):
            first = first.replace("<image>", captions[name], 1)
        turns = [(first, conv[1]["value"])] + [(q["value"], a["value"]) for q, a in zip(conv[2::2], conv[3::2])]
        assert text == "\n".join(f"{q} {a}" for q, a in turns)


def test_scoring_helpers():
    assert normalize("  Red.\nmore text") == "red"
    assert normalize("Three") == "3" and normalize("the first") == "first"
    img = Image.new("RGB", (48, 48), (255, 0, 0))
    assert blank_like(img).size == (48, 48) and blank_like(img).getpixel((5, 5)) == (128, 128, 128)
    table = format_table({"colour": {"with_image": 1.0, "blind": 0.2, "chance": 0.2}})
    assert "colour" in table and "100.0%" in table and "20.0%" in table


def test_demo_output_folder_is_never_overwritten(tmp_path):
    from llavakit.demo.clock import new_out_dir

    assert new_out_dir(tmp_path / "new").is_dir()
    assert new_out_dir(tmp_path / "new") == tmp_path / "new"  # empty: fine
    (tmp_path / "new" / "metrics.json").write_text("{}")
    with pytest.raises(FileExistsError, match="not empty"):
        new_out_dir(tmp_path / "new")
    assert (tmp_path / "new" / "metrics.json").read_text() == "{}"


def test_phase_clock_reports_wall_and_cpu_seconds_per_phase():
    from llavakit.demo.clock import PhaseClock

    said = []
    clock = PhaseClock(said.append)
    clock.start("world")
    sum(i * i for i in range(200_000))  # some CPU work
    clock.stop()
    with clock.phase("stage1"):
        sum(i * i for i in range(200_000))
    report = clock.report()
    assert list(report["phases"]) == list(report["phases_cpu"]) == ["world", "stage1"]
    assert all(v >= 0 for v in report["phases_cpu"].values())
    assert report["seconds"] >= sum(report["phases"].values()) - 0.2
    assert set(report["load_average"]) == {"start", "end"}
    assert [line.split("]")[0] for line in said] == ["[world", "[stage1"] and all("CPU s)" in line for line in said)


def test_demo_runs_with_the_thread_count_asked_for(monkeypatch, capsys):
    """`llavakit demo --threads N` trains with N torch threads (default 2, what docs/demo.md measured)."""
    import argparse

    import torch

    from llavakit.demo import cli, pipeline

    seen = []
    monkeypatch.setattr(pipeline, "run_demo", lambda out, seed, scale: seen.append(torch.get_num_threads()))
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    before = torch.get_num_threads()
    try:
        assert cli.run(parser.parse_args(["--threads", "1"])) == 0
        assert cli.run(parser.parse_args([])) == 0
        assert seen == [1, cli.DEMO_THREADS]
        assert cli.run(parser.parse_args(["--threads", "0"])) == 2
        assert "--threads 0" in capsys.readouterr().err and len(seen) == 2
    finally:
        torch.set_num_threads(before)
