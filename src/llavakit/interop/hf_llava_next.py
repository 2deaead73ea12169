"""Export an ``image_tokens: anyres`` model as transformers' LLaVA-NeXT (`LlavaNextForConditionalGeneration`
+ `LlavaNextProcessor`); `hf_llava_import.import_hf_llava_next` opens one.

The layout is llava-hf's (see `hf_llava`), plus the row newline::

    image_newline                      [D_llm]   <- llavakit's multi_modal_projector.image_newline.weight

The config carries ``image_grid_pinpoints``; the image processor is `LlavaNextImageProcessor` (PIL backend
when the encoder's processor is PIL, torchvision otherwise) with the encoder's resize/normalise settings
and the same pinpoints, so transformers cuts the same tiles and counts the same tokens as llavakit
(`llavakit.model.anyres`).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import LlavaNextConfig, LlavaNextProcessor

from ..model.config import LlavakitConfig, parse_dtype
from ..model.modeling import LlavakitForConditionalGeneration
from ..model.processor import LlavakitProcessor
from .hf_llava import (chat_template_for, check_projector, image_processor_fields, select_strategy, uses_pil_backend,
                       write_checkpoint)
from .weights import legacy_state_dict

NEWLINE_KEY = "multi_modal_projector.image_newline.weight"  # llavakit's name; llava-next's is "image_newline"


def _check_anyres(config: LlavakitConfig) -> None:
    if config.image_tokens != "anyres":
        raise ValueError(f"the hf-llava-next layout is for image_tokens='anyres' models; this one uses "
                         f"{config.image_tokens!r} (export 'base' models as hf-llava)")
    if config.vision_feature_select != "patch":
        raise ValueError("image_tokens='anyres' exports need vision_feature_select='patch' (a square feature grid)")


def hf_llava_next_config(config: LlavakitConfig, dtype: torch.dtype | None = None) -> LlavaNextConfig:
    _check_anyres(config)
    act = check_projector(config)
    strategy, _ = select_strategy(config)
    text = config.text_config.to_dict()
    vision = config.vision_config.to_dict()
    if dtype is not None:
        text["dtype"] = vision["dtype"] = str(dtype).removeprefix("torch.")
    hf = LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=int(config.image_token_id),
        image_seq_length=int(config.image_seq_length),
        projector_hidden_act=act,
        vision_feature_select_strategy=strategy,
        vision_feature_layer=config.vision_feature_layer,
        image_grid_pinpoints=[list(p) for p in config.image_grid_pinpoints],
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(config.text_config, "tie_word_embeddings", False)),
    )
    hf.architectures = ["LlavaNextForConditionalGeneration"]
    if dtype is not None:
        hf.dtype = dtype
    return hf


def hf_llava_next_processor(processor: LlavakitProcessor, config: LlavakitConfig) -> LlavaNextProcessor:
    _check_anyres(config)
    if processor.image_grid_pinpoints != config.image_grid_pinpoints:
        raise ValueError(f"the processor's image_grid_pinpoints {processor.image_grid_pinpoints} differ from the "
                         f"model's {config.image_grid_pinpoints}")
    if uses_pil_backend(processor.image_processor):
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil as cls
    else:
        from transformers import LlavaNextImageProcessor as cls
    image_processor = cls(image_grid_pinpoints=[list(p) for p in config.image_grid_pinpoints], do_pad=True,
                          **image_processor_fields(processor, config))
    strategy, additional = select_strategy(config)
    tokenizer = copy.deepcopy(processor.tokenizer)
    template = chat_template_for(processor)
    tokenizer.chat_template = template  # one template in the folder, not two that disagree
    return LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer,
                              patch_size=int(config.vision_config.patch_size), vision_feature_select_strategy=strategy,
                              chat_template=template, image_token=processor.image_token,
                              num_additional_image_tokens=additional)


def llava_next_state_dict(model: LlavakitForConditionalGeneration) -> dict[str, torch.Tensor]:
    """llava-hf's legacy names (`weights.legacy_state_dict`) with the newline at the top, as llava-next has it."""
    state = legacy_state_dict(model)
    if NEWLINE_KEY not in state:
        raise ValueError(f"the model has no {NEWLINE_KEY}; only image_tokens='anyres' / 'anyres_max' models export "
                         "with an image_newline (hf-llava-next / hf-llava-onevision)")
    state["image_newline"] = state.pop(NEWLINE_KEY)
    return state


def export_hf_llava_next(model: LlavakitForConditionalGeneration, processor: LlavakitProcessor, out: str | Path, *,
                         max_shard_size: int | str = "5GB", dtype: torch.dtype | str | None = None,
                         overwrite: bool = False) -> Path:
    """Write an anyres `model` + `processor` to `out` as a llava-hf LLaVA-NeXT checkpoint. Returns `out`."""
    dtype = parse_dtype(dtype)
    hf_config = hf_llava_next_config(model.config, dtype or model.dtype)  # validates before anything is written
    hf_processor = hf_llava_next_processor(processor, model.config)
    return write_checkpoint(model, llava_next_state_dict(model), hf_config, hf_processor, out,
                            max_shard_size=max_shard_size, dtype=dtype, overwrite=overwrite)
