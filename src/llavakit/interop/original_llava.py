"""Import checkpoints of the original LLaVA code base (haotian-liu/LLaVA) to start training from.

Such a checkpoint is the LLM's own folder with LLaVA's additions (facts from LLaVA's
`llava/model/llava_arch.py`, `multimodal_projector/builder.py`, `multimodal_encoder/clip_encoder.py`):

    config.json   architectures ["LlavaLlamaForCausalLM"], the LLM's fields, plus mm_vision_tower (hub id
                  or path of the CLIP tower), mm_projector_type ("linear", "mlp2x_gelu", ...),
                  mm_vision_select_layer, mm_vision_select_feature ("patch" | "cls_patch"), mm_hidden_size,
                  image_aspect_ratio ("pad" | "square"), mm_use_im_start_end
    weights       model.layers.* / model.embed_tokens.* / model.norm.* / lm_head.*      the LLM
                  model.mm_projector.{0,2,...}.*    nn.Sequential(Linear, GELU, Linear, ...); "linear" is a
                                                    bare nn.Linear: model.mm_projector.{weight,bias}
                  model.vision_tower.vision_tower.vision_model.*   sometimes (a tuned tower)
    mm_projector.bin    what a stage-1 (pretrain) run saves: only model.mm_projector.*, next to a config.json
                        written by `config.save_pretrained`: architectures still the base LLM's
                        ["LlamaForCausalLM"], model_type "llava_llama", the mm_* fields, _name_or_path = the
                        base LLM. No LLM weights and no tokenizer: those come from `llm=` (LLaVA's own loader
                        likewise needs --model-base for such a folder).

Prompts: LLaVA tokenizes around each <image> chunk by chunk (`tokenizer_image_token`: every chunk
through the tokenizer with its special tokens, bos kept for the first chunk only), so with a SentencePiece
Llama tokenizer the text after an image starts with its own "▁". The processor is built with
``tokenization="llava"`` so that llavakit reproduces those ids.

Original LLaVA marks images with the id -200 in code, so its tokenizer has no `<image>` token: we add
one (and a pad token if missing) exactly as `llavakit.build` does, new embedding rows = mean of the old.
`.bin` files are only ever read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer

from ..model.assemble import add_image_tokens, assemble, check_loading
from ..model.build import load_language_model, load_vision_tower
from ..model.config import FEATURE_SELECT, parse_dtype
from .weights import SAFE_INDEX, SAFE_WEIGHTS, legacy_tower_prefix

log = logging.getLogger(__name__)

# LLaVA architecture -> model_type of the causal LM it wraps
ORIGINAL_ARCHITECTURES: dict[str, str] = {"LlavaLlamaForCausalLM": "llama", "LlavaMistralForCausalLM": "mistral"}

# LLaVA's config model_type -> model_type of the causal LM. A pretrain (stage-1) run writes its config with
# `config.save_pretrained`, not the model's, so config.json keeps the base LLM's architectures
# (["LlamaForCausalLM"]) next to model_type "llava_llama" and the mm_* fields.
ORIGINAL_MODEL_TYPES: dict[str, str] = {"llava_llama": "llama", "llava_mistral": "mistral"}
STAGE1_ARCHITECTURES: dict[str, str] = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral"}

# How LLaVA tokenizes a prompt (its `tokenizer_image_token`): the text between <image> markers chunk by chunk,
# each chunk with the tokenizer's own special tokens (bos kept for the first chunk only). Recorded on the
# processor so that llavakit feeds imported checkpoints the ids they were trained on.
ORIGINAL_TOKENIZATION = "llava"

# LLaVA's mm_projector_type -> llavakit projector (same maths, same names)
ORIGINAL_PROJECTORS: dict[str, str] = {"linear": "linear", "identity": "identity",
                                       **{f"mlp{n}x_gelu": f"mlp{n}x_gelu" for n in range(2, 7)}}

# LLaVA's image_aspect_ratio -> llavakit image_aspect ("square" = the image processor as is)
ORIGINAL_ASPECTS: dict[str, str] = {"pad": "pad", "square": "resize"}

# Fields LLaVA adds to the LLM's config.json; everything else describes the LLM itself.
LLAVA_CONFIG_KEYS = frozenset({
    "architectures", "model_type", "image_aspect_ratio", "image_grid_pinpoints", "tokenizer_model_max_length",
    "tokenizer_padding_side", "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter", "tune_mm_vision_resampler",
    "freeze_mm_vision_resampler", "unfreeze_mm_vision_tower", "use_mm_proj", "mm_projector_lr",
    "mm_vision_tower_lr", "s2", "s2_scales",
})

PROJECTOR_BIN = "mm_projector.bin"
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
_PROJECTOR_MARK = "mm_projector."  # LLaVA itself keeps what follows this in each key (its `get_w`)
_TOWER_PREFIX = "model.vision_tower.vision_tower."


# --- reading checkpoint files ----------------------------------------------------------------------
def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the unpickler refused something that is not plain tensors
        raise ValueError(
            f"{path} could not be read as plain tensors (torch.load with weights_only=True refused it: {e}). "
            "llavakit never unpickles arbitrary objects; convert the file to safetensors with code you trust."
        ) from e


def read_state_dict(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder: `model.safetensors`, sharded safetensors, `pytorch_model.bin`
    or sharded .bin (each index's `weight_map` names the shards). `.bin` files are read with
    ``torch.load(weights_only=True)`` only."""
    d = Path(model_dir)
    for index_name, single in ((SAFE_INDEX, SAFE_WEIGHTS), (BIN_INDEX, BIN_WEIGHTS)):
        index, single_path = d / index_name, d / single
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif single_path.is_file():
            files = [single]
        else:
            continue
        out: dict[str, torch.Tensor] = {}
        for f in files:
            if f.endswith(".safetensors"):
                with safe_open(str(d / f), framework="pt") as fh:
                    out.update({k: fh.get_tensor(k) for k in fh.keys()})
            else:
                out.update(_torch_load(d / f))
        return out
    raise FileNotFoundError(
        f"no weights in {d}: expected {SAFE_WEIGHTS}, {SAFE_INDEX}, {BIN_WEIGHTS} or {BIN_INDEX}"
    )


def has_weights(model_dir: str | Path) -> bool:
    d = Path(model_dir)
    return any((d / n).is_file() for n in (SAFE_WEIGHTS, SAFE_INDEX, BIN_WEIGHTS, BIN_INDEX))


def _is_llava_part(key: str) -> bool:
    """Weights LLaVA adds to the LLM's state dict (everything else belongs to the LLM)."""
    return _PROJECTOR_MARK in key or key.startswith(("model.vision_tower.", "model.vision_resampler."))


def projector_state_dict(weights: dict[str, torch.Tensor], projector: str, source) -> dict[str, torch.Tensor]:
    """LLaVA's mm_projector weights -> llavakit names. [Sequential index 2k -> linear_{k+1}]"""
    out = {}
    for key, t in weights.items():
        if _PROJECTOR_MARK not in key:
            continue
        rest = key.split(_PROJECTOR_MARK, 1)[1]  # "0.weight" / "weight"
        head, _, param = rest.rpartition(".")
        if projector == "linear" and head == "":
            out[f"linear_1.{param}"] = t
        elif projector != "linear" and head.isdigit() and int(head) % 2 == 0:
            out[f"linear_{int(head) // 2 + 1}.{param}"] = t
        else:
            raise ValueError(f"{source}: unexpected projector weight {key!r} for mm_projector_type {projector!r}")
    return out


def _read_config(path: Path) -> tuple[dict, str]:
    """config.json and the LLM family (model_type of the wrapped causal LM)."""
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: pass the folder of an original-LLaVA checkpoint "
                                "(the one holding config.json)")
    raw = json.loads(cfg_path.read_text())
    arch = (raw.get("architectures") or [None])[0]
    if arch in ORIGINAL_ARCHITECTURES:
        return raw, ORIGINAL_ARCHITECTURES[arch]
    model_type = raw.get("model_type")
    if model_type in ORIGINAL_MODEL_TYPES and (arch is None or arch in STAGE1_ARCHITECTURES):
        family = ORIGINAL_MODEL_TYPES[model_type]
        if arch is not None and STAGE1_ARCHITECTURES[arch] != family:
            raise ValueError(f"{cfg_path}: architectures {raw['architectures']} do not match "
                             f"model_type {model_type!r}")
        if "mm_vision_tower" not in raw:
            raise ValueError(f"{cfg_path}: model_type {model_type!r} but no mm_vision_tower; it is not the config "
                             "of a LLaVA run")
        return raw, family  # a pretrain (stage-1) run: config.json + mm_projector.bin
    raise ValueError(
        f"{cfg_path}: architectures {raw.get('architectures')} (model_type {model_type!r}) is not an "
        f"original-LLaVA model; known: architectures {', '.join(ORIGINAL_ARCHITECTURES)}, or a pretrain run's "
        f"{'/'.join(STAGE1_ARCHITECTURES)} with model_type {'/'.join(ORIGINAL_MODEL_TYPES)}")


def _lookup(table: dict, value, what: str, cfg_path: Path):
    if value not in table:
        raise ValueError(f"{cfg_path}: {what}={value!r} is not supported; supported: {', '.join(map(str, table))}")
    return table[value]


def _load_projector_weights(path: Path, ckpt: dict, projector_bin, projector: str):
    """Projector weights, first found of: projector_bin, the checkpoint's own, path/mm_projector.bin."""
    if projector_bin is not None:
        projector_bin = Path(projector_bin)
        if not projector_bin.is_file():
            raise FileNotFoundError(f"projector weights {projector_bin} not found")
        return projector_state_dict(_torch_load(projector_bin), projector, projector_bin), projector_bin
    own = {k: v for k, v in ckpt.items() if _PROJECTOR_MARK in k}
    if own:
        return projector_state_dict(own, projector, path), path
    if (path / PROJECTOR_BIN).is_file():
        return projector_state_dict(_torch_load(path / PROJECTOR_BIN), projector, path / PROJECTOR_BIN), \
            path / PROJECTOR_BIN
    if projector == "identity":
        return {}, None
    raise FileNotFoundError(
        f"no projector weights for {path}: the checkpoint has no model.mm_projector.* weights and "
        f"{path / PROJECTOR_BIN} does not exist; pass projector_bin= (a pretrain run's mm_projector.bin)"
    )


def _text_config(raw: dict, family: str):
    fields = {k: v for k, v in raw.items() if k not in LLAVA_CONFIG_KEYS and not k.startswith("mm_")
              and not k.startswith("_")}
    cfg = AutoConfig.for_model(family, **fields)
    cfg.architectures = [AutoModelForCausalLM._model_mapping[type(cfg)].__name__]
    return cfg


def _load_llm(path: Path, ckpt: dict, raw: dict, family: str, llm, dtype, hub_kwargs):
    if llm is not None:
        return load_language_model(llm, dtype=dtype, **hub_kwargs), str(llm)
    hub_kwargs = {k: v for k, v in hub_kwargs.items() if k in ("device_map", "attn_implementation")}
    llm_weights = {k: v for k, v in ckpt.items() if not _is_llava_part(k)}
    if not llm_weights:
        raise FileNotFoundError(
            f"{path} holds no language-model weights (a pretrain run saves only {PROJECTOR_BIN}); pass llm= "
            f"(LLaVA's --model-base): the hub id or folder of the LLM the run started from (its config.json "
            f"says _name_or_path={raw.get('_name_or_path')!r})"
        )
    text_config = _text_config(raw, family)
    lm_cls = AutoModelForCausalLM._model_mapping[type(text_config)]
    # transformers' loader with our tensors: meta init, buffers, tying and dtype handled as for any checkpoint
    lm, info = lm_cls.from_pretrained(None, config=text_config, state_dict=llm_weights, dtype=dtype or "auto",
                                      output_loading_info=True, **hub_kwargs)
    if getattr(lm.config, "tie_word_embeddings", False):  # an absent lm_head is expected: it is re-tied
        info["missing_keys"] = [k for k in info.get("missing_keys") or [] if k != "lm_head.weight"]
    check_loading("the language model checkpoint", path, info)
    return lm, str(path)


def _apply_tower_weights(tower, ckpt: dict, path: Path) -> bool:
    """Overwrite the tower with the checkpoint's own copy (model.vision_tower.vision_tower.*), if any."""
    own = {k[len(_TOWER_PREFIX):]: v for k, v in ckpt.items() if k.startswith(_TOWER_PREFIX)}
    if not own:
        return False
    prefix = legacy_tower_prefix(tower)  # LLaVA saved CLIP with transformers 4.x names: vision_model.*
    own = {k[len(prefix):] if prefix and k.startswith(prefix) else k: v for k, v in own.items()}
    own = {k: v for k, v in own.items() if not k.endswith("position_ids")}  # a buffer 4.x sometimes saved
    result = tower.load_state_dict(own, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{path}: its vision-tower weights do not fit the tower from mm_vision_tower: missing "
            f"{result.missing_keys[:10]}, unexpected {result.unexpected_keys[:10]}; pass vision= the tower it "
            "was trained with"
        )
    return True


def import_original_llava(path: str | Path, vision: str | Path | None = None, llm: str | Path | None = None,
                          projector_bin: str | Path | None = None, dtype: torch.dtype | str | None = None,
                          device_map=None, attn_implementation: str | None = None, **hub_kwargs):
    """Open an original-LLaVA checkpoint folder as a llavakit (model, processor) pair.

    path           the checkpoint folder (config.json; LLM weights unless `llm` is given; tokenizer), or a
                   pretrain run's folder (config.json + mm_projector.bin; then `llm` is required)
    vision         the CLIP tower (hub id or folder); default: config's mm_vision_tower
    llm            where the LLM weights (and, if `path` has none, the tokenizer) come from instead of
                   `path`; a pretrain run has none: pass the LLM it started from (LLaVA's --model-base)
    projector_bin  a pretrain run's mm_projector.bin; default: the checkpoint's own projector weights,
                   else path/mm_projector.bin
    device_map, attn_implementation and hub options go to the LLM's loader (the tower follows the LLM's device).
    """
    path = Path(path)
    dtype = parse_dtype(dtype)
    raw, family = _read_config(path)
    cfg_path = path / "config.json"
    projector = _lookup(ORIGINAL_PROJECTORS, raw.get("mm_projector_type", "linear"), "mm_projector_type", cfg_path)
    aspect = _lookup(ORIGINAL_ASPECTS, raw.get("image_aspect_ratio", "square"), "image_aspect_ratio", cfg_path)
    select = _lookup({s: s for s in FEATURE_SELECT}, raw.get("mm_vision_select_feature", "patch"),
                     "mm_vision_select_feature", cfg_path)
    if "mm_vision_select_layer" not in raw:
        raise ValueError(f"{cfg_path} has no mm_vision_select_layer; it is not a LLaVA checkpoint config")
    if raw.get("mm_use_im_start_end"):
        raise ValueError(
            f"{cfg_path}: mm_use_im_start_end=true is not supported. LLaVA then wraps every image as "
            "<im_start><image><im_end> in code (training and inference) and keeps those two tokens' embeddings "
            f"in {PROJECTOR_BIN} after stage 1; llavakit's templates, chat and eval write a bare <image>, so the "
            "model would see prompts it was not trained on. (LLaVA-1.5 checkpoints have it false.)")
    vision = vision or raw.get("mm_vision_tower")
    if not vision:
        raise ValueError(f"{cfg_path} has no mm_vision_tower; pass vision= (the CLIP tower's hub id or folder)")

    ckpt = read_state_dict(path) if has_weights(path) else {}
    llm_kwargs = dict(hub_kwargs, **{k: v for k, v in (("device_map", device_map),
                                                         ("attn_implementation", attn_implementation)) if v})
    lm, llm_source = _load_llm(path, ckpt, raw, family, llm, dtype, llm_kwargs)
    lm_dtype = next(lm.parameters()).dtype
    tower = load_vision_tower(vision, dtype=lm_dtype, **hub_kwargs).to(lm.get_input_embeddings().weight.device)
    tuned_tower = _apply_tower_weights(tower, ckpt, path)
    if raw.get("mm_hidden_size") not in (None, tower.config.hidden_size):
        raise ValueError(f"{cfg_path}: mm_hidden_size={raw['mm_hidden_size']} but the tower {vision} has hidden "
                         f"size {tower.config.hidden_size}; pass vision= the tower the checkpoint was trained with")
    proj_weights, proj_source = _load_projector_weights(path, ckpt, projector_bin, projector)

    tok_source = path if (path / "tokenizer_config.json").is_file() else llm
    if tok_source is None:
        raise FileNotFoundError(f"no tokenizer in {path} (tokenizer_config.json); pass llm= to use the LLM's")
    tokenizer = AutoTokenizer.from_pretrained(tok_source, **hub_kwargs)
    add_image_tokens(tokenizer, lm)  # <image> (+ <pad>): LLaVA marked images with id -200 in code
    tokenizer.padding_side = "left"
    image_processor = AutoImageProcessor.from_pretrained(vision, **hub_kwargs)
    components = {"vision": str(vision), "llm": llm_source, "original-llava": str(path),
                  "projector": str(proj_source) if proj_source else None}
    model, processor = assemble(
        tower, lm, tokenizer, image_processor, projector=projector, projector_weights=proj_weights,
        vision_feature_layer=raw["mm_vision_select_layer"], vision_feature_select=select, image_aspect=aspect,
        components=components, chat_template=tokenizer.chat_template, tokenization=ORIGINAL_TOKENIZATION,
        attn_implementation=attn_implementation)
    model.eval()
    log.info("imported original LLaVA %s: LLM from %s, projector %s from %s, tower %s%s", path, llm_source,
             projector, proj_source, vision, " (tuned weights from the checkpoint)" if tuned_tower else "")
    return model, processor
