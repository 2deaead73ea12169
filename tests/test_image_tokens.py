"""Per-image token counts, owned by the processor: the ``unpad`` policy gives images of different sizes
different counts, and every path — processor, dataset, packing, training with the feature cache,
generation — agrees with the model on them.

The reference for which features an image keeps is transformers' own LLaVA-NeXT ``unpad_image``
(applied to a one-tile feature map), not llavakit's code.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import llavakit
from llavakit.data.collate import PackingCollator, PadCollator
from llavakit.data.conversation import Conversation, Turn
from llavakit.data.dataset import SupervisedDataset
from llavakit.model.processor import unpadded_box

SIZES = [(64, 32), (30, 60), (40, 40), (97, 20)]  # wide, tall, square, very wide (width, height)


@pytest.fixture(scope="module")
def unpad_built(tiny_dirs):
    torch.manual_seed(0)
    model, processor = llavakit.build(tiny_dirs["clip"], tiny_dirs["llama"], projector="mlp2x_gelu",
                                      image_aspect="pad", image_tokens="unpad")
    return model.eval(), processor


def _image(size, seed):
    g = torch.Generator().manual_seed(seed)
    px = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(px)


def _hf_unpad(grid_features: torch.Tensor, size) -> torch.Tensor:
    """transformers' LLaVA-NeXT unpadding of a [D, g, g] map for an image of (width, height)."""
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    w, h = size
    return unpad_image(grid_features, (h, w))  # transformers takes (height, width)


@pytest.mark.parametrize("size", SIZES + [(33, 31), (31, 33), (500, 7)])
@pytest.mark.parametrize("grid", [4, 7, 24])
def test_kept_rows_and_columns_match_transformers_unpad_image(size, grid):
    feats = torch.arange(grid * grid, dtype=torch.float32).reshape(1, grid, grid)
    top, bottom, left, right = unpadded_box(*size, grid)
    torch.testing.assert_close(feats[:, top:bottom, left:right], _hf_unpad(feats, size))


def test_counts_differ_by_size_and_the_model_splices_each_images_own_features(unpad_built):
    model, processor = unpad_built
    pair = [SIZES[0], SIZES[3]]  # 2:1 and ~5:1
    images = [_image(s, k) for k, s in enumerate(pair)]
    counts = processor.image_token_counts(images)
    grid = int(processor.image_seq_length ** 0.5)
    assert counts == [(_hf_unpad(torch.zeros(1, grid, grid), s).shape[1] * _hf_unpad(torch.zeros(1, grid, grid),
                                                                                    s).shape[2]) for s in pair]
    assert counts[0] != counts[1] and max(counts) < processor.image_seq_length

    inputs = processor(text="USER: <image> and <image>\nWhich is wider? ASSISTANT:", images=images,
                       return_tensors="pt")
    ids = inputs["input_ids"][0]
    assert int((ids == processor.image_token_id).sum()) == sum(counts)
    with torch.no_grad():
        embeds = model.embed(inputs["input_ids"], inputs["pixel_values"], image_sizes=inputs["image_sizes"])
        full = model.get_image_features(inputs["pixel_values"])  # [2, g*g, D]
    d = full.shape[-1]
    want = torch.cat([_hf_unpad(full[k].T.reshape(d, grid, grid), s).reshape(d, -1).T
                      for k, s in enumerate(pair)])  # [sum counts, D], image order
    torch.testing.assert_close(embeds[0][ids == processor.image_token_id], want)
    with pytest.raises(ValueError, match="image_sizes"):
        model(**{k: v for k, v in inputs.items() if k != "image_sizes"})
    with pytest.raises(ValueError, match=r"\[.*\] features each"):  # the splice names per-image counts
        model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
              image_sizes=torch.tensor([[40, 40], [40, 40]]))  # sizes that are not the images'


def test_dataset_packing_and_generation_use_the_per_image_counts(unpad_built, tmp_path):
    from llavakit.infer.generate import GenerationSettings, Generator

    model, processor = unpad_built
    paths = []
    for k, s in enumerate(SIZES):
        paths.append(str(tmp_path / f"{k}.png"))
        _image(s, k).save(paths[-1])
    convs = [Conversation([Turn("user", "<image>\nWhat is it?"), Turn("assistant", "a square")], images=[p], index=k)
             for k, p in enumerate(paths)]
    convs.append(Conversation([Turn("user", "<image><image> Compare."), Turn("assistant", "same")],
                              images=paths[:2], index=4))
    ds = SupervisedDataset(convs, processor, "vicuna_v1")
    for i, conv in enumerate(convs):
        want = processor.image_token_counts([Image.open(p) for p in conv.images])
        assert int((torch.as_tensor(ds[i]["input_ids"]) == processor.image_token_id).sum()) == sum(want)
        assert ds.image_sizes(i).tolist() == [list(Image.open(p).size) for p in conv.images]
    assert len(set(ds.lengths[:4])) > 1  # lengths (for grouping and packing) follow the sizes
    for collator in (PadCollator(processor.tokenizer.pad_token_id), PackingCollator()):
        batch = collator([ds[i] for i in range(len(ds))])
        out = model(**batch)
        assert torch.isfinite(out.loss)

    gen = Generator(model, processor)
    turns = [Turn("user", "<image> and <image>: which is wider?")]
    images = [Image.open(paths[0]), Image.open(paths[3])]
    batch = gen.encode([turns], [images])
    assert int((batch["input_ids"] == processor.image_token_id).sum()) == sum(processor.image_token_counts(images))
    reply = gen.generate([turns], [images], GenerationSettings(max_new_tokens=4))
    assert isinstance(reply[0], str)


def test_training_with_feature_cache_and_packing_under_unpad(tiny_dirs, tmp_path):
    """Stage 1 with cached tower features gives the losses of pixels, images of four sizes."""
    from llavakit.train import load_config, run_training
    from llavakit.train.loop import read_losses

    (tmp_path / "images").mkdir()
    for k, s in enumerate(SIZES):
        _image(s, k).save(tmp_path / "images" / f"{k}.png")
    rows = [{"id": f"c{i}", "image": f"{i % 4}.png", "conversations": [
        {"from": "human", "value": "<image>"}, {"from": "gpt", "value": f"caption {i} of a shape"}]} for i in range(8)]
    (tmp_path / "captions.json").write_text(json.dumps(rows))

    def run(name, **data):
        cfg = load_config(base={
            "model": {"vision": str(tiny_dirs["clip"]), "llm": str(tiny_dirs["llama"]), "image_aspect": "pad",
                      "image_tokens": "unpad"},
            "data": {"train": str(tmp_path / "captions.json"), "image_folder": str(tmp_path / "images"),
                     "template": "plain", "packing": True, **data},
            "train": {"stage": "pretrain", "output_dir": str(tmp_path / name), "max_steps": 3, "batch_size": 3,
                      "lr": 1e-3, "warmup_ratio": 0.0, "report_to": "none", "seed": 0}})
        torch.manual_seed(0)
        out = run_training(cfg)
        return [r["loss"] for r in read_losses(Path(out) / "losses.jsonl")]

    pixels = run("pixels")
    cached = run("cached", feature_cache=str(tmp_path / "cache"))
    torch.testing.assert_close(torch.tensor(cached), torch.tensor(pixels), atol=1e-5, rtol=1e-5)


def test_unpad_needs_pad_and_is_refused_by_exports(unpad_built, tiny_dirs, tmp_path):
    with pytest.raises(ValueError, match="image_aspect='pad'"):
        llavakit.build(tiny_dirs["clip"], tiny_dirs["llama"], image_tokens="unpad")
    from llavakit.interop import export

    with pytest.raises(ValueError, match="unpad"):
        export(unpad_built, tmp_path / "out", format="hf-llava")
    assert not (tmp_path / "out").exists()
