"""`llavakit data captions`: every kind of pair source becomes stage-1 LLaVA JSON that passes `data check`,
one instruction of the list per sample with the marker on either side (fixed by the seed), bad captions
skipped and reported, and the output trains through `llavakit train`."""

from __future__ import annotations

import csv
import json

import pytest
import yaml
from PIL import Image

from llavakit.cli import main
from llavakit.data.captions import read_instructions, stage1_question

BRIEF = read_instructions()


def _images(folder, n):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (16, 16), (i * 9 % 255, 40, 200)).save(folder / f"img{i}.png")


def _load(path):
    text = path.read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines()] if path.suffix == ".jsonl" else json.loads(text)


def _check_passes(out, capsys, *extra):
    assert main(["data", "check", str(out), *extra]) == 0
    summary = dict(line.rsplit(None, 1) for line in capsys.readouterr().out.splitlines() if line.startswith("  with"))
    assert summary == {"  with errors": "0", "  with warnings": "0"}


def test_the_shipped_list_is_llavas_brief_description_list():
    assert len(BRIEF) == 11 and BRIEF[0] == "Describe the image concisely."
    assert all(q.endswith(".") and "<image>" not in q for q in BRIEF)


def test_csv_pairs_become_clean_stage1_samples_and_bad_ones_are_reported(tmp_path, capsys):
    _images(tmp_path / "imgs", 40)
    rows = [{"image": f"imgs/img{i}.png", "caption": f"  a   blue\tsquare number {i} \n"} for i in range(40)]
    rows[3]["caption"] = "   "
    rows[5]["caption"] = "word " * 200
    rows[7]["image"] = "imgs/missing.png"
    rows[9]["caption"] = "a <image> inside"
    with (tmp_path / "pairs.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, ["image", "caption"])
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "out" / "stage1.json"
    assert main(["data", "captions", str(tmp_path / "pairs.csv"), str(out), "--report", str(tmp_path / "r.json"),
                 "--max-words", "50"]) == 0
    printed = capsys.readouterr().out
    data = _load(out)
    assert len(data) == 36 and "40 pairs read, 36 samples written, 4 skipped" in printed
    skipped = {s["index"]: s["reason"] for s in json.loads((tmp_path / "r.json").read_text())}
    assert skipped[3] == "empty caption" and skipped[5].startswith("caption too long: 200 words")
    assert skipped[7].startswith("image not found") and skipped[9] == "caption holds <image>"
    sample = data[0]
    assert sample["id"] == "img0" and sample["conversations"][1] == {"from": "gpt", "value": "a blue square number 0"}
    assert (out.parent / sample["image"]).resolve() == (tmp_path / "imgs" / "img0.png").resolve()
    questions = [s["conversations"][0]["value"] for s in data]
    before = [q for q in questions if q.startswith("<image>\n")]
    after = [q for q in questions if q.endswith("\n<image>")]
    assert len(before) + len(after) == 36 and before and after  # both of LLaVA's layouts
    assert {q.replace("<image>", "").strip() for q in questions} <= set(BRIEF)
    assert len({q.replace("<image>", "").strip() for q in questions}) > 3
    _check_passes(out, capsys)


def test_the_seed_decides_the_instructions_and_nothing_else_does(tmp_path):
    _images(tmp_path, 12)
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"image": f"img{i}.png", "blip_caption": f"c {i}"}) + "\n"
                                              for i in range(12)))
    outs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        assert main(["data", "captions", str(tmp_path / "p.jsonl"), str(tmp_path / f"{name}.jsonl"),
                     "--seed", str(seed)]) == 0
        outs[name] = (tmp_path / f"{name}.jsonl").read_text()
    assert outs["a"] == outs["b"] and outs["a"] != outs["c"]
    assert [r["conversations"][0]["value"] for r in map(json.loads, outs["a"].splitlines())] == \
        [stage1_question(BRIEF, 1, i) for i in range(12)]


def test_tsv_with_named_columns_and_an_edited_instruction_list(tmp_path, capsys):
    _images(tmp_path / "pics", 6)
    (tmp_path / "pairs.tsv").write_text("key\tfile\tdesc\n" + "".join(f"k{i}\timg{i}.png\tdesc {i}\n" for i in range(6)))
    (tmp_path / "mine.txt").write_text("# mine\nWhat is shown?\n\nName it.\n")
    out = tmp_path / "s1.jsonl"
    assert main(["data", "captions", str(tmp_path / "pairs.tsv"), str(out), "--image-column", "file",
                 "--caption-column", "desc", "--id-column", "key", "--image-folder", str(tmp_path / "pics"),
                 "--instructions", str(tmp_path / "mine.txt")]) == 0
    data = _load(out)
    assert [r["id"] for r in data] == [f"k{i}" for i in range(6)]
    assert {r["conversations"][0]["value"].replace("<image>", "").strip() for r in data} <= {"What is shown?", "Name it."}
    assert main(["data", "captions", str(tmp_path / "pairs.tsv"), str(out), "--image-column", "file",
                 "--caption-column", "nope"]) == 1
    assert "no column 'nope' (--caption-column); columns: ['desc', 'file', 'key']" in capsys.readouterr().err
    assert len(_load(out)) == 6 and not list(tmp_path.glob("*.tmp"))  # the earlier output is kept


def test_a_folder_of_images_with_txt_captions(tmp_path, capsys):
    _images(tmp_path / "f" / "sub", 3)
    for i in range(3):
        (tmp_path / "f" / "sub" / f"img{i}.txt").write_text(f"caption\n{i}\n")
    (tmp_path / "f" / "sub" / "img2.txt").unlink()  # an image without its caption is reported
    out = tmp_path / "o.json"
    assert main(["data", "captions", str(tmp_path / "f"), str(out)]) == 0
    assert "1 skipped" in capsys.readouterr().out
    data = _load(out)
    assert [r["id"] for r in data] == ["sub/img0", "sub/img1"] and data[1]["conversations"][1]["value"] == "caption 1"
    _check_passes(out, capsys)


@pytest.mark.parametrize("streaming", [False, True])
def test_a_datasets_source_with_embedded_images(tmp_path, capsys, streaming):
    import datasets

    ds = datasets.Dataset.from_dict(
        {"image": [Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(5)], "text": [f"red {i}" for i in range(5)]},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}))
    ds.to_parquet(str(tmp_path / "pairs.parquet"))
    out = tmp_path / "o" / "s1.json"
    args = ["data", "captions", str(tmp_path / "pairs.parquet"), str(out)] + (["--streaming"] if streaming else [])
    assert main(args) == 0
    data = _load(out)
    assert len(data) == 5 and all((out.parent / r["image"]).is_file() for r in data)
    assert [r["conversations"][1]["value"] for r in data] == [f"red {i}" for i in range(5)]
    with Image.open(out.parent / data[2]["image"]) as im:
        assert im.getpixel((0, 0))[0] == 80
    _check_passes(out, capsys)


def test_captions_train_as_stage1(tiny_dirs, tmp_path):
    _images(tmp_path / "imgs", 8)
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"image": f"imgs/img{i}.png", "caption": f"square {i}"}) + "\n"
                                              for i in range(8)))
    assert main(["data", "captions", str(tmp_path / "p.jsonl"), str(tmp_path / "s1.json")]) == 0
    tree = {"model": {"vision": str(tiny_dirs["clip"]), "llm": str(tiny_dirs["llama"])},
            "data": {"train": str(tmp_path / "s1.json"), "template": "plain", "max_length": 64},
            "train": {"stage": "pretrain", "output_dir": str(tmp_path / "run"), "max_steps": 2, "batch_size": 4,
                      "report_to": "none"}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(tree))
    assert main(["train", str(tmp_path / "cfg.yaml")]) == 0
    losses = [json.loads(line) for line in (tmp_path / "run" / "losses.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(r["loss"] > 0 for r in losses)
