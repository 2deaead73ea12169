"""Bounded image cost everywhere: tiny files with extreme shapes are refused from their header.

A 92-byte ``Image.new("L", (12000, 1))`` PNG passes a pixel limit (12,000 pixels) but costs
gigabytes once LLaVA's pad makes a 12000x12000 square of it, or once a short-side resize (CLIP's
``shortest_edge``) scales its 1 px side to 336. `ImageLimits` (max_pixels, max_side,
max_aspect_ratio) is checked from the header, before any decode, on every path: ``data check``,
training (validation and the dataset the loader uses), chat, the web upload handler and eval.
"""

from __future__ import annotations

import argparse
import json
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from llavakit.cli import main
from llavakit.data.conversation import Conversation, SampleError, Turn
from llavakit.data.images import (DEFAULT_MAX_ASPECT_RATIO, DEFAULT_MAX_SIDE, ImageError, ImageLimits, image_size,
                                  open_image)

# name -> (width, height). All tiny files (a few hundred bytes at most).
EXTREMES = {"wide12k": (12000, 1), "wide20k": (20000, 1), "wide100k": (100000, 1), "tall50k": (1, 50000)}
THIN = {"thin4k": (4000, 1)}  # under max_side, over max_aspect_ratio: CLIP-336 resize took 4.3 GB
NORMAL = {"normal": (64, 48)}


@pytest.fixture
def images(tmp_path) -> dict[str, Path]:
    folder = tmp_path / "images"
    folder.mkdir()
    out = {}
    for name, size in {**EXTREMES, **THIN, **NORMAL}.items():
        out[name] = folder / f"{name}.png"
        Image.new("L" if name != "normal" else "RGB", size, 200).save(out[name])
    assert all(out[n].stat().st_size < 1000 for n in EXTREMES)  # tiny files, huge once padded
    return out


def _size_text(name: str) -> str:
    w, h = {**EXTREMES, **THIN, **NORMAL}[name]
    return f"{w}x{h}"


def _assert_refusal(text: str, name: str) -> None:
    """The message names the file, its size, the limit broken and how to raise it."""
    assert f"{name}.png" in text, text
    assert _size_text(name) in text, text
    if name in EXTREMES:
        assert f"max_side={DEFAULT_MAX_SIDE:,}" in text and "--max-side" in text and "data.max_side" in text, text
    else:
        assert f"max_aspect_ratio={DEFAULT_MAX_ASPECT_RATIO:g}" in text and "--max-aspect-ratio" in text, text
        assert "data.max_aspect_ratio" in text, text


# --- the shared check ------------------------------------------------------------------------------
def test_limits_are_checked_from_the_header_before_any_decode(images, monkeypatch):
    def no_decode(self, *a, **k):
        raise AssertionError("decoded an image that is over a limit")

    monkeypatch.setattr(Image.Image, "load", no_decode)
    for name in [*EXTREMES, *THIN]:
        for call in (open_image, image_size, ImageLimits().open, ImageLimits().size):
            with pytest.raises(ImageError) as e:
                call(images[name])
            _assert_refusal(str(e.value) + " " + e.value.hint, name)
    with pytest.raises(ImageError) as e:
        open_image(images["thin4k"])
    assert e.value.kind == "image too elongated" and "4000:1" in str(e.value)
    with pytest.raises(ImageError) as e:
        open_image(images["wide12k"])  # breaks both: the message lists both, the hint both flags
    assert e.value.kind == "image too large"
    assert "max_aspect_ratio" in str(e.value) and "--max-aspect-ratio" in e.value.hint


def test_normal_images_pass_and_limits_can_be_raised_or_turned_off(images):
    assert open_image(images["normal"]).size == (64, 48)
    assert ImageLimits.of().open(images["normal"]).size == (64, 48)
    assert ImageLimits.of() == ImageLimits()  # unset = the defaults
    roomy = ImageLimits.of(max_side=20000, max_aspect_ratio=20000)
    assert roomy.open(images["wide12k"]).size == (12000, 1)
    assert ImageLimits.of(max_side=0, max_aspect_ratio=0).size(images["wide100k"]) == (100000, 1)  # 0 = off
    with pytest.raises(ImageError, match="max_pixels=1,000"):
        ImageLimits.of(max_pixels=1000).open(images["normal"])
    # a PIL image handed in directly is held to the same limits
    with pytest.raises(ImageError, match="max_side"):
        open_image(Image.new("L", (12000, 1)))


# --- data check ------------------------------------------------------------------------------------
def _llava_json(tmp_path: Path, images: dict[str, Path]) -> Path:
    rows = [{"id": f"s-{name}", "image": p.name, "conversations": [
        {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A strip."}]}
        for name, p in images.items()]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(rows))
    return path


def test_data_check_refuses_extreme_shapes_naming_sample_file_size_limit_and_flag(tmp_path, images, capsys):
    data = _llava_json(tmp_path, images)
    folder = str(images["normal"].parent)
    for mode in ("full", "header"):
        report = tmp_path / f"report-{mode}.json"
        assert main(["data", "check", str(data), "--image-folder", folder, "--images", mode,
                     "--report", str(report)]) == 1
        out = capsys.readouterr().out
        rows = {r["id"]: r for r in json.loads(report.read_text())}
        assert set(rows) == {f"s-{n}" for n in [*EXTREMES, *THIN]}  # the normal image passes
        for i, name in enumerate(images):
            if name == "normal":
                continue
            _assert_refusal(rows[f"s-{name}"]["reason"] + " " + rows[f"s-{name}"]["hint"], name)
            line = next(x for x in out.splitlines() if f"id='s-{name}'" in x)  # the sample: index and id
            assert line.startswith(f"#{i} ") and _size_text(name) in line
    # raising the limits on the command line lets them through
    assert main(["data", "check", str(data), "--image-folder", folder, "--images", "header",
                 "--max-side", "100000", "--max-aspect-ratio", "100000"]) == 0


# --- training: validation, the dataset the loader uses, and data.max_* from the config -------------
def _conv(path: Path, index: int, ident: str) -> Conversation:
    return Conversation([Turn("user", "<image>\nWhat is this?"), Turn("assistant", "A strip.")],
                        images=[str(path)], id=ident, index=index, source="train.json")


def test_training_dataset_refuses_extreme_shapes_before_decoding(images, tiny_built, monkeypatch):
    from llavakit.data.dataset import SupervisedDataset

    _, processor = tiny_built
    names = list(images)
    ds = SupervisedDataset([_conv(images[n], i, f"s-{n}") for i, n in enumerate(names)], processor, "vicuna_v1")
    pickle.loads(pickle.dumps(ds.image_loader))  # dataloader workers get the same check
    assert ds[names.index("normal")]["pixel_values"].shape[0] == 1
    decode = Image.Image.load

    def guarded(self, *a, **k):
        if max(self.size) > 1000:
            raise AssertionError("decoded an image that is over a limit")
        return decode(self, *a, **k)

    monkeypatch.setattr(Image.Image, "load", guarded)
    for i, name in enumerate(names):
        if name == "normal":
            continue
        with pytest.raises(SampleError) as e:
            ds[i]
        text = str(e.value)
        assert f"sample #{i} (id='s-{name}')" in text
        _assert_refusal(text, name)


def _train_cfg(data: Path, folder: Path, **data_keys):
    from llavakit.train.config import load_config

    return load_config(base={"model": {"vision": "v", "llm": "l"},
                             "data": {"train": str(data), "image_folder": str(folder), "max_length": 128,
                                      **data_keys}})


def test_training_refuses_extreme_shapes_and_honours_the_data_limits(tmp_path, images, tiny_built):
    from llavakit.train.config import ConfigError
    from llavakit.train.loop import prepare_data

    _, processor = tiny_built
    data, folder = _llava_json(tmp_path, images), images["normal"].parent
    said: list[str] = []
    with pytest.raises(ConfigError, match=r"5 sample\(s\) .* have errors"):
        prepare_data(_train_cfg(data, folder), processor, say=said.append)
    for name in [*EXTREMES, *THIN]:
        line = next(x for x in said if f"id='s-{name}'" in x)
        _assert_refusal(line, name)
    # data.max_pixels is honoured (validation and the dataset): the 64x48 image is over 1,000 pixels
    said.clear()
    normal_only = tmp_path / "normal.json"
    normal_only.write_text(json.dumps([r for r in json.loads(data.read_text()) if r["id"] == "s-normal"]))
    with pytest.raises(ConfigError):
        prepare_data(_train_cfg(normal_only, folder, max_pixels=1000), processor, say=said.append)
    assert any("max_pixels=1,000" in x and "data.max_pixels" in x for x in said), said
    dataset = prepare_data(_train_cfg(normal_only, folder, max_pixels=1000, check_images=False), processor,
                           say=said.append)
    with pytest.raises(SampleError, match="max_pixels=1,000"):  # the loader's dataset holds the same limit
        dataset[0]
    assert len(prepare_data(_train_cfg(normal_only, folder), processor, say=said.append)) == 1
    # raising data.max_side / data.max_aspect_ratio lets the extremes through
    roomy = prepare_data(_train_cfg(data, folder, max_side=100000, max_aspect_ratio=100000), processor,
                         say=said.append)
    assert len(roomy) == len(images)
    assert roomy.image_limits == ImageLimits(max_side=100000, max_aspect_ratio=100000.0)


def test_training_config_keys_for_the_limits():
    from llavakit.train.config import load_config

    cfg = load_config(base={"model": {"vision": "v", "llm": "l"}, "data": {"train": "x"}},
                      overrides=["--data.max_side=10000", "--data.max_aspect_ratio=50", "--data.max_pixels=1000000"])
    assert (cfg.data.max_pixels, cfg.data.max_side, cfg.data.max_aspect_ratio) == (1_000_000, 10000, 50.0)


# --- chat, web, eval -------------------------------------------------------------------------------
def _chat_args(*extra):
    from llavakit.infer.chat import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["--model", "no-such-model", *extra])


def test_chat_refuses_extreme_shapes_before_loading_the_model(images, capsys):
    from llavakit.infer.chat import open_chat_image, run

    for name in [*EXTREMES, *THIN]:
        with pytest.raises(ImageError) as e:
            open_chat_image(str(images[name]), _chat_args())
        _assert_refusal(f"{e.value} {e.value.hint}", name)
        assert run(_chat_args("--image", str(images[name]))) == 2  # refused before the model loads
        _assert_refusal(capsys.readouterr().err, name)
    assert open_chat_image(str(images["normal"]), _chat_args()).size == (64, 48)
    assert open_chat_image(str(images["wide12k"]), _chat_args("--max-side", "20000",
                                                              "--max-aspect-ratio", "20000")).size == (12000, 1)


def test_web_upload_handler_refuses_extreme_shapes(images):
    from llavakit.data.images import limits_from_args
    from llavakit.infer.web import WEB_MAX_PIXELS, add_arguments, upload_problem

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    limits = limits_from_args(parser.parse_args(["--model", "m"]))
    assert limits == ImageLimits(WEB_MAX_PIXELS, DEFAULT_MAX_SIDE, DEFAULT_MAX_ASPECT_RATIO)
    state = {"turns": [], "images": [], "pending": []}
    for name in [*EXTREMES, *THIN]:
        problem = upload_problem([str(images[name])], state, limits)
        assert problem and str(images[name].parent) not in problem  # the page shows the file name only
        _assert_refusal(problem, name)
    assert upload_problem([str(images["normal"])], state, limits) is None


class _NoGenerator:
    class template:
        name = "vicuna_v1"

    def generate(self, *a, **k):
        raise AssertionError("generated although an image is over a limit")


def test_eval_refuses_extreme_shapes_before_generating(tmp_path, images):
    from llavakit.eval.runner import EvalDataError, evaluate, read_samples

    for k, name in enumerate([*EXTREMES, *THIN]):
        rows = [{"id": "ok", "question": "What?", "image": str(images["normal"]), "answer": "x"},
                {"id": f"q-{name}", "question": "What?", "image": str(images[name]), "answer": "x"}]
        data = tmp_path / f"eval-{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        samples = read_samples(data, metric=None)
        with pytest.raises(EvalDataError) as e:
            evaluate(_NoGenerator(), samples, tmp_path / f"out{k}", "exact", progress=False, source=str(data))
        text = str(e.value)
        assert f"line 2 (sample #1, id='q-{name}')" in text
        _assert_refusal(text, name)


# --- the cost of what is allowed -------------------------------------------------------------------
_MEASURE = textwrap.dedent('''
    import json, resource, sys, time
    from types import SimpleNamespace
    from PIL import Image
    from llavakit.data.images import ImageError, ImageLimits
    from llavakit.demo.tiny import tiny_image_processor
    from llavakit.model.processor import LlavakitProcessor

    path, aspect, limits = sys.argv[1], sys.argv[2], ImageLimits(**json.loads(sys.argv[3]))
    me = SimpleNamespace(image_aspect=aspect, image_tokens="base", image_processor=tiny_image_processor("clip", 336))  # CLIP-336
    me._fill_colour = lambda: LlavakitProcessor._fill_colour(me)
    LlavakitProcessor.preprocess_images(me, [Image.new("RGB", (64, 64))])  # warm up
    before, t = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.time()
    try:
        shape = list(LlavakitProcessor.preprocess_images(me, [limits.open(path)]).shape)
    except ImageError as e:
        shape = str(e)
    grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print(json.dumps({"mb": grew, "s": time.time() - t, "shape": shape}))
''')


def _cost(path: Path, aspect: str, **limits) -> dict:
    """Peak RSS growth (MB) of opening `path` under `limits` and preprocessing it, in a fresh process."""
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(path), aspect, json.dumps(limits)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_refusing_costs_nothing_and_the_largest_allowed_extremes_stay_bounded(tmp_path, images):
    # refused from the header: no memory to speak of
    refused = _cost(images["wide100k"], "pad")
    assert "max_side" in refused["shape"] and refused["mb"] < 50, refused
    # the thinnest image allowed at the longest allowed side (8192x410, aspect 19.98), resized on its
    # short side to 336 as CLIP does: ~60 MB (4000x1 took 4.3 GB before the aspect limit)
    side, short = DEFAULT_MAX_SIDE, int(DEFAULT_MAX_SIDE // DEFAULT_MAX_ASPECT_RATIO) + 1
    extreme = tmp_path / "extreme.png"
    Image.new("L", (side, short), 200).save(extreme)
    resized = _cost(extreme, "resize")
    assert resized["shape"] == [1, 3, 336, 336] and resized["mb"] < 300, resized
    # LLaVA's pad costs about max_side² whatever the shape: with max_side=4096, a few hundred MB ...
    small = tmp_path / "extreme4096.png"
    Image.new("L", (4096, 205), 200).save(small)
    padded = _cost(small, "pad", max_side=4096)
    assert padded["shape"] == [1, 3, 336, 336] and padded["mb"] < 400, padded
    with pytest.raises(ImageError, match="max_side=4,096"):
        ImageLimits(max_side=4096).open(images["wide12k"])


@pytest.mark.slow
def test_pad_at_the_default_max_side_costs_no_more_than_a_square_max_pixels_allows(tmp_path):
    # ... and at the default 8192 about 0.9 GB: what an 8192x8192 photo (67M pixels, under the
    # default max_pixels) already costs. 12000x1 cost 2.4 GB and 100000x1 ~30 GB before max_side.
    extreme = tmp_path / "extreme.png"
    Image.new("L", (DEFAULT_MAX_SIDE, 410), 200).save(extreme)
    padded = _cost(extreme, "pad")
    assert padded["shape"] == [1, 3, 336, 336] and padded["mb"] < 1300, padded
