"""Video size limits from a recipe and the command line: ``data.video_max_frame_pixels`` / ``video_max_seconds`` /
``video_max_source_frames`` (None = the default, 0 = off, as ``data.max_pixels`` & co.) and the
``--video-max-*`` flags of ``llavakit data check`` change what is refused, with errors naming the file, the sample
and the key; the start-up cache is keyed on them; a bad value is a `ConfigError` naming its key."""

from __future__ import annotations

import json

import av
import numpy as np
import pytest
import torch

from llavakit.data.images import DEFAULT_MAX_ASPECT_RATIO, ImageLimits, pick_limit
from llavakit.data.video import DEFAULT_MAX_SECONDS, VideoLimits
from llavakit.train.config import ConfigError, load_config

PINS = [[32, 32], [32, 64], [64, 32], [64, 64]]


def write_clip(path, n, size=(48, 40), rate=10):
    """`n` frames (n / rate seconds) of a grey ramp, mpeg4 in mp4."""
    w, h = size
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=rate)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            for p in s.encode(av.VideoFrame.from_ndarray(np.full((h, w, 3), 10 * i, np.uint8), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A LLaVA JSON of a text row and a video row (clips/c.mp4: 8 frames of 48x40 at 10 fps, 0.8 s)."""
    root = tmp_path_factory.mktemp("video_limits")
    (root / "clips").mkdir()
    write_clip(root / "clips" / "c.mp4", 8)
    rows = [{"id": "text", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "hi"}]},
            {"id": "clip", "video": "clips/c.mp4", "conversations": [
                {"from": "human", "value": "<video>\nWhich way?"}, {"from": "gpt", "value": "up"}]}]
    (root / "train.json").write_text(json.dumps(rows))
    return root


@pytest.fixture(scope="module")
def processor(tiny_dirs):
    import llavakit

    torch.manual_seed(0)
    _, proc = llavakit.build(tiny_dirs["siglip"], tiny_dirs["qwen2"], image_tokens="anyres_max",
                             image_grid_pinpoints=PINS, anyres_max_tiles=2)
    assert proc.video_token_id is not None
    return proc


def _cfg(data, **keys):
    return load_config(base={"model": {"vision": "v", "llm": "l"},
                             "data": {"train": str(data / "train.json"), "template": "vicuna_v1", "max_length": 512,
                                      "cache": False, **keys}})


def test_one_limit_rule_for_images_and_videos():
    assert pick_limit(None, 5) == 5 and pick_limit(0, 5) is None and pick_limit(-1, 5) is None and pick_limit(3, 5) == 3
    assert VideoLimits.of() == VideoLimits() and ImageLimits.of() == ImageLimits()
    assert VideoLimits.of(0, 0, 0) == VideoLimits(None, None, None)
    assert VideoLimits.of(max_seconds=2).max_seconds == 2 and VideoLimits.of().max_seconds == DEFAULT_MAX_SECONDS
    assert ImageLimits.of(max_aspect_ratio=None).max_aspect_ratio == DEFAULT_MAX_ASPECT_RATIO


def test_config_keys_parse_and_bad_values_name_the_key(data):
    cfg = load_config(base={"model": {"vision": "v", "llm": "l"}, "data": {"train": "x"}},
                      overrides=["--data.video_max_frame_pixels=1000", "--data.video_max_seconds=2.5",
                                 "--data.video_max_source_frames=0"])
    d = cfg.data
    assert (d.video_max_frame_pixels, d.video_max_seconds, d.video_max_source_frames) == (1000, 2.5, 0)
    assert VideoLimits.of(d.video_max_frame_pixels, d.video_max_seconds, d.video_max_source_frames) == \
        VideoLimits(1000, 2.5, None)
    unset = load_config(base={"model": {"vision": "v", "llm": "l"}, "data": {"train": "x"}}).data
    assert (unset.video_max_frame_pixels, unset.video_max_seconds, unset.video_max_source_frames) == (None,) * 3
    for override, words in (("--data.video_max_seconds=-1", ["data.video_max_seconds=-1", ">= 0", "0 = no limit"]),
                            ("--data.video_max_frame_pixels=1.5", ["data.video_max_frame_pixels=1.5", "integer"]),
                            ("--data.video_max_source_frames=true", ["data.video_max_source_frames=True"]),
                            ("--data.video_max_source_frames=many", ["data.video_max_source_frames", "integer"]),
                            ("--data.video_max_seconds=long", ["data.video_max_seconds", "not a number"]),
                            ("--data.max_pixels=-5", ["data.max_pixels=-5", ">= 0"])):
        with pytest.raises(ConfigError) as e:
            load_config(base={"model": {"vision": "v", "llm": "l"}, "data": {"train": "x"}}, overrides=[override])
        assert all(w in str(e.value) for w in words), (override, str(e.value))


@pytest.mark.parametrize("key,value,words", [
    ("video_max_frame_pixels", 1000, ["video too large", "48x40", "max_frame_pixels=1,000"]),
    ("video_max_seconds", 0.5, ["video too long", "max_seconds=0.5"]),
    ("video_max_source_frames", 5, ["video too long", "max_source_frames=5"]),
])
def test_a_recipe_key_changes_what_training_refuses(data, processor, key, value, words):
    from llavakit.train.batches import prepare_data

    said: list[str] = []
    with pytest.raises(ConfigError, match=r"1 sample\(s\) .* have errors"):
        prepare_data(_cfg(data, **{key: value}), processor, say=said.append)
    line = next(x for x in said if x.startswith("error:"))
    assert "sample #1 (id='clip')" in line and "clips/c.mp4" in line, line
    assert all(w in line for w in words), line
    assert f"data.{key}" in line, line  # the hint names the recipe key that raises it
    for ok in (0, None):  # 0 turns the limit off; unset keeps the (roomy) default
        dataset = prepare_data(_cfg(data, **{key: ok}), processor, say=said.append)
        assert len(dataset) == 2 and dataset.num_videos(1) == 1
        assert dataset[1]["video_num_frames"].tolist() == [8]


def test_the_dataset_the_loader_reads_holds_the_recipes_video_limits(data, processor):
    """With data.check_images off the limit still holds where the frames are counted and decoded."""
    from llavakit.data.conversation import SampleError
    from llavakit.train.batches import prepare_data

    said: list[str] = []
    with pytest.raises(ConfigError):
        prepare_data(_cfg(data, video_max_seconds=0.5, check_images=False), processor, say=said.append)
    assert any("id='clip'" in x and "max_seconds=0.5" in x for x in said), said
    dataset = prepare_data(_cfg(data, video_max_source_frames=100), processor, say=said.append)
    assert dataset.video_limits == VideoLimits.of(max_source_frames=100)
    dataset.video_limits = VideoLimits.of(max_frame_pixels=100)  # what a lower key gives the loader's copy
    with pytest.raises(SampleError, match="max_frame_pixels=100"):
        dataset[1]


def test_startup_cache_is_keyed_on_the_video_limits(data, processor, tmp_path):
    from llavakit.data.templates import get_template
    from llavakit.data.token_cache import prepare

    template = get_template("vicuna_v1", processor.tokenizer)

    def run(limits):
        notes: list[str] = []
        got = prepare(str(data / "train.json"), processor, template, cache_dir=tmp_path, say=notes.append,
                      video_limits=limits)
        return got, " ".join(notes)

    first, note = run(None)
    assert "wrote" in note and not first.problems
    again, note = run(VideoLimits())
    assert "hit" in note
    over, note = run(VideoLimits.of(max_seconds=0.5))
    assert "hit" not in note
    assert [p.id for p in over.problems if p.severity == "error"] == ["clip"]
    assert over.dataset.video_limits == VideoLimits.of(max_seconds=0.5)
    hit, note = run(VideoLimits.of(max_seconds=0.5))
    assert "hit" in note and hit.dataset.video_limits == VideoLimits.of(max_seconds=0.5)


def test_data_check_flags(data, capsys):
    from llavakit.cli import main

    path = str(data / "train.json")
    for flags, words in ((["--video-max-frame-pixels", "1000"], ["video too large", "max_frame_pixels=1,000"]),
                         (["--video-max-seconds", "0.5"], ["video too long", "max_seconds=0.5"]),
                         (["--video-max-source-frames", "5"], ["video too long", "max_source_frames=5"])):
        assert main(["data", "check", path, "--images", "header", *flags]) == 1
        lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("#")]
        assert len(lines) == 1 and lines[0].startswith("#1") and "'clip'" in lines[0] and "c.mp4" in lines[0]
        assert all(w in lines[0] for w in words) and flags[0] in lines[0], lines[0]
        assert main(["data", "check", path, "--images", "header", flags[0], "0"]) == 0  # 0 = off
        capsys.readouterr()
    assert main(["data", "check", path]) == 0  # the defaults take a 0.8 s 48x40 clip
