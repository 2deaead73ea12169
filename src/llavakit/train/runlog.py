"""A run folder's log side: the loss log (``losses.jsonl``), its plot, the progress bar, trackers,
the guard and lock that keep two runs out of one folder, and the config checks of ``--resume``."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path

from .checkpoint import checkpoint_run_meta, complete_checkpoints, latest_checkpoint
from .config import ConfigError, RunConfig
from .recipes import PROJECTOR_FILE

log = logging.getLogger(__name__)
LOSS_LOG = "losses.jsonl"
LOCK_FILE = "train.lock"
CONFIG_FILE = "config.yaml"
_RESUME_CONFIG = re.compile(r"^config\.resume-(\d+)\.yaml$")


def guard_output_dir(run_dir: Path, resume: bool) -> None:
    has_run = run_dir.is_dir() and any(
        (run_dir / n).exists() for n in ("model", PROJECTOR_FILE, "adapter", LOSS_LOG)
    ) or bool(latest_checkpoint(run_dir))
    if has_run and not resume:
        raise ConfigError(
            f"{run_dir} already holds a training run; pass --resume to continue it, or set "
            "train.output_dir to a new folder (nothing is overwritten)"
        )


# --- one run per folder -------------------------------------------------------------------------
class RunLockedError(ConfigError):
    def __init__(self, message: str, pid: int | None):
        super().__init__(message)
        self.pid = pid


class RunLock:
    """An OS lock (``flock``) on ``RUN_DIR/train.lock``, which holds the owner's PID.

    The kernel drops a ``flock`` when its process dies (even by SIGKILL), so a lock file left by a
    killed run holds no lock: the next run takes it and reports the stale PID. Used by the main
    process only; `release` removes the file.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> int | None:
        """Take the lock; returns the PID of a stale lock it replaced (None if there was none).

        Raises `RunLockedError` (naming the holder's PID) when another live process holds it.
        """
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no OS lock, only the output-dir guard
            log.warning("no fcntl on this platform: %s is not locked against a second run", self.path.parent)
            return None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(100):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # held by a live process (EWOULDBLOCK)
                pid = _read_pid(fd)
                os.close(fd)
                raise RunLockedError(
                    f"{self.path.parent} is in use by another training run (PID {pid if pid else 'unknown'}, "
                    f"lock {self.path}); wait for it to finish or stop it, or use another train.output_dir. "
                    "(A lock left by a process that died is cleared automatically.)", pid) from None
            try:  # the holder we waited on may have removed the file and another run made a new one
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
                continue
            stale = _read_pid(fd)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            os.fsync(fd)
            self.fd = fd
            return stale
        raise ConfigError(f"could not lock {self.path}: it keeps being replaced by another process")

    def release(self) -> None:
        if self.fd is None:
            return
        import fcntl

        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 64, 0).decode(errors="replace").strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


# --- resume: the same run, or an explicitly allowed change ------------------------------------------
# Keys that only change bookkeeping, never what is trained: they may differ on --resume (and are reported).
RESUME_FREE = ("train.output_dir", "train.log_every", "train.report_to", "train.save_every", "train.keep_last",
               "train.on_nonfinite", "train.max_nonfinite_skips", "train.resume_allow", "data.num_workers",
               "data.check_images", "train.return_freed_memory")
DATA_KEY = "data.content"  # resume_allow entry for other data (same or other path): sample count + token lengths
RNG_ALLOW = "rng_state"  # resume_allow entry that accepts an unreadable RNG state (a non-exact resume)


def resume_differences(saved: dict, current: dict) -> dict[str, tuple]:
    """``{dotted.key: (checkpoint value, this value)}`` for every key that differs (both flattened).

    A key the checkpoint's (older) config does not have yet counts with its default value.
    """
    defaults = flat_config(RunConfig().to_dict())
    diff = {}
    for k, v in current.items():
        if k not in saved and k not in defaults:
            continue
        old = saved.get(k, defaults.get(k))
        if old != v:
            diff[k] = (old, v)
    return diff


def _allowed(key: str, allow) -> bool:
    return any(key == a or key.endswith("." + a) for a in allow)


def check_resume_config(run_dir: Path, cfg: RunConfig, num_processes: int, say=print) -> None:
    """Refuse a resume whose config differs from the one the newest checkpoint was trained with.

    The checkpoint's config comes from its trainer_state.json (older checkpoints: the newest
    config file of the run folder). Differences in `RESUME_FREE` keys are reported only; any other
    must be named in ``train.resume_allow`` (``--resume-allow``). The global micro-batch
    (batch_size x processes) can never change: the checkpoint's place in the data counts in it.
    """
    if not complete_checkpoints(run_dir):
        return
    meta, source = resume_meta(run_dir)
    saved_tree = (meta or {}).get("config")
    if saved_tree is None:
        path = newest_config(run_dir)
        if path is None:
            return
        import yaml

        saved_tree, source = yaml.safe_load(path.read_text()) or {}, path.name
    saved = flat_config(saved_tree)
    current = flat_config(cfg.to_dict())
    if meta and meta.get("num_processes"):
        saved["num_processes"] = meta["num_processes"]
        current["num_processes"] = num_processes
    diff = resume_differences(saved, current)
    allow = [a for a in cfg.train.resume_allow if a != RNG_ALLOW]
    unknown = [a for a in allow if not any(_allowed(k, [a]) for k in [*current, DATA_KEY])]
    if unknown:
        raise ConfigError(f"resume_allow names unknown config key(s) {unknown}; use names like max_steps, "
                          f"train.lr or {RNG_ALLOW}")
    free = {k: d for k, d in diff.items() if k in RESUME_FREE}
    allowed = {k: d for k, d in diff.items() if k not in free and _allowed(k, allow)}
    refused = {k: d for k, d in diff.items() if k not in free and k not in allowed}
    def lines(ds: dict) -> str:
        return "".join(f"\n  {k}: {a!r} -> {b!r}" for k, (a, b) in ds.items())

    if refused:
        names = ",".join(refused)
        raise ConfigError(
            f"--resume: this config differs from the one {source} was trained with:{lines(refused)}\n"
            "Resuming would not continue the same run. Use the run's own config "
            f"({run_dir / CONFIG_FILE} and later config.resume-N.yaml), start a new run in another "
            f"train.output_dir, or allow the change explicitly: --resume-allow {names}")
    geometry = ("train.batch_size", "num_processes")
    if any(k in diff for k in geometry):
        old = int(saved.get("train.batch_size", cfg.train.batch_size)) * int(saved.get("num_processes", num_processes))
        new = cfg.train.batch_size * num_processes
        if old != new:
            raise ConfigError(
                f"--resume: batch_size x processes was {old} samples per micro-step and is now {new}; the "
                "checkpoint's place in the data is counted in micro-steps of the old size, so this cannot be "
                "resumed (keep batch_size x processes the same, or start a new run)")
    if allowed:
        say(f"resuming with changes allowed by resume_allow (no longer identical to an uninterrupted run):"
            f"{lines(allowed)}")
    if free:
        say(f"resuming with changed bookkeeping settings:{lines(free)}")


def resume_meta(run_dir: Path) -> tuple[dict | None, str | None]:
    """(run meta, checkpoint name) of the newest complete checkpoint that has them."""
    for ckpt in reversed(complete_checkpoints(run_dir)):
        meta = checkpoint_run_meta(ckpt)
        if meta and meta.get("config"):
            return meta, ckpt.name
    return None, None


def data_fingerprint(dataset) -> str:
    """Sample count and a hash of every sample's token length: what the data order is made of."""
    lengths = getattr(dataset, "lengths", None)
    digest = hashlib.sha256(json.dumps(list(lengths)).encode()).hexdigest()[:12] if lengths is not None else "?"
    return f"{len(dataset)} samples, token lengths {digest}"


def check_resume_data(run_dir: Path, cfg: RunConfig, fingerprint: str, say=print) -> None:
    """Refuse a resume whose training data (at the same path) is no longer what the checkpoint saw."""
    meta, source = resume_meta(run_dir)
    old = (meta or {}).get("data")
    if old is None or old == fingerprint:
        return
    change = f"\n  {DATA_KEY}: {old!r} -> {fingerprint!r}"
    if _allowed(DATA_KEY, cfg.train.resume_allow):
        say(f"resuming with other training data (resume_allow: {DATA_KEY}):{change}")
        return
    raise ConfigError(
        f"--resume: the training data differs from what {source} was trained on:{change}\n"
        "The samples and their order would not continue the run. Restore the data, start a new run in another "
        f"train.output_dir, or allow it explicitly: --resume-allow {DATA_KEY}")


def newest_config(run_dir: Path) -> Path | None:
    """The config the run was last started with: the newest config.resume-N.yaml, else config.yaml."""
    resumes = sorted((int(m.group(1)), p) for p in run_dir.glob("config.resume-*.yaml")
                     if (m := _RESUME_CONFIG.match(p.name)))
    if resumes:
        return resumes[-1][1]
    first = run_dir / CONFIG_FILE
    return first if first.is_file() else None


def write_run_config(run_dir: Path, cfg: RunConfig, resume: bool) -> Path:
    """config.yaml on a new run; a resume keeps it and writes config.resume-N.yaml (N = 1, 2, ...)."""
    first = run_dir / CONFIG_FILE
    if not resume or not first.is_file():
        path = first
    else:
        n = [int(m.group(1)) for p in run_dir.glob("config.resume-*.yaml") if (m := _RESUME_CONFIG.match(p.name))]
        path = run_dir / f"config.resume-{max(n, default=0) + 1}.yaml"
    cfg.save(path)
    return path


def trackers(report_to: str):
    if report_to == "none":
        return None
    if report_to == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            log.warning("tensorboard is not installed (pip install 'llavakit[tensorboard]'); not logging to it")
            return None
    return report_to


def flat_config(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_config(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step", dynamic_ncols=True)


def append_loss(path: Path, step: int, loss: float, lr: float, nonfinite: bool = False) -> None:
    row = {"step": step, "loss": loss, "lr": lr}
    # the loss or the gradients were NaN/inf: the step was skipped or the run stops (under optimizer_in_backward
    # the weights were already updated during backward, so such a run stops)
    if nonfinite:
        row["nonfinite"] = True
    try:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
    except OSError as e:  # e.g. ENOSPC: say so; --resume drops a cut-off line
        from .checkpoint import write_error

        raise write_error(e, path, "the loss log", path.parent, latest_checkpoint(path.parent),
                          note="a cut-off last line is dropped on --resume") from e


def truncate_loss_log(path: Path, step: int, say=print) -> None:
    """On resume drop entries past the checkpoint: they are re-done identically.

    A line that does not parse (a write cut short by a full disk or a power loss) is dropped with
    a warning; everything after it is past the checkpoint or re-done anyway.
    """
    if not path.is_file():
        return
    rows, bad = _parse_losses(path)
    if bad:
        say(f"warning: {path} has {len(bad)} unreadable line(s) (a write cut short?): line(s) "
            f"{', '.join(str(n) for n, _ in bad[:5])}, e.g. {bad[0][1][:60]!r}; dropped them")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= step))
    os.replace(tmp, path)


def _parse_losses(path: Path) -> tuple[list[dict], list[tuple[int, str]]]:
    rows, bad = [], []
    for n, line in enumerate(Path(path).read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or "step" not in row:
                raise ValueError(line)
            rows.append(row)
        except ValueError:
            bad.append((n, line))
    return rows, bad


def read_losses(path: Path) -> list[dict]:
    """The rows of a loss log; an unparseable last line (a write cut short) is skipped with a warning."""
    rows, bad = _parse_losses(path)
    lines = Path(path).read_text(errors="replace").splitlines()
    last = max((n for n, x in enumerate(lines, 1) if x.strip()), default=0)
    if bad and (len(bad) > 1 or bad[0][0] != last):
        n, line = bad[0]
        raise ValueError(f"{path}, line {n}: not a loss record: {line[:80]!r}")
    if bad:
        log.warning("%s: skipping an unreadable last line (a write cut short?)", path)
    return rows


def plot_losses(log_path: Path, png: Path, title: str = "") -> Path | None:
    if not log_path.is_file():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_losses(log_path)
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean over supervised tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png
