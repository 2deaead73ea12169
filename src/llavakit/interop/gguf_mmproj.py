"""The vision tower + projector of a llavakit model as a llama.cpp "mmproj" GGUF (clip.cpp / mtmd).

Layout (keys and tensor names from the `gguf` package: `gguf.Keys.Clip*`, `TensorNameMap(MODEL_ARCH.MMPROJ)`),
read by llama.cpp's ``tools/mtmd/clip.cpp`` with projector type ``mlp`` (its LLaVA graph):

    general.architecture = "clip", clip.projector_type = "mlp", clip.has_vision_encoder = true
    clip.vision.{image_size, patch_size, embedding_length, feed_forward_length, block_count,
                 projection_dim, attention.head_count, attention.layer_norm_epsilon, image_mean, image_std}
    clip.use_gelu             true for tanh-GELU towers (SigLIP); false = quick-GELU (CLIP)
    clip.vision.feature_layer the hidden-state indices llavakit takes, made non-negative (0 = the
                              embeddings after the pre-norm, n = after layer n), ascending
    v.patch_embd, v.class_embd (CLIP), v.position_embd, v.pre_ln (CLIP), v.blk.{i}.*
    mm.0 / mm.2               the projector's linear_1 / linear_2 (LLaVA's nn.Sequential indices; GELU between)

Only the layers up to the deepest feature layer are written (clip.cpp never runs the others), and the
tower's post-layernorm and SigLIP's pooling head are left out: LLaVA uses raw hidden states.

`llamacpp_clip_order(model)` makes llavakit compute what llama.cpp's LLaVA graph computes for a CLIP tower
(CLS token last, ggml-org/llama.cpp#25814), to measure that runtime difference without llama.cpp.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch

from .gguf_text import file_type, write_tensors_and_close

log = logging.getLogger(__name__)

# vision model_type -> has a CLS token the tower puts first
VISION_TOWERS = {"clip_vision_model": True, "siglip_vision_model": False}
# HF hidden_act -> clip.use_gelu (clip.cpp: true = ggml_gelu (tanh approximation), false = quick GELU)
VISION_ACTS = {"quick_gelu": False, "gelu_pytorch_tanh": True, "gelu_new": True, "gelu": True}
# llavakit projector -> what clip.cpp's "mlp" graph computes: mm.0 -> GELU -> mm.2
GGUF_PROJECTORS = ("mlp2x_gelu",)


def feature_layers_for_gguf(config) -> list[int]:
    """llavakit's vision_feature_layer(s) as clip.cpp's non-negative, ascending indices."""
    n = int(config.vision_config.num_hidden_layers)
    layers = [x if x >= 0 else n + 1 + x for x in config.feature_layers]
    if any(not 0 <= x <= n for x in layers):
        raise ValueError(f"vision_feature_layer={config.vision_feature_layer} is out of range for a tower with {n} "
                         "layers")
    if layers != sorted(set(layers)):
        raise ValueError(
            f"vision_feature_layer={config.vision_feature_layer}: llama.cpp concatenates feature layers in "
            "ascending order without repeats; this list (as indices " f"{layers}) would be concatenated differently")
    return layers


def check_mmproj(model, processor) -> list[str]:
    """Raise ValueError if llama.cpp cannot run this tower/projector as llavakit does; returns warnings."""
    cfg = model.config
    vc = cfg.vision_config
    warnings = []
    if cfg.projector not in GGUF_PROJECTORS:
        raise ValueError(f"projector {cfg.projector!r} cannot be exported to GGUF: llama.cpp's LLaVA projector is "
                         f"linear -> GELU -> linear. Exportable projectors: {', '.join(GGUF_PROJECTORS)}")
    if vc.model_type not in VISION_TOWERS:
        raise ValueError(f"vision tower {vc.model_type!r} cannot be exported to GGUF; supported: "
                         f"{', '.join(VISION_TOWERS)} (CLIP, SigLIP)")
    if getattr(cfg, "image_tokens", "base") != "base":
        raise ValueError(f"image_tokens={cfg.image_tokens!r} (unpadded, size-dependent token counts) cannot be "
                         "exported to GGUF; llama.cpp's LLaVA-1.5 path gives every image the full grid")
    has_cls = VISION_TOWERS[vc.model_type]
    if int(cfg.vision_prefix_tokens) != (1 if has_cls else 0):
        raise ValueError(f"the tower puts {cfg.vision_prefix_tokens} tokens before its patches; llama.cpp expects "
                         f"{1 if has_cls else 0} for {vc.model_type}")
    if cfg.vision_feature_select != "patch" and has_cls:
        raise ValueError("vision_feature_select='cls_patch' keeps CLIP's CLS token, but llama.cpp's LLaVA graph "
                         "always drops it; only 'patch' can be exported to GGUF")
    act = getattr(vc, "hidden_act", "quick_gelu")
    if act not in VISION_ACTS:
        raise ValueError(f"vision hidden_act={act!r} has no clip.cpp equivalent; supported: {', '.join(VISION_ACTS)}")
    if act == "gelu":
        warnings.append("the tower uses exact (erf) GELU; clip.cpp computes the tanh approximation, so image "
                        "features differ slightly")
    if int(vc.intermediate_size) == int(vc.hidden_size):
        raise ValueError("the tower's intermediate_size equals its hidden_size; clip.cpp then mistakes fc1/fc2 for "
                         "a legacy swapped layout and exchanges them, so it cannot run this tower")
    if int(vc.image_size) % int(vc.patch_size):
        raise ValueError(f"image_size {vc.image_size} is not a multiple of patch_size {vc.patch_size}")
    feature_layers_for_gguf(cfg)
    ip = processor.image_processor
    for field in ("image_mean", "image_std"):
        if not getattr(ip, field, None) or len(getattr(ip, field)) != 3:
            raise ValueError(f"the image processor has no 3-channel {field}; GGUF stores it for clip.cpp")
    if has_cls:
        warnings.append("llama.cpp's LLaVA graph (tools/mtmd/models/llava.cpp, up to at least the llama.cpp in "
                        "llama-cpp-python 0.3.36) puts CLIP's CLS token after the patches, shifting position "
                        "embeddings (ggml-org/llama.cpp#25814, fix in #25844): EVERY image's features in llama.cpp "
                        "differ from llavakit's by about their own size (not rounding), so answers can differ even "
                        "where llavakit's top-2 margin is several logits. No export layout avoids it; "
                        "llavakit.interop.gguf_mmproj.llamacpp_clip_order(model) makes llavakit compute what "
                        "llama.cpp does, to measure the effect (docs/gguf.md). SigLIP towers are not affected.")
    return warnings


@contextmanager
def llamacpp_clip_order(model):
    """Within this block llavakit's CLIP tower computes what llama.cpp's LLaVA graph computes today
    (ggml-org/llama.cpp#25814): the CLS token *after* the patches, position rows 0..n added in that order, so
    patch i gets row i instead of i + 1 and the CLS token takes row n. With 'patch' select llavakit then keeps
    tokens 1..n as llama.cpp does: patches 1..n-1 and the CLS token, patch 0 dropped.

    For measuring the runtime's effect (features, answers) in llavakit; SigLIP towers (no CLS) are unchanged.
    """
    if not VISION_TOWERS.get(model.config.vision_config.model_type, False):
        yield model
        return
    emb = getattr(model.vision_tower, "vision_model", model.vision_tower).embeddings
    pos = emb.position_embedding.weight  # [n+1, D]: row 0 is CLS's

    def hook(module, args, output):
        plain = output - pos  # [B, n+1, D]: CLS first, then the patches, no positions
        return torch.cat([plain[:, 1:], plain[:, :1]], dim=1) + pos

    handle = emb.register_forward_hook(hook)
    try:
        yield model
    finally:
        handle.remove()


def _tower_state(model) -> dict[str, torch.Tensor]:
    """The tower's weights under 'vision_tower.vision_model.*' (the names gguf's TensorNameMap knows)."""
    tower = model.vision_tower
    sd = tower.state_dict()
    out = {}
    for k, v in sd.items():
        k = k if k.startswith("vision_model.") else "vision_model." + k
        out["vision_tower." + k] = v
    return out


def mmproj_tensors(model) -> list[tuple[str, torch.Tensor]]:
    import gguf

    cfg = model.config
    keep = max(feature_layers_for_gguf(cfg))
    names = gguf.TensorNameMap(gguf.MODEL_ARCH.MMPROJ, int(cfg.vision_config.num_hidden_layers))
    out = []
    skipped = []
    for key, t in _tower_state(model).items():
        rest = key.removeprefix("vision_tower.vision_model.")
        if rest.startswith(("post_layernorm.", "head.")) or key.endswith("position_ids"):
            skipped.append(key)
            continue
        if rest.startswith("encoder.layers."):
            if int(rest.split(".")[2]) >= keep:
                continue  # never run: deeper than the deepest feature layer
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"no mmproj GGUF name for the vision weight {key!r}")
        out.append((name, t))
    for i in (1, 2):
        lin = getattr(model.multi_modal_projector, f"linear_{i}")
        idx = 0 if i == 1 else 2  # LLaVA's nn.Sequential(Linear, GELU, Linear) indices, as clip.cpp reads them
        out += [(f"mm.{idx}.weight", lin.weight), (f"mm.{idx}.bias", lin.bias)]
    log.debug("mmproj: left out %s", ", ".join(skipped))
    return out


def _mmproj_qtype(name: str, qtype: str) -> str:
    # The class token and position table stay f32 (clip.cpp concatenates/adds them to f32 activations);
    # the patch convolution is f16 unless everything is f32.
    if name.startswith(("v.position_embd", "v.class_embd")):
        return "f32"
    if name.startswith("v.patch_embd"):
        return "f32" if qtype == "f32" else "f16"
    return qtype


def write_mmproj_gguf(path, model, processor, qtype: str, name: str = "llavakit") -> None:
    import gguf

    cfg = model.config
    vc = cfg.vision_config
    layers = feature_layers_for_gguf(cfg)
    tensors = mmproj_tensors(model)
    ip = processor.image_processor
    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ])
    try:
        w.add_type(gguf.GGUFType.MMPROJ)
        w.add_name(name)
        w.add_file_type(file_type(qtype))
        w.add_clip_has_vision_encoder(True)
        w.add_bool(gguf.Keys.Clip.HAS_LLAVA_PROJECTOR, True)
        w.add_clip_projector_type(gguf.VISION_PROJECTOR_TYPE_NAMES[gguf.VISION_PROJECTOR_TYPE.MLP])
        w.add_vision_image_size(int(vc.image_size))
        w.add_vision_patch_size(int(vc.patch_size))
        w.add_vision_embedding_length(int(vc.hidden_size))
        w.add_vision_feed_forward_length(int(vc.intermediate_size))
        w.add_vision_block_count(max(layers))
        w.add_vision_head_count(int(vc.num_attention_heads))
        w.add_vision_attention_layernorm_eps(float(vc.layer_norm_eps))
        w.add_vision_projection_dim(int(cfg.text_config.hidden_size))
        w.add_vision_image_mean([float(x) for x in ip.image_mean])
        w.add_vision_image_std([float(x) for x in ip.image_std])
        w.add_vision_use_gelu(VISION_ACTS[vc.hidden_act])
        w.add_array(gguf.Keys.ClipVision.FEATURE_LAYER if hasattr(gguf.Keys.ClipVision, "FEATURE_LAYER")
                    else "clip.vision.feature_layer", [int(x) for x in layers])
    except BaseException:
        w.close()
        raise
    write_tensors_and_close(w, tensors, lambda name: _mmproj_qtype(name, qtype))
