"""The optimizer: AdamW (torch's fused kernel where the device has one), 8-bit AdamW from bitsandbytes, and
the option of updating every weight inside the backward pass.

Memory of a full fine-tune is mostly per-weight state: the weights, one gradient and AdamW's two moments per
trainable weight. `train.optimizer: adamw_8bit` keeps the moments in 8 bits (bitsandbytes' blockwise
quantisation: a quarter of fp32's bytes). `train.optimizer_in_backward: true` updates each weight as soon as
the backward pass has accumulated its gradient and frees that gradient at once, so the gradients of the whole
model never exist together (the technique of PyTorch's tutorial "How to save memory by fusing the optimizer
step into the backward pass"). The global gradient norm is then only known after the update, so it cannot clip
(`train.max_grad_norm: 0`), accumulate micro-batches, average over processes or skip a non-finite step;
`validate` in train/config.py refuses those combinations and `attach_in_backward` refuses several processes.
"""

from __future__ import annotations

import torch

from .config import ConfigError, TrainingError

OPTIMIZERS = ("adamw", "adamw_8bit")
BETAS, EPS = (0.9, 0.999), 1e-8


def param_groups(groups, weight_decay: float) -> list[dict]:
    """Each llavakit group (name, lr, params) split into decayed (matrices) and not decayed (biases, norms)."""
    out = []
    for g in groups:
        decay = [p for p in g.params if p.ndim >= 2]
        no_decay = [p for p in g.params if p.ndim < 2]
        if decay:
            out.append({"params": decay, "lr": g.lr, "weight_decay": weight_decay, "name": g.name})
        if no_decay:
            out.append({"params": no_decay, "lr": g.lr, "weight_decay": 0.0, "name": g.name})
    return out


def fused_supported(params, device: str | None = None) -> bool:
    """torch's fused AdamW (one kernel for all weights' updates; transformers' Trainer default since torch 2.8)
    takes floating-point weights on a device it has the kernel for (`device`, else where the weights are)."""
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    devices = set(_get_fused_kernels_supported_devices())
    return all(p.is_floating_point() and (device or p.device.type) in devices for p in params)


def make_optimizer(groups, weight_decay: float, kind: str = "adamw", device: str | None = None):
    """AdamW over llavakit's parameter groups. ``kind`` is `train.optimizer`: "adamw" (torch; fused where
    supported, else its default implementation) or "adamw_8bit" (bitsandbytes). ``device``: the type of the
    device the weights will train on (``accelerator.device.type``; they may still be on the CPU here)."""
    pg = param_groups(groups, weight_decay)
    if kind == "adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise TrainingError("train.optimizer: adamw_8bit needs bitsandbytes (pip install 'llavakit[qlora]'); "
                                "or set train.optimizer: adamw") from None
        return bnb.optim.AdamW8bit(pg, betas=BETAS, eps=EPS)
    if kind != "adamw":
        raise ConfigError(f"train.optimizer={kind!r} is not one of {list(OPTIMIZERS)}")
    params = [p for g in pg for p in g["params"]]
    return torch.optim.AdamW(pg, betas=BETAS, eps=EPS,
                             fused=True if params and fused_supported(params, device) else None)


class InBackward:
    """Steps `optimizer` for one weight at a time, from a hook that runs when backward has accumulated that
    weight's gradient, then drops the gradient. The optimizer's own `step` skips weights without a gradient,
    so in the hook it updates exactly the weight whose gradient is there (every gradient is None when a
    backward starts: the trainer zeroes them with set_to_none). The learning rate is the group's, as the
    schedule left it after the previous step, as in a normal step. Tracks the squared gradient norm on the
    gradients' device (no host sync per weight) for the trainer's log (train/grad_norm) and its non-finite
    check. Each hook's `step` walks the optimizer's parameter list (skipping those without a gradient): cheap
    next to the update for the few hundred weight tensors of an LLM."""

    def __init__(self, optimizer, params):
        self.optimizer = optimizer
        self.sq: torch.Tensor | None = None
        self.handles = [p.register_post_accumulate_grad_hook(self._hook) for p in params]

    def _hook(self, p: torch.Tensor) -> None:
        sq = torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float32) ** 2
        self.sq = sq if self.sq is None else self.sq + sq
        self.optimizer.step()
        p.grad = None

    def take_norm(self) -> torch.Tensor | None:
        """The gradient norm of the updates since the last call (None if there were none)."""
        sq, self.sq = self.sq, None
        return None if sq is None else sq.sqrt()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def attach_in_backward(accelerator, optimizer, t) -> InBackward | None:
    """With `train.optimizer_in_backward`, hook the optimizer's weights so that backward updates them (after
    `accelerator.prepare`, on the weights it will train); otherwise nothing."""
    if not t.optimizer_in_backward:
        return None
    from accelerate.utils import DistributedType

    if accelerator.num_processes > 1 or accelerator.distributed_type != DistributedType.NO:
        raise ConfigError(
            f"train.optimizer_in_backward updates each weight inside the backward pass, before gradients could "
            f"be averaged over processes or sharded; this run has {accelerator.num_processes} process(es) under "
            f"{accelerator.distributed_type.value} (DeepSpeed and FSDP own the optimizer step). Run it in one plain "
            "process, or set train.optimizer_in_backward: false (and use gradient checkpointing or adamw_8bit)")
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
    hooked = InBackward(inner, [p for g in inner.param_groups for p in g["params"]])
    inner.llavakit_in_backward = hooked
    return hooked


def in_backward_of(optimizer) -> InBackward | None:
    inner = getattr(optimizer, "optimizer", optimizer)
    return getattr(inner, "llavakit_in_backward", None)
