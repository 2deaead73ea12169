"""LLaVA-OneVision's ``anyres_max`` policy: counts, the model's features, export/import with transformers'
LlavaOnevision as the reference.

References are transformers' own classes (`LlavaOnevisionProcessor._get_number_of_features`, its image processor,
`LlavaOnevisionForConditionalGeneration`). transformers builds a `LlavaOnevisionProcessor` only with a video
processor (torchvision, not installed here), so the tests use `ImageOnlyOnevisionProcessor`: the same class with
no video processor argument, every method transformers' own.
"""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors import safe_open
from transformers import AutoTokenizer, LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

import llavakit
from llavakit.demo.tiny import make_tokenizer, tiny_image_processor, tiny_llm_config, tiny_vision_config
from llavakit.interop import checkpoint_format, export
from llavakit.model.onevision import anyres_max_token_count, onevision_grid_pinpoints, parse_vision_aspect_ratio

TILE = 32  # the tiny encoders' input size (patch 8: a 4 x 4 feature grid per tile)
PINPOINT_SETS = {
    "onevision": onevision_grid_pinpoints(TILE),
    "one-tile": [[32, 32]],
    "mixed": [[32, 32], [64, 64], [96, 32], [32, 96], [128, 64]],
    "wide": [[32, 192], [192, 32], [96, 96], [64, 160]],
}
SIDES = st.one_of(st.integers(1, 64), st.integers(1, 2000))
SIZES = st.tuples(SIDES, SIDES)  # (width, height)
MAX_TILES = st.sampled_from([1, 2, 3, 9])


class ImageOnlyOnevisionProcessor(LlavaOnevisionProcessor):
    """transformers' LlavaOnevisionProcessor without its (torchvision) video processor."""

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, **kwargs)


def _image(size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(size[1], size[0], 3, generator=g) * 255).byte().numpy())


def _hf_counter(pinpoints, max_tiles, grid=4):
    tok = make_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    ip = LlavaOnevisionImageProcessorPil(size={"height": grid * 8, "width": grid * 8}, image_grid_pinpoints=pinpoints)
    return ImageOnlyOnevisionProcessor(ip, tok, num_image_tokens=grid * grid, vision_feature_select_strategy="full",
                                       vision_aspect_ratio=f"anyres_max_{max_tiles}")


# --- the count rule against transformers' processor ------------------------------------------------------
@settings(max_examples=300, deadline=None, derandomize=True)
@given(size=SIZES, pins=st.sampled_from(list(PINPOINT_SETS)), max_tiles=MAX_TILES)
def test_count_matches_llava_onevision_processor(size, pins, max_tiles):
    w, h = size
    hf = _hf_counter(PINPOINT_SETS[pins], max_tiles)
    assert anyres_max_token_count(w, h, PINPOINT_SETS[pins], TILE, 4, max_tiles) == \
        hf._get_number_of_features(h, w, TILE, TILE)


def test_worked_example_siglip384_is_what_llava_onevision_processor_counts():
    """docs/interop.md's example: SigLIP-384/14 (27 x 27 features per tile), anyres_max_9, OneVision's 36 pinpoints.
    1920x1080 -> 3 x 5 tiles, an 81 x 135 map unpadded to 75 x 135; sqrt(75*135 / (9*729)) = 1.242 > 1.1, so it
    is shrunk to 60 x 108: 729 + 60*108 + 60 = 7269 tokens. 640x480 -> 2 x 2 tiles, 40 x 54 kept as is: 2929."""
    pins = onevision_grid_pinpoints(384)
    assert pins[:2] == [[384, 384], [384, 768]] and len(pins) == 36
    hf = _hf_counter(pins, 9, grid=27)
    for (w, h), expected in (((1920, 1080), 7269), ((640, 480), 2929), ((2000, 1500), 7309), ((1000, 200), 2123)):
        assert anyres_max_token_count(w, h, pins, 384, 27, 9) == expected
        assert hf._get_number_of_features(h, w, 384, 384) == expected


def test_vision_aspect_ratio_names():
    assert parse_vision_aspect_ratio("anyres_max_9") == 9
    for bad in ("anyres", "anyres_max_0", "anyres_max_x", "max_9"):
        with pytest.raises(ValueError, match="anyres_max_N"):
            parse_vision_aspect_ratio(bad)


# --- property: the processor's count is what the model produces ------------------------------------------
@pytest.fixture(scope="module")
def ov_built(tiny_dirs):
    torch.manual_seed(0)
    model, processor = llavakit.build(tiny_dirs["siglip"], tiny_dirs["qwen2"], image_tokens="anyres_max")
    return model.eval(), processor


def _set(model, processor, pins, max_tiles):
    model.config.image_grid_pinpoints = processor.image_grid_pinpoints = PINPOINT_SETS[pins]
    model.config.anyres_max_tiles = processor.anyres_max_tiles = max_tiles


@settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(SIZES, min_size=1, max_size=3), pins=st.sampled_from(list(PINPOINT_SETS)), max_tiles=MAX_TILES)
def test_processor_count_is_the_number_of_features_the_model_produces(ov_built, sizes, pins, max_tiles):
    model, processor = ov_built
    _set(model, processor, pins, max_tiles)
    images = [Image.new("RGB", s, (40 * k, 90, 200)) for k, s in enumerate(sizes)]
    counts = processor.image_token_counts([im.size for im in images])  # one sample
    if len(images) > 1:
        assert counts == [4 * 4 + 1] * len(images)  # OneVision: base tile + one newline each
    pixel_values = processor.preprocess_images(images)
    assert pixel_values.shape[0] == (len(images) if len(images) > 1 else model.tiles_per_image(
        processor.image_sizes(images))[0])
    with torch.no_grad():
        per_image = model.select_image_features(model.get_image_features(pixel_values), processor.image_sizes(images),
                                                batch_num_images=[len(images)])
    assert [f.shape[0] for f in per_image] == counts
    if max(max(s) / min(s) for s in sizes) <= 20:  # within the processor's default max_aspect_ratio
        # two samples in one call: the multi-image rule goes by each text's own images
        texts = ["<image> " * len(images) + "a", "<image> b"]
        inputs = processor(text=texts, images=[images, images[:1]], return_tensors="pt")
        assert inputs["batch_num_images"].tolist() == [len(images), 1]
        single = processor.image_token_counts(images[:1])
        assert (inputs["input_ids"] == processor.image_token_id).sum(1).tolist() == [sum(counts), sum(single)]
        with torch.no_grad():  # the guarded splice agrees too
            model.embed(inputs["input_ids"], inputs["pixel_values"], image_sizes=inputs["image_sizes"],
                        batch_num_images=inputs["batch_num_images"])


def test_multi_image_sample_without_batch_num_images_is_a_clear_error(ov_built):
    model, processor = ov_built
    _set(model, processor, "onevision", 9)
    images = [_image((61, 46)), _image((29, 86), 1)]
    inputs = processor(text="<image> <image> x", images=images, return_tensors="pt")
    with pytest.raises(ValueError, match="batch_num_images"):
        model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])


# --- export to and import from transformers' LlavaOnevision ------------------------------------------------
PARITY = [[(61, 46)], [(29, 86)], [(48, 48)], [(640, 480)], [(300, 20)], [(200, 180)],
          [(61, 46), (29, 86)], [(48, 48), (100, 30), (33, 77)]]


def _hf_processor(folder):
    fields = json.loads((folder / "processor_config.json").read_text())
    assert fields.pop("processor_class") == "LlavaOnevisionProcessor"
    return ImageOnlyOnevisionProcessor(LlavaOnevisionImageProcessorPil.from_pretrained(folder),
                                       AutoTokenizer.from_pretrained(folder), **fields)


def _parity(model, processor, hf, hp, cases, seed=0):
    """max |logit difference| over `cases` (lists of image sizes, one prompt each) and a batch of two prompts."""
    worst = 0.0
    batches = [[c] for c in cases] + [[cases[0], cases[-1]]]  # + a single-image and a multi-image prompt together
    for k, batch in enumerate(batches):
        samples = [[_image(s, seed + k + j) for j, s in enumerate(sizes)] for sizes in batch]
        texts = ["USER: " + " ".join(["<image>"] * len(ims)) + " which one is brighter? ASSISTANT: the"
                 for ims in samples]
        theirs = hp(text=texts, images=samples, return_tensors="pt", padding=True, padding_side="left")
        ours = processor(text=texts, images=samples, return_tensors="pt", padding_side="left")
        assert torch.equal(ours["input_ids"], theirs["input_ids"])
        assert ours["batch_num_images"].tolist() == theirs["batch_num_images"].tolist()
        with torch.no_grad():
            ref = model(**ours).logits
            got = hf(**theirs).logits
            # llavakit also takes transformers' [N_img, max_tiles, 3, H, W] pixels (with its own sizes)
            alt = model(input_ids=ours["input_ids"], attention_mask=ours["attention_mask"],
                        pixel_values=theirs["pixel_values"], image_sizes=ours["image_sizes"],
                        batch_num_images=ours["batch_num_images"]).logits
        keep = ours["attention_mask"].bool()
        worst = max(worst, (got - ref)[keep].abs().max().item(), (alt - ref)[keep].abs().max().item())
    return worst


@pytest.mark.parametrize("max_tiles", [1, 9])
def test_export_loads_in_llava_onevision_with_same_ids_and_logits(ov_built, tmp_path, max_tiles):
    model, processor = ov_built
    _set(model, processor, "onevision", max_tiles)
    out = export((model, processor), tmp_path / "hf")  # the default format: anyres_max goes to llava-onevision
    assert checkpoint_format(out) == "hf-llava-onevision"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlavaOnevisionForConditionalGeneration"]
    assert cfg["vision_aspect_ratio"] == f"anyres_max_{max_tiles}" and cfg["image_grid_pinpoints"] == PINPOINT_SETS["onevision"]
    with safe_open(str(out / "model.safetensors"), framework="pt") as fh:
        assert "image_newline" in fh.keys()
    hf, info = LlavaOnevisionForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    worst = _parity(model, processor, hf.eval(), _hf_processor(out), PARITY)
    print(f"anyres_max_{max_tiles} export: max |dlogit| = {worst:.3g}")
    assert worst <= 1e-4


def test_export_format_checks(ov_built, tiny_dirs, tmp_path):
    with pytest.raises(ValueError, match="anyres_max"):
        export(ov_built, tmp_path / "next", format="hf-llava-next")
    with pytest.raises(ValueError, match="anyres_max"):
        export(ov_built, tmp_path / "gguf", format="gguf")
    base = llavakit.build(tiny_dirs["clip"], tiny_dirs["llama"])
    with pytest.raises(ValueError, match="base"):
        export(base, tmp_path / "base", format="hf-llava-onevision")
    assert not any((tmp_path / d).exists() for d in ("next", "gguf", "base"))


@pytest.fixture(scope="module")
def hf_onevision_dir(tmp_path_factory):
    """A LlavaOnevisionForConditionalGeneration built by transformers (SigLIP-shaped vision, Qwen2 LLM, random
    weights) and its processor files, as llava-hf's OneVision checkpoints have them."""
    out = tmp_path_factory.mktemp("llava_onevision")
    tok = make_tokenizer(family="qwen2")
    tok.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    tok.pad_token = tok.pad_token or tok.eos_token
    text = tiny_llm_config("qwen2", vocab_size=len(tok))
    pins = [[32, 32], [32, 64], [64, 32], [64, 64], [96, 64], [64, 128]]
    cfg = LlavaOnevisionConfig(vision_config=tiny_vision_config("siglip").to_dict(), text_config=text.to_dict(),
                               image_token_index=tok.convert_tokens_to_ids("<image>"),
                               video_token_index=tok.convert_tokens_to_ids("<video>"), image_grid_pinpoints=pins,
                               vision_aspect_ratio="anyres_max_2")
    torch.manual_seed(5)
    LlavaOnevisionForConditionalGeneration(cfg).save_pretrained(out)
    siglip = tiny_image_processor("siglip")
    LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32}, image_grid_pinpoints=pins,
                                    image_mean=siglip.image_mean, image_std=siglip.image_std).save_pretrained(out)
    tok.save_pretrained(out)
    (out / "processor_config.json").write_text(json.dumps({
        "processor_class": "LlavaOnevisionProcessor", "num_image_tokens": 16, "vision_feature_select_strategy": "full",
        "image_token": "<image>", "video_token": "<video>", "vision_aspect_ratio": "anyres_max_2"}))
    return out


def test_import_of_a_transformers_llava_onevision_gives_the_same_logits(hf_onevision_dir, tmp_path):
    model, processor = llavakit.load(hf_onevision_dir)
    assert model.config.image_tokens == processor.image_tokens == "anyres_max"
    assert model.config.anyres_max_tiles == processor.anyres_max_tiles == 2
    assert model.config.image_grid_pinpoints == processor.image_grid_pinpoints == \
        [[32, 32], [32, 64], [64, 32], [64, 64], [96, 64], [64, 128]]
    hf = LlavaOnevisionForConditionalGeneration.from_pretrained(hf_onevision_dir).eval()
    worst = _parity(model, processor, hf, _hf_processor(hf_onevision_dir),
                    [[(61, 46)], [(29, 86)], [(128, 100)], [(48, 48), (90, 30)]], seed=10)
    print(f"llava-onevision import: max |dlogit| = {worst:.3g}")
    assert worst <= 1e-4
    # the imported model saves as llavakit and reopens with the same policy settings
    model.save_pretrained(tmp_path / "kit")
    processor.save_pretrained(tmp_path / "kit")
    again, again_proc = llavakit.load(tmp_path / "kit")
    assert again.config.anyres_max_tiles == again_proc.anyres_max_tiles == 2
    assert again.config.image_grid_pinpoints == again_proc.image_grid_pinpoints == model.config.image_grid_pinpoints


# --- OneVision's recipe: stage 1 at base resolution, stage 2 tiled ----------------------------------------
def test_a_base_stage1_projector_starts_a_tiled_stage2(tiny_dirs, tmp_path, caplog):
    """Only the row newline may be missing (kept freshly initialised, logged); any other mismatch still fails."""
    from safetensors.torch import save_file

    from llavakit.train.config import ConfigError
    from llavakit.train.recipes import load_projector

    torch.manual_seed(0)
    base, _ = llavakit.build(tiny_dirs["siglip"], tiny_dirs["qwen2"])
    stage1 = {k: v.clone() for k, v in base.multi_modal_projector.state_dict().items()}
    save_file(stage1, str(tmp_path / "mm_projector.safetensors"))
    for policy in ("anyres", "anyres_max"):
        model, _ = llavakit.build(tiny_dirs["siglip"], tiny_dirs["qwen2"], image_tokens=policy)
        newline = model.multi_modal_projector.image_newline.weight.detach().clone()
        with caplog.at_level("INFO", logger="llavakit.train.recipes"):
            load_projector(model, tmp_path / "mm_projector.safetensors")
        assert "image_newline.weight" in caplog.text
        for k, v in stage1.items():
            torch.testing.assert_close(model.multi_modal_projector.state_dict()[k], v, rtol=0, atol=0)
        torch.testing.assert_close(model.multi_modal_projector.image_newline.weight, newline, rtol=0, atol=0)
    del stage1["linear_2.bias"]  # anything else missing is still an error
    save_file(stage1, str(tmp_path / "broken.safetensors"))
    with pytest.raises(ConfigError, match="linear_2.bias"):
        load_projector(model, tmp_path / "broken.safetensors")
    tiled = {k: v.clone() for k, v in model.multi_modal_projector.state_dict().items()}
    save_file(tiled, str(tmp_path / "tiled.safetensors"))
    with pytest.raises(ConfigError, match="unexpected"):  # a tiled projector into a base model: no newline to take it
        load_projector(base, tmp_path / "tiled.safetensors")


def test_cli_exports_an_anyres_max_model_as_llava_onevision(ov_built, tmp_path, capsys):
    """`llavakit export` writes OneVision by default for anyres_max, and with --format hf-llava-onevision; a saved
    model keeps N and its pinpoints; the other formats refuse it."""
    from llavakit.cli import main

    model, processor = ov_built
    _set(model, processor, "mixed", 3)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    for args, name in (([], "hf"), (["--format", "hf-llava-onevision"], "explicit")):
        assert main(["export", str(tmp_path / "model"), str(tmp_path / name), *args]) == 0
        assert "wrote hf-llava-onevision checkpoint" in capsys.readouterr().out
        cfg = json.loads((tmp_path / name / "config.json").read_text())
        assert cfg["model_type"] == "llava_onevision" and cfg["vision_aspect_ratio"] == "anyres_max_3"
        assert cfg["image_grid_pinpoints"] == PINPOINT_SETS["mixed"]
    _, info = LlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert main(["export", str(tmp_path / "model"), str(tmp_path / "next"), "--format", "hf-llava-next"]) == 2
    assert "anyres_max" in capsys.readouterr().err


def test_three_training_steps_single_image_samples(tiny_dirs, tmp_path):
    """anyres_max trains from a YAML-shaped config on single-image samples (multi-image and video samples, padded
    and packed: tests/test_tiled_training.py and tests/test_video_training.py)."""
    from pathlib import Path

    from llavakit.train import load_config, run_training
    from llavakit.train.loop import read_losses

    (tmp_path / "images").mkdir()
    for k, s in enumerate([(61, 46), (29, 86), (48, 48), (300, 20)]):
        _image(s, k).save(tmp_path / "images" / f"{k}.png")
    rows = [{"id": f"s{i}", "images": [f"{i % 4}.png"],
             "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                               {"from": "gpt", "value": f"shape number {i}"}]} for i in range(6)]
    (tmp_path / "train.json").write_text(json.dumps(rows))
    cfg = load_config(base={
        "model": {"vision": str(tiny_dirs["siglip"]), "llm": str(tiny_dirs["qwen2"]), "image_tokens": "anyres_max"},
        "data": {"train": str(tmp_path / "train.json"), "image_folder": str(tmp_path / "images"),
                 "template": "vicuna_v1", "max_length": 1024},
        "train": {"stage": "finetune", "output_dir": str(tmp_path / "run"), "max_steps": 3, "batch_size": 2,
                  "lr": 1e-3, "warmup_ratio": 0.0, "report_to": "none", "seed": 0}})
    torch.manual_seed(0)
    out = Path(run_training(cfg))
    losses = [r["loss"] for r in read_losses(out / "losses.jsonl")]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    model, processor = llavakit.load(out)
    assert model.config.image_tokens == processor.image_tokens == "anyres_max"
    assert model.config.anyres_max_tiles == processor.anyres_max_tiles == 9
