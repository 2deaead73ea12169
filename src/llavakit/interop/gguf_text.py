"""The language model of a llavakit model as a standard llama.cpp GGUF (weights, hyperparameters,
tokenizer, chat template).

Written with the `gguf` package (the writer llama.cpp's own converters use); tensor names come from
its `TensorNameMap`. Only what llama.cpp's own HF converter would write for the same LLM is written,
so the file is an ordinary text model: the `<image>` row of the embeddings stays in (the vocabulary
must keep its size) but nothing refers to it: llama.cpp's multimodal runtime (mtmd) cuts the prompt
at its media marker and feeds the image embeddings itself.

Supported LLMs: Llama and Mistral (GGUF architecture ``llama``; q/k rows permuted from Hugging
Face's rotate-half RoPE layout to llama.cpp's interleaved one, as llama.cpp's converter does) and
Qwen2 (``qwen2``, NeoX RoPE, no permutation). Tokenizers: byte-level BPE (GGUF ``gpt2``) with the
GPT-2 split regex (``pre = gpt-2``) or Qwen2's / Llama-3's regex; anything else is refused.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import torch

log = logging.getLogger(__name__)

# LLM model_type -> (gguf MODEL_ARCH member name, permute q/k for llama.cpp's RoPE layout)
TEXT_ARCHS: dict[str, tuple[str, bool]] = {
    "llama": ("LLAMA", True),
    "mistral": ("LLAMA", True),
    "qwen2": ("QWEN2", False),
}

# Split regexes of byte-level BPE pre-tokenizers -> llama.cpp's tokenizer.ggml.pre
_GPT2_REGEX = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_KNOWN_SPLITS = {
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""":
        "qwen2",
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""":
        "llama-bpe",
}

QTYPES = ("f32", "f16", "q8_0")


def check_text_model(lm) -> None:
    """Raise ValueError (before anything is written) if llama.cpp cannot represent this LLM."""
    cfg = lm.config
    if cfg.model_type not in TEXT_ARCHS:
        raise ValueError(f"LLM type {cfg.model_type!r} cannot be exported to GGUF by llavakit; supported: "
                         f"{', '.join(sorted(TEXT_ARCHS))}")
    rs = getattr(cfg, "rope_scaling", None) or {}
    params = getattr(cfg, "rope_parameters", None) or {}
    kind = (rs.get("rope_type") or rs.get("type") or params.get("rope_type") or "default")
    if kind != "default":
        raise ValueError(f"RoPE scaling {kind!r} is not exported to GGUF yet; only plain RoPE ('default')")
    act = getattr(cfg, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"LLM hidden_act={act!r}: llama.cpp's {cfg.model_type} graph uses SiLU only")


def rope_theta(cfg) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    return float(params.get("rope_theta") or getattr(cfg, "rope_theta", None) or 10000.0)


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a q/k projection from rotate-half pairs (i, i + d/2) to adjacent pairs (2i, 2i + 1)
    within each head: llama.cpp's ``llama`` graph applies RoPE to adjacent pairs."""
    out_dim = w.shape[0]
    head_dim = out_dim // n_head
    return w.reshape(n_head, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def to_qtype(name: str, t: torch.Tensor, qtype: str):
    """(array, raw_dtype) for GGUFWriter.add_tensor. 1-D tensors (norms, biases) stay f32; q8_0
    falls back to f16 for rows whose length is not a multiple of the block size."""
    import gguf

    a = t.detach().to(torch.float32).cpu().numpy()
    if a.ndim <= 1 or qtype == "f32":
        return a, None
    if qtype == "q8_0":
        block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
        if a.shape[-1] % block == 0:
            return gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
        log.info("%s: rows of %d values are not a multiple of %d; written as f16", name, a.shape[-1], block)
    return a.astype(np.float16), None


def write_tensors_and_close(writer, tensors, qtype_of) -> None:
    """Add `tensors` ([(gguf name, tensor)]) at the qtype ``qtype_of(name)`` gives, write the file, close it."""
    try:
        for tname, t in tensors:
            arr, raw = to_qtype(tname, t, qtype_of(tname))
            writer.add_tensor(tname, arr, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def file_type(qtype: str) -> int:
    import gguf

    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype]


# --- tokenizer -------------------------------------------------------------------------------------
def _tokenizer_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise ValueError(f"{type(tokenizer).__name__} is not a fast (tokenizers-backed) tokenizer; GGUF export "
                         "needs its tokenizer.json")
    return json.loads(backend.to_str())


def _pre_type(tj: dict) -> str:
    """llama.cpp's tokenizer.ggml.pre for a byte-level BPE tokenizer.json, from its pre-tokenizer."""
    pre = tj.get("pre_tokenizer") or {}
    items = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    splits = [p for p in items if p.get("type") == "Split"]
    byte_level = [p for p in items if p.get("type") == "ByteLevel"]
    if not byte_level:
        raise ValueError("the tokenizer is not byte-level BPE (no ByteLevel pre-tokenizer); GGUF export supports "
                         "byte-level BPE tokenizers (GPT-2 / Llama-3 / Qwen2 style)")
    if not splits and byte_level[0].get("use_regex", True):
        return "gpt-2"
    if len(splits) == 1:
        pattern = splits[0].get("pattern", {})
        regex = pattern.get("Regex") or pattern.get("String")
        if regex == _GPT2_REGEX:
            return "gpt-2"
        if regex in _KNOWN_SPLITS:
            return _KNOWN_SPLITS[regex]
    raise ValueError("the tokenizer's pre-tokenizer is not one llavakit can name for llama.cpp (known: GPT-2, "
                     f"Llama-3 and Qwen2 split regexes); got {json.dumps(pre)[:300]}")


def add_tokenizer(writer, tokenizer, n_vocab: int, chat_template: str | None) -> None:
    """Vocabulary (padded to the embedding rows), merges, token types, special ids and chat template."""
    import gguf

    tj = _tokenizer_json(tokenizer)
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"tokenizer model {model.get('type')!r}: GGUF export supports byte-level BPE only")
    pre = _pre_type(tj)
    vocab = dict(model["vocab"])
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    for i, a in added.items():
        vocab[a["content"]] = i
    by_id = {i: tok for tok, i in vocab.items()}
    if max(by_id) >= n_vocab:
        raise ValueError(f"the tokenizer has ids up to {max(by_id)} but the embeddings only {n_vocab} rows")
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    # Whether the tokenizer itself starts a text with bos (the tiny Llama one does, Qwen2 does not).
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    add_bos = tokenizer.bos_token_id is not None and bool(ids) and ids[0] == tokenizer.bos_token_id
    if tokenizer.bos_token_id is not None:
        writer.add_bos_token_id(int(tokenizer.bos_token_id))
    if tokenizer.eos_token_id is not None:
        writer.add_eos_token_id(int(tokenizer.eos_token_id))
    if tokenizer.unk_token_id is not None:
        writer.add_unk_token_id(int(tokenizer.unk_token_id))
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(int(tokenizer.pad_token_id))
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(False)
    if chat_template:
        writer.add_chat_template(chat_template)


# --- weights ---------------------------------------------------------------------------------------
def text_tensors(lm) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor) for every LLM weight; q/k permuted for the ``llama`` architecture."""
    import gguf

    cfg = lm.config
    arch_name, permute = TEXT_ARCHS[cfg.model_type]
    arch = getattr(gguf.MODEL_ARCH, arch_name)
    n_layers = int(cfg.num_hidden_layers)
    names = gguf.TensorNameMap(arch, n_layers)
    tied = lm.get_output_embeddings() is not None and \
        lm.get_output_embeddings().weight.data_ptr() == lm.get_input_embeddings().weight.data_ptr()
    n_head, n_kv = int(cfg.num_attention_heads), int(cfg.num_key_value_heads or cfg.num_attention_heads)
    out = []
    for key, t in lm.state_dict().items():
        if key.endswith("rotary_emb.inv_freq"):
            continue
        if tied and key == "lm_head.weight":
            continue  # llama.cpp uses token_embd when output.weight is absent
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"no GGUF name for the LLM weight {key!r} ({cfg.model_type})")
        if permute and key.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            t = permute_qk(t, n_head)
        elif permute and key.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
            t = permute_qk(t, n_kv)
        out.append((name, t))
    return out


def write_text_gguf(path, lm, tokenizer, qtype: str, chat_template: str | None, name: str = "llavakit") -> None:
    import gguf

    cfg = lm.config
    arch_name, _ = TEXT_ARCHS[cfg.model_type]
    arch = getattr(gguf.MODEL_ARCH, arch_name)
    n_vocab = int(lm.get_input_embeddings().weight.shape[0])
    n_head = int(cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head)
    tensors = text_tensors(lm)  # raises before the file is created
    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    try:
        w.add_name(name)
        w.add_context_length(int(cfg.max_position_embeddings))
        w.add_embedding_length(int(cfg.hidden_size))
        w.add_block_count(int(cfg.num_hidden_layers))
        w.add_feed_forward_length(int(cfg.intermediate_size))
        w.add_head_count(n_head)
        w.add_head_count_kv(int(cfg.num_key_value_heads or n_head))
        w.add_rope_dimension_count(head_dim)
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_rope_freq_base(rope_theta(cfg))
        w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
        w.add_vocab_size(n_vocab)
        w.add_file_type(file_type(qtype))
        add_tokenizer(w, tokenizer, n_vocab, chat_template)
    except BaseException:
        w.close()
        raise
    write_tensors_and_close(w, tensors, lambda _name: qtype)
