"""The learning-rate schedule: linear warm-up from 0, then cosine to 0, linear to 0, or constant.

The same factors as transformers' ``get_scheduler("cosine" | "linear" | "constant_with_warmup")`` (tested against
it), built on torch's `LambdaLR` here because importing ``transformers.optimization`` imports its trainer
utilities, and through them peft and, where installed, bitsandbytes (which compiles kernels at import): 2–3 s of
every launch's start-up on a 2-core machine, for three formulas.
"""

from __future__ import annotations

import functools
import math

from torch.optim.lr_scheduler import LambdaLR

from .config import SCHEDULES


def lr_factor(step: int, *, schedule: str, warmup: int, total: int) -> float:
    """The multiplier of the base rate at `step` (0-based) of `total`, after `warmup` steps rising from 0."""
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return max(0.0, (total - step) / max(1, total - warmup))
    done = (step - warmup) / max(1, total - warmup)  # 0 at the end of warm-up, 1 at the last step
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * done)))  # half a cosine period


def make_scheduler(schedule: str, optimizer, warmup: int, total: int) -> LambdaLR:
    """`LambdaLR` over every parameter group (each keeps its own base rate); resumable through its state dict."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r} is not one of {list(SCHEDULES)}")
    return LambdaLR(optimizer, functools.partial(lr_factor, schedule=schedule, warmup=warmup, total=total))
