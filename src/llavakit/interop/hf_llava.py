"""Export to, and import from, the llava-hf checkpoint format (`LlavaForConditionalGeneration`).

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

Import opens a llava-hf checkpoint through transformers' own loader and moves its modules into a
`LlavakitForConditionalGeneration`, so training can start from it.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

from ..model.build import count_prefix_tokens
from ..model.config import LlavakitConfig
from ..model.modeling import LlavakitForConditionalGeneration
from ..model.processor import LlavakitProcessor

log = logging.getLogger(__name__)

# llavakit projector name -> LlavaConfig.projector_hidden_act. HF Llava's projector is fixed:
# linear_1 -> act -> linear_2 (with biases); only our projectors of that shape can be exported.
HF_LLAVA_PROJECTORS: dict[str, str] = {"mlp2x_gelu": "gelu"}

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"

_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


# --- writing weight files ------------------------------------------------------------------------------
def parse_size(size: int | str) -> int:
    """'5GB' / '500MB' / '2GiB' / 1000000 -> bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
    unit = (m.group(2).upper() or "B") if m else None
    if not m or unit not in _SIZE_UNITS:
        raise ValueError(f"cannot read the size {size!r}; write it like 5GB, 500MB or 2GiB")
    return int(float(m.group(1)) * _SIZE_UNITS[unit])


def write_safetensors(state_dict: dict[str, torch.Tensor], out_dir: Path, max_shard_size: int | str = "5GB"
                      ) -> list[str]:
    """Write `state_dict` as one `model.safetensors` or as shards + `model.safetensors.index.json`.

    Tensors are made contiguous and moved to CPU; two names sharing storage get separate copies
    (safetensors refuses shared memory). Returns the file names written.
    """
    limit = parse_size(max_shard_size)
    tensors: dict[str, torch.Tensor] = {}
    seen_storage: set[int] = set()
    for name, t in state_dict.items():
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen_storage and t.numel():
            t = t.clone()
        seen_storage.add(ptr)
        tensors[name] = t
    shards: list[dict[str, torch.Tensor]] = [{}]
    used = 0
    for name, t in tensors.items():  # greedy, in state-dict order (keeps a layer's weights together)
        n = t.numel() * t.element_size()
        if shards[-1] and used + n > limit:
            shards.append({})
            used = 0
        shards[-1][name] = t
        used += n
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / SAFE_WEIGHTS), metadata={"format": "pt"})
        return [SAFE_WEIGHTS]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for fname, shard in zip(names, shards):
        save_file(shard, str(out_dir / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names + [SAFE_INDEX]


# --- legacy key layout -----------------------------------------------------------------------------
def legacy_tower_prefix(tower) -> str:
    """The prefix transformers 4.x put before this tower's keys ("vision_model." for CLIP/SigLIP).

    Read from transformers' own loading rules: 5.x removes it with a `PrefixChange` registered for the
    tower class, so the same rule tells us what to put back. "" for towers without such a rule.
    """
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import PrefixChange

    for key in (type(tower).__name__, tower.config.model_type):
        rules = get_checkpoint_conversion_mapping(key)
        if rules is not None:
            removed = [r.prefix_to_remove for r in rules if isinstance(r, PrefixChange) and r.prefix_to_remove]
            return removed[0] + "." if removed else ""
    return ""


def _original_names(module) -> dict[str, torch.Tensor]:
    """A component's state dict under the names its `save_pretrained` writes (transformers' reverse
    conversions, e.g. fused MoE experts split back)."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(module, module.state_dict())


def _is_tied(lm) -> bool:
    inp, outp = lm.get_input_embeddings(), lm.get_output_embeddings()
    return outp is not None and outp.weight.data_ptr() == inp.weight.data_ptr()


def legacy_state_dict(model: LlavakitForConditionalGeneration) -> dict[str, torch.Tensor]:
    """The model's weights under llava-hf's legacy names (see the module docstring)."""
    lm, tower = model.language_model, model.vision_tower
    if lm.base_model_prefix != "model":
        raise ValueError(
            f"{type(lm).__name__} keeps its body under {lm.base_model_prefix!r}, but llava-hf checkpoints must "
            "use language_model.model.*; this LLM cannot be exported to hf-llava"
        )
    out: dict[str, torch.Tensor] = {}
    tied = bool(getattr(lm.config, "tie_word_embeddings", False))
    if tied and not _is_tied(lm):
        raise ValueError(
            "the LLM config says tie_word_embeddings=True but lm_head and embed_tokens hold different weights; "
            "HF Llava would replace lm_head by the embeddings. Re-tie them (model.tie_weights()) or set "
            "text_config.tie_word_embeddings=False before exporting"
        )
    for k, v in _original_names(lm).items():
        if tied and k == "lm_head.weight":
            continue  # the reader ties it back to embed_tokens, as Qwen2.5-0.5B's own checkpoint does
        out["language_model." + k] = v
    prefix = legacy_tower_prefix(tower)
    for k, v in _original_names(tower).items():
        out["vision_tower." + (k if k.startswith(prefix) else prefix + k)] = v
    for k, v in model.multi_modal_projector.state_dict().items():
        out["multi_modal_projector." + k] = v
    return out


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


def _check_projector(config: LlavakitConfig) -> str:
    if config.projector not in HF_LLAVA_PROJECTORS:
        raise ValueError(
            f"projector {config.projector!r} cannot be written as an HF Llava checkpoint: HF Llava's projector "
            f"is linear_1 -> activation -> linear_2. Exportable projectors: {', '.join(HF_LLAVA_PROJECTORS)}"
        )
    return HF_LLAVA_PROJECTORS[config.projector]


def hf_llava_config(config: LlavakitConfig, dtype: torch.dtype | None = None) -> LlavaConfig:
    act = _check_projector(config)
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
    (`processor.template`, rendered by `llavakit.data.templates.jinja_chat_template`), else the
    processor's or the tokenizer's own template."""
    if getattr(processor, "template", None):
        try:
            from llavakit.data.templates import jinja_chat_template
        except ModuleNotFoundError as e:
            if e.name != "llavakit.data.templates":
                raise
            log.warning("llavakit.data.templates is not available; exporting the tokenizer's chat template "
                        "instead of %r", processor.template)
        else:
            return jinja_chat_template(processor.template, tokenizer=processor.tokenizer)
    return getattr(processor, "chat_template", None) or getattr(processor.tokenizer, "chat_template", None)


def _hf_image_processor(processor: LlavakitProcessor, config: LlavakitConfig):
    """The image processor HF's LlavaProcessor should use. LLaVA's `pad` aspect (expand to a square of
    the mean colour, then the tower's usual resize/crop) is llava-hf's `LlavaImageProcessor(do_pad=True)`."""
    ip = processor.image_processor
    if processor.image_aspect == "resize":
        return ip
    from transformers.image_processing_backends import PilBackend

    if isinstance(ip, PilBackend):  # keep the backend (PIL or torchvision) the model's processor uses
        from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil as cls
    else:
        from transformers import LlavaImageProcessor as cls
    fields = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
              "do_normalize", "image_mean", "image_std", "do_convert_rgb")
    # Unset fields are written as False/None so Llava's own defaults (224 px crop) never leak in.
    kwargs = {f: getattr(ip, f, None) for f in fields}
    kwargs = {k: (bool(v) if k.startswith("do_") else v) for k, v in kwargs.items()
              if v is not None or k.startswith("do_")}
    # HF's LlavaProcessor counts image tokens from crop_size; without a crop that is the tower's input size.
    side = int(config.vision_config.image_size)
    kwargs.setdefault("crop_size", {"height": side, "width": side})
    return cls(do_pad=True, **kwargs)


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


# --- fields older readers need ------------------------------------------------------------------------
# transformers 5 writes some settings only under their new names, which 4.x does not know and silently
# replaces by its defaults (rope_parameters -> RoPE base 10000: zero missing keys, no warning, other logits).
# The export therefore adds the 4.x spelling next to the 5.x one. Each addition is chosen so that 5.x reads
# back what it wrote (checked by tests/test_export.py); 4.57 and 4.45 are checked against real installs
# by tests/test_export_compat.py.

# Files written only by some exports; `overwrite` removes an old copy so no stale one survives.
_OPTIONAL_FILES = ("chat_template.jinja", "chat_template.json", "preprocessor_config.json")

# 4.x fast tokenizer classes that rebuild tokenizer.json's post-processor from add_bos_token/add_eos_token
# at load time, with these defaults. 5.x does not save the two flags, so they are written whenever the
# tokenizer's real behaviour differs from the 4.x default.
_BOS_EOS_REBUILDING_4X = {"LlamaTokenizer": (True, False), "CodeLlamaTokenizer": (True, False),
                          "GemmaTokenizer": (True, False)}


def legacy_rope_fields(cfg: dict) -> dict:
    """4.x RoPE fields for a 5.x config dict: `rope_theta`, `rope_scaling` (None for the default RoPE) and
    `partial_rotary_factor`, from 5.x's `rope_parameters` ({"rope_type", "rope_theta", ...}).

    5.x, reading such a config, takes a non-null `rope_scaling` as `rope_parameters` and fills in
    `rope_theta` and `partial_rotary_factor` from the top-level fields, i.e. it gets back the same dict.
    Linear/dynamic scaling is written in the two-key form `{"type", "factor"}` that every 4.x reads
    (4.37 accepts nothing else; 5.x keeps `type` as a synonym of `rope_type`); other types as 4.43+
    wrote them (`rope_type` + their parameters).
    """
    rope = cfg.get("rope_parameters")
    if not isinstance(rope, dict) or not rope:
        return {}
    if all(isinstance(v, dict) or v is None for v in rope.values()):  # one dict per layer type
        if not isinstance(rope.get("full_attention"), dict):
            log.warning("rope_parameters per layer type %s has no 'full_attention' entry; transformers 4.x "
                        "readers of this export will use their default RoPE", sorted(rope))
            return {}
        log.warning("rope_parameters per layer type %s: transformers 4.x fields can only hold one RoPE; "
                    "writing the 'full_attention' one", sorted(rope))
        rope = rope["full_attention"]
    out: dict = {}
    if rope.get("rope_theta") is not None:
        out["rope_theta"] = rope["rope_theta"]
    if rope.get("partial_rotary_factor") is not None:
        out["partial_rotary_factor"] = rope["partial_rotary_factor"]
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    rest = {k: v for k, v in rope.items() if k not in ("rope_theta", "rope_type", "type", "partial_rotary_factor")}
    if rope_type == "default" and not rest:
        out["rope_scaling"] = None
    elif rope_type in ("linear", "dynamic") and set(rest) == {"factor"}:
        out["rope_scaling"] = {"type": rope_type, "factor": rest["factor"]}
    else:
        out["rope_scaling"] = {"rope_type": rope_type, **rest}
    return out


def legacy_config_dict(cfg: dict) -> dict:
    """`cfg` (config.json of the export) with the 4.x spellings added, here and in every sub-config:
    RoPE (`legacy_rope_fields`) and `torch_dtype` (4.x before 4.56 reads only that name). Fields that are
    already there are kept."""
    cfg = dict(cfg)
    for key, value in legacy_rope_fields(cfg).items():
        cfg.setdefault(key, value)
    if cfg.get("dtype") is not None:
        cfg.setdefault("torch_dtype", cfg["dtype"])
    for key, value in cfg.items():
        if isinstance(value, dict) and "model_type" in value:  # text_config, vision_config, ...
            cfg[key] = legacy_config_dict(value)
    return cfg


def _adds_bos_eos(tokenizer) -> tuple[bool, bool]:
    """Whether the tokenizer, as saved, puts bos in front of / eos after a plain text."""
    ids = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return (bos is not None and ids[:1] == [bos]), (eos is not None and len(ids) > 1 and ids[-1:] == [eos])


def legacy_tokenizer_config(tok_cfg: dict, tokenizer=None, chat_template: str | None = None) -> dict:
    """tokenizer_config.json that transformers 4.x loads too.

    - `extra_special_tokens` as a list (5.x) becomes `additional_special_tokens` (4.x reads a list there and
      fails on a list under `extra_special_tokens`; 5.x converts it back on load);
    - 5.x's generic `TokenizersBackend` class is `PreTrainedTokenizerFast` in 4.x (5.x: the same class);
    - `add_bos_token`/`add_eos_token` when a 4.x class would otherwise rebuild the post-processor differently;
    - the chat template inside the file, where readers before 4.47 (no chat_template.jinja) look for it.
    """
    tok_cfg = dict(tok_cfg)
    extra = tok_cfg.get("extra_special_tokens")
    if isinstance(extra, list):
        del tok_cfg["extra_special_tokens"]
        tok_cfg.setdefault("additional_special_tokens", extra)
    if tok_cfg.get("tokenizer_class") == "TokenizersBackend":
        tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    defaults = _BOS_EOS_REBUILDING_4X.get(str(tok_cfg.get("tokenizer_class", "")).removesuffix("Fast"))
    if defaults is not None and tokenizer is not None:
        for key, actual, default in zip(("add_bos_token", "add_eos_token"), _adds_bos_eos(tokenizer), defaults):
            if actual != default:
                tok_cfg.setdefault(key, actual)
    if chat_template and "chat_template" not in tok_cfg:
        tok_cfg["chat_template"] = chat_template
    return tok_cfg


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def write_legacy_fields(out: Path, tokenizer=None) -> None:
    """Rewrite a folder written by 5.x's `save_pretrained` so that transformers 4.x reads it too (see
    above): 4.x config fields, a 4.x-readable tokenizer_config.json, the image processor moved from
    processor_config.json into `preprocessor_config.json`, and `chat_template.json` (the processor's
    template for readers before 4.47, which do not know chat_template.jinja)."""
    out = Path(out)
    _write_json(out / "config.json", legacy_config_dict(_read_json(out / "config.json")))
    template_file = out / "chat_template.jinja"
    template = template_file.read_text(encoding="utf-8") if template_file.is_file() else None
    tok_file = out / "tokenizer_config.json"
    if tok_file.is_file():
        _write_json(tok_file, legacy_tokenizer_config(_read_json(tok_file), tokenizer, template))
    proc_file = out / "processor_config.json"
    proc = _read_json(proc_file) if proc_file.is_file() else {}
    if isinstance(proc.get("image_processor"), dict):
        # 4.x before 4.56 passes every key of processor_config.json to LlavaProcessor(...), and a nested
        # "image_processor" then collides with the loaded one ("got multiple values for argument
        # 'image_processor'"). Written as llava-hf's hub checkpoints have it: the image processor on its
        # own in preprocessor_config.json, which every version reads (5.x when nothing is nested).
        image_processor = dict(proc.pop("image_processor"))
        image_processor.setdefault("processor_class", proc.get("processor_class", "LlavaProcessor"))
        _write_json(out / "preprocessor_config.json", image_processor)
        _write_json(proc_file, proc)
    if template is not None and not (out / "chat_template.json").exists():
        _write_json(out / "chat_template.json", {"chat_template": template})


# --- export ----------------------------------------------------------------------------------------
def _prepare_out_dir(out: Path, overwrite: bool) -> None:
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
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    hf_config = hf_llava_config(config, dtype or model.dtype)  # validates projector + strategy first
    hf_processor = hf_llava_processor(processor, config)
    state = legacy_state_dict(model)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    out = Path(out)
    _prepare_out_dir(out, overwrite)
    files = write_safetensors(state, out, max_shard_size)
    hf_config.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    hf_processor.save_pretrained(out)
    write_legacy_fields(out, hf_processor.tokenizer)
    log.info("exported hf-llava checkpoint to %s (%d weight file(s), %d tensors)", out, len(files), len(state))
    return out


# --- import ----------------------------------------------------------------------------------------
def _check_loading(path, info: dict) -> None:
    problems = {k: sorted(str(x) for x in (info.get(k) or [])) for k in ("missing_keys", "unexpected_keys",
                                                                        "mismatched_keys")}
    if any(problems.values()):
        lines = [f"the llava-hf checkpoint {path} does not load cleanly into LlavaForConditionalGeneration:"]
        lines += [f"  {k} ({len(v)}): {', '.join(v[:20])}" for k, v in problems.items() if v]
        lines.append("Check that the folder is a complete llava-hf checkpoint (config.json + all weight shards).")
        raise ValueError("\n".join(lines))


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


def import_hf_llava(path: str | Path, dtype: torch.dtype | str | None = None, **hub_kwargs):
    """Open a llava-hf checkpoint (folder or hub id) as a llavakit (model, processor) pair.

    The weights are loaded by transformers' own `LlavaForConditionalGeneration.from_pretrained` (every
    key spelling it accepts works) and must load with nothing missing or unexpected.
    """
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if Path(path).exists() and not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"{Path(path) / 'config.json'} not found: {path} is not a llava-hf checkpoint")
    hf, info = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype or "auto", output_loading_info=True,
                                                             **hub_kwargs)
    _check_loading(path, info)
    hf_cfg = hf.config
    if not hf_cfg.multimodal_projector_bias or hf_cfg.projector_hidden_act != "gelu":
        raise ValueError(
            f"{path}: projector with projector_hidden_act={hf_cfg.projector_hidden_act!r}, "
            f"bias={hf_cfg.multimodal_projector_bias} has no llavakit equivalent (only 'gelu' with biases, "
            "our 'mlp2x_gelu')"
        )
    hp = AutoProcessor.from_pretrained(path, **hub_kwargs)
    tokenizer, image_processor = hp.tokenizer, hp.image_processor
    # llavakit's processor owns the pad-to-square step (image_aspect), so the image processor must not pad too.
    aspect = "pad" if getattr(image_processor, "do_pad", False) else "resize"
    if aspect == "pad":
        image_processor.do_pad = False
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
        log.info("%s: the tokenizer has no pad token; padding with %r", path, tokenizer.pad_token)

    tower = hf.model.vision_tower
    prefix = count_prefix_tokens(tower, hf_cfg.vision_config)
    config = LlavakitConfig(
        vision_config=hf_cfg.vision_config,
        text_config=hf_cfg.text_config,
        projector="mlp2x_gelu",
        vision_feature_layer=hf_cfg.vision_feature_layer,
        vision_feature_select=_vision_select(hf_cfg, prefix, path),
        vision_prefix_tokens=prefix,
        image_token_id=hf_cfg.image_token_id,
        pad_token_id=tokenizer.pad_token_id,
        components={"hf-llava": str(path)},
    )
    config._attn_implementation = hf_cfg._attn_implementation
    with torch.device("meta"):  # an empty shell; the loaded modules go in below
        model = LlavakitForConditionalGeneration(config)
    model.vision_tower = tower
    lm = model.language_model
    setattr(lm, lm.base_model_prefix, hf.model.language_model)
    lm.set_output_embeddings(hf.lm_head)  # already the same Parameter as embed_tokens when tied
    model.multi_modal_projector.load_state_dict(hf.model.multi_modal_projector.state_dict(), strict=True, assign=True)
    model.config.vision_config = tower.config
    model.config.text_config = lm.config = hf.model.language_model.config
    on_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if on_meta:
        raise RuntimeError(f"importing {path} left weights without values: {', '.join(on_meta[:10])}")
    model.generation_config = hf.generation_config
    model.vision_tower.requires_grad_(False)
    model.eval()
    processor = LlavakitProcessor(image_processor, tokenizer, chat_template=hp.chat_template,
                                  image_token=hp.image_token, image_seq_length=config.image_seq_length,
                                  image_aspect=aspect, tokenization="llm")  # LlavaProcessor: one string, bos by the tokenizer
    return model, processor
