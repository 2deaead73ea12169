"""Import: start from a llava-hf checkpoint or an original-LLaVA one (full checkpoint, or a pretrain run's
mm_projector.bin + the base LLM). The tests write those folders themselves, in those layouts, from
tiny components, and check the imported model against the source weights and logits."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (AutoModelForCausalLM, AutoProcessor, AutoTokenizer, CLIPVisionModel, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaProcessor)

import llavakit
from llavakit.demo.tiny import make_tokenizer, tiny_image_processor, tiny_llm_config, tiny_vision_config
from llavakit.interop import checkpoint_format, export, import_hf_llava, import_original_llava, open_checkpoint

PROMPT = "USER: first <image> then the second <image> - which one is brighter? ASSISTANT: the"


def _images(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy()) for h, w in ((40, 30), (28, 44))]


def _trains(model, processor):
    """One supervised step works: finite loss, gradients reach projector and LLM, the tower stays frozen."""
    inputs = processor(text=PROMPT, images=_images(), return_tensors="pt")
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == processor.image_token_id, -100)
    model.train()
    out = model(**inputs, labels=labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.multi_modal_projector.linear_1.weight.grad is not None
    assert model.language_model.get_input_embeddings().weight.grad is not None
    assert all(p.grad is None for p in model.vision_tower.parameters())
    model.zero_grad(set_to_none=True)
    model.eval()


# --- llava-hf ------------------------------------------------------------------------------------------
def _write_hf_llava(out, vision_kind, strategy, layer, legacy_layout, do_pad=False):
    """An llava-hf folder made with transformers' own classes (random weights), not with llavakit."""
    tok = make_tokenizer(family="llama")
    tok.add_special_tokens({"additional_special_tokens": ["<image>"], "pad_token": "<pad>"})
    image_processor = tiny_image_processor(vision_kind)
    if do_pad:
        from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

        image_processor = LlavaImageProcessorPil(do_pad=True, size={"shortest_edge": 32},
                                                 crop_size={"height": 32, "width": 32})
    vcfg = tiny_vision_config(vision_kind)
    cfg = LlavaConfig(vision_config=vcfg.to_dict(), text_config=tiny_llm_config("llama", len(tok)).to_dict(),
                      image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=layer,
                      vision_feature_select_strategy=strategy, image_seq_length=16)
    torch.manual_seed(7)
    hf = LlavaForConditionalGeneration(cfg).eval()
    hf.save_pretrained(out)
    LlavaProcessor(image_processor, tok, patch_size=vcfg.patch_size, vision_feature_select_strategy=strategy,
                   num_additional_image_tokens=1 if vision_kind == "clip" else 0,
                   chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}").save_pretrained(out)
    if legacy_layout:  # rewrite as transformers 4.x wrote it: vision_tower.vision_model.*
        sd = load_file(str(out / "model.safetensors"))
        sd = {("vision_tower.vision_model." + k[len("vision_tower."):] if k.startswith("vision_tower.") else k): v
              for k, v in sd.items()}
        save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    return hf


HF_CASES = {
    "clip-default-5x": ("clip", "default", -2, False),
    "clip-default-legacy": ("clip", "default", -2, True),
    "clip-full-legacy": ("clip", "full", -1, True),
    "siglip-full-2layers": ("siglip", "full", [-3, -1], False),
}


@pytest.mark.parametrize("name", list(HF_CASES))
def test_import_hf_llava_matches_transformers_and_trains(tmp_path, name):
    vision_kind, strategy, layer, legacy = HF_CASES[name]
    hf = _write_hf_llava(tmp_path / "ckpt", vision_kind, strategy, layer, legacy)
    assert checkpoint_format(tmp_path / "ckpt") == "hf-llava"
    model, processor = open_checkpoint(tmp_path / "ckpt")
    assert isinstance(model, llavakit.LlavakitForConditionalGeneration)
    assert model.config.vision_feature_select == ("patch" if vision_kind == "siglip" or strategy == "default"
                                                  else "cls_patch")
    hp = AutoProcessor.from_pretrained(tmp_path / "ckpt")
    ours = processor(text=PROMPT, images=_images(), return_tensors="pt")
    theirs = hp(text=PROMPT, images=_images(), return_tensors="pt")
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    torch.testing.assert_close(ours["pixel_values"], theirs["pixel_values"], atol=0, rtol=0)
    with torch.no_grad():
        got = model(**ours).logits
        ref = hf(**theirs).logits
    assert (got - ref).abs().max().item() <= 1e-5
    assert processor.chat_template == hp.chat_template

    # it is an ordinary llavakit model now: save, reopen, same logits; and it trains
    model.save_pretrained(tmp_path / "lk")
    processor.save_pretrained(tmp_path / "lk")
    again, _ = llavakit.load(tmp_path / "lk")
    with torch.no_grad():
        torch.testing.assert_close(again(**ours).logits, got, atol=1e-6, rtol=0)
    # and exporting it again gives transformers the same model back
    back, info = LlavaForConditionalGeneration.from_pretrained(export((model, processor), tmp_path / "back"),
                                                               output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        assert (back(**theirs).logits - ref).abs().max().item() <= 1e-5
    _trains(model, processor)


def test_import_hf_llava_pad_image_processor_becomes_pad_aspect(tmp_path):
    _write_hf_llava(tmp_path / "ckpt", "clip", "default", -2, False, do_pad=True)
    _, processor = import_hf_llava(tmp_path / "ckpt")
    assert processor.image_aspect == "pad"
    square = processor(text="<image>", images=[Image.new("RGB", (30, 30), (200, 10, 10))], return_tensors="pt")
    assert square["pixel_values"].shape == (1, 3, 32, 32)


def test_import_hf_llava_refuses_incomplete_checkpoint(tmp_path):
    _write_hf_llava(tmp_path / "ckpt", "clip", "default", -2, False)
    sd = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    sd = {k: v for k, v in sd.items() if not k.startswith("multi_modal_projector.linear_2")}
    save_file(sd, str(tmp_path / "ckpt" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="linear_2"):
        import_hf_llava(tmp_path / "ckpt")


# --- original LLaVA ------------------------------------------------------------------------------------
LLAVA_EXTRAS = {
    "mm_vision_select_layer": -2,
    "mm_vision_select_feature": "patch",
    "mm_hidden_size": 32,
    "mm_use_im_start_end": False,
    "mm_use_im_patch_token": False,
    "tune_mm_mlp_adapter": False,
    "use_mm_proj": True,
    "tokenizer_model_max_length": 2048,
    "tokenizer_padding_side": "right",
}


def _llava_config(llm_dir, clip_dir, projector, aspect="pad"):
    cfg = json.loads((llm_dir / "config.json").read_text())
    cfg.update(LLAVA_EXTRAS, architectures=["LlavaLlamaForCausalLM"], model_type="llava_llama",
               mm_vision_tower=str(clip_dir), mm_projector_type=projector, image_aspect_ratio=aspect,
               _name_or_path=str(llm_dir))
    return cfg


def _llava_projector(projector, seed=5):
    torch.manual_seed(seed)
    if projector == "linear":  # LLaVA's "linear" is a bare nn.Linear
        return nn.Linear(32, 64)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64))


def _prefixed(module, prefix):
    return {prefix + k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def original_full(tiny_dirs, tmp_path_factory):
    """A finetuned LlavaLlamaForCausalLM checkpoint: sharded pytorch_model-*.bin + index, a tuned tower."""
    out = tmp_path_factory.mktemp("llava_full")
    llm = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"])
    tower = CLIPVisionModel.from_pretrained(tiny_dirs["clip"])
    with torch.no_grad():  # "tuned": differs from the tower mm_vision_tower points at
        for p in tower.parameters():
            p.add_(0.01 * torch.randn_like(p))
    proj = _llava_projector("mlp2x_gelu")
    llm_sd = _prefixed(llm, "")
    extra = {**_prefixed(proj, "model.mm_projector."),
             **_prefixed(tower, "model.vision_tower.vision_tower.vision_model.")}
    shards = {"pytorch_model-00001-of-00002.bin": llm_sd, "pytorch_model-00002-of-00002.bin": extra}
    for fname, sd in shards.items():
        torch.save(sd, out / fname)
    index = {"metadata": {}, "weight_map": {k: f for f, sd in shards.items() for k in sd}}
    (out / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    (out / "config.json").write_text(json.dumps(_llava_config(tiny_dirs["llama"], tiny_dirs["clip"], "mlp2x_gelu")))
    AutoTokenizer.from_pretrained(tiny_dirs["llama"]).save_pretrained(out)
    return out, llm, tower, proj


def _llava_reference_logits(input_ids, image_token_id, pixel_values, llm, tower, proj, layer=-2):
    """LLaVA's own maths, written out: CLIP layer `layer` without CLS -> projector, placed where each
    <image> stands; the LLM runs on the embeddings."""
    with torch.no_grad():
        feats = proj(tower(pixel_values, output_hidden_states=True).hidden_states[layer][:, 1:])  # [N, 16, D]
        ids = input_ids[0]
        is_img = ids == image_token_id
        emb = llm.get_input_embeddings()(ids.masked_fill(is_img, 0)).clone()  # [L, D]
        emb[is_img] = feats.reshape(-1, feats.shape[-1])
        return llm(inputs_embeds=emb[None]).logits


def test_import_original_llava_checkpoint_matches_llava_maths(original_full, tiny_dirs):
    path, llm, tower, proj = original_full
    assert checkpoint_format(path) == "original-llava"
    model, processor = open_checkpoint(path)
    assert model.config.projector == "mlp2x_gelu" and processor.image_aspect == "pad"
    assert model.config.vision_feature_layer == -2 and model.config.vision_feature_select == "patch"
    # the weights are the checkpoint's: LLM rows, projector (Sequential 0/2 -> linear_1/2), tuned tower
    vocab = llm.config.vocab_size
    torch.testing.assert_close(model.get_input_embeddings().weight[:vocab], llm.get_input_embeddings().weight)
    torch.testing.assert_close(model.language_model.lm_head.weight[:vocab], llm.lm_head.weight)
    torch.testing.assert_close(model.multi_modal_projector.linear_1.weight, proj[0].weight)
    torch.testing.assert_close(model.multi_modal_projector.linear_2.bias, proj[2].bias)
    for (k, a), b in zip(model.vision_tower.state_dict().items(), tower.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)
    # <image> was added (original LLaVA used id -200 in code) with the mean of the old rows
    img = processor.image_token_id
    assert img >= vocab
    torch.testing.assert_close(model.get_input_embeddings().weight[img], llm.get_input_embeddings().weight.mean(0))

    inputs = processor(text=PROMPT, images=_images(), return_tensors="pt")
    ref = _llava_reference_logits(inputs["input_ids"], img, inputs["pixel_values"], llm, tower, proj)
    with torch.no_grad():
        got = model(**inputs).logits[..., :vocab]
    assert (got - ref).abs().max().item() <= 1e-5
    _trains(model, processor)


@pytest.mark.parametrize("projector", ["mlp2x_gelu", "linear"])
def test_import_pretrain_run_projector_bin_with_base_llm(tiny_dirs, tmp_path, projector):
    run = tmp_path / "pretrain"
    run.mkdir()
    # what LLaVA's pretraining writes: config.save_pretrained keeps the base LLM's architectures
    cfg = _llava_config(tiny_dirs["llama"], tiny_dirs["clip"], projector, aspect="square")
    (run / "config.json").write_text(json.dumps({**cfg, "architectures": ["LlamaForCausalLM"]}))
    assert checkpoint_format(run) == "original-llava"
    proj = _llava_projector(projector, seed=11)
    torch.save(_prefixed(proj, "model.mm_projector."), run / "mm_projector.bin")

    with pytest.raises(FileNotFoundError, match="llm="):
        import_original_llava(run)
    model, processor = import_original_llava(run, llm=tiny_dirs["llama"])
    assert processor.image_aspect == "resize" and model.config.projector == projector
    first = proj if projector == "linear" else proj[0]
    torch.testing.assert_close(model.multi_modal_projector.linear_1.weight, first.weight)
    base = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"])
    vocab = base.config.vocab_size
    torch.testing.assert_close(model.language_model.model.layers[1].mlp.up_proj.weight,
                               base.model.layers[1].mlp.up_proj.weight)
    torch.testing.assert_close(model.language_model.lm_head.weight[:vocab], base.lm_head.weight)
    clip = CLIPVisionModel.from_pretrained(tiny_dirs["clip"])
    torch.testing.assert_close(model.vision_tower.embeddings.patch_embedding.weight,
                               clip.embeddings.patch_embedding.weight)
    if projector == "mlp2x_gelu":
        _trains(model, processor)


def test_projector_bin_overrides_the_checkpoints_own(original_full, tmp_path):
    path = original_full[0]
    other = _llava_projector("mlp2x_gelu", seed=99)
    torch.save(_prefixed(other, "model.mm_projector."), tmp_path / "mm_projector.bin")
    model, _ = import_original_llava(path, projector_bin=tmp_path / "mm_projector.bin")
    torch.testing.assert_close(model.multi_modal_projector.linear_2.weight, other[2].weight)


class NotATensor:  # pickled by reference; weights_only=True must refuse to rebuild it
    pass


def test_bin_files_are_read_with_weights_only(tiny_dirs, tmp_path):
    run = tmp_path / "pretrain"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(_llava_config(tiny_dirs["llama"], tiny_dirs["clip"], "mlp2x_gelu")))
    sd = _prefixed(_llava_projector("mlp2x_gelu"), "model.mm_projector.")
    torch.save({**sd, "payload": NotATensor()}, run / "mm_projector.bin")
    with pytest.raises(ValueError, match="weights_only=True"):
        import_original_llava(run, llm=tiny_dirs["llama"])


def test_original_llava_errors_name_the_file(tiny_dirs, tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "config.json")):
        import_original_llava(tmp_path)
    cfg = _llava_config(tiny_dirs["llama"], tiny_dirs["clip"], "mlp2x_gelu")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FileNotFoundError, match="mm_projector.bin"):  # no projector anywhere
        import_original_llava(tmp_path, llm=tiny_dirs["llama"])
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "mm_projector_type": "resampler"}))
    with pytest.raises(ValueError, match="mm_projector_type='resampler'.*mlp2x_gelu"):
        import_original_llava(tmp_path, llm=tiny_dirs["llama"])
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "architectures": ["LlavaMptForCausalLM"]}))
    with pytest.raises(ValueError, match="LlavaLlamaForCausalLM"):
        open_checkpoint(tmp_path)


def test_open_checkpoint_opens_llavakit_folders(tiny_built, tmp_path):
    model, processor = tiny_built
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert checkpoint_format(tmp_path) == "llavakit"
    again, _ = open_checkpoint(tmp_path)
    torch.testing.assert_close(again.multi_modal_projector.linear_1.weight, model.multi_modal_projector.linear_1.weight)


def test_load_passes_dtype_device_map_and_attention_to_every_format(tiny_built, original_full, tmp_path):
    """`llavakit.load` is one entry point: every format gets the caller's dtype, device_map and attention."""
    import llavakit

    model, processor = tiny_built
    model.save_pretrained(tmp_path / "own")
    processor.save_pretrained(tmp_path / "own")
    _write_hf_llava(tmp_path / "hf", "clip", "default", -2, False)
    for path in (tmp_path / "own", tmp_path / "hf", original_full[0]):
        loaded, _ = llavakit.load(path, dtype="bfloat16", device_map="cpu", attn_implementation="eager")
        assert loaded.language_model.dtype == torch.bfloat16, path
        assert loaded.language_model.config._attn_implementation == "eager", path
        assert {p.device.type for p in loaded.parameters()} == {"cpu"}, path
        loaded, _ = llavakit.load(path, attn_implementation="sdpa")
        assert loaded.language_model.config._attn_implementation == "sdpa", path
