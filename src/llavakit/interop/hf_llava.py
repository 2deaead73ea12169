"""Export to the llava-hf checkpoint format (`LlavaForConditionalGeneration`); `hf_llava_import` opens one.

Export writes a folder that transformers' `LlavaForConditionalGeneration` + `LlavaProcessor` (and
vLLM, which reads the same files) open unchanged. The weights are written by hand, in the legacy
llava-hf layout every reader knows::

    language_model.model.*             the LLM body (`language_model.` + the causal LM's own keys)
    language_model.lm_head.weight      left out when tied to the input embeddings (HF re-ties it)
    vision_tower.vision_model.*        CLIP/SigLIP as transformers 4.x named them
    multi_modal_projector.linear_{1,2}.*

transformers 5.x's own `save_pretrained` drops the `vision_model.` prefix of CLIP/SigLIP; 5.x reads
both spellings, but 4.x then loads a randomly initialised tower with only a warning. Likewise the config,
tokenizer and processor files get the 4.x field names next to the 5.x ones (`write_legacy_fields`).

The weight files are written by `weights.py`, the 4.x fields by `hf_legacy.py`.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from transformers import LlavaConfig, LlavaProcessor

from ..data.templates import TEMPLATES, jinja_chat_template, multimodal_chat_template
from ..model.config import LlavakitConfig, parse_dtype
from ..model.modeling import LlavakitForConditionalGeneration
from ..model.processor import LlavakitProcessor
from .hf_legacy import write_legacy_fields
from .weights import legacy_state_dict, write_safetensors

log = logging.getLogger(__name__)

# llavakit projector name -> LlavaConfig.projector_hidden_act. HF Llava's projector is fixed:
# linear_1 -> act -> linear_2 (with biases); only our projectors of that shape can be exported.
HF_LLAVA_PROJECTORS: dict[str, str] = {"mlp2x_gelu": "gelu"}


# --- config and processor --------------------------------------------------------------------------
def select_strategy(config: LlavakitConfig) -> tuple[str, int]:
    """(vision_feature_select_strategy, num_additional_image_tokens) for HF Llava.

    HF's "default" drops exactly one leading token (CLIP's CLS); "full" keeps all of them.
    """
    prefix = int(config.vision_prefix_tokens)
    if config.vision_feature_select == "cls_patch" or prefix == 0:
        return "full", prefix
    if prefix == 1:
        return "default", 1
    raise ValueError(
        f"this vision tower puts {prefix} tokens before its patches and the model drops them "
        "(vision_feature_select='patch'); HF Llava can only drop one (its 'default' strategy)"
    )


def check_projector(config: LlavakitConfig) -> str:
    if config.projector not in HF_LLAVA_PROJECTORS:
        raise ValueError(
            f"projector {config.projector!r} cannot be written as an HF Llava checkpoint: HF Llava's projector "
            f"is linear_1 -> activation -> linear_2. Exportable projectors: {', '.join(HF_LLAVA_PROJECTORS)}"
        )
    return HF_LLAVA_PROJECTORS[config.projector]


def hf_llava_config(config: LlavakitConfig, dtype: torch.dtype | None = None) -> LlavaConfig:
    act = check_projector(config)
    strategy, _ = select_strategy(config)
    text = config.text_config.to_dict()
    vision = config.vision_config.to_dict()
    if dtype is not None:
        text["dtype"] = vision["dtype"] = str(dtype).removeprefix("torch.")
    hf = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=int(config.image_token_id),
        image_seq_length=int(config.image_seq_length),
        projector_hidden_act=act,
        vision_feature_select_strategy=strategy,
        vision_feature_layer=config.vision_feature_layer,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(config.text_config, "tie_word_embeddings", False)),
    )
    hf.architectures = ["LlavaForConditionalGeneration"]
    if dtype is not None:
        hf.dtype = dtype
    return hf


def chat_template_for(processor: LlavakitProcessor) -> str | None:
    """The Jinja chat template to ship: the llavakit conversation template the model was trained with
    (`processor.template`, rendered by `jinja_chat_template`), else (`auto`, or none recorded) the
    processor's or the tokenizer's own template, wrapped to accept list-of-parts content too."""
    name = getattr(processor, "template", None)
    if name in TEMPLATES:
        return jinja_chat_template(name, tokenizer=processor.tokenizer)
    own = getattr(processor, "chat_template", None) or getattr(processor.tokenizer, "chat_template", None)
    return multimodal_chat_template(own) if own else None


def uses_pil_backend(image_processor) -> bool:
    """Whether an image processor is transformers' PIL backend (else torchvision): exports keep the backend."""
    from transformers.image_processing_backends import PilBackend

    return isinstance(image_processor, PilBackend)


def image_processor_fields(processor: LlavakitProcessor, config: LlavakitConfig) -> dict:
    """The encoder image processor's resize/crop/normalise settings, as keyword arguments for an HF Llava(-Next)
    image processor. Unset fields are written as False/None so HF's own defaults (224 px crop) never leak in."""
    ip = processor.image_processor
    fields = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
              "do_normalize", "image_mean", "image_std", "do_convert_rgb")
    kwargs = {f: getattr(ip, f, None) for f in fields}
    kwargs = {k: (bool(v) if k.startswith("do_") else v) for k, v in kwargs.items()
              if v is not None or k.startswith("do_")}
    # HF's processors count image tokens (and cut tiles) from crop_size; without a crop that is the tower's input.
    side = int(config.vision_config.image_size)
    kwargs.setdefault("crop_size", {"height": side, "width": side})
    return kwargs


def _hf_image_processor(processor: LlavakitProcessor, config: LlavakitConfig):
    """The image processor HF's LlavaProcessor should use. LLaVA's `pad` aspect (expand to a square of
    the mean colour, then the tower's usual resize/crop) is llava-hf's `LlavaImageProcessor(do_pad=True)`."""
    ip = processor.image_processor
    if processor.image_aspect == "resize":
        return ip
    if uses_pil_backend(ip):  # keep the backend (PIL or torchvision) the model's processor uses
        from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil as cls
    else:
        from transformers import LlavaImageProcessor as cls
    return cls(do_pad=True, **image_processor_fields(processor, config))


def hf_llava_processor(processor: LlavakitProcessor, config: LlavakitConfig) -> LlavaProcessor:
    strategy, additional = select_strategy(config)
    tokenizer = copy.deepcopy(processor.tokenizer)
    template = chat_template_for(processor)
    tokenizer.chat_template = template  # one template in the folder, not two that disagree
    hp = LlavaProcessor(
        image_processor=_hf_image_processor(processor, config),
        tokenizer=tokenizer,
        patch_size=int(config.vision_config.patch_size),
        vision_feature_select_strategy=strategy,
        chat_template=template,
        image_token=processor.image_token,
        num_additional_image_tokens=additional,
    )
    grid = config.patch_grid
    per_image = grid * grid + additional - (1 if strategy == "default" else 0)
    if per_image != config.image_seq_length:
        raise ValueError(f"HF LlavaProcessor would expand <image> to {per_image} tokens but the model emits "
                         f"{config.image_seq_length} features per image")
    return hp


# --- export ----------------------------------------------------------------------------------------
# Files written only by some exports; `overwrite` removes an old copy so no stale one survives.
_OPTIONAL_FILES = ("chat_template.jinja", "chat_template.json", "preprocessor_config.json")


def prepare_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty; pick a new folder or pass overwrite=True "
                                  "(--overwrite)")
        stale = [p for p in out.iterdir() if p.is_file() and (p.name.startswith(("model", "pytorch_model"))
                                                              or p.name in _OPTIONAL_FILES)]
        for p in stale:  # old shards next to a new index would be read by nobody but confuse everyone
            p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def export_hf_llava(model: LlavakitForConditionalGeneration, processor: LlavakitProcessor, out: str | Path, *,
                    max_shard_size: int | str = "5GB", dtype: torch.dtype | str | None = None,
                    overwrite: bool = False) -> Path:
    """Write `model` + `processor` to `out` as an llava-hf checkpoint. Returns `out`.

    `dtype` casts floating-point weights (default: keep them); shards above `max_shard_size`.
    """
    config = model.config
    dtype = parse_dtype(dtype)
    hf_config = hf_llava_config(config, dtype or model.dtype)  # validates projector + strategy first
    hf_processor = hf_llava_processor(processor, config)
    return write_checkpoint(model, legacy_state_dict(model), hf_config, hf_processor, out, max_shard_size=max_shard_size,
                            dtype=dtype, overwrite=overwrite)


def write_checkpoint(model, state: dict, hf_config, hf_processor, out: str | Path, *, max_shard_size: int | str,
                     dtype: torch.dtype | None, overwrite: bool) -> Path:
    """Write weights `state` (cast to `dtype` when given), `hf_config`, the model's generation config and
    `hf_processor` to `out`, with the transformers 4.x fields next to 5.x's. Returns `out`."""
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    out = Path(out)
    prepare_out_dir(out, overwrite)
    files = write_safetensors(state, out, max_shard_size)
    hf_config.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    hf_processor.save_pretrained(out)
    write_legacy_fields(out, hf_processor.tokenizer)
    log.info("exported %s checkpoint to %s (%d weight file(s), %d tensors)", hf_config.model_type, out, len(files),
             len(state))
    return out


