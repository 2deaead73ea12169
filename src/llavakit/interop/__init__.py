"""Interop: export llavakit models for other tools, and open other tools' LLaVA checkpoints.

    export(src, out, format="hf-llava")      a llavakit model dir (or run dir) -> llava-hf folder
                                             (an image_tokens: anyres model -> the llava-next layout,
                                              format="hf-llava-next"; an anyres_max one -> llava-onevision,
                                              format="hf-llava-onevision")
    export(src, out, format="gguf", dtype="f16")   -> model-f16.gguf + mmproj-f16.gguf + Modelfile (llama.cpp)
    open_checkpoint(path) -> (model, processor)
        llavakit folder              -> llavakit.model.build.load_saved
        llava-hf folder / hub id     -> import_hf_llava        (architectures: LlavaForConditionalGeneration)
        llava-next folder / hub id   -> import_hf_llava_next   (architectures: LlavaNextForConditionalGeneration)
        onevision folder / hub id    -> import_hf_llava_onevision (LlavaOnevisionForConditionalGeneration)
        original LLaVA checkpoint    -> import_original_llava  (architectures: LlavaLlamaForCausalLM, ...;
                                                                  a pretrain run: model_type llava_llama, ...)

Formats are told apart by the exact `model_type` / `architectures` in config.json, never by a name.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..model.build import load_saved
from .gguf import export_gguf
from .hf_llava import export_hf_llava
from .hf_llava_import import import_hf_llava, import_hf_llava_next, import_hf_llava_onevision
from .hf_llava_next import export_hf_llava_next
from .hf_llava_onevision import export_hf_llava_onevision
from .original_llava import ORIGINAL_ARCHITECTURES, ORIGINAL_MODEL_TYPES, import_original_llava

# export format -> writer(model, processor, out, **options)
EXPORT_FORMATS = {"hf-llava": export_hf_llava, "hf-llava-next": export_hf_llava_next,
                  "hf-llava-onevision": export_hf_llava_onevision, "gguf": export_gguf}

# image_tokens policy -> the export formats whose readers count image tokens that way (the first: the default)
POLICY_FORMATS = {"base": ("hf-llava", "gguf"), "unpad": (), "anyres": ("hf-llava-next",),
                  "anyres_max": ("hf-llava-onevision",)}

# config.json "architectures"[0] -> checkpoint format (llavakit itself is recognised by model_type)
ARCHITECTURE_FORMATS = {"LlavaForConditionalGeneration": "hf-llava", "LlavaNextForConditionalGeneration": "hf-llava-next",
                        "LlavaOnevisionForConditionalGeneration": "hf-llava-onevision",
                        **{arch: "original-llava" for arch in ORIGINAL_ARCHITECTURES}}

# keyword arguments that say where a checkpoint comes from (passed to config.json's lookup as well)
HUB_OPTIONS = ("revision", "token", "cache_dir", "local_files_only", "subfolder", "trust_remote_code", "proxies",
               "force_download")

__all__ = ["EXPORT_FORMATS", "checkpoint_format", "export", "export_gguf", "export_hf_llava", "export_hf_llava_next",
           "export_hf_llava_onevision", "import_hf_llava", "import_hf_llava_next", "import_hf_llava_onevision",
           "import_original_llava", "open_checkpoint", "resolve_model_dir"]


def _config_dict(path: str | Path, **hub_kwargs) -> dict:
    p = Path(path)
    if p.is_dir():
        cfg = p / "config.json"
        if not cfg.is_file():
            raise FileNotFoundError(f"{cfg} not found: {p} is not a model checkpoint folder")
        return json.loads(cfg.read_text())
    if p.exists():
        raise ValueError(f"{p} is a file; pass the checkpoint folder that holds config.json")
    text = str(path)
    if p.is_absolute() or text.startswith((".", "~")) or text.count("/") > 1 or "\\" in text:
        raise FileNotFoundError(f"{p} does not exist (and is not a hub id, which looks like 'org/name')")
    from transformers import PreTrainedConfig  # a hub id: let transformers fetch (or find cached) config.json

    return PreTrainedConfig.get_config_dict(str(path), **hub_kwargs)[0]


def checkpoint_format(path: str | Path, **hub_kwargs) -> str:
    """'llavakit', 'hf-llava', 'hf-llava-next', 'hf-llava-onevision' or 'original-llava', from config.json's
    model_type / architectures."""
    cfg = _config_dict(path, **hub_kwargs)
    if cfg.get("model_type") == "llavakit":
        return "llavakit"
    archs = cfg.get("architectures") or []
    if archs and archs[0] in ARCHITECTURE_FORMATS:
        return ARCHITECTURE_FORMATS[archs[0]]
    if cfg.get("model_type") in ORIGINAL_MODEL_TYPES:  # a LLaVA pretrain run: the base LLM's architectures
        return "original-llava"
    raise ValueError(
        f"{path}: config.json has model_type={cfg.get('model_type')!r}, architectures={archs}; llavakit opens "
        f"model_type 'llavakit' and architectures {sorted(ARCHITECTURE_FORMATS)}"
    )


def open_checkpoint(path: str | Path, dtype=None, device_map=None, attn_implementation=None, **kwargs):
    """(model, processor) from any checkpoint llavakit understands (see the module docstring); this is
    `llavakit.load`. A training run folder opens its saved model (`RUN/model`).

    `dtype`, `device_map`, `attn_implementation` and hub options (`revision`, `token`, `cache_dir`, ...)
    reach the loader of every format; `vision`/`llm`/`projector_bin` are the original-LLaVA importer's own.
    """
    if Path(path).is_dir() and not (Path(path) / "config.json").is_file():
        path = resolve_model_dir(path)  # a training run folder: its model/ (or a clear error)
    hub = {k: kwargs[k] for k in HUB_OPTIONS if k in kwargs}
    fmt = checkpoint_format(path, **hub)
    opener = {"llavakit": load_saved, "hf-llava": import_hf_llava, "hf-llava-next": import_hf_llava_next,
              "hf-llava-onevision": import_hf_llava_onevision, "original-llava": import_original_llava}[fmt]
    return opener(path, dtype=dtype, device_map=device_map, attn_implementation=attn_implementation, **kwargs)


def resolve_model_dir(path: str | Path) -> Path:
    """The folder holding a saved llavakit model: `path` itself, or `path/model` for a training run dir."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    for cand in (p, p / "model"):
        cfg = cand / "config.json"
        if cfg.is_file() and json.loads(cfg.read_text()).get("model_type") == "llavakit":
            return cand
    if (p / "adapter_config.json").is_file() or (p / "adapter" / "adapter_config.json").is_file():
        raise ValueError(f"{p} holds a LoRA adapter, not a full model; run `llavakit merge-lora` first and export "
                         "the merged folder")
    if (p / "config.json").is_file():
        mt = json.loads((p / "config.json").read_text()).get("model_type")
        raise ValueError(f"{p / 'config.json'} is a {mt!r} model, not a llavakit one (model_type 'llavakit')")
    raise FileNotFoundError(
        f"no llavakit model in {p}: looked for {p / 'config.json'} and {p / 'model' / 'config.json'}. Pass a saved "
        "model folder or a finetune run folder (its model/ subfolder is used); a pretrain run saves only the "
        "projector, and checkpoint-N folders hold training state, not a model"
    )


def export(src, out: str | Path, format: str = "hf-llava", **options) -> Path:
    """Export `src` — a llavakit model folder, a run folder (uses `RUN/model`) or a (model, processor)
    pair — to `out` in `format`. ``hf-llava`` (the default) of an ``image_tokens: anyres`` model writes the
    LLaVA-NeXT layout (``hf-llava-next``), of an ``anyres_max`` one LLaVA-OneVision's (``hf-llava-onevision``):
    the llava-hf format that counts image tokens that way."""
    if format not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {format!r}; valid formats: {', '.join(EXPORT_FORMATS)}")
    if isinstance(src, (tuple, list)):
        model, processor = src
    else:
        model, processor = load_saved(resolve_model_dir(src))
    policy = getattr(model.config, "image_tokens", "base")
    if format == "hf-llava" and policy in ("anyres", "anyres_max"):
        format = POLICY_FORMATS[policy][0]
    if format not in POLICY_FORMATS.get(policy, ()):  # checked before anything is written
        fits = POLICY_FORMATS.get(policy) or ("none",)
        raise ValueError(f"the model uses image_tokens={policy!r}, which the {format} layout cannot express (its "
                         f"readers count image tokens differently); formats for {policy!r}: {', '.join(fits)}")
    return EXPORT_FORMATS[format](model, processor, out, **options)
