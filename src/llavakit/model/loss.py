"""The LM-head cross-entropy at supervised positions, optionally in row chunks so the `[N_sup, V]` logits
(and their gradient) never exist in full.

At a 49k-150k vocabulary the fp32 logits of every supervised token and their gradient are the largest
tensors of a training step. `chunked_linear_cross_entropy` computes the loss `chunk_size` rows at a time:

- **Why an `autograd.Function` and not `torch.utils.checkpoint` per chunk.** With checkpointing each
  chunk's backward recomputes its logits (a second LM-head matmul) and autograd materialises one full
  `[V, D]` weight gradient per chunk before summing them. The function instead computes, in forward,
  each chunk's logits once, its summed CE and its gradient with respect to the hidden rows and the head
  weight (and bias), accumulating those into one buffer each; backward only scales them by
  `grad_output`. Peak extra memory: one `[chunk, V]` fp32 block plus the gradient buffers (which the
  optimizer needs anyway). Gradients are computed only for the inputs that require them (stage 1: the
  hidden rows only).
- **Precision.** The matmuls run in the tensors' dtype (or autocast's), the softmax in fp32, exactly as
  `cross_entropy(head(hidden).float(), ...)` does; the weight gradient is summed over chunks in fp32.
- **Tied embeddings.** The weight is handed to the function as the parameter itself, so its gradient
  adds to the embedding's through ordinary autograd accumulation.

`linear_cross_entropy_sum` picks the path: Liger's fused kernel when `liger_kernel` is installed and the
tensors are on CUDA, this module's chunks for a plain `nn.Linear` head, and otherwise (a PEFT/LoRA-wrapped
or quantised head, a sharded weight) the unchunked `cross_entropy`, which is what `chunk_size=0` selects.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Σ CE(hidden @ weight.T + bias, targets) over rows, `chunk_size` rows at a time (see the module doc)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size):
        # hidden [N, D], weight [V, D], bias [V] or None, targets [N] (IGNORE_INDEX rows count nothing)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        total = torch.zeros((), device=hidden.device, dtype=torch.float32)
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros(bias.shape, device=bias.device, dtype=torch.float32) if need_b else None
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start:start + chunk_size]  # [c, D]
            t = targets[start:start + chunk_size]  # [c]
            logits = nn.functional.linear(h, weight, bias)  # [c, V], in the matmul's dtype (autocast's if on)
            out_dtype = logits.dtype
            valid = t != IGNORE_INDEX
            safe_t = t.clamp(min=0).unsqueeze(1)  # [c, 1]
            logits = logits.float()  # softmax in fp32
            lse = torch.logsumexp(logits, dim=-1)  # [c]
            total += torch.where(valid, lse - logits.gather(1, safe_t).squeeze(1), 0.0).sum()
            if not (need_h or need_w or need_b):
                continue
            # d(Σ CE)/d logits = softmax - one_hot(target), zero on ignored rows (in the logits' storage)
            dlogits = logits.sub_(lse.unsqueeze(1)).exp_()
            dlogits.scatter_add_(1, safe_t, torch.full(safe_t.shape, -1.0, device=dlogits.device))
            dlogits.mul_(valid.unsqueeze(1))
            d = dlogits.to(out_dtype)  # the dtype autograd would hand the head's backward
            if need_h:
                grad_h[start:start + chunk_size] = (d @ weight).to(hidden.dtype)  # [c, D]
            if need_w:
                grad_w += (d.t() @ h).float()  # [V, D]
            if need_b:
                grad_b += dlogits.sum(0)
        ctx.save_for_backward(*(g for g in (grad_h, grad_w, grad_b) if g is not None))
        ctx.which = (need_h, need_w, need_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        saved = iter(ctx.saved_tensors)
        need_h, need_w, need_b = ctx.which
        grad_h = next(saved) * grad_output if need_h else None
        grad_w = (next(saved) * grad_output).to(ctx.dtypes[0]) if need_w else None
        grad_b = (next(saved) * grad_output).to(ctx.dtypes[1]) if need_b else None
        return grad_h, grad_w, grad_b, None, None


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                 targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Σ CE over the rows of `hidden` [N, D] against `targets` [N], `chunk_size` rows of logits at a time
    (an fp32 scalar; divide by the token count yourself). Zero rows give a 0 that still backpropagates."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return ChunkedLinearCrossEntropy.apply(hidden, weight, bias, targets, int(chunk_size))


def plain_linear_head(head: nn.Module, hidden: torch.Tensor) -> bool:
    """Whether `head` is an ordinary `nn.Linear` whose full weight is in hand (so its matmul can be done
    outside its own forward): not a PEFT/LoRA layer, a quantised subclass, or a sharded weight
    (DeepSpeed ZeRO-3 keeps an empty placeholder, FSDP2 a DTensor)."""
    if type(head) is not nn.Linear:
        return False
    w = head.weight
    return (type(w.data) is torch.Tensor and not hasattr(w, "ds_id") and w.ndim == 2
            and w.shape[1] == hidden.shape[-1])


def liger_loss():
    """Liger's fused linear cross-entropy (summed, -100 ignored), or None when `liger_kernel` is not installed."""
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")


def linear_cross_entropy_sum(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor,
                             chunk_size: int = 0) -> torch.Tensor:
    """Σ CE(head(hidden), targets) over rows: hidden [N, D], targets [N] -> fp32 scalar.

    `chunk_size` 0 materialises the `[N, V]` logits at once (the reference path). N > 0 never holds
    more than N rows of them: Liger's fused kernel on CUDA when installed, else `chunked_linear_cross_entropy`;
    a head that is not a plain `nn.Linear` (LoRA on the LM head, a quantised layer) falls back to the
    reference path, logged at debug level."""
    if chunk_size > 0 and not plain_linear_head(head, hidden):
        log.debug("loss_chunk_size=%d: the LM head is a %s, not a plain nn.Linear with its full weight; "
                  "computing the loss unchunked", chunk_size, type(head).__name__)
        chunk_size = 0
    if chunk_size <= 0:
        return nn.functional.cross_entropy(head(hidden).float(), targets, reduction="sum")
    if hidden.is_cuda:
        fused = liger_loss()
        if fused is not None:
            out = fused(head.weight, hidden, targets, head.bias)
            return (out[0] if isinstance(out, tuple) else out).float()
    return chunked_linear_cross_entropy(hidden, head.weight, head.bias, targets, chunk_size)
