"""One optimizer step over an accumulation window, and what it may find: the loss normalised by the
global batch's supervised tokens, gradient clipping, and non-finite losses, gradients or weights (skipped
or stopped, never saved)."""

from __future__ import annotations

import logging
import math
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import NamedTuple

import torch

from .checkpoint import any_process, latest_checkpoint
from .config import TrainingError
from .optim import in_backward_of, make_optimizer  # noqa: F401  (make_optimizer: loop's import)

log = logging.getLogger(__name__)


class NonFiniteError(TrainingError):
    """The loss or the gradients became NaN/inf; the run stopped without saving anything non-finite."""


# --- optimisation -------------------------------------------------------------------------------
def supervised_count(labels: torch.Tensor) -> torch.Tensor:
    """Tokens the shifted causal-LM loss counts: positions whose *next* label is supervised."""
    return (labels[..., 1:] != -100).sum()


def last_good(run_dir: Path) -> str:
    ckpt = latest_checkpoint(run_dir)
    return (f"the last complete checkpoint, {ckpt.name}, is intact (continue from it with --resume)"
            if ckpt else "no checkpoint had been saved yet")


def on_nonfinite(state: dict, res: StepResult, t, run_dir: Path, say) -> None:
    """A step whose loss or gradient norm is NaN/inf: skip it (counted) or stop the run."""
    step = state["step"] + 1
    what = "loss" if not math.isfinite(res.loss) else "gradient norm"
    norm = "n/a" if res.grad_norm is None else f"{res.grad_norm:.4g}"
    found = f"non-finite {what} at step {step} (loss {res.loss:.4g}, gradient norm {norm})"
    if t.on_nonfinite == "skip" and state["nonfinite_skips"] < t.max_nonfinite_skips:
        state["nonfinite_skips"] += 1
        say(f"warning: {found}; skipped this optimizer step ({state['nonfinite_skips']} of at most "
            f"train.max_nonfinite_skips={t.max_nonfinite_skips})")
        return
    why = ("train.on_nonfinite=stop" if t.on_nonfinite == "stop"
           else f"all train.max_nonfinite_skips={t.max_nonfinite_skips} skips are used up")
    raise NonFiniteError(
        f"{found}: stopped ({why}); nothing was saved from this step on and {last_good(run_dir)}. " + (
            f"Lower train.lr (now {t.lr:g}) or check the data (with train.optimizer_in_backward the step had "
            "already updated the weights it reached, and it cannot clip or skip: turn it off to use "
            "train.max_grad_norm and train.on_nonfinite=skip)" if getattr(t, "optimizer_in_backward", False) else
            f"Lower train.lr (now {t.lr:g}) or train.max_grad_norm, check the data, or set "
            "train.on_nonfinite=skip to drop such steps"))


def check_finite_weights(accelerator, model, step: int, run_dir: Path, t) -> None:
    """Refuse to save NaN/inf trainable weights (checked on every process, decided together)."""
    bad = torch.zeros((), device=accelerator.device)
    for p in accelerator.unwrap_model(model).parameters():
        if p.requires_grad and p.numel():
            bad += (~torch.isfinite(p.detach())).sum()
    if any_process(accelerator, bool(bad.item())):
        raise NonFiniteError(
            f"the trainable weights are non-finite after step {step}; not saving them, and "
            f"{last_good(run_dir)}. Lower train.lr (now {t.lr:g})")


def forward(model, mb: dict, n_items, t):
    """The model's loss on one micro-batch with the run's loss options; a `train.compile` that fails to
    compile (it does so in the first forward) becomes a `TrainingError` that says what to do."""
    try:
        return model(**mb, num_items_in_batch=n_items, supervised_logits_only=t.supervised_logits_only,
                     loss_chunk_size=t.loss_chunk_size)
    except Exception as e:
        if not t.compile or type(e).__module__.split(".")[:2] not in (["torch", "_dynamo"], ["torch", "_inductor"]):
            raise
        raise TrainingError(
            f"train.compile: torch.compile could not compile the LLM's decoder layers ({type(e).__name__}: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}). On CPU inductor needs a working C++ "
            "compiler (install g++, or set CXX); otherwise set train.compile: false") from e


class StepResult(NamedTuple):
    loss: float  # mean over the supervised tokens of the global batch
    tokens: int  # real (non-padding) tokens this process saw
    grad_norm: float | None  # total gradient norm (None under fp16 loss scaling, which handles inf itself)
    finite: bool  # False: the loss or the gradients were NaN/inf and the weights were left unchanged


def optimizer_step(accelerator, model, optimizer, scheduler, window, t, world) -> StepResult:
    """One optimizer step over an accumulation window; loss = Σ CE / supervised tokens of the global batch.

    A non-finite loss or gradient norm skips the update (gradients are dropped, the schedule still
    advances) and returns ``finite=False``; `train` then stops or counts a skip. The check reuses
    the all-reduce of the loss and the norm that clipping computes anyway.
    """
    device = accelerator.device
    local = sum(supervised_count(mb["labels"]) for mb in window).to(device)
    n_items = accelerator.reduce(local.clone(), reduction="sum").clamp(min=1)
    total, real = torch.zeros((), device=device), 0
    for i, mb in enumerate(window):
        mb = {k: v.to(device) if torch.is_tensor(v) else v for k, v in mb.items()}
        real += int(mb["attention_mask"].sum()) if "attention_mask" in mb else int(mb["input_ids"].numel())
        sync = i == len(window) - 1
        with nullcontext() if sync else accelerator.no_sync(model), accelerator.autocast():
            out = forward(model, mb, n_items, t)
            # DDP averages gradients over processes; scale so the result is the global token mean.
            loss = out.loss * world
        accelerator.backward(loss)
        total += out.loss.detach()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    norm, hooked = None, in_backward_of(optimizer)
    if hooked is not None:  # train.optimizer_in_backward: the weights were updated during backward
        norm = hooked.take_norm()
    elif t.max_grad_norm and t.max_grad_norm > 0:
        norm = accelerator.clip_grad_norm_(params, t.max_grad_norm)
    elif accelerator.scaler is None:
        grads = [p.grad.detach() for p in params if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])) \
            if grads else None
    if accelerator.scaler is not None:  # fp16: inf gradients are the loss scaler's business (it skips the step)
        norm = None
    bad_grads = torch.zeros((), device=device) if norm is None else \
        (~torch.isfinite(torch.as_tensor(norm, device=device, dtype=torch.float32))).float()
    stats = accelerator.reduce(torch.stack([total.float(), bad_grads]), reduction="sum").tolist()
    loss_value, finite = stats[0], math.isfinite(stats[0]) and stats[1] == 0
    if finite:
        optimizer.step()
        scheduler.step()
    else:
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()" when step 1 is skipped
            warnings.simplefilter("ignore", UserWarning)
            scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_value, real, None if norm is None else float(norm), finite)


