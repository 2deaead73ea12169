"""Export to llava-hf: transformers' own LlavaForConditionalGeneration/LlavaProcessor must load the folder
with nothing missing or unexpected and give the same token ids, pixels and logits as llavakit."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import (AutoModelForCausalLM, AutoProcessor, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                          MistralConfig, Qwen2Config)

import llavakit
from llavakit.cli import main
from llavakit.demo.tiny import make_tokenizer, save_tiny_llm, tiny_llm_config
from llavakit.data.conversation import Turn
from llavakit.data.templates import TEMPLATES, get_template, jinja_chat_template
from llavakit.interop import export, resolve_model_dir
from llavakit.interop.hf_legacy import legacy_config_dict, legacy_rope_fields, legacy_tokenizer_config

PROMPT = "USER: first <image> then the second <image> - which one is brighter? ASSISTANT: the"


def _images(seed=0):
    g = torch.Generator().manual_seed(seed)
    # not square, different shapes: exercises resize / crop
    return [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy()) for h, w in ((40, 30), (28, 44))]


@pytest.fixture(scope="module")
def tied_qwen2(tmp_path_factory):
    """A tiny Qwen2 with tied input/output embeddings (like Qwen2.5-0.5B) and its RoPE base 1e6."""
    out = tmp_path_factory.mktemp("qwen2_tied")
    tok = make_tokenizer(family="qwen2")
    cfg = tiny_llm_config("qwen2", vocab_size=len(tok), rope_theta=1e6)
    cfg.tie_word_embeddings = True
    cfg.eos_token_id = tok.eos_token_id
    torch.manual_seed(3)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def rope_llms(tmp_path_factory):
    """LLMs whose RoPE is not transformers' default (base 10000), as real ones: a reader that misses the
    RoPE fields then loads every weight and still computes other logits. Llama-3's base 500000; Mistral with
    base 1e6 and linear position scaling."""
    root = tmp_path_factory.mktemp("rope_llms")
    return {"llama": save_tiny_llm(root / "llama", "llama", rope_theta=500000.0),
            "mistral": save_tiny_llm(root / "mistral", "mistral",
                                     rope_parameters={"rope_type": "linear", "rope_theta": 1e6, "factor": 2.0})}


# name -> (vision, llm, build options, expected HF strategy, expected num_additional_image_tokens)
CASES = {
    "clip-llama-patch": ("clip", "llama", {}, "default", 1),
    "siglip-qwen2-tied": ("siglip", "qwen2_tied", {"vision_feature_layer": -1}, "full", 0),
    "clip-mistral-2layers-cls_patch": ("clip", "mistral", {"vision_feature_layer": [-3, -1],
                                                           "vision_feature_select": "cls_patch"}, "full", 1),
}


@pytest.fixture(scope="module")
def built(tiny_dirs, tied_qwen2, rope_llms):
    dirs = dict(tiny_dirs, qwen2_tied=tied_qwen2, **rope_llms)
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
    # the image processor on its own, where every transformers version reads it (4.x before 4.56 fails on a
    # nested copy in processor_config.json: "got multiple values for argument 'image_processor'")
    assert "image_processor" not in proc
    image_proc = json.loads((out / "preprocessor_config.json").read_text())
    assert image_proc["image_mean"] == list(processor.image_processor.image_mean)
    assert image_proc["processor_class"] == "LlavaProcessor"


@pytest.mark.parametrize("name", list(CASES))
def test_export_config_has_the_rope_and_dtype_fields_transformers_4_reads(built, exported, name):
    """transformers 4.x reads only rope_theta/rope_scaling; without them it silently uses base 10000."""
    model, _ = built(name)
    rope = model.config.text_config.rope_parameters
    assert rope["rope_theta"] != 10000  # the fixtures are chosen so that a missing field would matter
    out = exported(name)
    cfg = json.loads((out / "config.json").read_text())
    text = cfg["text_config"]
    assert text["rope_theta"] == rope["rope_theta"]
    if rope["rope_type"] == "default":
        assert text["rope_scaling"] is None
    else:
        assert text["rope_scaling"] == {"type": rope["rope_type"], "factor": rope["factor"]}
    assert text["rope_parameters"] == rope  # 5.x's own field stays
    assert cfg["torch_dtype"] == cfg["dtype"] == "float32"
    assert text["torch_dtype"] == cfg["vision_config"]["torch_dtype"] == "float32"
    assert cfg["tie_word_embeddings"] is text["tie_word_embeddings"] is model.config.text_config.tie_word_embeddings
    # and transformers 5 reads back the RoPE it wrote (plus, for linear/dynamic, the legacy "type" key that
    # 4.37 requires and 5.x accepts as a synonym of rope_type)
    read = dict(LlavaConfig.from_pretrained(out).text_config.rope_parameters)
    assert read.pop("type", rope["rope_type"]) == rope["rope_type"] and read == rope


@pytest.mark.parametrize("name", list(CASES))
def test_export_tokenizer_config_is_readable_by_transformers_4(built, exported, name):
    _, processor = built(name)
    out = exported(name)
    tok = json.loads((out / "tokenizer_config.json").read_text())
    # 4.x fails on a list under extra_special_tokens ('list' object has no attribute 'keys')
    assert not isinstance(tok.get("extra_special_tokens"), list)
    assert "<image>" in tok["additional_special_tokens"]
    assert tok["tokenizer_class"] != "TokenizersBackend"  # a 5.x-only name
    hp = AutoProcessor.from_pretrained(out)
    assert "<image>" in hp.tokenizer.extra_special_tokens  # 5.x turns the 4.x field back into its own
    assert hp.tokenizer(PROMPT)["input_ids"] == processor.tokenizer(PROMPT)["input_ids"]
    template = (out / "chat_template.jinja").read_text() if (out / "chat_template.jinja").exists() else None
    assert tok.get("chat_template") == template
    if template is not None:
        assert json.loads((out / "chat_template.json").read_text()) == {"chat_template": template}


ROPES = {
    "default": {"rope_type": "default", "rope_theta": 1e6},
    "linear": {"rope_type": "linear", "rope_theta": 5e5, "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 5e5, "factor": 4.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 1024},
    "yarn": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 1024},
}


@pytest.mark.parametrize("config_class", [LlamaConfig, MistralConfig, Qwen2Config])
@pytest.mark.parametrize("rope", list(ROPES))
def test_legacy_rope_fields_read_back_unchanged_in_transformers_5(config_class, rope):
    """5.x reads a non-null rope_scaling *instead of* rope_parameters: the 4.x fields must say the same."""
    cfg = config_class(rope_parameters=dict(ROPES[rope]), max_position_embeddings=2048)
    d = legacy_config_dict(cfg.to_dict())
    assert d["rope_theta"] == ROPES[rope]["rope_theta"]
    expected_scaling = {"default": None, "linear": {"type": "linear", "factor": 2.0},
                        "dynamic": {"type": "dynamic", "factor": 4.0}}
    if rope in expected_scaling:
        assert d["rope_scaling"] == expected_scaling[rope]
    else:  # as 4.43+ wrote them
        assert d["rope_scaling"] == {k: v for k, v in cfg.rope_parameters.items() if k != "rope_theta"}
    read = dict(config_class(**d).rope_parameters)
    assert read.pop("type", cfg.rope_parameters["rope_type"]) == cfg.rope_parameters["rope_type"]
    assert read == cfg.rope_parameters


def test_legacy_rope_fields_edge_cases():
    assert legacy_rope_fields({"model_type": "clip_vision_model"}) == {}  # no RoPE, nothing added
    assert legacy_rope_fields({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                                   "partial_rotary_factor": 0.5}}) == {
        "rope_theta": 1e4, "rope_scaling": None, "partial_rotary_factor": 0.5}
    per_layer = {"full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0},
                 "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    assert legacy_rope_fields({"rope_parameters": per_layer}) == {
        "rope_theta": 1e6, "rope_scaling": {"type": "linear", "factor": 8.0}}
    # fields already written the 4.x way are left alone
    assert legacy_config_dict({"rope_theta": 3.0, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}
                              )["rope_theta"] == 3.0


def test_legacy_tokenizer_config_fields():
    cfg = {"extra_special_tokens": ["<image>", "<pad>"], "tokenizer_class": "TokenizersBackend"}
    assert legacy_tokenizer_config(cfg, chat_template="{{ x }}") == {
        "additional_special_tokens": ["<image>", "<pad>"], "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": "{{ x }}"}
    named = {"extra_special_tokens": {"image_token": "<image>"}, "tokenizer_class": "Qwen2Tokenizer"}
    assert legacy_tokenizer_config(named) == named  # the dict form is what 4.x expects there


def test_llama_tokenizer_without_bos_keeps_its_behaviour_in_4x_fields(tmp_path):
    """4.x's LlamaTokenizerFast rebuilds the post-processor from add_bos_token (default True), which 5.x
    does not save; a tokenizer that adds no bos must say so."""
    from sptok import make_sp_llama_tokenizer

    tok = make_sp_llama_tokenizer(tmp_path / "sp", add_bos_token=False)
    assert tok("a")["input_ids"][0] != tok.bos_token_id
    cfg = legacy_tokenizer_config({"tokenizer_class": "LlamaTokenizer"}, tok)
    assert cfg["add_bos_token"] is False and "add_eos_token" not in cfg
    with_bos = make_sp_llama_tokenizer(tmp_path / "sp_bos")
    assert legacy_tokenizer_config({"tokenizer_class": "LlamaTokenizer"}, with_bos) == {
        "tokenizer_class": "LlamaTokenizer"}  # the 4.x default: nothing to add


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
    """Without a llavakit template the tokenizer's own one ships, wrapped so that it also takes
    transformers' list-of-parts messages; plain-string messages render exactly as the tokenizer's."""
    _, processor = built("siglip-qwen2-tied")
    assert processor.tokenizer.chat_template  # the tiny qwen2 ships one
    hp = AutoProcessor.from_pretrained(exported("siglip-qwen2-tied"))
    as_text = [{"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "A cat."},
               {"role": "user", "content": "Colour?"}]
    as_parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
                {"role": "user", "content": [{"type": "text", "text": "Colour?"}]}]
    expected = processor.tokenizer.apply_chat_template(as_text, tokenize=False, add_generation_prompt=True)
    assert hp.apply_chat_template(as_text, add_generation_prompt=True) == expected
    assert hp.apply_chat_template(as_parts, add_generation_prompt=True) == expected


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_exported_llavakit_templates_take_list_of_parts_messages(built, tmp_path, name):
    """transformers' standard multimodal messages render like the same conversation written as text."""
    model, processor = built("clip-llama-patch")
    processor = copy.copy(processor)  # the fixture's is shared
    processor.template = name
    hp = AutoProcessor.from_pretrained(export((model, processor), tmp_path / name))
    as_text = [{"role": "system", "content": "Be brief."},
               {"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "A cat."},
               {"role": "user", "content": "Colour?"}]
    as_parts = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
                {"role": "user", "content": [{"type": "text", "text": "Colour?"}]}]
    t = get_template(name, processor.tokenizer)
    turns = [Turn(m["role"], m["content"]) for m in as_text]
    assert hp.apply_chat_template(as_text, add_generation_prompt=True) == t.render_prompt(turns)
    assert hp.apply_chat_template(as_parts, add_generation_prompt=True) == t.render_prompt(turns)


def test_named_llavakit_template_is_rendered_to_jinja(built, tmp_path, monkeypatch):
    """With processor.template set, the Jinja text comes from llavakit.data.templates.jinja_chat_template."""
    model, processor = built("clip-llama-patch")
    monkeypatch.setattr(processor, "template", "vicuna_v1")
    hp = AutoProcessor.from_pretrained(export((model, processor), tmp_path / "hf"))
    assert hp.chat_template == jinja_chat_template("vicuna_v1", tokenizer=processor.tokenizer)


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


def test_cli_exports_an_anyres_model_as_llava_next(tiny_dirs, tmp_path, capsys):
    """`llavakit export` (default --format hf-llava) of an image_tokens: anyres model writes the LLaVA-NeXT layout,
    which transformers opens with nothing missing; parity is tests/test_anyres.py's."""
    from transformers import LlavaNextForConditionalGeneration

    model, processor = llavakit.build(tiny_dirs["clip"], tiny_dirs["llama"], image_tokens="anyres")
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    assert main(["export", str(tmp_path / "model"), str(tmp_path / "hf")]) == 0
    assert "wrote hf-llava-next checkpoint" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["model_type"] == "llava_next" and cfg["image_grid_pinpoints"] == model.config.image_grid_pinpoints
    _, info = LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert main(["export", str(tmp_path / "model"), str(tmp_path / "gguf"), "--format", "gguf"]) == 2
    assert "anyres" in capsys.readouterr().err
