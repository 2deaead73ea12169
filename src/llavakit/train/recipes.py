"""Stages are data: what trains, at which learning rate, applied by one function.

| stage    | vision tower              | projector | LLM                       |
|----------|---------------------------|-----------|---------------------------|
| pretrain | frozen                    | trains    | frozen                    |
| finetune | frozen (or `train_vision`)| trains    | trains                    |
| lora     | frozen (or `train_vision`)| trains    | frozen + LoRA adapters    |
| qlora    | frozen                    | trains    | 4-bit NF4 + LoRA adapters |
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ConfigError, RunConfig

log = logging.getLogger(__name__)

# stage -> which parts train (the LLM entry: "full", "lora" or None)
STAGE_TABLE = {
    "pretrain": {"projector": True, "llm": None, "vision_allowed": False},
    "finetune": {"projector": True, "llm": "full", "vision_allowed": True},
    "lora": {"projector": True, "llm": "lora", "vision_allowed": True},
    "qlora": {"projector": True, "llm": "lora", "vision_allowed": False},
}

PROJECTOR_FILE = "projector.safetensors"


@dataclass
class ParamGroup:
    name: str
    params: list
    lr: float


def check_qlora_available() -> None:
    if not torch.cuda.is_available():
        raise ConfigError(
            "stage 'qlora' loads the LLM in 4-bit with bitsandbytes, which needs a CUDA GPU; none is "
            "available here. Use stage: lora (same adapters, full-precision base) or run on a GPU machine."
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ConfigError("stage 'qlora' needs bitsandbytes: pip install 'llavakit[qlora]'") from e


def is_stage1_run(path: Path) -> bool:
    return (path / PROJECTOR_FILE).is_file() and (path / "config.yaml").is_file()


def assemble(cfg: RunConfig):
    """(model, processor) for this run: new from components, or continued from `init_from`."""
    import yaml

    import llavakit
    from llavakit.model.build import build

    m = cfg.model
    quant = None
    if cfg.train.stage == "qlora":
        check_qlora_available()
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
    build_kwargs = dict(projector=m.projector, vision_feature_layer=m.vision_feature_layer,
                        vision_feature_select=m.vision_feature_select, image_aspect=m.image_aspect,
                        image_tokens=m.image_tokens, dtype=m.dtype, attn_implementation=m.attn_implementation)
    if m.trust_remote_code:
        build_kwargs["trust_remote_code"] = True
    if quant is not None:
        build_kwargs["llm_quantization_config"] = quant
    build_kwargs.update(image_grid_pinpoints=m.image_grid_pinpoints, anyres_max_tiles=m.anyres_max_tiles)
    if m.init_from is None:
        return build_with_policy(build, m.vision, m.llm, build_kwargs)
    src = Path(m.init_from)
    if is_stage1_run(src):
        # Stage 2 from stage 1: same components, projector weights from the stage-1 run.
        prev = yaml.safe_load((src / "config.yaml").read_text())["model"]
        for key in ("projector", "vision_feature_layer", "vision_feature_select"):  # must match the weights
            build_kwargs[key] = prev[key]
        model, processor = build_with_policy(build, m.vision or prev["vision"], m.llm or prev["llm"], build_kwargs)
        load_projector(model, src / PROJECTOR_FILE)
        return model, processor
    if (src / "config.json").is_file():
        model, processor = llavakit.load(src, dtype=m.dtype, attn_implementation=m.attn_implementation)
        have = getattr(model.config, "image_tokens", "base")
        if m.image_tokens != "base" and m.image_tokens != have:
            raise ConfigError(f"model.image_tokens={m.image_tokens!r}, but {src} is an image_tokens: {have} model "
                              "(its weights fix the policy: a tiled policy needs the row newline). Remove the key, or "
                              "start from a stage-1 run directory, which may change the policy")
        return apply_image_policy(model, processor, m) if have == m.image_tokens else (model, processor)
    raise ConfigError(
        f"model.init_from={src} is neither a stage-1 run directory (with {PROJECTOR_FILE} and config.yaml) "
        "nor a model directory with config.json"
    )


def build_with_policy(build, vision, llm, build_kwargs: dict):
    """`build` with the recipe's pinpoints / N (which it records in the model config and the processor); pinpoints
    that do not fit the encoder are a ConfigError naming the key."""
    try:
        return build(vision, llm, **build_kwargs)
    except ValueError as e:
        if str(e).startswith("image_grid_pinpoints"):
            raise ConfigError(f"model.image_grid_pinpoints: {e}") from None
        raise


def apply_image_policy(model, processor, m):
    """Give a loaded model's config and processor ``model.image_grid_pinpoints`` / ``model.anyres_max_tiles`` when
    the recipe sets them (else the model's own stay); both record them, so saved models keep them. (A model the
    recipe builds gets them from `build`.)"""
    from llavakit.model.anyres import check_grid_pinpoints

    if m.image_grid_pinpoints is not None:
        tile = int(model.config.vision_config.image_size)
        try:
            pins = check_grid_pinpoints(m.image_grid_pinpoints, tile)
            if processor.tile_size != tile:
                raise ValueError(f"the image processor's input size {processor.tile_size} differs from the "
                                 f"encoder's {tile}")
        except ValueError as e:
            raise ConfigError(f"model.image_grid_pinpoints: {e}") from None
        model.config.image_grid_pinpoints = processor.image_grid_pinpoints = pins
    if m.anyres_max_tiles is not None:
        model.config.anyres_max_tiles = processor.anyres_max_tiles = int(m.anyres_max_tiles)
    return model, processor


# A projector without it is a base-policy stage 1's: a tiled (anyres / anyres_max) stage 2 starts from it, as
# OneVision's recipe does, and keeps its freshly initialised newline.
NEWLINE_KEY = "image_newline.weight"


def load_projector(model, path: Path) -> None:
    """Load a stage-1 projector (``mm_projector.safetensors``) into `model`'s projector; everything must fit, except
    that a tiled model may start from a projector without the row newline (a stage 1 at base resolution)."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    missing, unexpected = model.multi_modal_projector.load_state_dict(state, strict=False)
    if list(missing) == [NEWLINE_KEY] and not unexpected:
        log.info("%s has no %s (a base-resolution stage 1): keeping the freshly initialised row newline of this "
                 "image_tokens: %s model", path, NEWLINE_KEY, getattr(model.config, "image_tokens", "?"))
        missing = []
    if missing or unexpected:
        raise ConfigError(
            f"{path} does not fit this model's projector ({model.config.projector}): missing {missing}, "
            f"unexpected {unexpected}. Was stage 1 run with the same projector and components?"
        )


def apply_stage(model, cfg: RunConfig) -> tuple[object, list[ParamGroup]]:
    """Freeze/unfreeze (and wrap with LoRA) per the stage; returns (model, optimizer groups)."""
    t = cfg.train
    spec = STAGE_TABLE[t.stage]
    if t.train_vision and not spec["vision_allowed"]:
        raise ConfigError(f"train.train_vision is not supported with stage {t.stage!r}")
    model.requires_grad_(False)
    model.multi_modal_projector.requires_grad_(True)
    if spec["llm"] == "full":
        model.language_model.requires_grad_(True)
    elif spec["llm"] == "lora":
        model.language_model = wrap_lora(model.language_model, cfg)
    if t.train_vision:
        model.vision_tower.requires_grad_(True)
    if t.gradient_checkpointing:
        lm = model.language_model
        if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.24's name
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if spec["llm"] != "full":
            model.language_model.enable_input_require_grads()
    if t.compile:
        compile_decoder_layers(model)

    def trainable(module):
        return [p for p in module.parameters() if p.requires_grad]

    groups = [ParamGroup("projector", trainable(model.multi_modal_projector), t.projector_lr or t.lr)]
    if spec["llm"]:
        groups.append(ParamGroup("llm" if spec["llm"] == "full" else "llm (LoRA)",
                                 trainable(model.language_model), t.lr))
    if t.train_vision:
        groups.append(ParamGroup("vision", trainable(model.vision_tower), t.vision_lr or t.lr))
    return model, [g for g in groups if g.params]


def compile_decoder_layers(model) -> int:
    """`train.compile`: torch.compile each decoder layer of the LLM in place (`nn.Module.compile`, so
    parameter names, checkpoints and saved models are unchanged; the layers share one compiled graph).
    Compilation itself happens in the first forward. Returns the number of layers compiled."""
    import shutil

    lm = model.language_model
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm  # under LoRA: the PEFT-wrapped LLM
    layers = getattr(base.get_decoder(), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        raise ConfigError(f"train.compile: the LLM's decoder ({type(base.get_decoder()).__name__}) has no `layers` "
                          "list to compile; set train.compile: false")
    cxx = os.environ.get("CXX") or ("clang++" if sys.platform == "darwin" else "g++")  # what inductor runs
    if not torch.cuda.is_available() and not shutil.which(cxx):
        raise ConfigError(f"train.compile: true on CPU needs a C++ compiler for torch.compile's inductor backend, "
                          f"and {cxx!r} ($CXX, else g++) was not found: install one (e.g. apt install g++) or point "
                          "CXX at it, or set train.compile: false")
    for layer in layers:
        layer.compile()
    log.info("train.compile: compiled %d decoder layers of %s", len(layers), type(base).__name__)
    return len(layers)


def wrap_lora(language_model, cfg: RunConfig):
    from peft import LoraConfig, get_peft_model

    lc = cfg.train.lora
    target = lc.target_modules
    peft_cfg = LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=target,
                          task_type="CAUSAL_LM")
    return get_peft_model(language_model, peft_cfg)


def trainable_table(model, groups: list[ParamGroup]) -> str:
    """A printable table: each part's parameter count, how many train, at which lr."""
    lr_of = {id(p): g.lr for g in groups for p in g.params}
    rows = []
    for name, module in (("vision tower", model.vision_tower), ("projector", model.multi_modal_projector),
                         ("language model", model.language_model)):
        params = list(module.parameters())
        total = sum(p.numel() for p in params)
        train = sum(p.numel() for p in params if p.requires_grad)
        lrs = sorted({lr_of[id(p)] for p in params if p.requires_grad and id(p) in lr_of})
        rows.append((name, total, train, ", ".join(f"{x:g}" for x in lrs) or "-"))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'part':<{width}}  {'params':>13}  {'trainable':>13}  lr"]
    for name, total, train, lr in rows:
        lines.append(f"{name:<{width}}  {total:>13,}  {train:>13,}  {lr}")
    total = sum(r[1] for r in rows)
    train = sum(r[2] for r in rows)
    lines.append(f"{'total':<{width}}  {total:>13,}  {train:>13,}  ({100 * train / max(total, 1):.2f}% trains)")
    return "\n".join(lines)


def describe_stage(cfg: RunConfig) -> str:
    return json.dumps({"stage": cfg.train.stage, **STAGE_TABLE[cfg.train.stage]})
