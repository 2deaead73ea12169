"""Export an ``image_tokens: anyres_max`` model as transformers' LLaVA-OneVision
(`LlavaOnevisionForConditionalGeneration` + `LlavaOnevisionProcessor`); `hf_llava_import.import_hf_llava_onevision`
opens one.

The weights are llava-next's layout (`hf_llava_next.llava_next_state_dict`: llava-hf's names, the newline at the
top as ``image_newline``). The config carries ``image_grid_pinpoints`` and ``vision_aspect_ratio`` =
``"anyres_max_<anyres_max_tiles>"``; the image processor is `LlavaOnevisionImageProcessor` (PIL backend when the
encoder's processor is PIL, torchvision otherwise) with the encoder's resize/normalise settings and the same
pinpoints, so transformers cuts the same tiles, shrinks the same grids and counts the same tokens as llavakit
(`llavakit.model.onevision`).

Videos: the config's ``video_token_index`` is the model's ``<video>`` id (`llavakit.model.video`: per-frame features
2x2-pooled, one newline per video, as transformers' ``get_video_features``). A model without a ``<video>`` token
(built before video support) gets an id no token has (the text vocabulary's size), so nothing is taken for a video.

transformers builds a `LlavaOnevisionProcessor` only with a video processor, and video processors need
torchvision, which llavakit does not; so the processor's files are written directly (`OnevisionProcessorFiles`):
``processor_config.json`` (processor_class LlavaOnevisionProcessor, num_image_tokens, vision_aspect_ratio, ...),
the image processor's ``preprocessor_config.json``, ``video_preprocessor_config.json`` (LlavaOnevisionVideoProcessor:
each frame resized to the tower's square input, the encoder's normalisation; frames given already sampled), the
tokenizer and the chat template.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from transformers import LlavaOnevisionConfig

from ..model.config import LlavakitConfig, parse_dtype
from ..model.modeling import LlavakitForConditionalGeneration
from ..model.onevision import vision_aspect_ratio
from ..model.processor import LlavakitProcessor
from .hf_llava import (chat_template_for, check_projector, image_processor_fields, select_strategy, uses_pil_backend,
                       write_checkpoint)
from .hf_llava_next import llava_next_state_dict


def _check_anyres_max(config: LlavakitConfig) -> None:
    if config.image_tokens != "anyres_max":
        raise ValueError(f"the hf-llava-onevision layout is for image_tokens='anyres_max' models; this one uses "
                         f"{config.image_tokens!r} (export 'base' models as hf-llava, 'anyres' ones as hf-llava-next)")
    if config.vision_feature_select != "patch":
        raise ValueError("image_tokens='anyres_max' exports need vision_feature_select='patch' (a square feature grid)")


def hf_llava_onevision_config(config: LlavakitConfig, dtype: torch.dtype | None = None) -> LlavaOnevisionConfig:
    _check_anyres_max(config)
    act = check_projector(config)
    strategy, _ = select_strategy(config)
    text = config.text_config.to_dict()
    vision = config.vision_config.to_dict()
    if dtype is not None:
        text["dtype"] = vision["dtype"] = str(dtype).removeprefix("torch.")
    hf = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=int(config.image_token_id),
        # no <video> token: an id no token has, so no text position is ever taken for a video
        video_token_index=int(config.video_token_id if config.video_token_id is not None else
                              config.text_config.vocab_size),
        projector_hidden_act=act,
        vision_feature_select_strategy=strategy,
        vision_feature_layer=config.vision_feature_layer,
        image_grid_pinpoints=[list(p) for p in config.image_grid_pinpoints],
        vision_aspect_ratio=vision_aspect_ratio(config.anyres_max_tiles),
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(config.text_config, "tie_word_embeddings", False)),
    )
    hf.architectures = ["LlavaOnevisionForConditionalGeneration"]
    if dtype is not None:
        hf.dtype = dtype
    return hf


class OnevisionProcessorFiles:
    """What `LlavaOnevisionProcessor.save_pretrained` writes, without building one (see the module docstring):
    `save_pretrained(out)` writes the image processor, the tokenizer, the chat template and processor_config.json
    with `fields` (LlavaOnevisionProcessor's own arguments)."""

    processor_class = "LlavaOnevisionProcessor"

    def __init__(self, image_processor, tokenizer, chat_template: str | None, fields: dict,
                 video_fields: dict | None = None):
        self.image_processor, self.tokenizer, self.chat_template, self.fields = \
            image_processor, tokenizer, chat_template, dict(fields)
        self.video_fields = video_fields  # video_preprocessor_config.json's fields (None: not written)

    def save_pretrained(self, out: str | Path) -> None:
        out = Path(out)
        self.image_processor.save_pretrained(out)
        image_cfg = out / "preprocessor_config.json"
        data = json.loads(image_cfg.read_text(encoding="utf-8"))
        data["processor_class"] = self.processor_class  # as llava-hf's hub checkpoints have it
        image_cfg.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if self.video_fields is not None:
            video = {"video_processor_type": "LlavaOnevisionVideoProcessor", "processor_class": self.processor_class,
                     **self.video_fields}
            (out / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2, sort_keys=True) + "\n",
                                                                encoding="utf-8")
        self.tokenizer.save_pretrained(out)
        if self.chat_template is not None:
            (out / "chat_template.jinja").write_text(self.chat_template, encoding="utf-8")
        proc = {"processor_class": self.processor_class, **self.fields}
        (out / "processor_config.json").write_text(json.dumps(proc, indent=2, sort_keys=True) + "\n",
                                                   encoding="utf-8")


def hf_llava_onevision_processor(processor: LlavakitProcessor, config: LlavakitConfig) -> OnevisionProcessorFiles:
    _check_anyres_max(config)
    for key in ("image_grid_pinpoints", "anyres_max_tiles"):
        if getattr(processor, key) != getattr(config, key):
            raise ValueError(f"the processor's {key} {getattr(processor, key)} differs from the model's "
                             f"{getattr(config, key)}")
    if uses_pil_backend(processor.image_processor):
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import \
            LlavaOnevisionImageProcessorPil as cls
    else:
        from transformers import LlavaOnevisionImageProcessor as cls
    ip_fields = image_processor_fields(processor, config)
    image_processor = cls(image_grid_pinpoints=[list(p) for p in config.image_grid_pinpoints], do_pad=True,
                          **ip_fields)
    strategy, additional = select_strategy(config)
    tokenizer = copy.deepcopy(processor.tokenizer)
    template = chat_template_for(processor)
    tokenizer.chat_template = template  # one template in the folder, not two that disagree
    # OneVision counts the base tile's tokens as the tower emits them, then drops one under "default" (CLS)
    num_image_tokens = config.patch_grid ** 2 + additional
    fields = {"num_image_tokens": num_image_tokens, "vision_feature_select_strategy": strategy,
              "image_token": processor.image_token, "video_token": processor.video_token,
              "vision_aspect_ratio": vision_aspect_ratio(config.anyres_max_tiles)}
    video = None
    if config.video_token_id is not None:  # each frame = the whole frame resized to one tile (`model.video`)
        tile = int(config.vision_config.image_size)
        video = {k: v for k, v in ip_fields.items() if k in ("resample", "do_rescale", "rescale_factor", "do_normalize",
                                                             "image_mean", "image_std", "do_convert_rgb")}
        video.update(do_resize=True, size={"height": tile, "width": tile}, do_center_crop=False,
                     do_sample_frames=False)
        video = json.loads(json.dumps(video, default=lambda o: int(o) if hasattr(o, "__int__") else str(o)))
    return OnevisionProcessorFiles(image_processor, tokenizer, template, fields, video)


def export_hf_llava_onevision(model: LlavakitForConditionalGeneration, processor: LlavakitProcessor, out: str | Path,
                              *, max_shard_size: int | str = "5GB", dtype: torch.dtype | str | None = None,
                              overwrite: bool = False) -> Path:
    """Write an anyres_max `model` + `processor` to `out` as a llava-hf LLaVA-OneVision checkpoint. Returns `out`."""
    dtype = parse_dtype(dtype)
    hf_config = hf_llava_onevision_config(model.config, dtype or model.dtype)  # validates before anything is written
    hf_processor = hf_llava_onevision_processor(processor, model.config)
    return write_checkpoint(model, llava_next_state_dict(model), hf_config, hf_processor, out,
                            max_shard_size=max_shard_size, dtype=dtype, overwrite=overwrite)
