"""Every shipped recipe builds its full-size model on the meta device with the expected sizes.

No weights and no download: the components' configs are written out here (their published shapes)
and loaded back by path with AutoConfig, as a hub id would be.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from transformers import AutoConfig, CLIPVisionConfig, LlamaConfig, Qwen2Config, SiglipVisionConfig

from llavakit.model.build import build_on_meta
from llavakit.train.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# hub id -> config with the published shape
COMPONENTS = {
    "openai/clip-vit-large-patch14-336": lambda: CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, projection_dim=768),
    "openai/clip-vit-base-patch32": lambda: CLIPVisionConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        image_size=224, patch_size=32, projection_dim=512),
    "google/siglip-so400m-patch14-384": lambda: SiglipVisionConfig(
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
        image_size=384, patch_size=14),
    "lmsys/vicuna-7b-v1.5": lambda: LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0": lambda: LlamaConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
        num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048),
    # InternLM2 ships remote code that cannot be fetched offline; its decoder has Llama's shapes
    # (fused wqkv holds the same number of weights), so a Llama config of those shapes sizes it.
    "internlm/internlm2-chat-1_8b": lambda: LlamaConfig(
        vocab_size=92544, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
        num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=32768),
    "Qwen/Qwen2.5-0.5B-Instruct": lambda: Qwen2Config(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
}

# recipe folder -> (published LLM size in billions, vision tower size in millions, image tokens)
EXPECTED = {
    "llava15_7b": (6.74, 304, 576),
    "tinyllama_clip_b32": (1.10, 87, 49),
    "internlm2_1_8b_qlora": (1.89, 304, 576),
    "qwen25_05b_siglip": (0.49, 428, 729),
    "qwen25_05b_siglip_anyres": (0.49, 428, 729),  # stage 1 at base resolution (729 tokens), then tiles
}


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("recipe", sorted(EXPECTED))
def test_recipe_builds_full_size_model_on_meta(recipe, tmp_path):
    stage1 = load_config(CONFIGS / recipe / "stage1.yaml")
    stage2 = load_config(CONFIGS / recipe / "stage2.yaml")
    assert stage1.train.stage == "pretrain"
    assert stage2.train.stage in ("finetune", "lora", "qlora")
    assert stage2.model.init_from == stage1.train.output_dir  # stage 2 starts from stage 1's run
    m = stage1.model
    paths = {}
    for role, hub_id in (("vision", m.vision), ("llm", m.llm)):
        COMPONENTS[hub_id]().save_pretrained(tmp_path / role)
        paths[role] = AutoConfig.from_pretrained(tmp_path / role)
    model = build_on_meta(paths["vision"], paths["llm"], m.projector, vision_feature_layer=m.vision_feature_layer,
                          vision_feature_select=m.vision_feature_select)
    llm_b, vision_m, tokens = EXPECTED[recipe]
    assert next(model.parameters()).device.type == "meta"
    assert round(_count(model.language_model) / 1e9, 2) == llm_b
    assert round(_count(model.vision_tower) / 1e6) == vision_m
    d_vis, d_llm = paths["vision"].hidden_size, paths["llm"].hidden_size
    assert _count(model.multi_modal_projector) == d_vis * d_llm + d_llm + d_llm * d_llm + d_llm  # mlp2x_gelu
    assert model.config.image_seq_length == tokens


def test_llava15_recipe_matches_the_paper_settings():
    s1 = load_config(CONFIGS / "llava15_7b" / "stage1.yaml")
    s2 = load_config(CONFIGS / "llava15_7b" / "stage2.yaml")
    assert (s1.train.lr, s1.train.batch_size * 8 * s1.train.grad_accum, s1.data.template) == (1e-3, 256, "plain")
    assert (s2.train.lr, s2.train.batch_size * 8 * s2.train.grad_accum, s2.data.template) == (2e-5, 128, "vicuna_v1")
    for s in (s1, s2):
        assert (s.train.schedule, s.train.warmup_ratio, s.train.epochs, s.data.max_length) == ("cosine", 0.03, 1, 2048)
    assert s2.model.image_aspect == "pad"


def test_accelerate_configs_are_valid_yaml_for_each_backend():
    kinds = {yaml.safe_load(p.read_text())["distributed_type"] for p in (CONFIGS / "accelerate").glob("*.yaml")}
    assert {"MULTI_GPU", "FSDP", "DEEPSPEED"} <= kinds
