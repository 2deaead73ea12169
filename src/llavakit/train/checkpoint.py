"""Checkpoints that are either complete or absent.

A checkpoint is written under ``RUN/checkpoint-N.tmp`` and renamed to ``RUN/checkpoint-N`` only
when every file is on disk, so a crash (or SIGKILL) mid-save never leaves a folder that looks
complete. Model weights in a checkpoint are the *trainable* parameters only (a stage-1 checkpoint
is the projector, not 14 GB of frozen LLM); optimizer, scheduler and RNG states come from
``accelerator.save_state``. Only the newest ``keep_last`` complete checkpoints are kept.

Failures are loud and leave the folder usable: a save that runs out of disk removes its ``.tmp``
folder and says which file and why (ENOSPC); a checkpoint that cannot be read back (truncated,
corrupt) is renamed ``checkpoint-N.corrupt`` and the previous complete one is used; an unreadable
RNG state is an error unless a non-exact resume is allowed explicitly (``resume_allow: [rng_state]``).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
from pathlib import Path

from .config import TrainingError

log = logging.getLogger(__name__)
_CKPT = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
RUN_KEY = "run"  # trainer_state.json: {"step", "epoch", ..., "run": {"config": ..., "num_processes": ...}}


class CheckpointMismatch(RuntimeError):
    """The checkpoint holds other trainable weights than this run has (a config change, not corruption)."""


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
            raise CheckpointMismatch(
                f"checkpoint {input_dir} does not match this run's trainable weights (missing {missing[:5]}, "
                f"unexpected {extra[:5]}); resume with the same config the run was started with"
            )
        model.load_state_dict(state, strict=False)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator, run_dir: Path, step: int, state: dict, keep_last: int,
                    meta: dict | None = None) -> Path:
    """Write checkpoint-<step> atomically (all processes call this).

    `meta` (the run's config and process count) is stored beside the training state so `--resume`
    can check that it continues the same run. On a write error the ``.tmp`` folder is removed,
    nothing older is rotated out, and a `TrainingError` names the file (and ENOSPC when the disk is full).
    """
    final = run_dir / f"checkpoint-{step}"
    tmp = run_dir / f"checkpoint-{step}.tmp"
    main = accelerator.is_main_process
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    err = None
    try:
        accelerator.save_state(str(tmp))
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
        err = e
    if main and err is None:
        try:
            _write_text(tmp / STATE_FILE, json.dumps({**state, RUN_KEY: meta or {}}, indent=1))
            _fsync_dir(tmp)
        except OSError as e:
            err = e
    if any_process(accelerator, err is not None):
        exc = write_error(err, tmp, f"checkpoint {final.name}", run_dir, latest_checkpoint(run_dir))
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        raise exc from err
    if main:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)  # the commit point
        _fsync_dir(run_dir)
        for old in complete_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def write_error(err: BaseException | None, where: Path, what: str, run_dir: Path, intact: Path | None,
                note: str = "the partial files were removed"):
    """A `TrainingError` that says which file could not be written and why (ENOSPC named as such)."""
    filename = getattr(err, "filename", None) or (_newest_file(where) if where.is_dir() else None) or where
    code = getattr(err, "errno", None)
    free = _free_bytes(run_dir)
    disk_full = code == errno.ENOSPC or (free is not None and free < 1 << 20)
    reason = (f"ENOSPC (no space left on device; {free / 2**20:.0f} MiB free)" if disk_full and free is not None
              else "ENOSPC (no space left on device)" if disk_full
              else f"{errno.errorcode.get(code, 'error')}: {getattr(err, 'strerror', None) or err}" if code
              else str(err) if err is not None else "a write failed on another process")
    keep = f"the last complete checkpoint {intact.name} is intact" if intact else "no complete checkpoint exists yet"
    todo = "free some space" if disk_full else "fix the cause"
    e = TrainingError(f"could not write {what}: {filename}: {reason}. {note[:1].upper()}{note[1:]} and {keep}; "
                      f"{todo} and continue with --resume")
    e.errno = errno.ENOSPC if disk_full else code
    e.filename = str(filename)
    return e


def any_process(accelerator, flag: bool) -> bool:
    """True on every process when `flag` is true on any (one all-reduce; none for one process)."""
    if accelerator.num_processes == 1:
        return bool(flag)
    import torch

    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


def read_state(ckpt: Path) -> dict:
    """The checkpoint's trainer_state.json; raises on an unreadable one."""
    return json.loads((ckpt / STATE_FILE).read_text())


def checkpoint_run_meta(ckpt: Path) -> dict | None:
    """The run config and process count a checkpoint was written with (None: older or unreadable)."""
    try:
        return read_state(ckpt).get(RUN_KEY) or None
    except (OSError, ValueError):
        return None


def check_rng_state(ckpt: Path, process_index: int) -> str | None:
    """None when this process's RNG state in `ckpt` reads back; else what is wrong with it.

    accelerate only logs (at info level) when it cannot restore the RNG state, and the resumed run
    then silently differs from an uninterrupted one (dropout masks, data-loader seeds).
    """
    from accelerate.utils import RNG_STATE_NAME
    from accelerate.utils.other import load

    path = ckpt / f"{RNG_STATE_NAME}_{process_index}.pkl"
    if not path.is_file():
        return f"{path} is missing"
    try:
        states = load(path)
    except Exception as e:  # noqa: BLE001 - any unpickling error means the same thing here
        return f"{path} is unreadable ({_brief(e)})"
    missing = [k for k in ("random_state", "numpy_random_seed", "torch_manual_seed") if k not in (states or {})]
    if missing:
        return f"{path} lacks {missing}"
    return None


def load_checkpoint(accelerator, ckpt: Path, allow_bad_rng: bool = False, warn=log.warning) -> dict:
    """Restore weights, optimizer, scheduler and RNG from `ckpt`; returns its training state."""
    problem = check_rng_state(ckpt, accelerator.process_index)
    if any_process(accelerator, problem is not None):
        problem = problem or "of another process cannot be read"
        if not allow_bad_rng:
            raise TrainingError(
                f"cannot resume exactly: the RNG state {problem}. Resume from an earlier checkpoint (move "
                f"{ckpt.name} aside), or accept a resume whose dropout and data-loader randomness differ from an "
                "uninterrupted run with --resume-allow rng_state"
            )
        warn(f"warning: the RNG state {problem}; resuming anyway (resume_allow: rng_state): the random numbers "
             "from here on differ from an uninterrupted run's")
    state = read_state(ckpt)
    accelerator.load_state(str(ckpt))
    state.pop(RUN_KEY, None)
    return state


def load_latest(accelerator, run_dir: Path, allow_bad_rng: bool = False, warn=log.warning):
    """Load the newest checkpoint that reads back; returns (checkpoint, state) or (None, None).

    A checkpoint that fails to load (truncated safetensors, corrupt optimizer state, bad JSON) is
    renamed ``checkpoint-N.corrupt`` (kept for inspection, ignored from then on) and the previous
    one is tried, with a warning. All processes take the same decision. A checkpoint whose weights
    do not match the model (`CheckpointMismatch`) and an unreadable RNG state are errors, not
    corruption, and stop the resume.
    """
    ckpts = complete_checkpoints(run_dir)
    for ckpt in reversed(ckpts):
        err = None
        try:
            state = load_checkpoint(accelerator, ckpt, allow_bad_rng, warn)
        except (TrainingError, CheckpointMismatch):
            raise
        except Exception as e:  # noqa: BLE001 - whatever a damaged file raises (SafetensorError, UnpicklingError, ...)
            err = e
        if not any_process(accelerator, err is not None):
            return ckpt, state
        bad = ckpt.with_name(ckpt.name + ".corrupt")
        warn(f"warning: {ckpt.name} cannot be loaded ({_brief(err) if err else 'it failed on another process'}); "
             f"moved it to {bad.name} and trying the previous checkpoint")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(bad, ignore_errors=True)
            os.replace(ckpt, bad)
        accelerator.wait_for_everyone()
    if ckpts:
        raise TrainingError(f"none of the checkpoints in {run_dir} can be loaded (see the warnings above; the "
                            "damaged ones were renamed *.corrupt); start a new run in another train.output_dir")
    return None, None


def _brief(e: BaseException) -> str:
    """`Type: first line of the message`, at most 200 characters (torch's load errors run to pages)."""
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:200]}{'...' if len(first) > 200 else ''}"


def _write_text(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _newest_file(folder: Path) -> Path | None:
    try:
        files = [f for f in folder.rglob("*") if f.is_file()]
        return max(files, key=lambda f: f.stat().st_mtime) if files else None
    except OSError:
        return None


def _free_bytes(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


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
