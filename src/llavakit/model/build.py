"""Assemble a new LLaVA model from pretrained components, and open a saved one.

`build` is LLaVA's "surgery" done once and checked: load the vision encoder and the LLM by hub id or
path through the Auto classes, add `<image>` (and a pad token when the tokenizer has none), grow the
embeddings with the new rows set to the mean of the old ones, put a fresh projector between them,
and refuse to continue if any component weight is missing or unexpected.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path

import torch
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForCausalLM, AutoTokenizer

from .assemble import (IMAGE_TOKEN, OTHER_TOWER_PREFIXES, ComponentWeightsError, add_image_tokens, assemble, check_loading,
                       count_prefix_tokens, quiet_transformers, vision_config_of)
from .config import LlavakitConfig, parse_dtype
from .modeling import LlavakitForConditionalGeneration
from .processor import LlavakitProcessor

log = logging.getLogger(__name__)

__all__ = ["IMAGE_TOKEN", "ComponentWeightsError", "build", "build_on_meta", "load_language_model", "load_saved",
           "load_vision_tower"]


def load_vision_tower(vision: str | Path, dtype=None, **hub_kwargs):
    cfg, dual = vision_config_of(AutoConfig.from_pretrained(vision, **hub_kwargs))
    model_cls = AutoModel._model_mapping[type(cfg)]
    quiet = quiet_transformers() if dual else nullcontext()
    with quiet:  # the other tower's weights are expected leftovers; real problems are raised just below
        tower, info = model_cls.from_pretrained(vision, config=cfg, dtype=dtype, output_loading_info=True,
                                                **hub_kwargs)
    check_loading("the vision checkpoint", vision, info, ignore_unexpected=OTHER_TOWER_PREFIXES if dual else ())
    return tower


def load_language_model(llm: str | Path, dtype=None, quantization_config=None, **hub_kwargs):
    if quantization_config is not None:
        hub_kwargs["quantization_config"] = quantization_config
    lm, info = AutoModelForCausalLM.from_pretrained(llm, dtype=dtype, output_loading_info=True, **hub_kwargs)
    check_loading("the language model checkpoint", llm, info)
    return lm


def build(vision: str | Path, llm: str | Path, projector: str = "mlp2x_gelu", *,
          vision_feature_layer: int | list[int] = -2, vision_feature_select: str = "patch",
          image_aspect: str = "resize", image_tokens: str = "base", dtype: torch.dtype | str | None = None,
          attn_implementation: str | None = None, llm_quantization_config=None, **hub_kwargs):
    """A new (model, processor) from a vision encoder and a causal LM, each a hub id or a local path.

    The projector is freshly initialised; everything else keeps its pretrained weights.
    """
    dtype = parse_dtype(dtype)
    tower = load_vision_tower(vision, dtype=dtype, **hub_kwargs)
    lm = load_language_model(llm, dtype=dtype, quantization_config=llm_quantization_config, **hub_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(llm, **hub_kwargs)
    image_processor = AutoImageProcessor.from_pretrained(vision, **hub_kwargs)
    add_image_tokens(tokenizer, lm)
    tokenizer.padding_side = "left"  # the processor serves generation; training collators pad themselves
    model, processor = assemble(
        tower, lm, tokenizer, image_processor, projector=projector, vision_feature_layer=vision_feature_layer,
        vision_feature_select=vision_feature_select, image_aspect=image_aspect, image_tokens=image_tokens,
        components={"vision": str(vision), "llm": str(llm)}, chat_template=tokenizer.chat_template,
        attn_implementation=attn_implementation)
    log.info("built llavakit model: %s + %s, projector %s, %d tokens per image",
             vision, llm, projector, model.config.image_seq_length)
    return model, processor


def load_saved(path: str | Path, dtype: torch.dtype | str | None = None, device_map=None,
               attn_implementation: str | None = None, **hub_kwargs):
    """Open a model llavakit saved (model_type "llavakit"). Returns (model, processor).

    `llavakit.load` opens other formats too (llava-hf, original LLaVA) and calls this for llavakit's own."""
    dtype = parse_dtype(dtype)
    kwargs = dict(hub_kwargs)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = LlavakitForConditionalGeneration.from_pretrained(path, dtype=dtype, device_map=device_map, **kwargs)
    model.vision_tower.requires_grad_(False)
    processor = LlavakitProcessor.from_pretrained(path, **hub_kwargs)
    return model, processor


def build_on_meta(vision_config, text_config, projector: str = "mlp2x_gelu", *, vision_feature_layer=-2,
                  vision_feature_select: str = "patch", extra_tokens: int = 0):
    """The full-size model on the `meta` device (no weights, no memory): for sizing recipes.

    `extra_tokens` grows the vocabulary as `build` would (`<image>`, and `<pad>` when missing).
    """
    vision_config, _ = vision_config_of(vision_config)
    with torch.device("meta"):
        tower = AutoModel.from_config(vision_config)
        prefix = count_prefix_tokens(tower, vision_config)
        text_config.vocab_size += extra_tokens
        config = LlavakitConfig(vision_config=vision_config, text_config=text_config, projector=projector,
                                vision_feature_layer=vision_feature_layer,
                                vision_feature_select=vision_feature_select, vision_prefix_tokens=prefix,
                                image_token_id=text_config.vocab_size - 1)
        return LlavakitForConditionalGeneration(config)
