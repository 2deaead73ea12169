"""Packed attention without a dense mask (`model/packed_attention.py`): the same logits, loss and gradients
as the padded batch and as transformers' dense block-diagonal path, and no [ΣL, ΣL] tensor on the way."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torch.overrides import TorchFunctionMode

import llavakit
from llavakit.data.collate import PackingCollator, PadCollator, unpack
from llavakit.data.conversation import Conversation, Turn
from llavakit.data.dataset import SupervisedDataset
from llavakit.data.tokenize import IGNORE_INDEX
from llavakit.demo.tiny import save_tiny_llm, save_tiny_vision
from llavakit.model.packed_attention import (PACKED_SDPA, equal_runs, sample_spans, supports_packed_attention,
                                             use_packed_attention)

ATOL = 1e-5


def _img(seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(24, 36, 3, generator=g) * 255).to(torch.uint8).numpy())


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def built(request, tmp_path_factory):
    """(family, model, processor, items): tiny CLIP + a tiny LLM in fp32 training mode, and four samples
    (one image, two images, text only, one image). Llama with one kv head per head (MHA), Qwen2 with
    grouped-query attention (4 heads, 2 kv heads) and biases on q/k/v."""
    root = tmp_path_factory.mktemp(f"packed_{request.param}")
    kv = 4 if request.param == "llama" else 2
    clip = save_tiny_vision(root / "clip", "clip")
    lm = save_tiny_llm(root / request.param, request.param, num_heads=4, num_kv_heads=kv)
    torch.manual_seed(0)
    model, processor = llavakit.build(clip, lm, projector="mlp2x_gelu", attn_implementation="sdpa")
    model.train()
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
    items = [ds[i] for i in range(len(ds))]
    assert len({len(x["input_ids"]) for x in items}) == 4  # different lengths
    return request.param, model, processor, items


def _attn(model, name):
    """Set the LLM's attention implementation (the vision tower keeps sdpa)."""
    model.language_model.set_attn_implementation(name)
    assert model.language_model.config._attn_implementation == name


def _run(model, batch, **kw):
    """Loss, logits (or None) and the gradient of every weight that got one, for one forward + backward."""
    model.zero_grad(set_to_none=True)
    out = model(**batch, **kw)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads  # (a text-only batch leaves the projector without a gradient)
    return out.loss.detach(), (None if out.logits is None else out.logits.detach()), grads


def _assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], atol=ATOL, rtol=ATOL)
    assert a[2].keys() == b[2].keys()
    for name in a[2]:
        torch.testing.assert_close(a[2][name], b[2][name], atol=ATOL, rtol=ATOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("supervised_only", [False, True])
def test_packed_equals_padded_and_dense_packed(built, supervised_only):
    """Logits, loss and every gradient: new packed path == padded batch == transformers' dense-mask packed path."""
    _, model, processor, items = built
    packed = PackingCollator()(items)
    padded = PadCollator(processor.tokenizer.pad_token_id)(items)
    for i, item in enumerate(items):  # the packing collator never supervises a sample's first token: same here
        assert padded["labels"][i, 0] == IGNORE_INDEX and item["labels"][0] == IGNORE_INDEX
    kw = {"supervised_logits_only": supervised_only}
    try:
        _attn(model, "sdpa")
        ref_padded = _run(model, padded, **kw)
        ref_dense = _run(model, packed, **kw)
        assert use_packed_attention(model) and model.language_model.config._attn_implementation == PACKED_SDPA
        assert model.vision_tower.config._attn_implementation == "sdpa"
        got = _run(model, packed, **kw)
        got_flash_kwargs = _run(model, PackingCollator(return_flash_kwargs=True)(items), **kw)  # cu_seq_lens route
    finally:
        _attn(model, "sdpa")
    _assert_same(got, ref_padded)
    _assert_same(got, ref_dense)
    _assert_same(got_flash_kwargs, ref_dense)
    if not supervised_only:
        lens = [len(x["input_ids"]) for x in items]
        for i, (mine, dense) in enumerate(zip(unpack(got[1], packed["position_ids"]),
                                              unpack(ref_dense[1], packed["position_ids"]))):
            torch.testing.assert_close(mine, ref_padded[1][i, :lens[i]], atol=ATOL, rtol=ATOL)
            torch.testing.assert_close(mine, dense, atol=ATOL, rtol=ATOL)


def test_single_sample_and_length_one_samples(built):
    """A batch of one sample, text samples of length 1 between longer ones (no image), and runs of samples of
    equal length (one batched sdpa call each) beside single ones."""
    _, model, _, items = built
    g = torch.Generator().manual_seed(0)
    short = [{"input_ids": torch.randint(5, 300, (n,), generator=g), "pixel_values": None} for n in (1, 7, 1, 1, 5)]
    for s in short:
        s["labels"] = s["input_ids"].clone()
    batches = [PackingCollator()(items[1:2]), PackingCollator()(short), PackingCollator()(short[:1] + items[:1]),
               PackingCollator()([items[0], items[0], items[3], items[1], items[1], items[1], short[2]])]
    try:
        for batch in batches:
            _attn(model, "sdpa")
            dense = _run(model, batch)
            assert use_packed_attention(model)
            got = _run(model, batch)
            _assert_same(got, dense)
            torch.testing.assert_close(got[1], dense[1], atol=ATOL, rtol=ATOL)
    finally:
        _attn(model, "sdpa")


def test_padded_batches_and_generation_are_unchanged(built):
    """With a padding mask or a KV cache the new implementation is transformers' sdpa: same logits, same tokens."""
    _, model, processor, items = built
    padded = PadCollator(processor.tokenizer.pad_token_id, padding_side="left")(items)
    prompt = {k: v for k, v in PadCollator(processor.tokenizer.pad_token_id)(items[:1]).items() if k != "labels"}
    model.eval()
    try:
        outs = []
        for name in ("sdpa", PACKED_SDPA):
            _attn(model, name)
            with torch.no_grad():
                logits = model(**padded).logits
                tokens = model.generate(**prompt, max_new_tokens=6, do_sample=False)
            outs.append((logits, tokens))
    finally:
        _attn(model, "sdpa")
        model.train()
    keep = padded["attention_mask"].bool()
    torch.testing.assert_close(outs[1][0][keep], outs[0][0][keep], atol=ATOL, rtol=ATOL)
    assert outs[1][1].tolist() == outs[0][1].tolist()


class _SquareSpy(TorchFunctionMode):
    """Records every tensor going into or out of a torch call whose last two dims are [n, n]."""

    def __init__(self, n: int):
        super().__init__()
        self.n, self.seen = n, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in [*args, *(kwargs or {}).values(), *(out if isinstance(out, (tuple, list)) else [out])]:
            if torch.is_tensor(t) and t.dim() >= 2 and tuple(t.shape[-2:]) == (self.n, self.n):
                self.seen.append((getattr(func, "__name__", str(func)), tuple(t.shape)))
        return out


def test_no_dense_mask_at_4096_tokens(built):
    """Four samples of 1024 tokens: the dense path builds a [1, 1, 4096, 4096] mask (the spy sees it);
    the new path never creates, nor hands to sdpa, any tensor ending in [4096, 4096]."""
    _, model, _, _ = built
    n, lens = 4096, [1024] * 4
    g = torch.Generator().manual_seed(0)
    feats = [{"input_ids": torch.randint(5, 300, (k,), generator=g), "labels": torch.randint(5, 300, (k,), generator=g),
              "pixel_values": None} for k in lens]
    batch = PackingCollator()(feats)
    try:
        _attn(model, "sdpa")
        with torch.no_grad(), _SquareSpy(n) as dense:
            model(**batch, supervised_logits_only=True)
        assert dense.seen, "the spy should see transformers' dense block-diagonal mask"
        use_packed_attention(model)
        with torch.no_grad(), _SquareSpy(n) as mine:
            model(**batch, supervised_logits_only=True)
    finally:
        _attn(model, "sdpa")
    assert mine.seen == []


def test_sample_spans():
    pos = torch.tensor([[0, 1, 2, 0, 0, 1]])
    assert sample_spans(pos, 6) == [[(0, 3), (3, 4), (4, 6)]]
    assert sample_spans(pos, 6, torch.tensor([0, 3, 4, 6], dtype=torch.int32)) == [[(0, 3), (3, 4), (4, 6)]]
    assert sample_spans(torch.arange(6)[None], 6) is None  # one sample: plain causal sdpa
    assert sample_spans(torch.tensor([[5, 6, 7, 2, 3]]), 5) == [[(0, 3), (3, 5)]]  # transformers' rule: +1 steps
    rows = torch.tensor([[0, 1, 2, 3], [0, 1, 0, 1]])
    assert sample_spans(rows, 4, batch_size=2) == [[(0, 4)], [(0, 2), (2, 4)]]
    assert equal_runs([(0, 3), (3, 6), (6, 7), (7, 8), (8, 10)]) == [(0, 2, 3), (6, 2, 1), (8, 1, 2)]
    with pytest.raises(ValueError, match="does not cover"):
        sample_spans(pos, 6, torch.tensor([0, 3, 5]))


def test_who_is_switched(tiny_dirs, built):
    """sdpa/eager LLMs switch; flash/flex keep theirs; a sliding-window LLM (Mistral) is refused."""
    _, model, _, _ = built
    try:
        _attn(model, "eager")
        assert use_packed_attention(model)
        model.language_model.config._attn_implementation = "flex_attention"
        assert not use_packed_attention(model)
        assert model.language_model.config._attn_implementation == "flex_attention"
    finally:
        _attn(model, "sdpa")
    from transformers import AutoConfig

    mistral = AutoConfig.from_pretrained(tiny_dirs["mistral"])
    assert "sliding window" in supports_packed_attention(mistral)
    assert supports_packed_attention(AutoConfig.from_pretrained(tiny_dirs["qwen2"])) is None


def test_trainer_uses_it_when_packing(tiny_dirs, tmp_path, capsys):
    """`data.packing: true` with the default sdpa: the trainer switches the LLM and trains."""
    import json

    from llavakit.train import load_config
    from llavakit.train.loop import read_losses, train

    rows = [{"id": f"t{i}", "conversations": [{"from": "human", "value": f"Say {w}."}, {"from": "gpt", "value": w}]}
            for i, w in enumerate(["red", "green", "blue", "yellow"] * 2)]
    (tmp_path / "train.json").write_text(json.dumps(rows))
    cfg = load_config(base={
        "model": {"vision": str(tiny_dirs["clip"]), "llm": str(tiny_dirs["llama"])},
        "data": {"train": str(tmp_path / "train.json"), "template": "vicuna_v1", "packing": True},
        "train": {"stage": "finetune", "output_dir": str(tmp_path / "run"), "max_steps": 2, "batch_size": 4,
                  "report_to": "none", "save_every": 0}})
    run = train(cfg)
    assert f"({PACKED_SDPA} attention)" in capsys.readouterr().out
    losses = read_losses(run / "losses.jsonl")
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in losses)
