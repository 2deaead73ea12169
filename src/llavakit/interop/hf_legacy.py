"""Fields older readers need in an exported folder, so transformers 4.x (and vLLM pinned to it) reads what
transformers 5.x wrote: 4.x config names next to 5.x ones, a 4.x tokenizer config, the image processor in
`preprocessor_config.json` and the chat template in `chat_template.json`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

# --- fields older readers need ------------------------------------------------------------------------
# transformers 5 writes some settings only under their new names, which 4.x does not know and silently
# replaces by its defaults (rope_parameters -> RoPE base 10000: zero missing keys, no warning, other logits).
# The export therefore adds the 4.x spelling next to the 5.x one. Each addition is chosen so that 5.x reads
# back what it wrote (checked by tests/test_export.py); 4.57 and 4.45 are checked against real installs
# by tests/test_export_compat.py.

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
        tok_cfg = legacy_tokenizer_config(_read_json(tok_file), tokenizer, template)
        legacy = getattr(tokenizer, "legacy", None)  # 5.x does not save it; a Llama tokenizer reloaded without
        if isinstance(legacy, bool):                   # it is legacy=False (other ids after special tokens)
            tok_cfg.setdefault("legacy", legacy)
        _write_json(tok_file, tok_cfg)
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


