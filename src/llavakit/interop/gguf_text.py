"""The language model of a llavakit model as a standard llama.cpp GGUF (weights, hyperparameters,
tokenizer, chat template).

Written with the `gguf` package (the writer llama.cpp's own converters use); tensor names come from
its `TensorNameMap`. Only what llama.cpp's own HF converter would write for the same LLM is written,
so the file is an ordinary text model: the `<image>` row of the embeddings stays in (the vocabulary
must keep its size) but nothing refers to it: llama.cpp's multimodal runtime (mtmd) cuts the prompt
at its media marker and feeds the image embeddings itself.

Supported LLMs: Llama and Mistral (GGUF architecture ``llama``; q/k rows permuted from Hugging
Face's rotate-half RoPE layout to llama.cpp's interleaved one, as llama.cpp's converter does) and
Qwen2 (``qwen2``, NeoX RoPE, no permutation). Tokenizers (`gguf_vocab`): byte-level BPE (GGUF
``gpt2``) with the GPT-2 split regex (``pre = gpt-2``) or Qwen2's / Llama-3's regex, and SentencePiece
BPE with byte fallback (Llama-2 / Vicuna, GGUF ``llama``); anything else is refused.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from .gguf_vocab import add_tokenizer

log = logging.getLogger(__name__)

# LLM model_type -> (gguf MODEL_ARCH member name, permute q/k for llama.cpp's RoPE layout)
TEXT_ARCHS: dict[str, tuple[str, bool]] = {
    "llama": ("LLAMA", True),
    "mistral": ("LLAMA", True),
    "qwen2": ("QWEN2", False),
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
