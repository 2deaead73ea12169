"""``llavakit data check`` / ``data stats`` count a multi-image sample's image tokens the way the processor does under
``anyres_max``: each image of a sample with several is one base tile + newline (OneVision's rule), not the tiled
count it would get alone; and an image that truncation leaves alone in its sample is counted as training counts it
then (tiled), so the check's truncation verdict is training's."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from llavakit.data.dataset import SupervisedDataset
from llavakit.data.formats import load_conversations
from llavakit.data.templates import get_template

PINS = [[32, 32], [32, 64], [64, 32], [64, 64]]
SIZES = [(61, 46), (29, 86)]  # alone: 44 and 40 tokens; together: 17 each (base tile + newline)


@pytest.fixture(scope="module")
def built(tiny_dirs, tmp_path_factory):
    import llavakit

    torch.manual_seed(0)
    model, processor = llavakit.build(tiny_dirs["siglip"], tiny_dirs["qwen2"], image_tokens="anyres_max",
                                      image_grid_pinpoints=PINS, anyres_max_tiles=2)
    root = tmp_path_factory.mktemp("multi_image")
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    for k, size in enumerate(SIZES):
        Image.new("RGB", size, (40 * k, 90, 160)).save(root / f"{k}.png")
    return processor, root


def _write(root, name, rows):
    (root / name).write_text(json.dumps(rows))
    return str(root / name)


def _stats_length(main, capsys, path, root) -> int:
    assert main(["data", "stats", path, "--model", str(root / "model"), "--template", "vicuna_v1",
                 "--histogram", str(root / "h.png")]) == 0
    out = capsys.readouterr().out
    return int(next(ln for ln in out.splitlines() if ln.strip().startswith("max")).split()[-1])


def _check_lines(main, capsys, path, root, max_length) -> tuple[int, list[str]]:
    rc = main(["data", "check", path, "--model", str(root / "model"), "--template", "vicuna_v1",
               "--max-length", str(max_length)])
    return rc, [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("#")]


def test_the_estimate_of_a_multi_image_sample_is_the_processors_count(built, capsys):
    from llavakit.cli import main

    processor, root = built
    counts = processor.image_token_counts([root / "0.png", root / "1.png"])
    assert counts == [processor.num_image_tokens(tiled=False)] * 2  # the multi-image rule...
    alone = [processor.image_token_counts([root / f"{k}.png"])[0] for k in range(2)]
    assert all(a > c for a, c in zip(alone, counts))  # ...which gives fewer tokens than tiling each image
    # the processor's real count for the sample: the placeholders it expands the markers to
    images = [Image.open(root / f"{k}.png").convert("RGB") for k in range(2)]
    ids = processor(text="<image>\n<image>\nWhich is wider?", images=images)["input_ids"][0]
    assert sum(int(i == processor.image_token_id) for i in ids) == sum(counts)

    path = _write(root, "two.json", [{"id": "two", "images": ["0.png", "1.png"], "conversations": [
        {"from": "human", "value": "<image>\n<image>\nWhich is wider?"}, {"from": "gpt", "value": "the first"}]}])
    convs, _ = load_conversations(path)
    template = get_template("vicuna_v1", processor.tokenizer)
    dataset = SupervisedDataset(convs, processor, template)
    ids, _ = dataset.tokens(0)
    assert int((ids == processor.image_token_id).sum()) == sum(counts)
    # data stats' length (tokens) is training's exact length: the multi-image count, not the tiled one
    length = _stats_length(main, capsys, path, root)
    assert length == dataset.lengths[0]
    # data check at exactly that budget: fits (the tiled count would make it too long by sum(alone) - sum(counts))
    rc, lines = _check_lines(main, capsys, path, root, length)
    assert rc == 0 and lines == [], lines
    rc, lines = _check_lines(main, capsys, path, root, length - 1)
    assert len(lines) == 1 and f"too long: {length} tokens > max_length {length - 1}" in lines[0], lines


def test_an_image_left_alone_by_truncation_is_judged_as_training_counts_it(built, capsys):
    """Two rounds, an image in each: a budget that keeps round one with its image counted as one of two (base tile
    + newline) but not tiled alone, as training counts it once round two is cut, drops the sample in training;
    the check says so (an error), and with a budget that fits it tiled, both keep the same supervised tokens."""
    from llavakit.cli import main

    processor, root = built
    rows = [{"id": "rounds", "images": ["0.png", "1.png"], "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "blue"},
        {"from": "human", "value": "<image>\nAnd this one?"}, {"from": "gpt", "value": "teal, and taller"}]}]
    path = _write(root, "rounds.json", rows)
    template = get_template("vicuna_v1", processor.tokenizer)
    first, _ = load_conversations(_write(root, "first.json", [{**rows[0], "images": ["0.png"],
                                                               "conversations": rows[0]["conversations"][:2]}]))
    tiled = SupervisedDataset(first, processor, template).lengths[0]  # round one, its image tiled (alone)
    multi = tiled - processor.image_token_counts([root / "0.png"])[0] + processor.num_image_tokens(tiled=False)
    convs, _ = load_conversations(path)
    assert SupervisedDataset(convs, processor, template).lengths[0] > tiled  # the whole sample is longer

    budget = (multi + tiled) // 2  # fits round one as one of two images, not tiled alone
    training = SupervisedDataset(convs, processor, template, max_length=budget)
    assert len(training) == 0 and training.report.dropped == 1
    rc, lines = _check_lines(main, capsys, path, root, budget)
    assert rc == 1 and len(lines) == 1 and "error" in lines[0] and "'rounds'" in lines[0], lines

    training = SupervisedDataset(convs, processor, template, max_length=tiled)  # round one fits, tiled
    assert len(training) == 1 and training.report.truncated == 1 and training.lengths[0] == tiled
    _, labels = training.tokens(0)
    kept = int((labels != -100).sum())
    rc, lines = _check_lines(main, capsys, path, root, tiled)
    assert rc == 0 and len(lines) == 1 and "warning" in lines[0], lines
    assert f"truncation keeps {kept} of" in lines[0], lines
