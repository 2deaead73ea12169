"""Open a llava-hf checkpoint (`LlavaForConditionalGeneration`) as a llavakit model, so training can start
from it: transformers' own loader reads the weights, and its modules move into a llavakit model.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoProcessor, LlavaForConditionalGeneration

from ..model.assemble import assemble, check_loading, count_prefix_tokens
from ..model.config import parse_dtype

log = logging.getLogger(__name__)


def _vision_select(hf_cfg, prefix: int, path) -> str:
    strategy = hf_cfg.vision_feature_select_strategy
    if strategy == "full":
        return "cls_patch" if prefix else "patch"
    if strategy == "default" and prefix == 1:
        return "patch"
    raise ValueError(
        f"{path}: vision_feature_select_strategy={strategy!r} drops one leading token, but this vision tower "
        f"puts {prefix} tokens before its patches; llavakit can only drop exactly the tower's prefix tokens"
    )


def _causal_lm(hf):
    """The LLM of a loaded `LlavaForConditionalGeneration` as its own causal LM (modules moved, not copied)."""
    text_config = hf.model.language_model.config
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(text_config)
    setattr(lm, lm.base_model_prefix, hf.model.language_model)
    lm.set_output_embeddings(hf.lm_head)  # already the same Parameter as embed_tokens when tied
    lm.config = text_config
    lm.generation_config = hf.generation_config
    return lm


def import_hf_llava(path: str | Path, dtype: torch.dtype | str | None = None, device_map=None,
                    attn_implementation: str | None = None, **hub_kwargs):
    """Open a llava-hf checkpoint (folder or hub id) as a llavakit (model, processor) pair.

    The weights are loaded by transformers' own `LlavaForConditionalGeneration.from_pretrained` (every
    key spelling it accepts works) and must load with nothing missing or unexpected. `device_map`,
    `attn_implementation` and hub options go to that loader.
    """
    dtype = parse_dtype(dtype)
    if Path(path).exists() and not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"{Path(path) / 'config.json'} not found: {path} is not a llava-hf checkpoint")
    load_kwargs = dict(hub_kwargs)
    if attn_implementation:
        load_kwargs["attn_implementation"] = attn_implementation
    hf, info = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype or "auto", device_map=device_map,
                                                             output_loading_info=True, **load_kwargs)
    check_loading("the llava-hf checkpoint", path, info,
                  hint="Check that the folder is a complete llava-hf checkpoint (config.json + all weight shards).")
    hf_cfg = hf.config
    if not hf_cfg.multimodal_projector_bias or hf_cfg.projector_hidden_act != "gelu":
        raise ValueError(
            f"{path}: projector with projector_hidden_act={hf_cfg.projector_hidden_act!r}, "
            f"bias={hf_cfg.multimodal_projector_bias} has no llavakit equivalent (only 'gelu' with biases, "
            "our 'mlp2x_gelu')"
        )
    hp = AutoProcessor.from_pretrained(path, **hub_kwargs)
    tokenizer, image_processor = hp.tokenizer, hp.image_processor
    # llavakit's processor owns the pad-to-square step (image_aspect), so the image processor must not pad too.
    aspect = "pad" if getattr(image_processor, "do_pad", False) else "resize"
    if aspect == "pad":
        image_processor.do_pad = False
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
        log.info("%s: the tokenizer has no pad token; padding with %r", path, tokenizer.pad_token)

    tower = hf.model.vision_tower
    prefix = count_prefix_tokens(tower, hf_cfg.vision_config)
    model, processor = assemble(
        tower, _causal_lm(hf), tokenizer, image_processor, projector="mlp2x_gelu",
        projector_weights=hf.model.multi_modal_projector.state_dict(),
        vision_feature_layer=hf_cfg.vision_feature_layer, vision_feature_select=_vision_select(hf_cfg, prefix, path),
        image_token=hp.image_token, image_token_id=hf_cfg.image_token_id, image_aspect=aspect,
        components={"hf-llava": str(path)}, chat_template=hp.chat_template,
        attn_implementation=hf_cfg._attn_implementation, generation_config=hf.generation_config,
        tokenization="llm")  # LlavaProcessor: one string, bos by the tokenizer
    model.eval()
    return model, processor
