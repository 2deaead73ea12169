"""LLaVA-NeXT's ``anyres`` policy: the grid, the counts, the model's features, export/import with transformers'
LlavaNext as the reference, and training.

References are transformers' own LLaVA-NeXT functions and classes (`select_best_resolution`, `unpad_image`,
`image_size_to_num_patches`, `LlavaNextProcessor`, `LlavaNextForConditionalGeneration`), never llavakit's code.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors import safe_open
from transformers import (AutoProcessor, CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                          LlavaNextProcessor)
from transformers.image_processing_utils import select_best_resolution
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches, unpad_image

import llavakit
from llavakit.demo.tiny import make_tokenizer, tiny_llm_config
from llavakit.interop import export
from llavakit.model.anyres import (anyres_token_count, best_resolution, check_grid_pinpoints, default_grid_pinpoints,
                                   num_tiles, unpadded_extent)
from llavakit.model.processor import LlavakitProcessor

TILE = 32  # the tiny CLIP's input size (patch 8: a 4 x 4 feature grid per tile)
PINPOINT_SETS = {
    "default": default_grid_pinpoints(TILE),
    "one-tile": [[32, 32]],
    "mixed": [[32, 32], [64, 64], [96, 32], [32, 96], [128, 64]],
    "large": [[32, 128], [128, 32], [96, 96], [64, 128]],
}
SIDES = st.one_of(st.integers(1, 64), st.integers(1, 2000))  # small sides often: extreme aspect ratios
SIZES = st.tuples(SIDES, SIDES)  # (width, height)


def _image(size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(size[1], size[0], 3, generator=g) * 255).byte().numpy())


# --- the grid math against transformers' functions ------------------------------------------------------
@settings(max_examples=300, deadline=None, derandomize=True)
@given(size=SIZES, pins=st.sampled_from(list(PINPOINT_SETS)))
def test_grid_tiles_and_unpadding_match_transformers(size, pins):
    w, h = size
    pinpoints = PINPOINT_SETS[pins]
    assert best_resolution(w, h, pinpoints) == tuple(select_best_resolution((h, w), pinpoints))
    assert num_tiles(w, h, pinpoints, TILE) == image_size_to_num_patches((h, w), pinpoints, TILE)
    rows, cols = (x // TILE for x in best_resolution(w, h, pinpoints))
    fmap = torch.arange(rows * 4 * cols * 4, dtype=torch.float32).reshape(1, rows * 4, cols * 4)
    top, bottom, left, right = unpadded_extent(w, h, rows * 4, cols * 4)
    torch.testing.assert_close(fmap[:, top:bottom, left:right], unpad_image(fmap, (h, w)))


def test_pinpoints_are_checked():
    assert check_grid_pinpoints([(64, 32)], 32) == [[64, 32]]
    for bad in ([[48, 32]], [], [[0, 32]], [32, 64]):
        with pytest.raises(ValueError, match="image_grid_pinpoints"):
            check_grid_pinpoints(bad, 32)


def _clip336_tokenizer():
    tok = make_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.pad_token = "<unk>"
    return tok


def test_worked_example_clip336_640x480_is_2340_tokens_as_llava_next_processor():
    assert anyres_token_count(640, 480, default_grid_pinpoints(336), 336, 24) == 2340
    tok = _clip336_tokenizer()
    ours = LlavakitProcessor(CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
                             tok, image_seq_length=576, image_tokens="anyres", tokenization="llm")
    assert ours.image_grid_pinpoints == [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    assert ours.num_image_tokens((640, 480)) == 2340
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    hf = LlavaNextProcessor(ip, tok, patch_size=14, vision_feature_select_strategy="default",
                            num_additional_image_tokens=1)
    ids = hf(text="<image>", images=[Image.new("RGB", (640, 480))], return_tensors="pt")["input_ids"]
    assert int((ids == tok.convert_tokens_to_ids("<image>")).sum()) == 2340


# --- property: the processor's count is what the model produces ------------------------------------------
@pytest.fixture(scope="module")
def policy_models(tiny_dirs):
    torch.manual_seed(0)
    out = {}
    for policy, aspect in (("base", "resize"), ("unpad", "pad"), ("anyres", "resize")):
        model, processor = llavakit.build(tiny_dirs["clip"], tiny_dirs["llama"], image_aspect=aspect,
                                          image_tokens=policy)
        out[policy] = (model.eval(), processor)
    return out


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(SIZES, min_size=1, max_size=3), policy=st.sampled_from(["base", "unpad", "anyres"]),
       pins=st.sampled_from(list(PINPOINT_SETS)))
def test_processor_count_is_the_number_of_features_the_model_produces(policy_models, sizes, policy, pins):
    model, processor = policy_models[policy]
    if policy == "anyres":
        model.config.image_grid_pinpoints = processor.image_grid_pinpoints = PINPOINT_SETS[pins]
    images = [Image.new("RGB", s, (40 * k, 90, 200)) for k, s in enumerate(sizes)]
    counts = [processor.num_image_tokens(im.size) for im in images]  # the processor's rule, size limits aside
    pixel_values, image_sizes = processor.preprocess_images(images), processor.image_sizes(images)
    with torch.no_grad():
        per_image = model.select_image_features(model.get_image_features(pixel_values), image_sizes)
    assert [f.shape[0] for f in per_image] == counts
    if max(max(s) / min(s) for s in sizes) <= 20:  # within the processor's default max_aspect_ratio
        inputs = processor(text="USER: " + " and ".join(["<image>"] * len(images)) + " ASSISTANT:", images=images,
                           return_tensors="pt")
        assert processor.image_token_counts(images) == counts
        assert int((inputs["input_ids"] == processor.image_token_id).sum()) == sum(counts)
        with torch.no_grad():  # the guarded splice agrees too
            model.embed(inputs["input_ids"], inputs["pixel_values"], image_sizes=inputs.get("image_sizes"))


def test_anyres_features_are_base_then_unpadded_rows_with_newlines(policy_models):
    """The layout, checked against transformers' unpad_image on the tile map built by hand."""
    model, processor = policy_models["anyres"]
    model.config.image_grid_pinpoints = processor.image_grid_pinpoints = PINPOINT_SETS["default"]
    image = _image((300, 60))
    inputs = processor(text="<image>", images=[image], return_tensors="pt")
    assert inputs["pixel_values"].shape == (1 + 3, 3, TILE, TILE)  # base + 1 x 3 grid
    with torch.no_grad():
        feats = model.get_image_features(inputs["pixel_values"])  # [4, 16, D]
        got = model.select_image_features(feats, inputs["image_sizes"])[0]
    d = feats.shape[-1]
    fmap = torch.cat([feats[k].reshape(4, 4, d) for k in (1, 2, 3)], dim=1).permute(2, 0, 1)  # [D, 4, 12]
    kept = unpad_image(fmap, (60, 300))  # [D, 2, 12]: the rows over the padding go
    assert kept.shape[1] == 2
    newline = model.multi_modal_projector.image_newline.weight
    rows = torch.cat([kept.permute(1, 2, 0), newline.expand(kept.shape[1], 1, d)], dim=1).reshape(-1, d)
    torch.testing.assert_close(got, torch.cat([feats[0], rows]))
    with pytest.raises(ValueError, match="cached vision_features"):
        model(input_ids=inputs["input_ids"], vision_features=torch.zeros(1, 16, 32), image_sizes=inputs["image_sizes"])


def test_anyres_needs_resize_aspect_and_a_square_grid(tiny_dirs):
    with pytest.raises(ValueError, match="image_aspect='resize'"):
        llavakit.build(tiny_dirs["clip"], tiny_dirs["llama"], image_aspect="pad", image_tokens="anyres")
    with pytest.raises(ValueError, match="square"):
        llavakit.build(tiny_dirs["clip"], tiny_dirs["llama"], vision_feature_select="cls_patch", image_tokens="anyres")


# --- export to and import from transformers' LlavaNext -------------------------------------------------
PARITY_SIZES = [(61, 46), (29, 86), (48, 48), (640, 480), (200, 12)]  # 640x480, 300x900 scaled to 32 px tiles; ...


@pytest.mark.parametrize("pins", ["default", "mixed"])
def test_export_loads_in_llava_next_with_same_ids_pixels_and_logits(policy_models, tmp_path, pins):
    model, processor = policy_models["anyres"]
    model.config.image_grid_pinpoints = processor.image_grid_pinpoints = PINPOINT_SETS[pins]
    out = export((model, processor), tmp_path / "hf")  # the default format: anyres goes to llava-next
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlavaNextForConditionalGeneration"]
    assert cfg["image_grid_pinpoints"] == PINPOINT_SETS[pins]
    with safe_open(str(out / "model.safetensors"), framework="pt") as fh:
        assert "image_newline" in fh.keys() and not any("projector.image_newline" in k for k in fh.keys())
    hf, info = LlavaNextForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    hp = AutoProcessor.from_pretrained(out)
    assert type(hp).__name__ == "LlavaNextProcessor"
    worst = 0.0
    for k, sizes in enumerate([[s] for s in PARITY_SIZES] + [PARITY_SIZES[:2], PARITY_SIZES[2:5]]):
        images = [_image(s, seed=k) for s in sizes]
        prompt = "USER: " + " ".join(["<image>"] * len(images)) + " which one is brighter? ASSISTANT: the"
        theirs = hp(text=prompt, images=images, return_tensors="pt")
        ours = processor(text=prompt, images=images, return_tensors="pt")
        assert torch.equal(ours["input_ids"], theirs["input_ids"])
        tiles = model.tiles_per_image(ours["image_sizes"])
        torch.testing.assert_close(torch.cat([pv[:n] for pv, n in zip(theirs["pixel_values"], tiles)]),
                                   ours["pixel_values"], atol=0, rtol=0)
        with torch.no_grad():
            ref = model(**ours).logits
            got = hf(**theirs).logits
            if k == 0:  # llavakit also takes transformers' [N_img, max_tiles, 3, H, W] pixels (with its own sizes)
                torch.testing.assert_close(model(input_ids=ours["input_ids"], pixel_values=theirs["pixel_values"],
                                                 image_sizes=ours["image_sizes"]).logits, ref, atol=0, rtol=0)
        worst = max(worst, (got - ref).abs().max().item())
    print(f"anyres export, pinpoints {pins}: max |dlogit| = {worst:.3g}")
    assert worst <= 1e-4


def test_export_format_checks(policy_models, tmp_path):
    for policy, fmt, match in (("anyres", "gguf", "anyres"), ("base", "hf-llava-next", "base"),
                               ("unpad", "hf-llava", "unpad")):
        with pytest.raises(ValueError, match=match):
            export(policy_models[policy], tmp_path / policy, format=fmt)
        assert not (tmp_path / policy).exists()


@pytest.fixture(scope="module")
def hf_llava_next_dir(tiny_dirs, tmp_path_factory):
    """A LlavaNextForConditionalGeneration built by transformers (random weights) + its LlavaNextProcessor."""
    out = tmp_path_factory.mktemp("llava_next")
    tok = make_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    text = tiny_llm_config("llama", vocab_size=len(tok))
    vision = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                              intermediate_size=64)
    pins = [[32, 64], [64, 32], [64, 64], [96, 64]]
    cfg = LlavaNextConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                          image_token_index=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=pins,
                          vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(5)
    LlavaNextForConditionalGeneration(cfg).save_pretrained(out)
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                    image_grid_pinpoints=pins)
    LlavaNextProcessor(ip, tok, patch_size=8, vision_feature_select_strategy="default",
                       num_additional_image_tokens=1).save_pretrained(out)
    return out


def test_import_of_a_transformers_llava_next_gives_the_same_logits(hf_llava_next_dir, tmp_path):
    model, processor = llavakit.load(hf_llava_next_dir)
    assert model.config.image_tokens == "anyres"
    assert model.config.image_grid_pinpoints == processor.image_grid_pinpoints == [[32, 64], [64, 32], [64, 64], [96, 64]]
    hf = LlavaNextForConditionalGeneration.from_pretrained(hf_llava_next_dir).eval()
    hp = AutoProcessor.from_pretrained(hf_llava_next_dir)
    worst = 0.0
    for k, sizes in enumerate([[(61, 46)], [(29, 86)], [(48, 48), (90, 30)]]):
        images = [_image(s, seed=10 + k) for s in sizes]
        prompt = "USER: " + " ".join(["<image>"] * len(images)) + " what is it? ASSISTANT:"
        theirs = hp(text=prompt, images=images, return_tensors="pt")
        ours = processor(text=prompt, images=images, return_tensors="pt")
        assert torch.equal(ours["input_ids"], theirs["input_ids"])
        with torch.no_grad():
            worst = max(worst, (model(**ours).logits - hf(**theirs).logits).abs().max().item())
    print(f"llava-next import: max |dlogit| = {worst:.3g}")
    assert worst <= 1e-4
    # and the imported model saves as llavakit and reopens with the same pinpoints
    model.save_pretrained(tmp_path / "kit")
    processor.save_pretrained(tmp_path / "kit")
    again, again_proc = llavakit.load(tmp_path / "kit")
    assert again.config.image_grid_pinpoints == again_proc.image_grid_pinpoints == model.config.image_grid_pinpoints


# --- training ------------------------------------------------------------------------------------------
def test_three_training_steps_with_images_of_different_sizes(tiny_dirs, tmp_path):
    from llavakit.data.conversation import Conversation, Turn
    from llavakit.data.dataset import SupervisedDataset
    from llavakit.train import load_config, run_training
    from llavakit.train.loop import read_losses

    (tmp_path / "images").mkdir()
    sizes = [(61, 46), (29, 86), (48, 48), (120, 20)]
    for k, s in enumerate(sizes):
        _image(s, k).save(tmp_path / "images" / f"{k}.png")
    rows = [{"id": f"s{i}", "images": [f"{i % 4}.png"] + ([f"{(i + 1) % 4}.png"] if i % 3 == 0 else []),
             "conversations": [{"from": "human", "value": "<image>\n" * (1 + (i % 3 == 0)) + "What is it?"},
                               {"from": "gpt", "value": f"shape number {i}"}]} for i in range(8)]
    (tmp_path / "train.json").write_text(json.dumps(rows))
    cfg = load_config(base={
        "model": {"vision": str(tiny_dirs["clip"]), "llm": str(tiny_dirs["llama"]), "image_tokens": "anyres"},
        "data": {"train": str(tmp_path / "train.json"), "image_folder": str(tmp_path / "images"),
                 "template": "vicuna_v1", "max_length": 1024},
        "train": {"stage": "finetune", "output_dir": str(tmp_path / "run"), "max_steps": 3, "batch_size": 3,
                  "lr": 1e-3, "warmup_ratio": 0.0, "report_to": "none", "seed": 0}})
    torch.manual_seed(0)
    out = Path(run_training(cfg))
    losses = [r["loss"] for r in read_losses(out / "losses.jsonl")]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    model, processor = llavakit.load(out)
    assert model.config.image_tokens == "anyres" and processor.image_grid_pinpoints == model.config.image_grid_pinpoints

    # labels: the image placeholders are the processor's counts and unsupervised; the answer is supervised
    paths = [str(tmp_path / "images" / f"{k}.png") for k in range(4)]
    conv = Conversation([Turn("user", "<image>\n<image>\nWhat is it?"), Turn("assistant", "shape number 3")],
                        images=paths[:2], index=0)
    ds = SupervisedDataset([conv], processor, "vicuna_v1")
    item = ds[0]
    is_image = item["input_ids"] == processor.image_token_id
    assert int(is_image.sum()) == sum(processor.image_token_counts([Image.open(p) for p in paths[:2]]))
    assert (item["labels"][is_image] == -100).all()
    assert item["pixel_values"].shape[0] == sum(num_tiles(w, h, processor.image_grid_pinpoints, TILE)
                                                for w, h in sizes[:2])
    supervised = item["labels"][item["labels"] != -100]
    assert processor.tokenizer.decode(supervised).strip().startswith("shape number 3")
    from llavakit.data.collate import PackingCollator, PadCollator

    ds = SupervisedDataset([conv, Conversation([Turn("user", "<image>\nAnd this?"), Turn("assistant", "a bar")],
                                               images=paths[3:], index=1)], processor, "vicuna_v1")
    for collator in (PadCollator(processor.tokenizer.pad_token_id), PackingCollator()):
        batch = collator([ds[0], ds[1]])  # 2 + 1 images of three sizes: their tiles concatenated
        assert batch["pixel_values"].shape[0] == sum(num_tiles(w, h, processor.image_grid_pinpoints, TILE)
                                                     for w, h in sizes[:2] + sizes[3:])
        with torch.no_grad():
            assert torch.isfinite(model(**batch).loss)
