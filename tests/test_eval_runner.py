"""`llavakit eval`: batch size does not change predictions, interrupted runs resume, bad rows are named."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from llavakit.eval.metrics import get_metric
from llavakit.eval.runner import (
    METRICS_FILE,
    PREDICTIONS,
    RUN_FILE,
    EvalDataError,
    evaluate,
    read_samples,
    sample_turns,
)
from llavakit.infer.generate import GenerationSettings, Generator

SETTINGS = GenerationSettings(max_new_tokens=6)


@pytest.fixture(scope="module")
def generator(tiny_built):
    model, processor = tiny_built
    return Generator(model, processor)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Seven questions with 0, 1 or 2 images, of different lengths (so batches are really padded)."""
    d = tmp_path_factory.mktemp("evaldata")
    (d / "img").mkdir()
    for name, size, colour in (("red", (40, 30), (220, 20, 20)), ("blue", (24, 36), (20, 20, 220)),
                               ("green", (32, 32), (20, 200, 20))):
        Image.new("RGB", size, colour).save(d / "img" / f"{name}.png")
    rows = [
        {"id": "a", "question": "What colour is it?", "image": "img/red.png", "answers": ["red"] * 10},
        {"id": "b", "question": "Is there a circle?", "answer": "no"},
        {"question_id": 7, "question": "Which one is blue, the first or the second image?",
         "images": ["img/red.png", "img/blue.png"], "answers": [{"answer": "second"}] * 3},
        {"id": "d", "question": "Compare <image> with <image>.", "images": ["img/green.png", "img/red.png"],
         "answer": "different"},
        {"id": "e", "question": "How many?", "image": "img/green.png", "answer": "one"},
        {"id": "f", "question": "Describe the picture in detail, please, and say what the main colour is.",
         "image": "img/blue.png", "answer": "blue"},
        {"id": "g", "question": "What is in the image?", "image": "img/green.png", "answer": "a square"},
    ]
    path = d / "vqa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _predictions(out_dir) -> dict[str, str]:
    lines = (out_dir / PREDICTIONS).read_text().splitlines()
    records = [json.loads(x) for x in lines]
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)), f"an id was written twice: {ids}"
    return {r["id"]: r["prediction"] for r in records}


@pytest.fixture(scope="module")
def reference(generator, data, tmp_path_factory):
    """Batch size 1: the predictions every other run must reproduce."""
    out = tmp_path_factory.mktemp("eval_bs1")
    samples = read_samples(data, metric=get_metric("vqav2"))
    metrics = evaluate(generator, samples, out, "vqav2", batch_size=1, settings=SETTINGS, progress=False)
    return out, metrics


def test_batched_predictions_equal_batch_size_one(generator, data, reference, tmp_path):
    ref_dir, ref_metrics = reference
    samples = read_samples(data, metric=get_metric("vqav2"))
    assert sorted(len(s.images) for s in samples) == [0, 1, 1, 1, 1, 2, 2]
    metrics = evaluate(generator, samples, tmp_path, "vqav2", batch_size=3, settings=SETTINGS, progress=False)
    assert _predictions(tmp_path) == _predictions(ref_dir)
    assert set(_predictions(tmp_path)) == {"a", "b", "7", "d", "e", "f", "g"}
    assert metrics == ref_metrics
    assert metrics["samples"] == 7 and metrics["metric"] == "vqav2" and 0.0 <= metrics["accuracy"] <= 1.0
    assert json.loads((tmp_path / METRICS_FILE).read_text()) == metrics
    run = json.loads((tmp_path / RUN_FILE).read_text())
    assert run["template"] == "vicuna_v1" and run["max_new_tokens"] == 6


class _Interrupting:
    """A generator whose n-th `generate` call is interrupted (like Ctrl-C); counts prompts generated."""

    def __init__(self, inner, interrupt_on_call: int | None = None):
        self.inner, self.interrupt_on_call = inner, interrupt_on_call
        self.calls, self.prompts = 0, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def generate(self, conversations, images, settings=None):
        self.calls += 1
        if self.calls == self.interrupt_on_call:
            raise KeyboardInterrupt
        self.prompts += len(conversations)
        return self.inner.generate(conversations, images, settings)


def test_resume_after_interruption(generator, data, reference, tmp_path):
    samples = read_samples(data)
    flaky = _Interrupting(generator, interrupt_on_call=2)
    with pytest.raises(KeyboardInterrupt):
        evaluate(flaky, samples, tmp_path, "vqav2", batch_size=2, settings=SETTINGS, progress=False)
    first = (tmp_path / PREDICTIONS).read_text()
    assert len(first.splitlines()) == 2  # the first batch is on disk, the second never finished
    assert not (tmp_path / METRICS_FILE).exists()
    # a write cut short by a crash: an incomplete last line must be dropped, not kept or fatal
    with open(tmp_path / PREDICTIONS, "a") as f:
        f.write('{"id": "7", "predic')

    again = _Interrupting(generator)
    metrics = evaluate(again, samples, tmp_path, "vqav2", batch_size=2, settings=SETTINGS, progress=False)
    assert again.prompts == len(samples) - 2  # already-done ids were skipped
    text = (tmp_path / PREDICTIONS).read_text()
    assert text.startswith(first)  # appended, not rewritten
    assert _predictions(tmp_path) == _predictions(reference[0])
    assert metrics == reference[1]

    # a finished run resumed again generates nothing and gives the same metrics
    idle = _Interrupting(generator)
    assert evaluate(idle, samples, tmp_path, "vqav2", batch_size=4, settings=SETTINGS, progress=False) == metrics
    assert idle.prompts == 0


def test_resume_refuses_other_settings(generator, data, reference, tmp_path):
    samples = read_samples(data)[:2]
    evaluate(generator, samples, tmp_path, "vqav2", batch_size=2, settings=SETTINGS, progress=False)
    with pytest.raises(EvalDataError, match=r"max_new_tokens: 6 then, 3 now.*--overwrite"):
        evaluate(generator, samples, tmp_path, "vqav2", settings=GenerationSettings(max_new_tokens=3),
                 progress=False)
    out = evaluate(generator, samples, tmp_path, "exact", settings=GenerationSettings(max_new_tokens=3),
                   prompt_suffix="\nAnswer the question using a single word or phrase.", overwrite=True,
                   progress=False)
    assert out["metric"] == "exact" and out["samples"] == 2


def test_metric_can_change_on_a_finished_run(generator, data, reference):
    # the metric is not part of the predictions: re-scoring the same folder is allowed and cheap
    ref_dir, _ = reference
    idle = _Interrupting(generator)
    out = evaluate(idle, read_samples(data), ref_dir, "exact", settings=SETTINGS, progress=False,
                   prompt_suffix=get_metric("vqav2").prompt_suffix)
    assert idle.prompts == 0 and out["metric"] == "exact" and out["samples"] == 7


def test_prompts(data):
    s = {x.id: x for x in read_samples(data)}
    suffix = "\nAnswer briefly."
    assert sample_turns(s["a"], suffix)[0].content == "<image>\nWhat colour is it?\nAnswer briefly."
    assert sample_turns(s["b"], "")[0].content == "Is there a circle?"
    assert sample_turns(s["7"], "")[0].content.startswith("<image>\n<image>\nWhich one")
    assert sample_turns(s["d"], "")[0].content == "Compare <image> with <image>."  # markers stay where they are
    assert s["7"].answers == ["second"] * 3 and s["7"].images[1].endswith("img/blue.png")


def test_choices_are_listed_and_scored(tmp_path):
    path = tmp_path / "mc.jsonl"
    rows = [{"id": 1, "question": "Which animal can fly?", "choices": ["cat", "bird"], "answer": "B"},
            {"id": 2, "question": "Pick one:\nA. x\nB. y", "choices": ["x", "y"], "answer": 0}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    s = read_samples(path, metric=get_metric("option"))
    assert sample_turns(s[0], "\nAnswer with the letter.")[0].content == (
        "Which animal can fly?\nA. cat\nB. bird\nAnswer with the letter.")
    assert sample_turns(s[1], "")[0].content == "Pick one:\nA. x\nB. y"  # already listed: not repeated
    assert get_metric("option").score("B", s[0].answers, s[0].choices)["score"] == 1.0
    assert get_metric("option").score("A.", s[1].answers, s[1].choices)["score"] == 1.0


def test_bad_rows_are_named_with_line_index_id_and_fix(tmp_path):
    (tmp_path / "ok.png").write_bytes(b"")  # exists; decoding is only checked at generation time
    rows = [
        '{"id": "good", "question": "Q?", "image": "ok.png", "answer": "yes"}',
        "{not json",
        '{"id": "noq", "image": "ok.png", "answer": "x"}',
        '{"id": "good", "question": "dup?", "answer": "x"}',
        '{"id": "gone", "question": "Q?", "image": "missing.png", "answer": "yes"}',
        '{"id": "marks", "question": "<image> vs <image>", "image": "ok.png", "answer": "x"}',
        '{"id": "popebad", "question": "Q?", "answer": "maybe"}',
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(rows[:2]) + "\n\n" + "\n".join(rows[2:]) + "\n")  # a blank line too
    with pytest.raises(EvalDataError) as e:
        read_samples(path, metric=get_metric("pope"))
    msg = str(e.value)
    assert "6 bad row(s)" in msg
    assert f"{path} line 2 (sample #1): not valid JSON" in msg
    assert "line 4 (sample #2, id='noq'): has no `question` string -> add the question text" in msg
    assert "line 5 (sample #3, id='good'): repeats the id of sample #0" in msg
    assert "line 6 (sample #4, id='gone'): image not found:" in msg and "--image-folder" in msg
    assert "line 7 (sample #5, id='marks'): the question has 2 <image> marker(s) but the row gives 1 image(s)" in msg
    assert "line 8 (sample #6, id='popebad'): answer 'maybe' is not 'yes' or 'no'" in msg
    assert "choose another --metric" in msg


def test_undecodable_image_names_the_sample(generator, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"id": "x1", "question": "Q?", "image": "broken.png", "answer": "a"}) + "\n")
    with pytest.raises(EvalDataError, match=r"d\.jsonl line 1 \(sample #0, id='x1'\): image corrupt"):
        evaluate(generator, read_samples(path), tmp_path / "out", "vqav2", settings=SETTINGS, progress=False,
                 source=str(path))


def test_cli_end_to_end(tiny_built, data, reference, tmp_path, capsys):
    from llavakit.cli import main

    model, processor = tiny_built
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    out = tmp_path / "out"
    code = main(["eval", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--batch-size", "4",
                 "--max-new-tokens", "6", "--no-progress", "--device", "cpu"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((out / METRICS_FILE).read_text()) == reference[1]
    assert _predictions(out) == _predictions(reference[0])

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1}\n')
    assert main(["eval", "--model", str(model_dir), "--data", str(bad), "--no-progress"]) == 2
    assert "has no `question` string" in capsys.readouterr().err


def test_cli_resume_is_keyed_by_everything_that_changes_predictions(tiny_built, data, tmp_path, capsys):
    """Another image folder, another model saved at the same path, another dtype: refused with the
    differences; a record line that is valid JSON but not a record is named, not a crash."""
    import shutil

    import torch

    from llavakit.cli import main

    model, processor = tiny_built
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    out = tmp_path / "out"
    args = ["eval", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--max-new-tokens", "4",
            "--no-progress", "--device", "cpu", "--limit", "2"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 0  # the same command resumes (nothing to do)
    capsys.readouterr()

    other_images = tmp_path / "images2"
    shutil.copytree(data.parent, other_images)
    assert main(args + ["--image-folder", str(other_images)]) == 2
    assert "image_folder:" in capsys.readouterr().err

    assert main(args + ["--dtype", "bfloat16"]) == 2
    assert "dtype: 'default' then, 'bfloat16' now" in capsys.readouterr().err

    retrained = model.__class__(model.config)  # another model, saved where the first one was
    with torch.no_grad():
        for p in retrained.parameters():
            p.normal_()
    retrained.save_pretrained(model_dir)
    assert main(args) == 2
    assert "model_fingerprint:" in capsys.readouterr().err

    with open(out / PREDICTIONS, "a") as f:
        f.write("{}\n")
    assert main(args + ["--overwrite"]) == 0  # --overwrite starts over
    capsys.readouterr()
    with open(out / PREDICTIONS, "a") as f:
        f.write("{}\n")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "line 3 is JSON but not a prediction record" in err
