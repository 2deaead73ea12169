"""Training data: the validated dataset, its seeded epoch order, each process's micro-batches, the
collator and the loader."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .config import ConfigError, RunConfig

log = logging.getLogger(__name__)


# --- data ---------------------------------------------------------------------------------------
def data_cache_dir(cfg: RunConfig) -> Path | None:
    """Where the start-up cache lives: data.cache_dir, else $LLAVAKIT_DATA_CACHE, else RUN_DIR/data_cache
    (None with data.cache: false)."""
    import os

    from llavakit.data.token_cache import ENV_DIR

    if not cfg.data.cache:
        return None
    return Path(cfg.data.cache_dir or os.environ.get(ENV_DIR) or Path(cfg.train.output_dir) / "data_cache")


def prepare_data(cfg: RunConfig, processor, say=print, run_dir: Path | None = None):
    """Read, validate and tokenize the training data; refuse to start on errors unless told.

    Structural and image checks come from `llavakit.data.validate` (the same as `llavakit data
    check`); token-level problems (nothing to supervise, too long to keep) come from building the
    dataset, so every sample is tokenized once. All of it is read from the start-up cache
    (`llavakit.data.token_cache`, `data_cache_dir`) when an earlier run saw the same inputs.
    """
    from llavakit.data.dataset import default_workers
    from llavakit.data.images import ImageLimits
    from llavakit.data.templates import get_template
    from llavakit.data.token_cache import prepare
    from llavakit.data.video import VideoLimits

    d = cfg.data
    name = d.train if isinstance(d.train, str) else "the mixture"
    limits = ImageLimits.of(d.max_pixels, d.max_side, d.max_aspect_ratio)  # checked from headers, before decoding
    video_limits = VideoLimits.of(d.video_max_frame_pixels, d.video_max_seconds, d.video_max_source_frames)
    template = get_template(d.template, processor.tokenizer)
    prepared = prepare(d.train, processor, template, image_folder=d.image_folder, format=d.format, seed=d.seed,
                       max_length=d.max_length, overflow=d.overflow, limits=limits, check_images=d.check_images,
                       cache_dir=data_cache_dir(cfg), workers=d.preprocess_workers or default_workers(), say=say,
                       video_limits=video_limits)
    dataset, problems = prepared.dataset, prepared.problems
    report = dataset.report
    skipped_at = set(report.skipped_indices)
    skipped = [p for p in report.problems if p.index in skipped_at]
    errors = [p for p in problems if p.severity == "error"] + skipped
    warnings = [p for p in problems if p.severity == "warning"]
    if run_dir is not None:
        (run_dir / "data_report.json").write_text(json.dumps(
            {"problems": [p.as_dict() for p in problems], **report.as_dict()}, indent=1))
    for p in warnings[:5]:
        say(f"warning: {p}")
    if len(warnings) > 5:
        say(f"... and {len(warnings) - 5} more warnings (run `llavakit data check` for all)")
    if errors:
        for p in errors[:10]:
            say(f"error: {p}")
        n_bad = len({p.index for p in errors})
        if not d.skip_invalid:
            raise ConfigError(
                f"{n_bad} sample(s) in {name} have errors (first ones above); fix them "
                f"(`llavakit data check {name}` lists all) or set data.skip_invalid=true to train on the rest"
            )
        say(f"skipping {n_bad} invalid sample(s) (data.skip_invalid=true); {len(dataset)} remain")
    if prepared.mixture_table is not None:
        say("data mixture:\n" + prepared.mixture_table)
    say(f"data: {report}")
    if len(dataset) == 0:
        raise ConfigError(f"no trainable samples left in {name}")
    return dataset


def epoch_order(dataset, cfg: RunConfig, epoch: int, global_batch: int) -> list[int]:
    """Sample order of one epoch: seeded, optionally exact-length/modality grouped."""
    if cfg.data.group_by_length:
        from llavakit.data.sampler import LengthGroupedSampler

        sampler = LengthGroupedSampler(dataset.lengths, global_batch, has_image=dataset.has_image,
                                       seed=cfg.train.seed)
        sampler.set_epoch(epoch)
        return list(sampler)
    g = torch.Generator().manual_seed(cfg.train.seed * 1000 + epoch)
    return torch.randperm(len(dataset), generator=g).tolist()


def rank_batches(order: list[int], per_device: int, world: int, rank: int) -> list[list[int]]:
    """This process's micro-batches: slice `rank` of every global micro-batch of the order."""
    g = per_device * world
    if world > 1 and len(order) % g:  # wrap around so every process gets a full slice (no hang)
        order = order + order[: g - len(order) % g]
    out = []
    for start in range(0, len(order), g):
        chunk = order[start:start + g]
        mine = chunk[rank * per_device:(rank + 1) * per_device]
        if mine:
            out.append(mine)
    return out


def make_loader(dataset, batches, collator, num_workers: int, seed: int = 0):
    from torch.utils.data import DataLoader

    # Its own generator: creating the iterator draws a worker base seed, which must not consume the
    # global RNG (dropout) at a point that differs between a resumed and an uninterrupted run.
    return DataLoader(dataset, batch_sampler=batches, collate_fn=collator, num_workers=num_workers,
                      persistent_workers=False, generator=torch.Generator().manual_seed(seed))


def make_collator(cfg: RunConfig, processor):
    """The batch collator the recipe asks for: padding-free packing or right padding."""
    from llavakit.data.collate import PackingCollator, PadCollator

    if cfg.data.packing:
        return PackingCollator()
    return PadCollator(processor.tokenizer.pad_token_id, padding_side="right")


