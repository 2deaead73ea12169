"""Video, LLaVA-OneVision's way: reading and sampling (PyAV), the processor's count == the model's features,
export/import parity with transformers' LlavaOnevision.

References are transformers' own: `LlavaOnevisionProcessor._get_num_multimodal_tokens` (the video count),
`LlavaOnevisionModel.apply_pooling` (the 2x2 bilinear pooling) and `LlavaOnevisionForConditionalGeneration`
(logits). transformers' video processor needs torchvision (not installed), so transformers' model is given the
frames llavakit's processor made, and its token ids are built the way its processor builds them (the
``<video>`` token repeated its count, then tokenized).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import av
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers import (AutoTokenizer, LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                          LlavaOnevisionProcessor)
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil
from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

import llavakit
from llavakit.data.specials import special_texts
from llavakit.data.video import (VideoError, VideoLimits, load_video, probe_video, read_video, sample_indices,
                                 sampled_frame_count)
from llavakit.demo.tiny import make_tokenizer, save_tiny_vision, tiny_image_processor, tiny_llm_config, \
    tiny_vision_config
from llavakit.interop import export
from llavakit.model.video import pool_frames, video_token_count


class ImageOnlyOnevisionProcessor(LlavaOnevisionProcessor):
    """transformers' LlavaOnevisionProcessor without its (torchvision) video processor."""

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, **kwargs)


# --- tiny video files --------------------------------------------------------------------------------------
def write_video(path, n, size=(64, 48), codec="mpeg4", rate=10, fmt=None):
    """`n` frames; frame i is a flat grey of level 8*i (so a decoded frame tells its index)."""
    w, h = size
    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream(codec, rate=rate)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.full((h, w, 3), 8 * i, np.uint8), format="rgb24")
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def frame_index(im):
    return round(float(np.asarray(im, dtype=np.float32).mean()) / 8)


def test_sample_indices_are_onevisions_linspace():
    for total in (1, 2, 7, 20, 33, 301):
        for n in (1, 4, 8, 32):
            want = np.linspace(0, total - 1, min(n, total), dtype=int).tolist()
            assert sample_indices(total, n) == want
    assert sampled_frame_count(300, 32, fps=1, source_fps=30) == 10  # a 10 s clip at one frame a second
    assert sampled_frame_count(3, 32, fps=0.01, source_fps=30) == 1  # never fewer than one
    with pytest.raises(ValueError, match="max_frames"):
        sample_indices(10, 0)


@pytest.mark.parametrize("codec,fmt,ext", [("mpeg4", None, "mp4"), ("libx264", None, "mkv"),
                                           ("libx264", "h264", "h264")])  # raw .h264: no frame count, no seeking
def test_read_video_samples_uniformly(tmp_path, codec, fmt, ext):
    if codec not in av.codecs_available:
        pytest.skip(f"{codec} not in this PyAV build")
    path = write_video(tmp_path / f"v.{ext}", 20, codec=codec, fmt=fmt)
    assert probe_video(path).frames == 20
    frames = read_video(path, max_frames=8)
    assert [frame_index(f) for f in frames] == sample_indices(20, 8) == [0, 2, 5, 8, 10, 13, 16, 19]
    assert all(f.mode == "RGB" and f.size == (64, 48) for f in frames)
    assert len(read_video(path, max_frames=50)) == 20  # a short video keeps every frame
    if fmt is None:  # 20 frames at 10 fps = 2 s: 1 frame a second keeps 2
        assert [frame_index(f) for f in read_video(path, 8, fps=1)] == [0, 19]


def test_a_list_of_frames_is_a_video(tmp_path):
    frames = [Image.new("RGB", (30, 20), (8 * i,) * 3) for i in range(10)]
    assert [frame_index(f) for f in load_video(frames, max_frames=4)] == sample_indices(10, 4)
    for i, f in enumerate(frames):
        f.save(tmp_path / f"{i}.png")
    paths = [str(tmp_path / f"{i}.png") for i in range(10)]
    assert [frame_index(f) for f in load_video(paths, max_frames=3)] == sample_indices(10, 3)
    with pytest.raises(VideoError, match="empty"):
        load_video([])


def test_unusable_videos_are_clear_errors(tmp_path):
    good = write_video(tmp_path / "good.mp4", 12)
    (tmp_path / "noise.mp4").write_bytes(bytes(range(256)) * 40)
    data = good.read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.mp4").write_bytes(b"")
    cases = {"noise.mp4": ("video corrupt", "video has no frames"), "cut.mp4": ("video corrupt", "video has no frames"),
             "missing.mp4": ("video missing",), "empty.mp4": ("video empty",)}
    for name, kinds in cases.items():
        with pytest.raises(VideoError) as err:
            read_video(tmp_path / name)
        assert err.value.kind in kinds and name in str(err.value) and err.value.hint, err.value
    with pytest.raises(VideoError, match="remote"):
        read_video("https://example.com/v.mp4")
    with pytest.raises(VideoError, match="folder"):
        read_video(tmp_path)
    # over the limits: refused from the metadata, naming the file, the size and the setting
    for limits, words in ((VideoLimits(max_frame_pixels=1000), ["64x48", "max_frame_pixels"]),
                          (VideoLimits(max_seconds=0.5), ["1.2 s", "max_seconds"]),
                          (VideoLimits(max_source_frames=5), ["max_source_frames"])):
        with pytest.raises(VideoError) as err:
            read_video(good, limits=limits)
        assert "good.mp4" in str(err.value) and all(w in str(err.value) for w in words), err.value
    assert VideoLimits.of(max_seconds=0).max_seconds is None  # 0 turns a limit off


# --- counts: the processor's == transformers' == the model's -------------------------------------------------
def test_pooling_and_count_match_transformers():
    for grid in (1, 2, 4, 5, 7, 27):
        feats = torch.randn(3, grid * grid, 6)
        cfg = SimpleNamespace(vision_config=SimpleNamespace(image_size=grid * 14, patch_size=14))
        torch.testing.assert_close(pool_frames(feats), LlavaOnevisionModel.apply_pooling(SimpleNamespace(config=cfg),
                                                                                         feats), rtol=0, atol=0)
        tok = make_tokenizer()
        tok.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
        hf = ImageOnlyOnevisionProcessor(LlavaOnevisionImageProcessorPil(), tok, num_image_tokens=grid * grid)
        for frames in (1, 2, 8, 32):
            assert video_token_count(frames, grid) == \
                hf._get_num_multimodal_tokens(video_sizes=[(frames, 384, 384)])["num_video_tokens"][0]
    # docs/interop.md's example: SigLIP-384/14 -> 27 x 27 per frame -> pooled 14 x 14 = 196; 32 frames -> 6273
    assert video_token_count(32, 27) == 32 * 196 + 1 == 6273


@pytest.fixture(scope="module")
def video_built(tiny_dirs, tmp_path_factory):
    """anyres_max models with a <video> token: tiny SigLIP at 32 px (4 x 4 features) and at 40 px (5 x 5, odd:
    pooled to ceil(5/2) = 3)."""
    odd = save_tiny_vision(tmp_path_factory.mktemp("siglip40") / "siglip", "siglip", image_size=40)
    torch.manual_seed(0)
    return {g: tuple(x.eval() if hasattr(x, "eval") else x for x in
                     llavakit.build(vision, tiny_dirs["qwen2"], image_tokens="anyres_max"))
            for g, vision in ((4, tiny_dirs["siglip"]), (5, odd))}


def _frames(n, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray((torch.rand(size[1], size[0], 3, generator=g) * 255).byte().numpy()) for _ in range(n)]


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(grid=st.sampled_from([4, 5]), frames=st.lists(st.integers(1, 6), min_size=1, max_size=3),
       size=st.tuples(st.integers(1, 90), st.integers(1, 90)), max_frames=st.integers(1, 5))
def test_processor_count_is_the_number_of_features_the_model_produces(video_built, grid, frames, size, max_frames):
    model, processor = video_built[grid]
    processor.video_max_frames = max_frames
    try:
        videos = [_frames(n, size, k) for k, n in enumerate(frames)]
        counts = processor.video_token_counts(videos)
        assert counts == [min(n, max_frames) * ((grid + 1) // 2) ** 2 + 1 for n in frames]
        inputs = processor(text=" ".join(["<video>"] * len(videos)) + " what moves?", videos=videos,
                           return_tensors="pt")
        assert inputs["video_num_frames"].tolist() == [min(n, max_frames) for n in frames]
        assert list(inputs["pixel_values_videos"].shape) == [len(frames), max(inputs["video_num_frames"]), 3,
                                                             grid * 8, grid * 8]
        assert int((inputs["input_ids"] == processor.video_token_id).sum()) == sum(counts)
        with torch.no_grad():
            feats = model.get_video_features(inputs["pixel_values_videos"], inputs["video_num_frames"])
            assert [f.shape[0] for f in feats] == counts
            model.embed(inputs["input_ids"], pixel_values_videos=inputs["pixel_values_videos"],
                        video_num_frames=inputs["video_num_frames"])  # the guarded splice agrees
    finally:
        processor.video_max_frames = 32


def test_frames_of_a_shorter_video_do_not_depend_on_the_padding(video_built):
    """A 2-frame video batched with a 4-frame one gets the same features as alone."""
    model, processor = video_built[4]
    a, b = _frames(4, (50, 30)), _frames(2, (20, 60), 1)
    both = processor(text=["<video> x", "<video> y"], videos=[a, b], return_tensors="pt", padding_side="left")
    alone = processor(text="<video> y", videos=[b], return_tensors="pt")
    with torch.no_grad():
        f_both = model.get_video_features(both["pixel_values_videos"], both["video_num_frames"])
        f_alone = model.get_video_features(alone["pixel_values_videos"], alone["video_num_frames"])
    torch.testing.assert_close(f_both[1], f_alone[0])


def test_video_errors(video_built, tiny_built):
    model, processor = video_built[4]
    with pytest.raises(ValueError, match="1 <video> marker"):
        processor(text="<video> x", videos=[_frames(2, (9, 9)), _frames(2, (9, 9))])
    inputs = processor(text="<video> x", videos=[_frames(3, (9, 9))], return_tensors="pt")
    with pytest.raises(ValueError, match="no pixel_values_videos"):
        model(input_ids=inputs["input_ids"])
    with pytest.raises(ValueError, match="video placeholders and video features do not match"):
        model(input_ids=inputs["input_ids"], pixel_values_videos=inputs["pixel_values_videos"][:, :2])
    base_model, base_processor = tiny_built  # a base model has no <video> token and takes no videos
    with pytest.raises(ValueError, match="anyres_max"):
        base_processor(text="<video> x", videos=[_frames(2, (9, 9))])
    with pytest.raises(ValueError, match="anyres_max"):
        base_model.get_video_features(inputs["pixel_values_videos"])
    assert "pixel_values_videos" not in base_processor(text="<video> is plain text here")  # no video token
    # the <video> marker in a conversation is the video, not special-token text to escape
    assert "<video>" not in special_texts(processor.tokenizer) and "<image>" not in special_texts(processor.tokenizer)


def test_generation_with_a_video_cached_equals_uncached(video_built, tmp_path):
    model, processor = video_built[4]
    write_video(tmp_path / "clip.mp4", 9, size=(40, 30))
    inputs = processor(text=["USER: <video> where does it go? ASSISTANT:", "USER: hi <image> <video> ASSISTANT:"],
                       videos=[str(tmp_path / "clip.mp4"), _frames(2, (30, 50))], images=[[], _frames(1, (33, 21))],
                       return_tensors="pt", padding_side="left")
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    with torch.no_grad():
        cached = model.generate(**inputs, use_cache=True, **kw)
        uncached = model.generate(**inputs, use_cache=False, **kw)
    assert torch.equal(cached, uncached)
    assert not (cached[:, inputs["input_ids"].shape[1]:] == processor.video_token_id).any()


# --- export to / import from transformers' LlavaOnevision ------------------------------------------------------
def _hf_text(text, video_counts):
    """The text transformers' LlavaOnevisionProcessor tokenizes for `text`: each <video>
    repeated its count (its `replace_video_token`)."""
    parts = text.split("<video>")
    text = parts[0] + "".join("<video>" * n + p for n, p in zip(video_counts, parts[1:]))
    return text


def _parity(model, processor, hf, hp, seed=0):
    """max |logit difference| over a video prompt, a prompt with an image and a video, and a batch of two."""
    worst = 0.0
    grid = model.config.patch_grid
    cases = [(["USER: <video> which way does it move? ASSISTANT: left"], [[]], [_frames(3, (50, 30), seed)]),
             (["USER: <image> and <video>: same shape? ASSISTANT: yes"], [_frames(1, (61, 46), seed + 1)],
              [_frames(4, (30, 60), seed + 2)]),
             (["USER: <video> bigger? ASSISTANT:", "USER: the clip <video> ASSISTANT: it"], [[], []],
              [_frames(2, (40, 40), seed + 3), _frames(2, (90, 20), seed + 4)])]
    for texts, images, videos in cases:
        ours = processor(text=texts, images=images if any(images) else None, videos=videos, return_tensors="pt",
                         padding_side="left")
        hf_counts = hp._get_num_multimodal_tokens(video_sizes=[(len(v), 1, 1) for v in videos])["num_video_tokens"]
        assert hf_counts == [video_token_count(len(v), grid) for v in videos]
        at, hf_texts = 0, []
        for t in texts:
            n = t.count("<video>")
            hf_texts.append(_hf_text(t, hf_counts[at:at + n]))
            at += n
        theirs = hp(text=hf_texts, images=images if any(images) else None, return_tensors="pt", padding=True,
                    padding_side="left")
        assert torch.equal(ours["input_ids"], theirs["input_ids"])
        theirs["pixel_values_videos"] = ours["pixel_values_videos"]  # frames: same count per video in each case
        with torch.no_grad():
            ref = model(**ours).logits
            got = hf(**theirs).logits
        keep = ours["attention_mask"].bool()
        worst = max(worst, (got - ref)[keep].abs().max().item())
    return worst


def _hf_processor(folder):
    """transformers' processor for the images; the texts it gets have their videos already expanded (`_hf_text`,
    its video processor's job), so its check that every <video> comes with a video is off."""
    fields = json.loads((folder / "processor_config.json").read_text())
    assert fields.pop("processor_class") == "LlavaOnevisionProcessor"
    hp = ImageOnlyOnevisionProcessor(LlavaOnevisionImageProcessorPil.from_pretrained(folder),
                                     AutoTokenizer.from_pretrained(folder), **fields)
    assert hp.video_token == "<video>"
    hp.video_token = None
    return hp


@pytest.mark.parametrize("grid", [4, 5])
def test_export_gives_llava_onevision_the_same_video_logits(video_built, tmp_path, grid):
    model, processor = video_built[grid]
    out = export((model, processor), tmp_path / "hf")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["video_token_index"] == model.config.video_token_id == processor.video_token_id
    video_cfg = json.loads((out / "video_preprocessor_config.json").read_text())
    assert video_cfg["size"] == {"height": grid * 8, "width": grid * 8} and video_cfg["image_mean"] == [0.5] * 3
    hf, info = LlavaOnevisionForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    worst = _parity(model, processor, hf.eval(), _hf_processor(out))
    print(f"video export (grid {grid}): max |dlogit| = {worst:.3g}")
    assert worst <= 1e-4


@pytest.fixture(scope="module")
def hf_onevision_dir(tmp_path_factory):
    """A LlavaOnevisionForConditionalGeneration built by transformers (SigLIP-shaped, Qwen2, random weights) with
    its processor files, the <video> token in its tokenizer."""
    out = tmp_path_factory.mktemp("llava_onevision_video")
    tok = make_tokenizer(family="qwen2")
    tok.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    tok.pad_token = tok.pad_token or tok.eos_token
    pins = [[32, 32], [32, 64], [64, 32], [64, 64]]
    cfg = LlavaOnevisionConfig(vision_config=tiny_vision_config("siglip").to_dict(),
                               text_config=tiny_llm_config("qwen2", vocab_size=len(tok)).to_dict(),
                               image_token_index=tok.convert_tokens_to_ids("<image>"),
                               video_token_index=tok.convert_tokens_to_ids("<video>"), image_grid_pinpoints=pins,
                               vision_aspect_ratio="anyres_max_9")
    torch.manual_seed(7)
    LlavaOnevisionForConditionalGeneration(cfg).save_pretrained(out)
    siglip = tiny_image_processor("siglip")
    LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32}, image_grid_pinpoints=pins,
                                    image_mean=siglip.image_mean, image_std=siglip.image_std).save_pretrained(out)
    tok.save_pretrained(out)
    (out / "processor_config.json").write_text(json.dumps({
        "processor_class": "LlavaOnevisionProcessor", "num_image_tokens": 16, "vision_feature_select_strategy": "full",
        "image_token": "<image>", "video_token": "<video>", "vision_aspect_ratio": "anyres_max_9"}))
    return out


def test_import_of_a_llava_onevision_takes_videos_with_the_same_logits(hf_onevision_dir, tmp_path):
    model, processor = llavakit.load(hf_onevision_dir)
    hf = LlavaOnevisionForConditionalGeneration.from_pretrained(hf_onevision_dir).eval()
    assert model.config.video_token_id == processor.video_token_id == hf.config.video_token_id
    worst = _parity(model, processor, hf, _hf_processor(hf_onevision_dir), seed=20)
    print(f"video import: max |dlogit| = {worst:.3g}")
    assert worst <= 1e-4
    model.save_pretrained(tmp_path / "kit")  # saved as llavakit, it still takes videos
    processor.save_pretrained(tmp_path / "kit")
    again, again_proc = llavakit.load(tmp_path / "kit")
    assert again.config.video_token_id == again_proc.video_token_id == model.config.video_token_id
