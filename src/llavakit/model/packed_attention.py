"""Packed attention without a dense mask: each sample of a padding-free packed row attends to itself only.

A packed batch is one row ``[1, ΣL]`` whose ``position_ids`` restart at 0 for every sample, with no
``attention_mask`` (`data/collate.py`'s `PackingCollator`). transformers' ``sdpa`` and ``eager`` paths
turn such a row into a block-diagonal causal mask over the whole ``[ΣL, ΣL]`` and run dense attention
over it: a batch of B samples costs about B times the attention work of B separate rows, and on CPU
none of it is skipped. ``flash_attention_2`` avoids this on a GPU; this module does the same with plain
``torch.nn.functional.scaled_dot_product_attention``: it cuts q/k/v at the sample boundaries and runs
causal attention per sample, so the largest score block is ``[L_i, L_i]``.

It is an attention implementation registered with transformers' public hooks under the name
`PACKED_SDPA` (``"sdpa_packed"``):

- ``AttentionMaskInterface``: the mask builder returns no mask for a row without ``attention_mask``
  whose queries and keys are the same tokens (a training forward, packed or not); every other case
  (a padding mask, a KV cache with past tokens) gets exactly the mask ``sdpa`` would get;
- ``AttentionInterface``: with no mask, the sample boundaries come from ``cu_seq_lens_q`` (when the
  collator sends it) or from the ``position_ids`` the decoder layers pass down, with the same rule as
  transformers (a new sample wherever the position does not grow by 1). One sample per row, a mask,
  a KV cache or a single query token go to transformers' own ``sdpa`` function unchanged, so padded
  batches and generation compute exactly what ``sdpa`` computes.

Tried and not kept: ``flex_attention`` with a document ``BlockMask``. In torch 2.13 it has no backward
on CPU ("FlexAttention does not support backward on CPU"), and its compiled forward took about as long
as per-sample sdpa at the SmolLM2 shape, after ~30 s of compiling (numbers in docs/performance.md).

`use_packed_attention(model)` switches a model's LLM to it (the trainer does so when ``data.packing``
is on and the LLM runs ``sdpa`` or ``eager``). The name is not written to saved configs (transformers
keeps the attention implementation out of ``config.json``), so saved models load with ``sdpa``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

PACKED_SDPA = "sdpa_packed"
# Implementations the trainer replaces with PACKED_SDPA for packed batches: both build the dense mask.
DENSE_IMPLEMENTATIONS = ("sdpa", "eager", None)


@torch.compiler.disable  # data-dependent (Python lists of spans): under train.compile it runs eagerly, no recompiles
def sample_spans(position_ids: torch.Tensor | None, length: int, cu_seq_lens: torch.Tensor | None = None,
                 batch_size: int = 1) -> list[list[tuple[int, int]]] | None:
    """Per row, the ``(start, end)`` token ranges of its samples, or None when no row holds more than one.

    `cu_seq_lens` (int [n+1], flash-attention's cumulative lengths) describes a single row; otherwise
    `position_ids` [B or 1, L] is read the way transformers' ``find_packed_sequence_indices`` reads it:
    a sample starts wherever the position is not the previous one plus 1."""
    if cu_seq_lens is not None and batch_size == 1:
        cu = [int(c) for c in cu_seq_lens.reshape(-1).tolist()]
        if cu[0] != 0 or cu[-1] != length:
            raise ValueError(f"cu_seq_lens_q {cu} does not cover a packed row of {length} tokens")
        spans = [[(a, b) for a, b in zip(cu, cu[1:]) if b > a]]
        return spans if len(spans[0]) > 1 else None
    if position_ids is None:
        return None
    pos = position_ids.reshape(-1, position_ids.shape[-1])  # [B or 1, L]
    if pos.shape[-1] != length:
        return None  # not this forward's tokens (e.g. positions of a longer cached sequence)
    starts_at = torch.ones_like(pos, dtype=torch.bool)  # [B, L]: True where a sample starts
    starts_at[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    if not bool(starts_at[:, 1:].any()):
        return None
    spans = []
    for row in starts_at:
        starts = row.nonzero().flatten().tolist()
        spans.append(list(zip(starts, starts[1:] + [length])))
    if len(spans) == 1 and batch_size > 1:  # position ids [1, L] shared by every row
        spans = spans * batch_size
    return spans


def packed_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """Causal sdpa inside each packed sample. query [B, H, L, D], key/value [B, H_kv, L, D] ->
    ([B, L, H, D], None), the layout transformers' attention functions return."""
    spans = None
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    q_len = query.shape[2]
    if (attention_mask is None and causal and q_len > 1 and key.shape[2] == q_len and not kwargs.get("use_cache")
            and kwargs.get("position_bias") is None):
        spans = sample_spans(kwargs.get("position_ids"), q_len, kwargs.get("cu_seq_lens_q"), query.shape[0])
    if spans is None:  # one sample per row, a padding mask or a KV cache: exactly transformers' sdpa
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, dropout=dropout,
                                               scaling=scaling, is_causal=is_causal, **kwargs)
    if kwargs.get("sliding_window") is not None:
        raise NotImplementedError(
            f"{PACKED_SDPA} attention has no sliding window; this layer has one ({kwargs['sliding_window']}). "
            "Use model.attn_implementation: flash_attention_2, or data.packing: false")
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise NotImplementedError(f"{PACKED_SDPA} attention supports neither logit soft-capping nor attention "
                                  "sinks; use model.attn_implementation: eager with data.packing: false")
    return attend_per_sample(query, key, value, spans, dropout, scaling), None


@torch.compiler.disable  # one sdpa call per run of samples: a Python loop over data-dependent spans
def attend_per_sample(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, spans: list[list[tuple[int, int]]],
                      dropout: float, scaling: float | None) -> torch.Tensor:
    """query [B, H, L, D], key/value [B, H_kv, L, D] -> [B, L, H, D]: causal sdpa inside each span of each row."""
    gqa = key.shape[1] != query.shape[1]  # grouped-query attention: sdpa shares each kv head itself
    rows = []
    for b, row_spans in enumerate(spans):
        parts = []
        for start, n, size in equal_runs(row_spans):  # n samples of `size` tokens from `start`: one sdpa call
            end = start + n * size
            q, k, v = (x[b, :, start:end].unflatten(1, (n, size)).transpose(0, 1) for x in (query, key, value))
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True,
                                                 enable_gqa=gqa)  # [n, H, size, D]
            parts.append(out.transpose(1, 2).reshape(1, n * size, out.shape[1], out.shape[-1]))  # [1, n*size, H, D]
        rows.append(torch.cat(parts, dim=1))  # [1, L, H, D]
    return torch.cat(rows, dim=0)  # [B, L, H, D]


def equal_runs(spans: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """Consecutive samples of equal length merged: ``(start, count, length)`` per run. A length-grouped packed
    row is then one batched sdpa call, as fast as the padded batch; samples of different lengths run one by one."""
    runs: list[list[int]] = []
    for s, e in spans:
        if runs and runs[-1][2] == e - s and runs[-1][0] + runs[-1][1] * runs[-1][2] == s:
            runs[-1][1] += 1
        else:
            runs.append([s, 1, e - s])
    return [tuple(r) for r in runs]


def packed_sdpa_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                     attention_mask: torch.Tensor | None = None, **kwargs):
    """No mask for a training forward without a padding mask (the attention function finds the samples);
    otherwise the mask ``sdpa`` would get, unchanged."""
    no_past = isinstance(q_offset, int) and isinstance(kv_offset, int) and q_offset == kv_offset == 0
    if attention_mask is None and no_past and q_length == kv_length:
        return None
    return ALL_MASK_ATTENTION_FUNCTIONS["sdpa"](batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                                                q_offset=q_offset, kv_offset=kv_offset,
                                                attention_mask=attention_mask, **kwargs)


AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
AttentionMaskInterface.register(PACKED_SDPA, packed_sdpa_mask)


def supports_packed_attention(config) -> str | None:
    """Why `config`'s LLM cannot use PACKED_SDPA, or None when it can: it must be a causal decoder whose
    layers all use full attention (the mask builder never sees a sliding window or an image overlay)."""
    if not getattr(config, "is_causal", True) or getattr(config, "is_encoder_decoder", False):
        return "it is not a causal decoder"
    layer_types = getattr(config, "layer_types", None)
    if layer_types and any(t != "full_attention" for t in layer_types):
        return f"its layers are not all full attention ({sorted(set(layer_types))})"
    if not layer_types and getattr(config, "sliding_window", None) is not None \
            and getattr(config, "use_sliding_window", True):
        return f"it uses a sliding window ({config.sliding_window})"
    return None


def use_packed_attention(model) -> bool:
    """Switch the LLM of a llavakit `model` (or a causal LM) from ``sdpa``/``eager`` to PACKED_SDPA.

    Returns True when switched (or already on). The vision tower keeps its own implementation. An LLM
    running another implementation (``flash_attention_2`` already attends per sample; ``flex_attention``)
    or one `supports_packed_attention` refuses is left alone and False is returned."""
    lm = getattr(model, "language_model", model)
    lm = getattr(lm, "get_base_model", lambda: lm)()  # a PEFT wrapper: the transformers model inside
    current = lm.config._attn_implementation
    if current == PACKED_SDPA:
        return True
    if current not in DENSE_IMPLEMENTATIONS or supports_packed_attention(lm.config) is not None:
        return False
    lm.set_attn_implementation(PACKED_SDPA)
    return lm.config._attn_implementation == PACKED_SDPA
