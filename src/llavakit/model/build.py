"""Assemble a new LLaVA model from pretrained components, and open a saved one.

`build` is LLaVA's "surgery" done once and checked: load the vision encoder and the LLM by hub id or
path through the Auto classes, add `<image>` (and a pad token when the tokenizer has none), grow the
embeddings with the new rows set to the mean of the old ones, put a fresh projector between them,
and refuse to continue if any component weight is missing or unexpected.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForCausalLM, AutoTokenizer

from ..data.conversation import IMAGE_MARKER
from .config import LlavakitConfig, parse_dtype
from .modeling import LlavakitForConditionalGeneration
from .processor import LlavakitProcessor

log = logging.getLogger(__name__)

IMAGE_TOKEN = IMAGE_MARKER  # the one marker text, defined with the conversation
PAD_TOKEN = "<pad>"

# Weights of the *other* tower of a dual encoder (CLIP/SigLIP text side). When only the vision
# tower of such a checkpoint is loaded these are expected to be left over; nothing else is.
_OTHER_TOWER_PREFIXES = ("text_model.", "text_projection", "visual_projection", "logit_scale", "logit_bias")


class ComponentWeightsError(RuntimeError):
    """A component checkpoint does not match its architecture."""


def _check_loading(name: str, source, info: dict, dual_encoder: bool) -> None:
    missing = sorted(info.get("missing_keys") or [])
    unexpected = sorted(info.get("unexpected_keys") or [])
    mismatched = sorted(str(k) for k in (info.get("mismatched_keys") or []))
    if dual_encoder:
        unexpected = [k for k in unexpected if not k.startswith(_OTHER_TOWER_PREFIXES)]
    if missing or unexpected or mismatched:
        def show(keys):
            return ", ".join(keys[:20]) + (f" … (+{len(keys) - 20} more)" if len(keys) > 20 else "")
        lines = [f"the {name} checkpoint {source} does not match its architecture:"]
        if missing:
            lines.append(f"  missing weights ({len(missing)}): {show(missing)}")
        if unexpected:
            lines.append(f"  unexpected weights ({len(unexpected)}): {show(unexpected)}")
        if mismatched:
            lines.append(f"  shape-mismatched weights ({len(mismatched)}): {show(mismatched)}")
        lines.append("Check that the path/id points at a complete checkpoint of this model type.")
        raise ComponentWeightsError("\n".join(lines))


def vision_config_of(cfg):
    """The vision part of a config: a dual encoder's (CLIP/SigLIP) `vision_config`, else itself."""
    sub = getattr(cfg, "vision_config", None)
    return (sub, True) if sub is not None else (cfg, False)


@contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)


def load_vision_tower(vision: str | Path, dtype=None, **hub_kwargs):
    cfg, dual = vision_config_of(AutoConfig.from_pretrained(vision, **hub_kwargs))
    model_cls = AutoModel._model_mapping[type(cfg)]
    quiet = _quiet_transformers() if dual else nullcontext()
    with quiet:  # the other tower's weights are expected leftovers; real problems are raised just below
        tower, info = model_cls.from_pretrained(vision, config=cfg, dtype=dtype, output_loading_info=True,
                                                **hub_kwargs)
    _check_loading("vision", vision, info, dual)
    return tower


def load_language_model(llm: str | Path, dtype=None, quantization_config=None, **hub_kwargs):
    if quantization_config is not None:
        hub_kwargs["quantization_config"] = quantization_config
    lm, info = AutoModelForCausalLM.from_pretrained(llm, dtype=dtype, output_loading_info=True, **hub_kwargs)
    _check_loading("language model", llm, info, dual_encoder=False)
    return lm


def count_prefix_tokens(tower, vision_config) -> int:
    """Tokens the tower emits before its patch grid (CLIP: 1 CLS, SigLIP: 0), from a dry forward."""
    size = int(vision_config.image_size)
    with torch.device("meta"):
        dummy = torch.zeros(1, int(getattr(vision_config, "num_channels", 3)), size, size)
    try:
        out = tower(dummy.to(device="meta"), return_dict=True)
        seq = out.last_hidden_state.shape[1]
    except Exception:  # meta execution unsupported by some towers: run a real tiny forward
        p = next(tower.parameters())
        with torch.no_grad():
            seq = tower(torch.zeros(1, 3, size, size, dtype=p.dtype, device=p.device), return_dict=True
                        ).last_hidden_state.shape[1]
    return int(seq) - (size // int(vision_config.patch_size)) ** 2


def _add_tokens_and_resize(tokenizer, lm) -> list[int]:
    """Add <image> (+ <pad> if missing); new embedding rows = mean of the old rows."""
    specials = [IMAGE_TOKEN]
    if tokenizer.pad_token is None:
        specials.append(PAD_TOKEN)
    tokenizer.add_special_tokens({"additional_special_tokens": specials}, replace_extra_special_tokens=False)
    if PAD_TOKEN in specials:
        tokenizer.pad_token = PAD_TOKEN
    new_ids = tokenizer.convert_tokens_to_ids(specials)
    emb = lm.get_input_embeddings()
    old_rows = emb.weight.shape[0]
    if max(new_ids) >= old_rows:
        lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        ref = min(old_rows, min(new_ids))  # rows that existed and were trained
        for layer in {id(lm.get_input_embeddings()): lm.get_input_embeddings(),
                      id(lm.get_output_embeddings()): lm.get_output_embeddings()}.values():
            if layer is None:
                continue
            w = layer.weight
            w[new_ids] = w[:ref].float().mean(0, keepdim=True).to(w.dtype)
            if getattr(layer, "bias", None) is not None:
                layer.bias[new_ids] = layer.bias[:ref].float().mean().to(layer.bias.dtype)
    return new_ids


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
    _add_tokens_and_resize(tokenizer, lm)
    tokenizer.padding_side = "left"  # the processor serves generation; training collators pad themselves

    config = LlavakitConfig(
        vision_config=tower.config,
        text_config=lm.config,
        projector=projector,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select=vision_feature_select,
        vision_prefix_tokens=count_prefix_tokens(tower, tower.config),
        image_tokens=image_tokens,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        pad_token_id=tokenizer.pad_token_id,
        components={"vision": str(vision), "llm": str(llm)},
    )
    if attn_implementation:
        config._attn_implementation = attn_implementation
    # Build the shell on the meta device (no second copy of the LLM in memory), then put the loaded
    # components in and materialise only the new projector.
    with torch.device("meta"):
        model = LlavakitForConditionalGeneration(config)
    model.vision_tower = tower
    model.language_model = lm
    model.config.vision_config = tower.config
    model.config.text_config = lm.config
    device = next(lm.parameters()).device
    model.multi_modal_projector.to_empty(device=device)
    for m in model.multi_modal_projector.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    proj_dtype = lm.get_input_embeddings().weight.dtype  # 4-bit LLMs keep embeddings in full precision
    model.multi_modal_projector.to(dtype=proj_dtype)
    model.vision_tower.requires_grad_(False)  # frozen unless a training recipe unfreezes it
    model.generation_config = lm.generation_config
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    processor = LlavakitProcessor(image_processor, tokenizer, image_token=IMAGE_TOKEN,
                                  image_seq_length=config.image_seq_length, image_aspect=image_aspect,
                                  chat_template=tokenizer.chat_template, tokenization="llm",
                                  image_tokens=image_tokens)
    log.info("built llavakit model: %s + %s, projector %s, %d tokens per image",
             vision, llm, projector, config.image_seq_length)
    return model, processor


def load(path: str | Path, dtype: torch.dtype | str | None = None, device_map=None,
         attn_implementation: str | None = None, **hub_kwargs):
    """Open a saved model: llavakit's own, or an llava-hf / original-LLaVA checkpoint (imported).

    Returns (model, processor)."""
    from llavakit.interop import checkpoint_format, open_checkpoint

    if checkpoint_format(path) != "llavakit":
        return open_checkpoint(path, dtype=dtype)
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
