"""Checkpoints that are either complete or absent.

A checkpoint is written under ``RUN/checkpoint-N.tmp`` and renamed to ``RUN/checkpoint-N`` only
when every file is on disk, so a crash (or SIGKILL) mid-save never leaves a folder that looks
complete. Model weights in a checkpoint are the *trainable* parameters only (a stage-1 checkpoint
is the projector, not 14 GB of frozen LLM); optimizer, scheduler and RNG states come from
``accelerator.save_state``. Only the newest ``keep_last`` complete checkpoints are kept.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

_CKPT = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _CKPT.match(p.name)) and p.is_dir()
             and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = complete_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def remove_partial(run_dir: Path) -> list[Path]:
    """Delete ``checkpoint-N.tmp`` folders left by an interrupted save; returns what was removed."""
    removed = []
    if run_dir.is_dir():
        for p in run_dir.glob("checkpoint-*.tmp"):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def trainable_state_dict(model) -> dict:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if k in names}


def install_hooks(accelerator, unwrap):
    """Make `accelerator.save_state`/`load_state` store only trainable weights (plain/DDP runs).

    FSDP and DeepSpeed runs keep accelerate's own sharded model saving (their hooks see no weights).
    """

    def save_hook(models, weights, output_dir):
        for i, model in enumerate(models):
            if i < len(weights):
                weights[i] = trainable_state_dict(unwrap(model))

    def load_hook(models, input_dir):
        from safetensors.torch import load_file

        path = Path(input_dir) / "model.safetensors"
        if not models or not path.is_file():
            return
        model = unwrap(models.pop(0))
        state = load_file(str(path))
        expected = set(trainable_state_dict(model))
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise RuntimeError(
                f"checkpoint {input_dir} does not match this run's trainable weights (missing {missing[:5]}, "
                f"unexpected {extra[:5]}); resume with the same config the run was started with"
            )
        model.load_state_dict(state, strict=False)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator, run_dir: Path, step: int, state: dict, keep_last: int) -> Path:
    """Write checkpoint-<step> atomically (all processes call this)."""
    final = run_dir / f"checkpoint-{step}"
    tmp = run_dir / f"checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)  # the commit point
        _fsync_dir(run_dir)
        for old in complete_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, ckpt: Path) -> dict:
    accelerator.load_state(str(ckpt))
    return json.loads((ckpt / STATE_FILE).read_text())


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir() if path.is_dir() else []:
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    try:
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:  # pragma: no cover - some filesystems refuse directory fsync
        pass
