"""Open a llava-hf checkpoint (`LlavaForConditionalGeneration`, LLaVA-NeXT's `LlavaNextForConditionalGeneration`
as an ``image_tokens: anyres`` model, or LLaVA-OneVision's `LlavaOnevisionForConditionalGeneration` as an
``anyres_max`` one) as a llavakit model, so training can start from it: transformers' own loader reads the
weights, and its modules move into a llavakit model.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import (AutoModelForCausalLM, AutoProcessor, LlavaForConditionalGeneration,
                          LlavaNextForConditionalGeneration, LlavaOnevisionForConditionalGeneration)

from ..model.anyres import check_grid_pinpoints
from ..model.assemble import assemble, check_loading, count_prefix_tokens
from ..model.config import parse_dtype
from ..model.onevision import parse_vision_aspect_ratio
from ..model.processor import token_id_or_none

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
    return _import(LlavaForConditionalGeneration, path, dtype, device_map, attn_implementation, hub_kwargs)


def import_hf_llava_next(path: str | Path, dtype: torch.dtype | str | None = None, device_map=None,
                         attn_implementation: str | None = None, **hub_kwargs):
    """Open a llava-hf LLaVA-NeXT checkpoint (`LlavaNextForConditionalGeneration`) as an ``image_tokens:
    anyres`` llavakit (model, processor) pair, with its ``image_grid_pinpoints`` and ``image_newline``."""
    return _import(LlavaNextForConditionalGeneration, path, dtype, device_map, attn_implementation, hub_kwargs)


def import_hf_llava_onevision(path: str | Path, dtype: torch.dtype | str | None = None, device_map=None,
                              attn_implementation: str | None = None, **hub_kwargs):
    """Open a llava-hf LLaVA-OneVision checkpoint (`LlavaOnevisionForConditionalGeneration`) as an ``image_tokens:
    anyres_max`` llavakit (model, processor) pair: its pinpoints, its ``vision_aspect_ratio`` "anyres_max_N" as
    ``anyres_max_tiles`` N, its ``image_newline``, and its ``video_token_index`` (when the tokenizer has the video
    token) for videos (`llavakit.model.video`)."""
    return _import(LlavaOnevisionForConditionalGeneration, path, dtype, device_map, attn_implementation, hub_kwargs)


# transformers class -> llavakit image_tokens policy
POLICIES = {LlavaForConditionalGeneration: "base", LlavaNextForConditionalGeneration: "anyres",
            LlavaOnevisionForConditionalGeneration: "anyres_max"}


def onevision_processor_parts(path, hub_kwargs: dict) -> SimpleNamespace:
    """A OneVision folder's tokenizer, image processor and processor_config.json fields (image_token,
    vision_aspect_ratio, chat_template), read one by one: transformers builds a `LlavaOnevisionProcessor` only
    with its video processor, which needs torchvision (llavakit preprocesses video frames with the image processor's
    settings)."""
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.utils import cached_file

    tokenizer = AutoTokenizer.from_pretrained(path, **hub_kwargs)
    image_processor = AutoImageProcessor.from_pretrained(path, **hub_kwargs)
    found = cached_file(path, "processor_config.json", _raise_exceptions_for_missing_entries=False, **hub_kwargs)
    fields = json.loads(Path(found).read_text(encoding="utf-8")) if found else {}
    return SimpleNamespace(tokenizer=tokenizer, image_processor=image_processor,
                           image_token=fields.get("image_token", "<image>"),
                           video_token=fields.get("video_token", "<video>"),
                           vision_aspect_ratio=fields.get("vision_aspect_ratio", "anyres_max_9"),
                           chat_template=fields.get("chat_template") or tokenizer.chat_template)


def _tile_image_processor(image_processor):
    """The encoder's own (CLIP) image processor with a LlavaNext / OneVision image processor's settings: llavakit
    cuts the tiles itself (`llavakit.model.anyres`) and preprocesses each tile with this one."""
    from transformers.image_processing_backends import PilBackend

    if isinstance(image_processor, PilBackend):
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as cls
    else:
        from transformers import CLIPImageProcessor as cls
    fields = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
              "do_normalize", "image_mean", "image_std", "do_convert_rgb")
    kwargs = {f: getattr(image_processor, f) for f in fields if getattr(image_processor, f, None) is not None}
    for key in ("size", "crop_size"):
        if key in kwargs and not isinstance(kwargs[key], dict):
            kwargs[key] = {k: v for k, v in vars(kwargs[key]).items() if v is not None}
    kwargs.setdefault("do_center_crop", False)  # OneVision's processor leaves it unset: no crop, not CLIP's 224 px
    return cls(**kwargs)


def _import(hf_class, path, dtype, device_map, attn_implementation, hub_kwargs: dict):
    dtype = parse_dtype(dtype)
    if Path(path).exists() and not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"{Path(path) / 'config.json'} not found: {path} is not a llava-hf checkpoint")
    load_kwargs = dict(hub_kwargs)
    if attn_implementation:
        load_kwargs["attn_implementation"] = attn_implementation
    hf, info = hf_class.from_pretrained(path, dtype=dtype or "auto", device_map=device_map, output_loading_info=True,
                                        **load_kwargs)
    check_loading("the llava-hf checkpoint", path, info,
                  hint="Check that the folder is a complete llava-hf checkpoint (config.json + all weight shards).")
    hf_cfg = hf.config
    if not hf_cfg.multimodal_projector_bias or hf_cfg.projector_hidden_act != "gelu":
        raise ValueError(
            f"{path}: projector with projector_hidden_act={hf_cfg.projector_hidden_act!r}, "
            f"bias={hf_cfg.multimodal_projector_bias} has no llavakit equivalent (only 'gelu' with biases, "
            "our 'mlp2x_gelu')"
        )
    hp = onevision_processor_parts(path, hub_kwargs) if hf_class is LlavaOnevisionForConditionalGeneration \
        else AutoProcessor.from_pretrained(path, **hub_kwargs)
    tokenizer, image_processor = hp.tokenizer, hp.image_processor
    policy = POLICIES[hf_class]
    next_ = policy != "base"  # tiled: LLaVA-NeXT or OneVision
    projector_weights = dict(hf.model.multi_modal_projector.state_dict())
    pinpoints, max_tiles = None, None  # the checkpoint's own (tiled policies), recorded by assemble
    if next_:
        pinpoints = check_grid_pinpoints(hf_cfg.image_grid_pinpoints, int(hf_cfg.vision_config.image_size))
        if [list(p) for p in image_processor.image_grid_pinpoints] != pinpoints:
            raise ValueError(f"{path}: the image processor's image_grid_pinpoints {image_processor.image_grid_pinpoints} "
                             f"differ from the model's {pinpoints}")
        image_processor = _tile_image_processor(image_processor)
        projector_weights["image_newline.weight"] = hf.model.image_newline
    video = {}
    if policy == "anyres_max":
        video_id = token_id_or_none(tokenizer, hp.video_token)  # None: the tokenizer has no video token, no videos
        if video_id is not None and video_id != hf_cfg.video_token_id:
            raise ValueError(f"{path}: the tokenizer's {hp.video_token!r} is id {video_id}, the model's "
                             f"video_token_index is {hf_cfg.video_token_id}")
        video = {"video_token": hp.video_token, "video_token_id": video_id}
        max_tiles = parse_vision_aspect_ratio(hf_cfg.vision_aspect_ratio)
        if parse_vision_aspect_ratio(hp.vision_aspect_ratio) != max_tiles:
            raise ValueError(f"{path}: the processor's vision_aspect_ratio {hp.vision_aspect_ratio!r} differs from the "
                             f"model's {hf_cfg.vision_aspect_ratio!r}")
    # llavakit's processor owns the pad-to-square step (image_aspect), so the image processor must not pad too.
    aspect = "pad" if getattr(image_processor, "do_pad", False) and not next_ else "resize"
    if aspect == "pad":
        image_processor.do_pad = False
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
        log.info("%s: the tokenizer has no pad token; padding with %r", path, tokenizer.pad_token)

    tower = hf.model.vision_tower
    prefix = count_prefix_tokens(tower, hf_cfg.vision_config)
    model, processor = assemble(
        tower, _causal_lm(hf), tokenizer, image_processor, projector="mlp2x_gelu", projector_weights=projector_weights,
        image_tokens=policy,
        vision_feature_layer=hf_cfg.vision_feature_layer, vision_feature_select=_vision_select(hf_cfg, prefix, path),
        image_token=hp.image_token, image_token_id=hf_cfg.image_token_id, image_aspect=aspect,
        components={"hf-llava": str(path)}, chat_template=hp.chat_template,
        attn_implementation=hf_cfg._attn_implementation, generation_config=hf.generation_config,
        tokenization="llm", image_grid_pinpoints=pinpoints, anyres_max_tiles=max_tiles,  # the checkpoint's own
        **video)  # LlavaProcessor: one string, bos by the tokenizer
    model.eval()
    return model, processor
