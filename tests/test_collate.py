"""Batching: padding, padding-free packing (same logits as unpacked), length-grouped sampling."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from llavakit.data.collate import PackingCollator, PadCollator, packed_lengths, unpack
from llavakit.data.conversation import Conversation, Turn
from llavakit.data.dataset import SupervisedDataset
from llavakit.data.sampler import LengthGroupedSampler, PackedBatchSampler, pack_indices
from llavakit.data.tokenize import IGNORE_INDEX


def _img(seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(24, 36, 3, generator=g) * 255).to(torch.uint8).numpy())


@pytest.fixture(scope="module")
def items(tiny_built):
    """Four samples: one image, two images, text only, one image (different lengths)."""
    _, processor = tiny_built
    convs = [
        Conversation([Turn("user", "<image>\nWhat is in the image?"), Turn("assistant", "A red circle.")],
                     images=[_img(1)]),
        Conversation([Turn("user", "<image> or <image>: which has more circles?"), Turn("assistant", "The first."),
                      Turn("user", "How many?"), Turn("assistant", "Three.")], images=[_img(2), _img(3)]),
        Conversation([Turn("user", "Count to five."), Turn("assistant", "one two three four five")]),
        Conversation([Turn("user", "Describe the picture in detail, please!\n<image>"),
                      Turn("assistant", "There is a blue square on a white background.")], images=[_img(4)]),
    ]
    ds = SupervisedDataset(convs, processor, "vicuna_v1")
    assert ds.report.kept == 4
    return [ds[i] for i in range(len(ds))]


def _single(model, item) -> torch.Tensor:
    pv = item["pixel_values"]
    return model(input_ids=item["input_ids"][None], pixel_values=pv).logits[0]  # [L, V]


@pytest.fixture(params=["sdpa", "eager"])
def attn_model(request, tiny_built):
    model, _ = tiny_built
    before = model.language_model.config._attn_implementation
    model.set_attn_implementation(request.param)
    assert model.language_model.config._attn_implementation == request.param
    yield model
    model.set_attn_implementation(before)


def test_packed_logits_equal_unpacked_logits(attn_model, items):
    batch = PackingCollator()(items)
    lens = [len(x["input_ids"]) for x in items]
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (1, sum(lens))
    assert batch["pixel_values"].shape[0] == 4 and "attention_mask" not in batch
    assert packed_lengths(batch["position_ids"]) == lens
    with torch.no_grad():
        packed = unpack(attn_model(**batch).logits, batch["position_ids"])
        for item, got in zip(items, packed):
            torch.testing.assert_close(got, _single(attn_model, item), atol=1e-5, rtol=1e-5)


def test_without_use_cache_false_attention_would_leak(tiny_built, items):
    # Why the collator sends use_cache=False: with a cache transformers does not detect packing.
    model, _ = tiny_built
    batch = PackingCollator()(items[2:4])
    batch.pop("use_cache")
    with torch.no_grad():
        second = unpack(model(**batch, use_cache=True).logits, batch["position_ids"])[1]
        assert not torch.allclose(second, _single(model, items[3]), atol=1e-3)


def test_packed_loss_is_the_token_mean_of_the_samples(tiny_built, items):
    model, _ = tiny_built
    batch = PackingCollator()(items)
    with torch.no_grad():
        loss = model(**batch).loss
        total, count = 0.0, 0
        for item in items:
            logits = _single(model, item)
            y = item["labels"][1:]
            total += F.cross_entropy(logits[:-1], y, ignore_index=IGNORE_INDEX, reduction="sum")
            count += int((y != IGNORE_INDEX).sum())
    torch.testing.assert_close(loss, total / count, atol=1e-5, rtol=1e-5)


def test_flash_kwargs_describe_the_boundaries(tiny_built, items):
    model, _ = tiny_built
    batch = PackingCollator(return_flash_kwargs=True)(items[:3])
    lens = [len(x["input_ids"]) for x in items[:3]]
    assert batch["cu_seq_lens_q"].tolist() == [0, lens[0], lens[0] + lens[1], sum(lens)]
    assert batch["cu_seq_lens_q"].dtype == torch.int32 and batch["max_length_k"] == max(lens)
    with torch.no_grad():  # non-flash attention ignores them
        got = unpack(model(**batch).logits, batch["position_ids"])[2]
        torch.testing.assert_close(got, _single(model, items[2]), atol=1e-5, rtol=1e-5)


def test_each_packed_sample_starts_unsupervised():
    items = [{"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([5, 6, 7]), "pixel_values": None},
             {"input_ids": torch.tensor([8, 9]), "labels": torch.tensor([8, 9]), "pixel_values": None}]
    batch = PackingCollator()(items)
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]] and "pixel_values" not in batch
    assert items[0]["labels"].tolist() == [5, 6, 7]  # inputs are not modified


@pytest.mark.parametrize("side", ["right", "left"])
def test_pad_collator(side):
    pv = torch.ones(1, 3, 4, 4)
    items = [{"input_ids": torch.tensor([1, 2, 3]), "labels": torch.tensor([-100, 2, 3]), "pixel_values": pv},
             {"input_ids": torch.tensor([4]), "labels": torch.tensor([4]), "pixel_values": None},
             {"input_ids": torch.tensor([5, 6]), "labels": torch.tensor([-100, 6]), "pixel_values": 2 * pv.repeat(2, 1, 1, 1)}]
    b = PadCollator(0, padding_side=side, pad_to_multiple_of=4)(items)
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape == (3, 4)
    if side == "right":
        assert b["input_ids"].tolist() == [[1, 2, 3, 0], [4, 0, 0, 0], [5, 6, 0, 0]]
        assert b["labels"].tolist()[1] == [4, -100, -100, -100]
        assert b["attention_mask"].tolist()[2] == [1, 1, 0, 0]
    else:
        assert b["input_ids"].tolist() == [[0, 1, 2, 3], [0, 0, 0, 4], [0, 0, 5, 6]]
        assert b["attention_mask"].tolist()[1] == [0, 0, 0, 1]
    assert b["pixel_values"].shape == (3, 3, 4, 4) and b["pixel_values"][:, 0, 0, 0].tolist() == [1, 2, 2]
    assert "pixel_values" not in PadCollator(0)(items[1:2])


def test_right_padded_logits_equal_unpadded(tiny_built, items):
    model, processor = tiny_built
    b = PadCollator(processor.tokenizer.pad_token_id)(items)
    with torch.no_grad():
        logits = model(**b).logits
        for i, item in enumerate(items):
            n = len(item["input_ids"])
            torch.testing.assert_close(logits[i, :n], _single(model, item), atol=1e-5, rtol=1e-5)


# --- sampling ---------------------------------------------------------------------------------------
def test_sampler_is_a_deterministic_permutation():
    rng = random.Random(0)
    lengths = [rng.randint(5, 500) for _ in range(203)]
    has_image = [rng.random() < 0.6 for _ in lengths]
    a = LengthGroupedSampler(lengths, 4, has_image=has_image, seed=3, world_size=2)
    b = LengthGroupedSampler(lengths, 4, has_image=has_image, seed=3, world_size=2)
    first = list(a)
    assert sorted(first) == list(range(203)) and len(a) == 203
    assert first == list(b)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b) != first
    assert list(LengthGroupedSampler(lengths, 4, has_image=has_image, seed=4, world_size=2)) != first


def test_sampler_keeps_modalities_apart():
    rng = random.Random(1)
    lengths = [rng.randint(5, 500) for _ in range(250)]
    has_image = [rng.random() < 0.3 for _ in lengths]
    order = list(LengthGroupedSampler(lengths, 3, has_image=has_image, seed=0, world_size=2))
    g = 6
    blocks = [order[i:i + g] for i in range(0, len(order), g)]
    n_img, n_txt = sum(has_image), len(has_image) - sum(has_image)
    full = n_img // g + n_txt // g
    for block in blocks[:full]:
        assert len({has_image[i] for i in block}) == 1  # one modality per global batch
    assert len(blocks) - full <= 2  # only the leftovers (< 2 global batches' worth) come last, mixed
    assert len({has_image[i] for b in blocks[:full] for i in b}) == 2


def test_sampler_groups_by_exact_length():
    lengths = list(range(100))
    random.Random(2).shuffle(lengths)
    order = list(LengthGroupedSampler(lengths, 10, seed=0, megabatch_mult=100))
    blocks = [sorted(lengths[i] for i in order[k:k + 10]) for k in range(0, 100, 10)]
    # One mega-batch covers everything: every batch is 10 neighbouring lengths, longest first inside.
    assert sorted(b[0] for b in blocks) == list(range(0, 100, 10))
    assert all(b == list(range(b[0], b[0] + 10)) for b in blocks)
    assert [b[0] for b in blocks] != sorted(b[0] for b in blocks)  # batches themselves are shuffled


def test_pack_indices():
    rng = random.Random(3)
    lengths = [rng.randint(1, 50) for _ in range(300)]
    order = list(range(300))
    rng.shuffle(order)
    bins = pack_indices(lengths, 64, order)
    assert sorted(i for b in bins for i in b) == list(range(300))
    assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
    pos = {i: k for k, i in enumerate(order)}
    assert all([pos[i] for i in b] == sorted(pos[i] for i in b) for b in bins)
    assert len(bins) < 0.75 * len(lengths)  # actually packs
    with pytest.raises(ValueError, match="sample 1 has 70 tokens > max_tokens 64"):
        pack_indices([3, 70], 64)


def test_packed_batch_sampler_follows_the_epoch():
    lengths = [10, 20, 30, 40, 50, 60] * 5
    s = PackedBatchSampler(LengthGroupedSampler(lengths, 2, seed=0), lengths, 100)
    e0 = list(s)
    assert sorted(i for b in e0 for i in b) == list(range(30)) and len(s) == len(e0)
    s.set_epoch(1)
    assert list(s) != e0
