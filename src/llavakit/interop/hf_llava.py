"""Export to, and import from, the llava-hf checkpoint format (`LlavaForConditionalGeneration`).

Export writes a folder that transformers' `LlavaForConditionalGeneration` + `LlavaProcessor` (and
vLLM, which reads the same files) open unchanged. The weights are written by hand, in the legacy
llava-hf layout every reader knows::

    language_model.model.*             the LLM body (`language_model.` + the causal LM's own keys)
    language_model.lm_head.weight      left out when tied to the input embeddings (HF re-ties it)
    vision_tower.vision_model.*        CLIP/SigLIP as transformers 4.x named them
    multi_modal_projector.linear_{1,2}.*

transformers 5.x's own `save_pretrained` drops the `vision_model.` prefix of CLIP/SigLIP; 5.x reads
both spellings, but 4.x then loads a randomly initialised tower with only a warning.

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


# --- export ----------------------------------------------------------------------------------------
def _prepare_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty; pick a new folder or pass overwrite=True "
                                  "(--overwrite)")
        stale = [p for p in out.iterdir() if p.name.startswith(("model", "pytorch_model")) and p.is_file()]
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
