"""Assemble a new LLaVA model from pretrained components, and open a saved one.

`build` is LLaVA's "surgery" done once and checked: load the vision encoder and the LLM by hub id or
path through the Auto classes, add `<image>` (`<video>` too for an ``anyres_max`` model, and a pad token when the
tokenizer has none), grow the embeddings with the new rows set to the mean of the old ones, put a fresh projector
between them, and refuse to continue if any component weight is missing or unexpected.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path

import torch
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForCausalLM, AutoTokenizer

from .assemble import (IMAGE_TOKEN, OTHER_TOWER_PREFIXES, ComponentWeightsError, add_image_tokens, assemble, check_loading,
                       check_policy_keys, count_prefix_tokens, quiet_transformers, vision_config_of)
from .config import LlavakitConfig, parse_dtype
from .modeling import LlavakitForConditionalGeneration
from .processor import LlavakitProcessor

log = logging.getLogger(__name__)

__all__ = ["IMAGE_TOKEN", "ComponentWeightsError", "build", "build_on_meta", "gguf_source", "load_language_model",
           "load_saved", "load_tokenizer", "load_vision_tower"]


def load_vision_tower(vision: str | Path, dtype=None, **hub_kwargs):
    cfg, dual = vision_config_of(AutoConfig.from_pretrained(vision, **hub_kwargs))
    model_cls = AutoModel._model_mapping[type(cfg)]
    quiet = quiet_transformers() if dual else nullcontext()
    with quiet:  # the other tower's weights are expected leftovers; real problems are raised just below
        tower, info = model_cls.from_pretrained(vision, config=cfg, dtype=dtype, output_loading_info=True,
                                                **hub_kwargs)
    check_loading("the vision checkpoint", vision, info, ignore_unexpected=OTHER_TOWER_PREFIXES if dual else ())
    return tower


# Options only the LLM's loader understands: given to `build` with the shared hub options, they go to the LLM alone.
LLM_ONLY_OPTIONS = ("gguf_file", "quantization_config")


def gguf_source(llm: str | Path, gguf_file: str | None = None) -> tuple[Path, str] | None:
    """(folder, file name) when `llm` is a GGUF file, or a folder holding one GGUF file and no config.json
    (or `gguf_file` names it); None for an ordinary checkpoint."""
    p = Path(llm)
    if gguf_file:
        return (p, gguf_file) if p.is_dir() else None
    if p.is_file() and p.suffix.lower() == ".gguf":
        return p.parent, p.name
    if p.is_dir() and not (p / "config.json").is_file():
        found = sorted(f.name for f in p.glob("*.gguf"))
        if len(found) > 1:
            raise ValueError(f"{p} holds {len(found)} GGUF files ({', '.join(found)}); pass the one to use as "
                             f"llm={p / found[0]}")
        if found:
            return p, found[0]
    return None


def _require_gguf(path) -> None:
    try:
        import gguf  # noqa: F401  (transformers reads GGUF files with it)
    except ImportError as e:
        raise ImportError(f"{path} is a GGUF file; reading it needs the 'gguf' package: "
                          "pip install 'llavakit[gguf]'") from e


def _load_gguf_llm(folder: Path, name: str, dtype, hub_kwargs):
    """A GGUF LLM, dequantised by transformers, as an ordinary (saveable, trainable) model in `dtype`.

    transformers marks a model read from GGUF as quantized (it refuses `save_pretrained`); the weights it
    holds are already dequantised, so the model is rebuilt from its config without the quantization entry
    and given those weights."""
    _require_gguf(folder / name)
    with quiet_transformers():
        read = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype or torch.float32,
                                                    **hub_kwargs)
    config = read.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    lm, info = type(read).from_pretrained(None, config=config, state_dict=read.state_dict(),
                                          dtype=dtype or torch.float32, output_loading_info=True)
    if getattr(config, "tie_word_embeddings", False):  # the head is the embedding, re-tied by the loader
        info["missing_keys"] = [k for k in info.get("missing_keys") or [] if k != "lm_head.weight"]
    check_loading("the GGUF language model", folder / name, info)
    lm.generation_config = read.generation_config
    return lm


def load_language_model(llm: str | Path, dtype=None, quantization_config=None, **hub_kwargs):
    """A causal LM from a hub id, a folder, or a GGUF file (dequantised to `dtype`, default float32)."""
    gguf = gguf_source(llm, hub_kwargs.pop("gguf_file", None))
    if gguf is not None:
        if quantization_config is not None:
            raise ValueError(f"{llm}: quantization_config applies to full-precision checkpoints; a GGUF LLM is "
                             "dequantised on loading")
        return _load_gguf_llm(*gguf, dtype, hub_kwargs)
    if quantization_config is not None:
        hub_kwargs["quantization_config"] = quantization_config
    lm, info = AutoModelForCausalLM.from_pretrained(llm, dtype=dtype, output_loading_info=True, **hub_kwargs)
    check_loading("the language model checkpoint", llm, info)
    return lm


def load_tokenizer(llm: str | Path, **hub_kwargs):
    """The LLM's tokenizer: from its folder / hub id, or from the GGUF file's own vocabulary."""
    gguf = gguf_source(llm, hub_kwargs.pop("gguf_file", None))
    if gguf is not None:
        _require_gguf(gguf[0] / gguf[1])
        return AutoTokenizer.from_pretrained(gguf[0], gguf_file=gguf[1], **hub_kwargs)
    return AutoTokenizer.from_pretrained(llm, **hub_kwargs)


def build(vision: str | Path, llm: str | Path, projector: str = "mlp2x_gelu", *,
          vision_feature_layer: int | list[int] = -2, vision_feature_select: str = "patch",
          image_aspect: str = "resize", image_tokens: str = "base", dtype: torch.dtype | str | None = None,
          attn_implementation: str | None = None, llm_quantization_config=None, vision_kwargs: dict | None = None,
          llm_kwargs: dict | None = None, image_grid_pinpoints: list[list[int]] | None = None,
          anyres_max_tiles: int | None = None, **hub_kwargs):
    """A new (model, processor) from a vision encoder and a causal LM, each a hub id or a local path; the
    LLM may also be a GGUF file (or a folder with one), read through transformers and dequantised to `dtype`.

    The projector is freshly initialised; everything else keeps its pretrained weights. `hub_kwargs`
    (`revision`, `token`, `cache_dir`, ...) go to both components' loaders; `vision_kwargs` / `llm_kwargs` to
    one of them only (they win over `hub_kwargs`). LLM-only options given with the shared ones
    (`gguf_file`, `quantization_config`) go to the LLM. ``image_grid_pinpoints`` / ``anyres_max_tiles`` (tiled
    policies only; None = the policy's defaults) are recorded in the model config and the processor (`assemble`).
    """
    check_policy_keys(image_tokens, image_grid_pinpoints, anyres_max_tiles)  # before anything loads
    dtype = parse_dtype(dtype)
    shared = {k: v for k, v in hub_kwargs.items() if k not in LLM_ONLY_OPTIONS}
    vision_kwargs = {**shared, **(vision_kwargs or {})}
    llm_kwargs = {**hub_kwargs, **(llm_kwargs or {})}
    tower = load_vision_tower(vision, dtype=dtype, **vision_kwargs)
    lm = load_language_model(llm, dtype=dtype, quantization_config=llm_quantization_config, **llm_kwargs)
    tokenizer = load_tokenizer(llm, **{k: v for k, v in llm_kwargs.items() if k != "quantization_config"})
    image_processor = AutoImageProcessor.from_pretrained(vision, **vision_kwargs)
    add_image_tokens(tokenizer, lm, video=image_tokens == "anyres_max")  # OneVision's policy takes videos too
    tokenizer.padding_side = "left"  # the processor serves generation; training collators pad themselves
    model, processor = assemble(
        tower, lm, tokenizer, image_processor, projector=projector, vision_feature_layer=vision_feature_layer,
        vision_feature_select=vision_feature_select, image_aspect=image_aspect, image_tokens=image_tokens,
        components={"vision": str(vision), "llm": str(llm)}, chat_template=tokenizer.chat_template,
        attn_implementation=attn_implementation, image_grid_pinpoints=image_grid_pinpoints,
        anyres_max_tiles=anyres_max_tiles)
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
