"""The steps every way of making a llavakit model shares: check a loaded component, add the image token,
measure the tower's prefix tokens, and put tower + projector + LLM together with their processor.

`build` (new models), the llava-hf importer and the original-LLaVA importer all end in `assemble`, so a
model made any of the three ways is put together, frozen and configured the same way.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch

from ..data.conversation import IMAGE_MARKER
from ..data.video import VIDEO_MARKER
from .config import TILED_POLICIES, LlavakitConfig
from .modeling import LlavakitForConditionalGeneration
from .processor import LlavakitProcessor, encoder_input_size, token_id_or_none

log = logging.getLogger(__name__)

IMAGE_TOKEN = IMAGE_MARKER  # the one marker text, defined with the conversation
VIDEO_TOKEN = VIDEO_MARKER  # anyres_max models only (LLaVA-OneVision's video rule), defined with the video reader
PAD_TOKEN = "<pad>"

# Weights of the *other* tower of a dual encoder (CLIP/SigLIP text side). When only the vision
# tower of such a checkpoint is loaded these are expected to be left over; nothing else is.
OTHER_TOWER_PREFIXES = ("text_model.", "text_projection", "visual_projection", "logit_scale", "logit_bias")


class ComponentWeightsError(ValueError, RuntimeError):
    """A checkpoint does not match its architecture (weights missing, unexpected or of the wrong shape).

    A ValueError (bad input) and, as before, a RuntimeError."""


def check_loading(what: str, source, info: dict, *, ignore_unexpected: tuple[str, ...] = (),
                  hint: str = "Check that the path/id points at a complete checkpoint of this model type.") -> None:
    """Raise `ComponentWeightsError` listing every problem in a transformers `output_loading_info` dict.

    `what` names the checkpoint ("the vision checkpoint"), `ignore_unexpected` lists key prefixes that
    may be left over (the other tower of a dual encoder)."""
    missing = sorted(str(k) for k in (info.get("missing_keys") or []))
    unexpected = sorted(str(k) for k in (info.get("unexpected_keys") or []) if not str(k).startswith(ignore_unexpected))
    mismatched = sorted(str(k) for k in (info.get("mismatched_keys") or []))
    if not (missing or unexpected or mismatched):
        return

    def show(keys):
        return ", ".join(keys[:20]) + (f" … (+{len(keys) - 20} more)" if len(keys) > 20 else "")

    lines = [f"{what} {source} does not match its architecture:"]
    if missing:
        lines.append(f"  missing weights ({len(missing)}): {show(missing)}")
    if unexpected:
        lines.append(f"  unexpected weights ({len(unexpected)}): {show(unexpected)}")
    if mismatched:
        lines.append(f"  shape-mismatched weights ({len(mismatched)}): {show(mismatched)}")
    lines.append(hint)
    raise ComponentWeightsError("\n".join(lines))


def vision_config_of(cfg):
    """(the vision part of a config, whether it is a dual encoder): CLIP/SigLIP's `vision_config`, else itself."""
    sub = getattr(cfg, "vision_config", None)
    return (sub, True) if sub is not None else (cfg, False)


@contextmanager
def quiet_transformers():
    """transformers' own logging at error level inside the block (expected leftovers are checked by us)."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)


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


def add_image_tokens(tokenizer, lm, video: bool = False) -> list[int]:
    """Add `<image>` (+ `<video>` with `video`, + `<pad>` when the tokenizer has no pad token); new embedding rows
    = mean of the old rows.

    Returns the new tokens' ids."""
    specials = [IMAGE_TOKEN] + ([VIDEO_TOKEN] if video else [])
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


def assemble(tower, lm, tokenizer, image_processor, *, projector: str, vision_feature_layer,
             vision_feature_select: str, components: dict, projector_weights: dict | None = None,
             image_token: str = IMAGE_TOKEN, image_token_id: int | None = None, image_aspect: str = "resize",
             image_tokens: str = "base", tokenization: str = "llm", chat_template: str | None = None,
             attn_implementation: str | None = None, generation_config=None, video_token: str = VIDEO_TOKEN,
             video_token_id: int | None = None, image_grid_pinpoints: list[list[int]] | None = None,
             anyres_max_tiles: int | None = None):
    """(model, processor) from loaded parts: the vision `tower`, a causal `lm` whose tokenizer already has
    `image_token`, and their processors.

    ``image_grid_pinpoints`` ([height, width] px, multiples of the encoder's input size; None = the policy's
    default) and ``anyres_max_tiles`` (N of ``anyres_max_N``; None = 9) go to the model config and the processor
    alike; they are for the tiled policies only (a ValueError otherwise).

    The model shell is built on the meta device (no second copy of the LLM in memory); the parts go in,
    and the projector gets `projector_weights` (a state dict) or, when None, a fresh initialisation. The
    tower is frozen (a training recipe may unfreeze it). `generation_config` defaults to the LLM's, with the
    tokenizer's pad token."""
    if image_token_id is None:
        image_token_id = tokenizer.convert_tokens_to_ids(image_token)
    if video_token_id is None and image_tokens == "anyres_max":  # videos only under OneVision's policy
        video_token_id = token_id_or_none(tokenizer, video_token)
    check_policy_keys(image_tokens, image_grid_pinpoints, anyres_max_tiles)
    if image_grid_pinpoints is not None:
        tile, side = int(tower.config.image_size), encoder_input_size(image_processor)
        if side != tile:
            raise ValueError(f"image_grid_pinpoints: the image processor's input size {side} differs from the "
                             f"encoder's {tile}")
    config = LlavakitConfig(
        vision_config=tower.config,
        text_config=lm.config,
        projector=projector,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select=vision_feature_select,
        vision_prefix_tokens=count_prefix_tokens(tower, tower.config),
        image_tokens=image_tokens,
        image_grid_pinpoints=image_grid_pinpoints,
        anyres_max_tiles=9 if anyres_max_tiles is None else anyres_max_tiles,
        image_token_id=image_token_id,
        video_token_id=video_token_id if image_tokens == "anyres_max" else None,
        pad_token_id=tokenizer.pad_token_id,
        components=components,
    )
    if attn_implementation:
        config._attn_implementation = attn_implementation
    with torch.device("meta"):
        model = LlavakitForConditionalGeneration(config)
    model.vision_tower = tower
    model.language_model = lm
    model.config.vision_config = tower.config
    model.config.text_config = lm.config
    proj = model.multi_modal_projector
    proj_dtype = lm.get_input_embeddings().weight.dtype  # 4-bit LLMs keep embeddings in full precision
    if projector_weights is None:
        proj.to_empty(device=lm.get_input_embeddings().weight.device)
        for m in proj.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
        proj.to(dtype=proj_dtype)
    else:
        try:
            proj.load_state_dict({k: v.to(proj_dtype) for k, v in projector_weights.items()}, strict=True,
                                 assign=True)
        except RuntimeError as e:
            source = components.get("projector") or next(iter(components.values()), "the checkpoint")
            raise ValueError(f"projector weights from {source} do not fit a {projector!r} projector between the "
                             f"tower and the LLM: {e}") from e
    on_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if on_meta:
        raise RuntimeError(f"assembling the model left weights without values: {', '.join(on_meta[:10])}")
    model.vision_tower.requires_grad_(False)
    if generation_config is None:  # the LLM's, padding with the tokenizer's pad token
        generation_config = lm.generation_config
        generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config = generation_config
    processor = LlavakitProcessor(image_processor, tokenizer, image_token=image_token,
                                  image_seq_length=config.image_seq_length, image_aspect=image_aspect,
                                  chat_template=chat_template, tokenization=tokenization, image_tokens=image_tokens,
                                  video_token=video_token, image_grid_pinpoints=config.image_grid_pinpoints,
                                  anyres_max_tiles=config.anyres_max_tiles)
    return model, processor


def check_policy_keys(image_tokens: str, image_grid_pinpoints, anyres_max_tiles) -> None:
    """ValueError when pinpoints / N are given to a policy that does not use them."""
    if image_grid_pinpoints is not None and image_tokens not in TILED_POLICIES:
        raise ValueError(f"image_grid_pinpoints is only used with image_tokens {list(TILED_POLICIES)}, not "
                         f"{image_tokens!r}")
    if anyres_max_tiles is not None and image_tokens != "anyres_max":
        raise ValueError(f"anyres_max_tiles is only used with image_tokens 'anyres_max', not {image_tokens!r}")
