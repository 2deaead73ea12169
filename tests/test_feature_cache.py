"""Frozen-vision feature cache: same loss as pixels, keys that follow the encoder, a store that persists."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from llavakit.data.collate import PackingCollator, PadCollator
from llavakit.data.conversation import Conversation, Turn
from llavakit.data.dataset import SupervisedDataset
from llavakit.train.config import ConfigError
from llavakit.train.feature_cache import (FeatureCache, FeatureCacheError, attach_feature_cache, encoder_fingerprint,
                                          image_key)


def _write_images(folder, n: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        g = torch.Generator().manual_seed(100 + i)
        px = (torch.rand(20 + 4 * i, 28, 3, generator=g) * 255).to(torch.uint8).numpy()
        p = folder / f"{i}.png"
        Image.fromarray(px).save(p)
        paths.append(str(p))
    return paths


@pytest.fixture(scope="module")
def stage1(tiny_built, tmp_path_factory):
    """A stage-1 (plain template) dataset of 4 captioned images, one image used twice."""
    _, processor = tiny_built
    paths = _write_images(tmp_path_factory.mktemp("imgs"), 3)
    captions = ["A red circle.", "Two blue squares on a white background.", "one two three", "There is a dog."]
    refs = [paths[0], paths[1], paths[2], paths[0]]
    convs = [Conversation([Turn("user", "<image>"), Turn("assistant", c)], images=[r], index=i)
             for i, (c, r) in enumerate(zip(captions, refs))]
    return SupervisedDataset(convs, processor, "plain")


def _loss_and_grad(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch, supervised_logits_only=True)
    out.loss.backward()
    grad = model.multi_modal_projector.linear_1.weight.grad.clone()
    model.zero_grad(set_to_none=True)
    return out.loss.detach(), grad


@pytest.mark.parametrize("collator", [PadCollator(0, padding_side="right"), PackingCollator()],
                         ids=["pad", "packed"])
def test_cached_features_give_the_stage1_loss_and_projector_gradient_of_pixels(tiny_built, stage1, tmp_path,
                                                                               collator):
    model, processor = tiny_built
    if isinstance(collator, PadCollator):
        collator = PadCollator(processor.tokenizer.pad_token_id, padding_side="right")
    cache = FeatureCache(tmp_path / "cache", model, processor)
    assert cache.build(stage1, say=lambda *a: None) == 3  # the repeated image is computed once
    cached = cache.wrap(stage1)
    assert cached.lengths == stage1.lengths and cached.has_image == stage1.has_image
    idx = range(len(stage1))
    pixel_batch = collator([stage1[i] for i in idx])
    cached_batch = cache.collator(collator)([cached[i] for i in idx])
    assert "pixel_values" not in cached_batch and cached_batch["vision_features"].shape[0] == 4
    torch.testing.assert_close(cached_batch["input_ids"], pixel_batch["input_ids"])
    loss_px, grad_px = _loss_and_grad(model, pixel_batch)
    loss_c, grad_c = _loss_and_grad(model, cached_batch)
    torch.testing.assert_close(loss_c, loss_px, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_c, grad_px, atol=1e-5, rtol=1e-4)


def test_store_survives_reopen_and_is_not_rebuilt(tiny_built, stage1, tmp_path):
    model, processor = tiny_built
    first = FeatureCache(tmp_path / "c", model, processor)
    first.build(stage1, say=lambda *a: None)
    keys = first.keys_of(stage1)
    before = first.get(keys[1])  # [1, T, D]
    again = FeatureCache(tmp_path / "c", model, processor)
    assert again.directory == first.directory and len(again) == 3
    assert again.build(stage1, say=lambda *a: None) == 0
    torch.testing.assert_close(again.get(keys[1]), before, rtol=0, atol=0)
    assert before.shape == (1, model.config.vision_tokens, model.config.vision_config.hidden_size)
    # What dataloader workers receive: the index and paths, not the model.
    clone = pickle.loads(pickle.dumps(again))
    assert clone.model is None and len(pickle.dumps(again)) < 100_000
    torch.testing.assert_close(clone.get(keys[1]), before, rtol=0, atol=0)


def test_new_images_go_to_a_new_shard_and_missing_ones_are_an_error(tiny_built, stage1, tmp_path):
    model, processor = tiny_built
    cache = FeatureCache(tmp_path / "c", model, processor)
    keys = cache.keys_of(stage1)
    with pytest.raises(FeatureCacheError, match="not in"):
        cache.wrap(stage1, keys)
    cache.build(stage1, keys[:2], say=lambda *a: None)
    assert len(cache) == 2 and cache.index[keys[1][0]][0] == 0
    assert cache.build(stage1, keys, say=lambda *a: None) == 1
    assert cache.index[keys[2][0]] == (1, 0)  # shard 1, row 0


def _fp(model, processor) -> str:
    return encoder_fingerprint(model, processor)[0]


def test_key_changes_with_encoder_weights_config_features_and_preprocessing(tiny_built):
    model, processor = tiny_built
    base = _fp(model, processor)
    assert _fp(model, processor) == base  # deterministic

    other_weights = copy.deepcopy(model)
    with torch.no_grad():
        next(other_weights.vision_tower.parameters())[..., 0] += 1e-3
    other_layer = copy.deepcopy(model)
    other_layer.config.vision_feature_layer = -1
    other_select = copy.deepcopy(model)
    other_select.config.vision_feature_select = "cls_patch"
    other_config = copy.deepcopy(model)
    other_config.config.vision_config.layer_norm_eps = 1e-6
    padded = copy.deepcopy(processor)
    padded.image_aspect = "pad"
    other_mean = copy.deepcopy(processor)
    other_mean.image_processor.image_mean = [0.5, 0.5, 0.5]
    fps = [_fp(other_weights, processor), _fp(other_layer, processor), _fp(other_select, processor),
           _fp(other_config, processor), _fp(model, padded), _fp(model, other_mean)]
    assert base not in fps and len(set(fps)) == len(fps)


def test_changed_preprocessing_misses_the_old_store(tiny_built, stage1, tmp_path):
    model, processor = tiny_built
    FeatureCache(tmp_path / "c", model, processor).build(stage1, say=lambda *a: None)
    padded = copy.deepcopy(processor)
    padded.image_aspect = "pad"
    fresh = FeatureCache(tmp_path / "c", model, padded)
    assert len(fresh) == 0 and fresh.build(stage1, say=lambda *a: None) == 3
    assert [p.parent for p in fresh.prune()] == [tmp_path / "c"] and len(list((tmp_path / "c").iterdir())) == 1


def test_image_key_is_the_content_not_the_name(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.new("RGB", (4, 4), (1, 2, 3)).save(a)
    b.write_bytes(a.read_bytes())
    assert image_key(str(a)) == image_key(b) == image_key(a.read_bytes())
    assert image_key(Image.new("RGB", (4, 4), (1, 2, 3))) != image_key(Image.new("RGB", (4, 4), (1, 2, 4)))


def test_bf16_features_round_trip_exactly(tiny_built, stage1, tmp_path):
    model, processor = tiny_built
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    cache = FeatureCache(tmp_path / "c", bf16, processor)
    cache.build(stage1, say=lambda *a: None)
    item = stage1[1]
    with torch.no_grad():
        want = bf16.vision_features(item["pixel_values"])
    got = FeatureCache(tmp_path / "c", bf16, processor).get(cache.keys_of(stage1)[1])
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_trainer_hook_refuses_a_trainable_tower_and_wraps_otherwise(tiny_built, stage1, tmp_path):
    model, processor = tiny_built
    cfg = SimpleNamespace(train=SimpleNamespace(train_vision=True),
                          data=SimpleNamespace(feature_cache=str(tmp_path / "c"), num_workers=0))
    collator = PackingCollator()
    with pytest.raises(ConfigError, match="frozen vision"):
        attach_feature_cache(cfg, model, processor, stage1, collator, say=lambda *a: None)
    cfg.train.train_vision = False
    ds, coll = attach_feature_cache(cfg, model, processor, stage1, collator, say=lambda *a: None)
    batch = coll([ds[0], ds[3]])
    assert batch["vision_features"].shape[0] == 2 and "pixel_values" not in batch
    torch.testing.assert_close(batch["vision_features"][0], batch["vision_features"][1], rtol=0, atol=0)


@pytest.mark.parametrize("policy", ["anyres", "anyres_max"])
def test_trainer_hook_refuses_tiled_policies_up_front(tiny_dirs, stage1, tmp_path, policy):
    """A tiled model sees several tiles per image; the cache holds one: a clear ConfigError before anything is built."""
    import llavakit

    model, processor = llavakit.build(tiny_dirs["clip"], tiny_dirs["llama"], image_tokens=policy)
    cfg = SimpleNamespace(train=SimpleNamespace(train_vision=False),
                          data=SimpleNamespace(feature_cache=str(tmp_path / "c"), num_workers=0))
    with pytest.raises(ConfigError, match="use image_tokens: base for the feature cache, as OneVision's stage 1 does"):
        attach_feature_cache(cfg, model, processor, stage1, PackingCollator(), say=lambda *a: None)
    assert not (tmp_path / "c").exists()


def test_a_stage1_run_with_the_cache_matches_one_without(tiny_dirs, tmp_path):
    """Through the real trainer (`data.feature_cache`): same losses and projector, twice the second time."""
    import json

    from safetensors.torch import load_file

    from llavakit.train import load_config, run_training
    from llavakit.train.loop import read_losses

    paths = _write_images(tmp_path / "images", 4)
    rows = [{"id": f"c{i}", "image": Path(p).name, "conversations": [
        {"from": "human", "value": "<image>"}, {"from": "gpt", "value": f"caption number {i} of a square"}]}
        for i, p in enumerate(paths * 2)]
    (tmp_path / "captions.json").write_text(json.dumps(rows))

    def run(name, **data):
        cfg = load_config(base={
            "model": {"vision": str(tiny_dirs["clip"]), "llm": str(tiny_dirs["llama"])},
            "data": {"train": str(tmp_path / "captions.json"), "image_folder": str(tmp_path / "images"),
                     "template": "plain", "packing": True, **data},
            "train": {"stage": "pretrain", "output_dir": str(tmp_path / name), "max_steps": 3, "batch_size": 3,
                      "lr": 1e-3, "warmup_ratio": 0.0, "report_to": "none", "seed": 0}})
        torch.manual_seed(0)  # the same fresh projector in every run
        out = run_training(cfg)
        return [r["loss"] for r in read_losses(out / "losses.jsonl")], load_file(str(out / "projector.safetensors"))

    plain_losses, plain_proj = run("pixels")
    cached_losses, cached_proj = run("cached", feature_cache=str(tmp_path / "cache"))
    again_losses, _ = run("cached_again", feature_cache=str(tmp_path / "cache"))  # reads the built store
    (store,) = (tmp_path / "cache").iterdir()
    assert len(json.loads((store / "index.json").read_text())) == 4  # 8 samples, 4 distinct images
    torch.testing.assert_close(torch.tensor(cached_losses), torch.tensor(plain_losses), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.tensor(again_losses), torch.tensor(plain_losses), atol=1e-5, rtol=1e-5)
    for k in plain_proj:
        torch.testing.assert_close(cached_proj[k], plain_proj[k], atol=1e-5, rtol=1e-4)
