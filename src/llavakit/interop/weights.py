"""Weight files of exported checkpoints: sharded safetensors, and the transformers 4.x key names that every
llava-hf reader knows (CLIP/SigLIP under `vision_model.`, the LLM under `language_model.`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..model.modeling import LlavakitForConditionalGeneration

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


