"""A run folder's log side: the loss log (``losses.jsonl``), its plot, the progress bar, trackers and
the guard that keeps two runs out of one folder."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .checkpoint import latest_checkpoint
from .config import ConfigError
from .recipes import PROJECTOR_FILE

log = logging.getLogger(__name__)
LOSS_LOG = "losses.jsonl"


def guard_output_dir(run_dir: Path, resume: bool) -> None:
    has_run = run_dir.is_dir() and any(
        (run_dir / n).exists() for n in ("model", PROJECTOR_FILE, "adapter", LOSS_LOG)
    ) or bool(latest_checkpoint(run_dir))
    if has_run and not resume:
        raise ConfigError(
            f"{run_dir} already holds a training run; pass --resume to continue it, or set "
            "train.output_dir to a new folder (nothing is overwritten)"
        )


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


def append_loss(path: Path, step: int, loss: float, lr: float) -> None:
    with open(path, "a") as f:
        f.write(json.dumps({"step": step, "loss": loss, "lr": lr}) + "\n")


def truncate_loss_log(path: Path, step: int) -> None:
    """On resume drop entries past the checkpoint: they are re-done identically."""
    if not path.is_file():
        return
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= step))


def read_losses(path: Path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


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
