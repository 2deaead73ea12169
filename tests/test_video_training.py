"""Videos through data, training, chat, web and eval, on a tiny ``anyres_max`` model with a ``<video>`` token.

What a user relies on: ``video`` / ``videos`` rows (a file, or a list of frame images) are read in every format;
``llavakit data check`` names a bad video's file, sample and fix, ``data stats`` counts video tokens; every
sample's video placeholders are the processor's count of the decoded frames and the model produces exactly that
many features from a collated batch (padding or packing, mixed with image, multi-image and text-only samples);
only the answers are supervised; a resumed run ends where an uninterrupted one does; batched generation with a
video beside an image equals one prompt at a time; ``/video`` in chat, a video upload in web and ``video`` in eval
rows reach the model. The clips are written here with PyAV: a bright square moving right on a dark background.
"""

from __future__ import annotations

import argparse
import json
import shutil

import av
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

import llavakit
from llavakit.data.collate import PackingCollator, PadCollator
from llavakit.data.conversation import SampleError, Turn
from llavakit.data.dataset import SupervisedDataset
from llavakit.data.formats import load_conversations, parse_row
from llavakit.data.video import VideoLimits, load_video
from llavakit.train import load_config, run_training
from llavakit.train.loop import read_losses

PINS = [[32, 32], [32, 64], [64, 32], [64, 64]]
SIZES = [(61, 46), (29, 86), (48, 48)]


def write_clip(path, n, size=(48, 40), rate=10):
    """`n` frames of a 10 px white square moving right by 3 px a frame (mpeg4 in mp4)."""
    w, h = size
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=rate)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            a = np.full((h, w, 3), 20, np.uint8)
            a[15:25, 3 * i:3 * i + 10] = 235
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def _image(size, seed):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(size[1], size[0], 3, generator=g) * 255).byte().numpy())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """12 LLaVA-JSON rows: a video file, one image, two images, text only, a video as frames (marker inserted),
    an image and a video; two clips (6 and 9 frames), 5 frame images."""
    root = tmp_path_factory.mktemp("video_data")
    for d in ("images", "videos", "frames"):
        (root / d).mkdir()
    for k, s in enumerate(SIZES):
        _image(s, k).save(root / "images" / f"{k}.png")
    write_clip(root / "videos" / "v0.mp4", 6)
    write_clip(root / "videos" / "v1.mp4", 9)
    for k in range(5):
        Image.new("RGB", (30, 20), (40 * k, 10, 200 - 30 * k)).save(root / "frames" / f"{k}.png")
    frames = [f"frames/{k}.png" for k in range(5)]
    rows = []
    for i in range(12):
        a, b, clip = f"{i % 3}.png", f"{(i + 1) % 3}.png", f"v{i % 2}.mp4"
        kind = i % 6
        if kind == 0:
            rows.append({"id": f"vid{i}", "video": f"videos/{clip}", "conversations": [
                {"from": "human", "value": "<video>\nWhich way does it move?"},
                {"from": "gpt", "value": f"right {i}"}]})
        elif kind == 1:
            rows.append({"id": f"one{i}", "image": f"images/{a}", "conversations": [
                {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": f"noise {i}"}]})
        elif kind == 2:
            rows.append({"id": f"two{i}", "images": [f"images/{a}", f"images/{b}"], "conversations": [
                {"from": "human", "value": "<image>\n<image>\nWhich is wider?"},
                {"from": "gpt", "value": f"the {i}th"}]})
        elif kind == 3:
            rows.append({"id": f"text{i}", "conversations": [
                {"from": "human", "value": f"Count to {i}."}, {"from": "gpt", "value": f"done {i}"}]})
        elif kind == 4:  # frames, no marker: one is put before the question
            rows.append({"id": f"frames{i}", "video": frames, "conversations": [
                {"from": "human", "value": "Does it get darker?"}, {"from": "gpt", "value": f"bluer {i}"}]})
        else:
            rows.append({"id": f"mix{i}", "image": f"images/{a}", "video": f"videos/{clip}", "conversations": [
                {"from": "human", "value": "<image>\n<video>\nIs the picture in the clip?"},
                {"from": "gpt", "value": f"no {i}"}, {"from": "human", "value": "Sure?"},
                {"from": "gpt", "value": f"yes {i}"}]})
    (root / "train.json").write_text(json.dumps(rows))
    return root


def _tree(tiny_dirs, data, out, packing=False, **train):
    model = {"vision": str(tiny_dirs["siglip"]), "llm": str(tiny_dirs["qwen2"]), "image_tokens": "anyres_max",
             "image_grid_pinpoints": PINS, "anyres_max_tiles": 2, "attn_implementation": "eager"}
    return {"model": model,
            "data": {"train": str(data / "train.json"), "template": "vicuna_v1", "max_length": 1024,
                     "packing": packing, "cache": False},
            "train": {"stage": "finetune", "output_dir": str(out), "max_steps": 2, "batch_size": 4, "lr": 1e-3,
                      "warmup_ratio": 0.0, "log_every": 1, "report_to": "none", "seed": 0, **train}}


@pytest.fixture(scope="module")
def built(tiny_dirs, data, tmp_path_factory):
    from llavakit.train.recipes import assemble

    torch.manual_seed(0)
    model, processor = assemble(load_config(base=_tree(tiny_dirs, data, tmp_path_factory.mktemp("unused"))))
    processor.template = "vicuna_v1"
    assert processor.video_token_id is not None
    return model.eval(), processor


def _rows(data):
    return json.loads((data / "train.json").read_text())


def _dataset(data, processor, **kw):
    convs, problems = load_conversations(data / "train.json")
    assert all(p.severity == "warning" and "marker inserted" in p.reason for p in problems)
    return SupervisedDataset(convs, processor, "vicuna_v1", **kw)


def _videos_of(data, row) -> list:
    v = row.get("video")
    if v is None:
        return []
    return [[str(data / f) for f in v] if isinstance(v, list) else str(data / v)]


def _images_of(data, row) -> list[str]:
    return [str(data / p) for p in (row.get("images") or ([row["image"]] if "image" in row else []))]


def _spans(labels):
    out, run = [], []
    for t in labels.tolist() + [-100]:
        if t != -100:
            run.append(t)
        elif run:
            out, run = out + [run], []
    return out


# --- formats -------------------------------------------------------------------------------------------------
def test_video_fields_in_the_row_formats(tmp_path):
    turns = [{"from": "human", "value": "<video>\nWhat?"}, {"from": "gpt", "value": "x"}]
    conv, problems = parse_row({"id": "a", "video": "c.mp4", "conversations": turns}, "llava", index=0,
                               image_folder=str(tmp_path))
    assert conv.videos == [str(tmp_path / "c.mp4")] and not problems
    conv, _ = parse_row({"videos": [["f0.png", "f1.png"], "c.mp4"], "image": "i.png", "conversations": [
        {"from": "human", "value": "<image><video><video>What?"}, {"from": "gpt", "value": "x"}]}, "llava", index=1,
        image_folder=str(tmp_path))
    assert conv.videos == [[str(tmp_path / "f0.png"), str(tmp_path / "f1.png")], str(tmp_path / "c.mp4")]
    # LLaVA-Video-178K spells a video's marker <image>: with videos and no images it is read as <video>
    conv, problems = parse_row({"video": "c.mp4", "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}]}, "llava", index=2)
    assert conv.turns[0].content == "<video>\nWhat?" and not conv.images and not problems
    # messages: an inline video part, and the row-level field
    conv, _ = parse_row({"messages": [{"role": "user", "content": [{"type": "video", "video": "c.mp4"},
                                                                   {"type": "text", "text": "Moving?"}]},
                                      {"role": "assistant", "content": "yes"}]}, "messages", index=3,
                        image_folder=str(tmp_path))
    assert conv.turns[0].content == "<video>\nMoving?" and conv.videos == [str(tmp_path / "c.mp4")]
    for bad, words in (({"video": "a.mp4", "videos": ["b.mp4"]}, "both 'video' and 'videos'"),
                       ({"video": [1, 2]}, "'video'[0]"), ({"videos": "a.mp4"}, "'videos' is str")):
        conv, problems = parse_row({**bad, "conversations": turns}, "llava", index=4, image_folder=str(tmp_path))
        assert conv is None and words in problems[0].reason, problems


# --- data: counts, labels, batches ---------------------------------------------------------------------------
@pytest.mark.parametrize("collator", ["pad", "pack"])
def test_batches_supervise_the_answers_and_the_model_makes_every_video_placeholders_feature(built, data, collator):
    model, processor = built
    ds, rows, tok = _dataset(data, processor), _rows(data), processor.tokenizer
    coll = PadCollator(tok.pad_token_id) if collator == "pad" else PackingCollator()
    for start in range(0, len(ds), 4):
        idx = list(range(start, start + 4))
        items = [ds[i] for i in idx]
        batch = coll(items)
        assert [ds.lengths[i] for i in idx] == [len(it["input_ids"]) for it in items]  # exact up front
        decoded = [load_video(v, processor.video_max_frames) for i in idx for v in _videos_of(data, rows[i])]
        counts = [processor.num_video_tokens(len(f)) for f in decoded]
        if decoded:  # [V_total, F_max, 3, s, s] in placeholder order, shorter videos zero-padded
            pv, nf = batch["pixel_values_videos"], batch["video_num_frames"]
            assert nf.tolist() == [len(f) for f in decoded] and pv.shape[:2] == (len(decoded), max(nf.tolist()))
            for k, n in enumerate(nf.tolist()):
                assert not pv[k, n:].any()
        else:
            assert "pixel_values_videos" not in batch and "video_num_frames" not in batch
        if "batch_num_images" in batch:  # videos are not images
            assert batch["batch_num_images"].tolist() == [len(_images_of(data, rows[i])) for i in idx]
        ids, labels = batch["input_ids"], batch["labels"]
        if collator == "pack":
            lens = [len(it["input_ids"]) for it in items]
            ids, labels = ids[0].split(lens), labels[0].split(lens)
        for i, row_ids, row_labels in zip(idx, ids, labels):
            vids = [processor.num_video_tokens(len(load_video(v))) for v in _videos_of(data, rows[i])]
            assert int((row_ids == processor.video_token_id).sum()) == sum(vids)
            assert int((row_ids == processor.image_token_id).sum()) == sum(processor.image_token_counts(
                [Image.open(p) for p in _images_of(data, rows[i])]))
            answers = [tok.decode(s, skip_special_tokens=True).strip() for s in _spans(row_labels)]
            assert answers == [t["value"] for t in rows[i]["conversations"] if t["from"] == "gpt"]
        with torch.no_grad():
            if decoded:
                feats = model.get_video_features(batch["pixel_values_videos"], batch["video_num_frames"])
                assert [f.shape[0] for f in feats] == counts
            assert int((batch["input_ids"] == processor.video_token_id).sum()) == sum(counts)
            kwargs = {k: v for k, v in batch.items() if k != "use_cache"}
            assert torch.isfinite(model(**kwargs).loss)  # the guarded splices run: placeholders == features


def test_a_batch_with_a_video_and_one_without(built, data):
    model, processor = built
    ds = _dataset(data, processor)
    for coll in (PadCollator(processor.tokenizer.pad_token_id), PackingCollator()):
        batch = coll([ds[0], ds[1]])  # a video sample, then a one-image sample
        assert batch["video_num_frames"].tolist() == [6] and batch["batch_num_images"].tolist() == [0, 1]
        with torch.no_grad():
            emb = model.embed(batch["input_ids"], batch["pixel_values"], image_sizes=batch["image_sizes"],
                              batch_num_images=batch["batch_num_images"],
                              pixel_values_videos=batch["pixel_values_videos"],
                              video_num_frames=batch["video_num_frames"])
            assert emb.shape[:2] == batch["input_ids"].shape
            with pytest.raises(ValueError, match="video"):  # without the video, its placeholders are an error
                model.embed(batch["input_ids"], batch["pixel_values"], image_sizes=batch["image_sizes"],
                            batch_num_images=batch["batch_num_images"])


def test_a_video_sample_on_a_model_without_videos_is_a_clear_error(tiny_built, data):
    _, processor = tiny_built  # base policy: no <video> token
    convs, _ = load_conversations(data / "train.json")
    ds = SupervisedDataset(convs, processor, "vicuna_v1")
    video_rows = [r["id"] for r in _rows(data) if "video" in r]
    skipped = [p for p in ds.report.problems if "video unsupported" in p.reason]
    assert sorted(p.id for p in skipped) == sorted(video_rows) and "anyres_max" in skipped[0].hint
    with pytest.raises(SampleError, match=r"sample #0 \(id='vid0'\).*video unsupported"):
        SupervisedDataset(convs, processor, "vicuna_v1", strict=True)


def test_decoded_frames_fewer_than_the_metadata_said_recount_the_placeholders(built, data, monkeypatch):
    """If a file's metadata overstated its frames, the item follows the decoded frames (model == placeholders)."""
    from llavakit.data.dataset import recount_videos

    _, processor = built
    ds = _dataset(data, processor)
    i, vid = 0, processor.video_token_id  # vid0: 6 frames; pretend its metadata had said 8
    ids, labels = ds.tokens(i)
    grown = recount_videos(ids, labels, vid, [processor.num_video_tokens(6)], [processor.num_video_tokens(8)])
    assert int((grown[0] == vid).sum()) == processor.num_video_tokens(8) and len(grown[0]) == len(grown[1])
    monkeypatch.setattr(ds.store, "video_frames", lambda j: [8])
    monkeypatch.setattr(ds.store, "tokens", lambda j: grown)
    item = ds[i]
    assert torch.equal(item["input_ids"], ids) and torch.equal(item["labels"], labels)
    assert item["video_num_frames"].tolist() == [6]


def test_data_check_names_bad_videos_and_stats_count_video_tokens(built, data, tmp_path, capsys):
    from llavakit.cli import main
    from llavakit.data.validate import validate

    model, processor = built
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    shutil.copytree(data, tmp_path / "d")
    (tmp_path / "d" / "videos" / "noise.mp4").write_bytes(bytes(range(256)) * 40)
    rows = _rows(data)[:4] + [
        {"id": "lost", "video": "videos/missing.mp4", "conversations": [
            {"from": "human", "value": "<video>\nWhat?"}, {"from": "gpt", "value": "x"}]},
        {"id": "noise", "video": "videos/noise.mp4", "conversations": [
            {"from": "human", "value": "<video>\nWhat?"}, {"from": "gpt", "value": "x"}]},
        {"id": "twice", "video": "videos/v0.mp4", "conversations": [
            {"from": "human", "value": "<video><video>\nWhat?"}, {"from": "gpt", "value": "x"}]}]
    (tmp_path / "d" / "bad.json").write_text(json.dumps(rows))
    assert main(["data", "check", str(tmp_path / "d" / "bad.json"), "--model", str(tmp_path / "model")]) == 1
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("#")]
    lost = next(ln for ln in lines if "'lost'" in ln)
    assert lost.startswith("#4") and "video missing" in lost and "missing.mp4" in lost and "-> check the path" in lost
    noise = next(ln for ln in lines if "'noise'" in ln)
    assert ("video corrupt" in noise or "video has no frames" in noise) and "noise.mp4" in noise and "->" in noise
    assert "video count mismatch: 2 <video> marker(s) but 1 video(s)" in next(ln for ln in lines if "'twice'" in ln)
    # over a limit: the metadata is enough, nothing decoded
    convs, _ = load_conversations(data / "train.json")
    over = validate(convs[:1], video_limits=VideoLimits(max_frame_pixels=100), full_image_check=False)
    assert len(over) == 1 and "video too large" in over[0].reason and "48x40" in over[0].reason and over[0].hint
    # stats: video rows and their tokens
    assert main(["data", "stats", str(data / "train.json"), "--model", str(tmp_path / "model"),
                 "--histogram", str(tmp_path / "h.png")]) == 0
    out = capsys.readouterr().out
    table = {ln[:32].strip(): ln[32:].strip() for ln in out.splitlines() if len(ln) > 32 and ln[32:].strip().isdigit()}
    expected = sum(processor.num_video_tokens(len(load_video(v))) for r in _rows(data) for v in _videos_of(data, r))
    assert table["samples with videos"] == "6" and table["videos"] == "6"
    assert int(table["video tokens"]) == expected and "could not be tokenized" not in out


def test_startup_cache_keys_on_video_sampling_and_sees_changed_videos(built, data, tmp_path):
    from llavakit.data.templates import get_template
    from llavakit.data.token_cache import prepare

    _, processor = built
    shutil.copytree(data, tmp_path / "d")
    template = get_template("vicuna_v1", processor.tokenizer)

    def run():
        notes = []
        got = prepare(str(tmp_path / "d" / "train.json"), processor, template, cache_dir=tmp_path / "cache",
                      say=notes.append)
        return got.dataset, " ".join(notes)

    first, note = run()
    assert "wrote" in note
    again, note = run()
    assert "hit" in note and again.lengths == first.lengths
    assert again.store.videos(4) == first.store.videos(4) and isinstance(again.store.videos(4)[0], list)
    assert torch.equal(again[5]["pixel_values_videos"], first[5]["pixel_values_videos"])
    saved = processor.video_max_frames
    try:
        processor.video_max_frames = 3  # fewer frames: other counts, so the cache must miss
        fewer, note = run()
        assert "hit" not in note and sum(fewer.lengths) < sum(first.lengths)
        assert fewer[0]["video_num_frames"].tolist() == [3]
    finally:
        processor.video_max_frames = saved
    write_clip(tmp_path / "d" / "videos" / "v0.mp4", 4)  # a changed video: rebuilt, with its new count
    changed, note = run()
    assert "changed" in note and changed.store.video_frames(0) == [4]


# --- training ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("packing", [False, True])
def test_training_steps_on_videos_images_and_text(tiny_dirs, data, tmp_path, packing):
    tree = _tree(tiny_dirs, data, tmp_path / "run", packing)
    tree["data"]["group_by_length"] = True  # grouped by the exact lengths, video placeholders included
    run = run_training(load_config(base=tree))
    losses = [r["loss"] for r in read_losses(run / "losses.jsonl")]
    assert len(losses) == 2 and all(np.isfinite(losses))
    model, processor = llavakit.load(run / "model")
    assert model.config.video_token_id == processor.video_token_id is not None
    assert model.config.image_grid_pinpoints == processor.image_grid_pinpoints == PINS


def test_resumed_video_run_ends_with_the_weights_of_an_uninterrupted_one(tiny_dirs, data, tmp_path):
    tree = _tree(tiny_dirs, data, tmp_path / "run", packing=True, max_steps=4, save_every=2, batch_size=3)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tree))
    run = run_training(path)
    ref_weights = load_file(str(run / "model" / "model.safetensors"))
    ref_losses = read_losses(run / "losses.jsonl")
    shutil.rmtree(run / "model")
    (run / "finished.json").unlink()
    run_training(path, resume=True)
    losses = read_losses(run / "losses.jsonl")
    assert [r["step"] for r in losses] == [1, 2, 3, 4]
    assert [r["loss"] for r in losses] == pytest.approx([r["loss"] for r in ref_losses], rel=1e-6, abs=1e-7)
    weights = load_file(str(run / "model" / "model.safetensors"))
    assert max((weights[k] - ref_weights[k]).abs().max().item() for k in ref_weights) < 1e-6


# --- inference -----------------------------------------------------------------------------------------------
def test_batched_generation_with_a_video_beside_an_image_equals_one_at_a_time(built, data):
    from llavakit.infer.generate import GenerationSettings, Generator

    model, processor = built
    gen = Generator(model, processor, template="vicuna_v1")
    clip0, clip1 = str(data / "videos" / "v0.mp4"), str(data / "videos" / "v1.mp4")
    convs = [[Turn("user", "<video>\nWhich way?")], [Turn("user", "<image>\nWhat is it?")],
             [Turn("user", "<image>\n<video>\nBoth?")], [Turn("user", "Hello")]]
    images = [[], [_image((61, 46), 0)], [_image((29, 86), 1)], []]
    videos = [[clip0], [], [clip1], []]
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    inputs = gen.encode(convs, images, videos)
    assert inputs["video_num_frames"].tolist() == [6, 9] and inputs["batch_num_images"].tolist() == [0, 1, 1, 0]
    with torch.no_grad():
        batched = model.generate(**inputs, **kwargs)[:, inputs["input_ids"].shape[1]:]
        for k in range(len(convs)):
            one = gen.encode(convs[k:k + 1], images[k:k + 1], videos[k:k + 1])
            alone = model.generate(**one, **kwargs)[:, one["input_ids"].shape[1]:]
            assert batched[k].tolist() == alone[0].tolist(), k
    settings = GenerationSettings(max_new_tokens=4)
    assert gen.generate(convs, images, settings, videos=videos) == [
        gen.generate([c], [i], settings, videos=[v])[0] for c, i, v in zip(convs, images, videos)]
    frames = load_video(clip0)  # a list of frames is a video too
    assert gen.generate(convs[:1], [[]], settings, videos=[[frames]]) == gen.generate(convs[:1], [[]], settings,
                                                                                       videos=[[clip0]])
    with pytest.raises(ValueError, match="1 <video> marker"):
        gen.encode(convs[:1], [[]], [[]])


def _chat(generator, monkeypatch, capsys, lines, *argv):
    from llavakit.infer import chat

    parser = argparse.ArgumentParser()
    chat.add_arguments(parser)
    args = parser.parse_args(["--model", "unused", "--max-new-tokens", "4", *argv])
    monkeypatch.setattr(chat, "load_generator", lambda a: generator)
    monkeypatch.setattr(chat.sys, "stdin", type("T", (), {"isatty": staticmethod(lambda: False)})())
    feed = iter(lines)

    def fake_input(prompt=""):
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    assert chat.run(args) == 0
    return capsys.readouterr().out


def test_chat_video_command(built, data, tiny_built, tmp_path, monkeypatch, capsys):
    from llavakit.infer.generate import GenerationSettings, Generator

    model, processor = built
    gen = Generator(model, processor, template="vicuna_v1")
    clip = str(data / "videos" / "v1.mp4")
    out = _chat(gen, monkeypatch, capsys, [f"/video {clip}", "/video /no/such.mp4", "Which way?", "/quit"],
                "--log", str(tmp_path / "chat.log"))
    want = gen.generate([[Turn("user", "<video>\nWhich way?")]], [[]], GenerationSettings(max_new_tokens=4),
                        videos=[[clip]])[0]
    assert f"[video attached: {clip} (9 frames); 1 waiting for your next message]" in out
    assert "[cannot use /no/such.mp4: video missing: file not found: /no/such.mp4 -> check the path" in out
    assert f"assistant> {want}" in out
    # a model without videos says so
    base = Generator(*tiny_built, template="vicuna_v1")
    out = _chat(base, monkeypatch, capsys, [f"/video {clip}"], "--log", str(tmp_path / "chat.log"))
    assert f"[cannot use {clip}: videos need image_tokens='anyres_max'" in out


def test_eval_rows_with_videos(built, data, tmp_path):
    from llavakit.eval.metrics import get_metric
    from llavakit.eval.runner import PREDICTIONS, evaluate, read_samples, sample_turns
    from llavakit.infer.generate import GenerationSettings, Generator

    model, processor = built
    rows = [{"id": "a", "question": "Which way?", "video": "videos/v0.mp4", "answer": "right"},
            {"id": "b", "question": "What is it?", "image": "images/0.png", "answer": "x"},
            {"id": "c", "question": "Darker?", "video": [f"frames/{k}.png" for k in range(5)], "answer": "y"},
            {"id": "d", "question": "<image> then <video>: same?", "image": "images/1.png",
             "videos": ["videos/v1.mp4"], "answer": "no"}]
    (data / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples = read_samples(data / "q.jsonl", metric=get_metric("exact"))
    assert [len(s.videos) for s in samples] == [1, 0, 1, 1] and isinstance(samples[2].videos[0], list)
    assert sample_turns(samples[0], "")[0].content == "<video>\nWhich way?"
    gen, settings = Generator(model, processor, template="vicuna_v1"), GenerationSettings(max_new_tokens=4)

    def predictions(batch_size):
        out = tmp_path / f"bs{batch_size}"
        evaluate(gen, samples, out, "exact", batch_size=batch_size, settings=settings, progress=False)
        return {r["id"]: r["prediction"] for r in map(json.loads, (out / PREDICTIONS).read_text().splitlines())}

    one = predictions(1)
    assert set(one) == {"a", "b", "c", "d"} and predictions(4) == one
    assert one["a"] == gen.generate([sample_turns(samples[0], get_metric("exact").prompt_suffix)], [[]], settings,
                                    videos=[[str(data / "videos" / "v0.mp4")]])[0]
    (data / "bad.jsonl").write_text(json.dumps({"id": "z", "question": "?", "video": "videos/none.mp4",
                                                "answer": "x"}) + "\n")
    from llavakit.eval.runner import EvalDataError

    with pytest.raises(EvalDataError, match=r"id='z'\): video not found: .*none.mp4"):
        read_samples(data / "bad.jsonl")


def test_web_takes_video_uploads_for_models_with_videos(built, data, tiny_built, tmp_path):
    from llavakit.data.images import ImageLimits
    from llavakit.infer.generate import GenerationSettings, Generator
    from llavakit.infer.web import _new_state, session_from_state, upload_problem

    model, processor = built
    clip = str(data / "videos" / "v0.mp4")
    state, limits = _new_state(), ImageLimits()
    assert upload_problem([clip, str(data / "images" / "0.png")], state, limits, processor=processor) is None
    assert "images only" in upload_problem([clip], state, limits, processor=tiny_built[1])
    (tmp_path / "noise.mp4").write_bytes(bytes(range(256)) * 40)
    problem = upload_problem([str(tmp_path / "noise.mp4")], state, limits, processor=processor)
    assert problem.startswith("noise.mp4: video") and "To do:" in problem
    assert "At most 1 videos" in upload_problem([clip, clip], state, limits, processor=processor, max_videos=1)
    gen = Generator(model, processor, template="vicuna_v1")
    state = {**state, "pending_videos": [clip]}
    session = session_from_state(gen, GenerationSettings(max_new_tokens=4), state, limits)
    assert [len(v) for v in session.pending_videos] == [6]
    assert session.user_turn("Which <video>way?").content == "<video>\nWhich way?"  # typed markers are dropped
    reply = "".join(session.ask("Which way?"))
    assert reply == gen.generate([[Turn("user", "<video>\nWhich way?")]], [[]], session.settings,
                                 videos=[[clip]])[0]
    assert len(session.videos) == 1 and not session.pending_videos


# --- build keys ------------------------------------------------------------------------------------------------
def test_build_records_pinpoints_and_max_tiles(tiny_dirs):
    model, processor = llavakit.build(tiny_dirs["siglip"], tiny_dirs["qwen2"], image_tokens="anyres_max",
                                      image_grid_pinpoints=PINS, anyres_max_tiles=2)
    assert model.config.image_grid_pinpoints == processor.image_grid_pinpoints == PINS
    assert model.config.anyres_max_tiles == processor.anyres_max_tiles == 2
    with pytest.raises(ValueError, match="image_grid_pinpoints is only used with"):
        llavakit.build(tiny_dirs["siglip"], tiny_dirs["qwen2"], image_grid_pinpoints=PINS)
    with pytest.raises(ValueError, match="multiple of the encoder's input size 32"):
        llavakit.build(tiny_dirs["siglip"], tiny_dirs["qwen2"], image_tokens="anyres", image_grid_pinpoints=[[32, 48]])


def test_the_feature_cache_refuses_a_video_model_up_front(tiny_dirs, data, tmp_path):
    """Videos need anyres_max, and the stage-1 feature cache holds one base tile per image: refused, with the fix."""
    from llavakit.train.config import ConfigError

    tree = _tree(tiny_dirs, data, tmp_path / "run")
    tree["data"]["feature_cache"] = str(tmp_path / "features")
    with pytest.raises(ConfigError, match="feature_cache cannot be used with image_tokens: anyres_max.*"
                                          "image_tokens: base"):
        run_training(load_config(base=tree))
