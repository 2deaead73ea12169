"""Export to llava-hf: transformers' own LlavaForConditionalGeneration/LlavaProcessor must load the folder
with nothing missing or unexpected and give the same token ids, pixels and logits as llavakit."""

from __future__ import annotations

import json
import shutil
import sys
import types

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoProcessor, LlavaForConditionalGeneration

import llavakit
from llavakit.cli import main
from llavakit.demo.tiny import make_tokenizer, tiny_llm_config
from llavakit.interop import export, resolve_model_dir

PROMPT = "USER: first <image> then the second <image> - which one is brighter? ASSISTANT: the"


def _images(seed=0):
    g = torch.Generator().manual_seed(seed)
    # not square, different shapes: exercises resize / crop
    return [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy()) for h, w in ((40, 30), (28, 44))]


@pytest.fixture(scope="module")
def tied_qwen2(tmp_path_factory):
    """A tiny Qwen2 with tied input/output embeddings (like Qwen2.5-0.5B)."""
    out = tmp_path_factory.mktemp("qwen2_tied")
    tok = make_tokenizer(family="qwen2")
    cfg = tiny_llm_config("qwen2", vocab_size=len(tok))
    cfg.tie_word_embeddings = True
    cfg.eos_token_id = tok.eos_token_id
    torch.manual_seed(3)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


# name -> (vision, llm, build options, expected HF strategy, expected num_additional_image_tokens)
CASES = {
    "clip-llama-patch": ("clip", "llama", {}, "default", 1),
    "siglip-qwen2-tied": ("siglip", "qwen2_tied", {"vision_feature_layer": -1}, "full", 0),
    "clip-mistral-2layers-cls_patch": ("clip", "mistral", {"vision_feature_layer": [-3, -1],
                                                           "vision_feature_select": "cls_patch"}, "full", 1),
}


@pytest.fixture(scope="module")
def built(tiny_dirs, tied_qwen2):
    dirs = dict(tiny_dirs, qwen2_tied=tied_qwen2)
    cache = {}

    def get(name):
        if name not in cache:
            vision, llm, opts, *_ = CASES[name]
            torch.manual_seed(1)
            model, processor = llavakit.build(dirs[vision], dirs[llm], projector="mlp2x_gelu", **opts)
            cache[name] = (model.eval(), processor)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def exported(built, tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            out = tmp_path_factory.mktemp(name) / "hf"
            cache[name] = export(built(name), out)
        return cache[name]

    return get


def _safetensors_keys(folder):
    keys = []
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            keys += list(fh.keys())
    return keys


@pytest.mark.parametrize("name", list(CASES))
def test_transformers_loads_export_with_same_inputs_and_logits(built, exported, name):
    model, processor = built(name)
    out = exported(name)
    hf, info = LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    hp = AutoProcessor.from_pretrained(out)
    assert type(hp).__name__ == "LlavaProcessor"

    ours = processor(text=PROMPT, images=_images(), return_tensors="pt")
    theirs = hp(text=PROMPT, images=_images(), return_tensors="pt")
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert int((ours["input_ids"] == model.config.image_token_id).sum()) == 2 * model.config.image_seq_length
    torch.testing.assert_close(theirs["pixel_values"], ours["pixel_values"], atol=0, rtol=0)

    with torch.no_grad():
        ref = model(**ours).logits
        got = hf(input_ids=theirs["input_ids"], attention_mask=theirs["attention_mask"],
                 pixel_values=theirs["pixel_values"]).logits
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", list(CASES))
def test_export_writes_legacy_layout_config_and_processor(built, exported, name):
    model, processor = built(name)
    _, _, _, strategy, additional = CASES[name]
    out = exported(name)
    keys = _safetensors_keys(out)
    tied = model.config.text_config.tie_word_embeddings
    vision = [k for k in keys if k.startswith("vision_tower.")]
    assert vision and all(k.startswith("vision_tower.vision_model.") for k in vision)
    assert sorted(k for k in keys if k.startswith("multi_modal_projector.")) == [
        f"multi_modal_projector.linear_{i}.{p}" for i in (1, 2) for p in ("bias", "weight")]
    lm_keys = [k for k in keys if k.startswith("language_model.")]
    assert all(k.startswith("language_model.model.") or k == "language_model.lm_head.weight" for k in lm_keys)
    assert ("language_model.lm_head.weight" in keys) is (not tied)
    assert len(keys) == len(lm_keys) + len(vision) + 4  # nothing else, no "model." 5.x spelling
    assert len(vision) == len(model.vision_tower.state_dict())

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlavaForConditionalGeneration"] and cfg["model_type"] == "llava"
    assert cfg["image_token_index"] == model.config.image_token_id
    assert cfg["vision_feature_select_strategy"] == strategy
    assert cfg["vision_feature_layer"] == model.config.vision_feature_layer
    assert cfg["projector_hidden_act"] == "gelu"
    assert cfg["image_seq_length"] == model.config.image_seq_length
    assert cfg["text_config"]["model_type"] == model.config.text_config.model_type
    assert cfg["text_config"]["vocab_size"] == model.config.text_config.vocab_size
    assert cfg["text_config"]["num_hidden_layers"] == model.config.text_config.num_hidden_layers
    assert cfg["vision_config"]["model_type"] == model.config.vision_config.model_type
    assert cfg["vision_config"]["image_size"] == model.config.vision_config.image_size

    proc = json.loads((out / "processor_config.json").read_text())
    assert proc["image_token"] == "<image>"
    assert proc["patch_size"] == model.config.vision_config.patch_size
    assert proc["vision_feature_select_strategy"] == strategy
    assert proc["num_additional_image_tokens"] == additional
    assert proc["image_processor"]["image_mean"] == list(processor.image_processor.image_mean)


def test_tower_from_a_legacy_clip_checkpoint_is_not_prefixed_twice(tiny_dirs, tmp_path):
    """Hub CLIP checkpoints (openai/clip-vit-*) still use 4.x names (vision_model.*); transformers records
    that on load, and the export must not add the prefix a second time."""
    clip = tmp_path / "clip_4x"
    shutil.copytree(tiny_dirs["clip"], clip)
    sd = load_file(str(clip / "model.safetensors"))
    save_file({"vision_model." + k: v for k, v in sd.items()}, str(clip / "model.safetensors"),
              metadata={"format": "pt"})
    out = export(llavakit.build(clip, tiny_dirs["llama"]), tmp_path / "hf")
    vision = [k for k in _safetensors_keys(out) if k.startswith("vision_tower.")]
    assert vision and all(k.startswith("vision_tower.vision_model.") for k in vision)
    assert not any(k.startswith("vision_tower.vision_model.vision_model.") for k in vision)
    _, info = LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_tied_llm_exports_without_lm_head_and_hf_reties_it(built, exported):
    out = exported("siglip-qwen2-tied")
    hf = LlavaForConditionalGeneration.from_pretrained(out)
    assert hf.lm_head.weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()
    model, _ = built("siglip-qwen2-tied")
    torch.testing.assert_close(hf.lm_head.weight, model.language_model.lm_head.weight, atol=0, rtol=0)


def test_chat_template_comes_from_the_tokenizer(built, exported):
    _, processor = built("siglip-qwen2-tied")
    assert processor.tokenizer.chat_template  # the tiny qwen2 ships one
    hp = AutoProcessor.from_pretrained(exported("siglip-qwen2-tied"))
    assert hp.chat_template == processor.tokenizer.chat_template


def test_named_llavakit_template_is_rendered_to_jinja(built, tmp_path, monkeypatch):
    """With processor.template set, the Jinja text comes from llavakit.data.templates.jinja_chat_template."""
    model, processor = built("clip-llama-patch")
    fake = types.ModuleType("llavakit.data.templates")
    fake.jinja_chat_template = lambda name, tokenizer=None: "{# llavakit:" + name + " #}{{ messages[0]['content'] }}"
    monkeypatch.setitem(sys.modules, "llavakit.data.templates", fake)
    monkeypatch.setattr(processor, "template", "vicuna_v1")
    hp = AutoProcessor.from_pretrained(export((model, processor), tmp_path / "hf"))
    assert hp.chat_template == "{# llavakit:vicuna_v1 #}{{ messages[0]['content'] }}"


def test_real_llavakit_template_renders_in_transformers(built, tmp_path, monkeypatch):
    templates = pytest.importorskip("llavakit.data.templates")
    model, processor = built("clip-llama-patch")
    monkeypatch.setattr(processor, "template", "vicuna_v1")
    hp = AutoProcessor.from_pretrained(export((model, processor), tmp_path / "hf"))
    assert hp.chat_template == templates.jinja_chat_template("vicuna_v1", tokenizer=processor.tokenizer)
    text = hp.tokenizer.apply_chat_template([{"role": "user", "content": "<image>\nWhat is it?"}], tokenize=False,
                                            add_generation_prompt=True)
    assert "<image>" in text and "What is it?" in text


def test_pad_aspect_exports_as_llava_image_processor_with_same_pixels(tiny_dirs, tmp_path):
    model, processor = llavakit.build(tiny_dirs["clip"], tiny_dirs["llama"], image_aspect="pad")
    hp = AutoProcessor.from_pretrained(export((model, processor), tmp_path / "hf"))
    assert hp.image_processor.do_pad
    ours = processor(text=PROMPT, images=_images(), return_tensors="pt")
    theirs = hp(text=PROMPT, images=_images(), return_tensors="pt")
    torch.testing.assert_close(theirs["pixel_values"], ours["pixel_values"], atol=0, rtol=0)


def test_sharded_and_cast_export_loads(built, tmp_path):
    model, processor = built("clip-llama-patch")
    out = export((model, processor), tmp_path / "hf", max_shard_size="40KB", dtype="bfloat16")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    assert all((out / s).is_file() for s in shards)
    with safe_open(str(out / shards[0]), framework="pt") as fh:
        assert fh.get_slice(next(iter(fh.keys()))).get_dtype() == "BF16"
    hf, info = LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert hf.dtype == torch.bfloat16
    torch.testing.assert_close(hf.model.multi_modal_projector.linear_1.weight,
                               model.multi_modal_projector.linear_1.weight.to(torch.bfloat16), atol=0, rtol=0)


@pytest.mark.parametrize("projector", ["linear", "avgpool2x2_mlp2x_gelu"])
def test_projector_hf_llava_cannot_hold_is_refused_by_name(tiny_dirs, tmp_path, projector):
    pair = llavakit.build(tiny_dirs["clip"], tiny_dirs["llama"], projector=projector)
    with pytest.raises(ValueError, match=rf"{projector}.*Exportable projectors: mlp2x_gelu"):
        export(pair, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()  # refused before anything was written


def test_cli_exports_a_run_dir_through_its_model_subfolder(built, tmp_path, capsys):
    model, processor = built("clip-llama-patch")
    run = tmp_path / "run"
    model.save_pretrained(run / "model")
    processor.save_pretrained(run / "model")
    assert resolve_model_dir(run) == run / "model"
    assert main(["export", str(run), str(tmp_path / "hf"), "--format", "hf-llava"]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "llava"
    # a second export into the same, now non-empty, folder is refused unless --overwrite
    assert main(["export", str(run / "model"), str(tmp_path / "hf")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["export", str(run / "model"), str(tmp_path / "hf"), "--overwrite"]) == 0


def test_cli_names_what_it_looked_for(tmp_path, capsys):
    assert main(["export", str(tmp_path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "config.json") in err and str(tmp_path / "model" / "config.json") in err
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")  # a LoRA run
    assert main(["export", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "merge-lora" in capsys.readouterr().err
