"""The training loop: our own, on accelerate (DDP / FSDP / DeepSpeed via `accelerate launch`).

Why not HF `Trainer`: we need (1) the loss normalised by the number of supervised tokens of the
whole *global* batch, so 1 process and N processes with the same global batch give the same loss
curve; (2) a data order that depends only on the seed, the epoch and the global batch, so resuming
(and changing the number of processes) replays exactly the same samples; (3) checkpoints that hold
only trainable weights and are written atomically. Each is a few lines here and a fight with
`Trainer`'s internals there. Everything distributed is accelerate's: `prepare`, `backward`,
`no_sync`, `reduce`, `save_state`/`load_state`.

Data sharding: every process walks the same seeded order in *global* micro-batches of
`batch_size x num_processes` samples and takes its own slice, so the samples in a step do not
depend on how many processes share it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import NamedTuple

import torch

from .checkpoint import (any_process, install_hooks, latest_checkpoint, load_latest, remove_partial, save_checkpoint,
                         write_error)
from .config import ConfigError, RunConfig, TrainingError
from .recipes import PROJECTOR_FILE, apply_stage, assemble, trainable_table
from .runlog import (LOSS_LOG, RNG_ALLOW, RunLock, append_loss, check_resume_config, check_resume_data,
                     data_fingerprint, flat_config, guard_output_dir, plot_losses, progress_bar, read_losses, trackers,
                     truncate_loss_log, write_run_config)

__all__ = ["train", "prepare_data", "epoch_order", "rank_batches", "make_loader", "make_optimizer", "make_collator",
           "optimizer_step", "save_final", "supervised_count", "read_losses", "plot_losses", "LOSS_LOG",
           "NonFiniteError", "StepResult"]
log = logging.getLogger(__name__)


class NonFiniteError(TrainingError):
    """The loss or the gradients became NaN/inf; the run stopped without saving anything non-finite."""


# --- data ---------------------------------------------------------------------------------------
def prepare_data(cfg: RunConfig, processor, say=print, run_dir: Path | None = None):
    """Read, validate and tokenize the training data; refuse to start on errors unless told.

    Structural and image checks come from `llavakit.data.validate` (the same as `llavakit data
    check`); token-level problems (nothing to supervise, too long to keep) come from building the
    dataset, so every sample is tokenized once.
    """
    from llavakit.data.dataset import SupervisedDataset
    from llavakit.data.formats import load_conversations
    from llavakit.data.templates import get_template
    from llavakit.data.validate import validate

    d = cfg.data
    convs, problems = load_conversations(d.train, format=d.format, image_folder=d.image_folder, on_error="collect")
    from llavakit.data.images import ImageLimits

    limits = ImageLimits.of(d.max_pixels, d.max_side, d.max_aspect_ratio)  # checked from headers, before decoding
    problems = validate((convs, problems), check_images=d.check_images, **limits.as_kwargs())
    bad = {p.index for p in problems if p.severity == "error"}
    template = get_template(d.template, processor.tokenizer)
    dataset = SupervisedDataset([c for c in convs if c.index not in bad], processor, template,
                                max_length=d.max_length, overflow=d.overflow, image_limits=limits)
    report = dataset.report
    skipped = [p for p in report.problems if p.index in set(report.skipped_indices)]
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
                f"{n_bad} sample(s) in {d.train} have errors (first ones above); fix them "
                f"(`llavakit data check {d.train}` lists all) or set data.skip_invalid=true to train on the rest"
            )
        say(f"skipping {n_bad} invalid sample(s) (data.skip_invalid=true); {len(dataset)} remain")
    say(f"data: {report}")
    if len(dataset) == 0:
        raise ConfigError(f"no trainable samples left in {d.train}")
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


# --- optimisation -------------------------------------------------------------------------------
def make_optimizer(groups, weight_decay: float):
    param_groups = []
    for g in groups:
        decay = [p for p in g.params if p.ndim >= 2]
        no_decay = [p for p in g.params if p.ndim < 2]
        if decay:
            param_groups.append({"params": decay, "lr": g.lr, "weight_decay": weight_decay, "name": g.name})
        if no_decay:
            param_groups.append({"params": no_decay, "lr": g.lr, "weight_decay": 0.0, "name": g.name})
    return torch.optim.AdamW(param_groups, betas=(0.9, 0.999), eps=1e-8)


def supervised_count(labels: torch.Tensor) -> torch.Tensor:
    """Tokens the shifted causal-LM loss counts: positions whose *next* label is supervised."""
    return (labels[..., 1:] != -100).sum()


# --- the run ------------------------------------------------------------------------------------
def train(cfg: RunConfig, resume: bool = False) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    t = cfg.train
    run_dir = Path(t.output_dir)
    log_with = trackers(t.report_to)
    accelerator = Accelerator(
        mixed_precision={"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[t.precision],
        log_with=log_with, project_dir=str(run_dir),
        # we count optimizer steps ourselves; accelerate would otherwise step the schedule once per process
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    main = accelerator.is_main_process
    say = print if main else (lambda *a, **k: None)
    world = accelerator.num_processes
    # One run per folder: the main process holds an OS lock on RUN_DIR/train.lock for the whole run,
    # taken before anything slow. Its checks (lock, existing run, resume config) run on the main
    # process only and every process gets their verdict, so a refusal never leaves a rank waiting.
    lock = RunLock(run_dir) if main else None
    finished = False
    try:
        _on_main(accelerator, lambda: _claim_run_dir(run_dir, cfg, resume, world, lock, say))
        _run(cfg, resume, accelerator, run_dir, log_with, say)
        finished = True
    finally:
        if not finished:  # close tracker files without a barrier (another rank may be gone)
            for tracker in getattr(accelerator, "trackers", []):
                try:
                    tracker.finish()
                except Exception:  # noqa: BLE001 - the original error matters more
                    log.debug("closing tracker %s failed", tracker, exc_info=True)
        if lock is not None:
            lock.release()
        if world == 1:  # let a later run in this process (e.g. stage 2 after stage 1) choose its own precision
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state(reset_partial_state=True)
    return run_dir


def _claim_run_dir(run_dir: Path, cfg: RunConfig, resume: bool, world: int, lock: RunLock, say) -> None:
    stale = lock.acquire()
    if stale:
        say(f"warning: cleared a stale lock in {run_dir} left by PID {stale} (no running process holds it)")
    guard_output_dir(run_dir, resume)
    if resume:
        remove_partial(run_dir)
        check_resume_config(run_dir, cfg, world, say)
    write_run_config(run_dir, cfg, resume)


def _on_main(accelerator, fn) -> None:
    """Run `fn` on the main process; if it raises, raise on every process (no rank left waiting)."""
    err = None
    if accelerator.is_main_process:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, here and on the other ranks
            err = e
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        box = [None if err is None else (isinstance(err, TrainingError), f"{err}")]
        broadcast_object_list(box)
        if err is None and box[0] is not None:
            raise (TrainingError if box[0][0] else ConfigError)(box[0][1])
    if err is not None:
        raise err


def _run(cfg: RunConfig, resume: bool, accelerator, run_dir: Path, log_with, say) -> None:
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    t = cfg.train
    main = accelerator.is_main_process
    set_seed(t.seed)

    model, processor = assemble(cfg)
    processor.template = cfg.data.template
    dataset = prepare_data(cfg, processor, say, run_dir if main else None)
    fingerprint = data_fingerprint(dataset)
    if resume:
        check_resume_data(run_dir, cfg, fingerprint, say)
    model, groups = apply_stage(model, cfg)
    say(trainable_table(model, groups))

    collator = make_collator(cfg, processor)
    if cfg.data.feature_cache:  # frozen vision: tower outputs computed once, then read from disk
        from .feature_cache import attach_feature_cache

        dataset, collator = attach_feature_cache(cfg, model, processor, dataset, collator, accelerator, say)
    world, rank = accelerator.num_processes, accelerator.process_index
    per_epoch_micro = math.ceil(len(dataset) / (t.batch_size * world))
    steps_per_epoch = math.ceil(per_epoch_micro / t.grad_accum)
    total_steps = t.max_steps if t.max_steps > 0 else max(1, math.ceil(t.epochs * steps_per_epoch))
    optimizer = make_optimizer(groups, t.weight_decay)
    schedule = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[t.schedule]
    scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=int(round(t.warmup_ratio * total_steps)),
                              num_training_steps=total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    install_hooks(accelerator, accelerator.unwrap_model)
    if log_with:
        accelerator.init_trackers("llavakit", config=flat_config(cfg.to_dict()))

    state = {"step": 0, "epoch": 0, "micro_in_epoch": 0, "nonfinite_skips": 0}
    if resume:
        ckpt, loaded = load_latest(accelerator, run_dir, allow_bad_rng=RNG_ALLOW in t.resume_allow, warn=say)
        if ckpt is None:
            say(f"--resume: no complete checkpoint in {run_dir}; starting from step 0")
        else:
            state.update(loaded)
            say(f"resumed from {ckpt} (step {state['step']}, epoch {state['epoch']})")
    if main:
        truncate_loss_log(run_dir / LOSS_LOG, state["step"], say)
    meta = {"config": cfg.to_dict(), "num_processes": world, "data": fingerprint}

    say(f"training: {len(dataset)} samples, {total_steps} steps of {t.batch_size} x {world} process(es) x "
        f"{t.grad_accum} accumulation = {t.batch_size * world * t.grad_accum} samples/step")
    bar = progress_bar(total_steps, state["step"], main)
    model.train()
    t_last, tokens_since = time.perf_counter(), 0
    try:
        while state["step"] < total_steps:
            order = epoch_order(dataset, cfg, state["epoch"], t.batch_size * world)
            epoch_batches = rank_batches(order, t.batch_size, world, rank)
            loader = iter(make_loader(dataset, epoch_batches[state["micro_in_epoch"]:], collator,
                                      cfg.data.num_workers, seed=t.seed * 1000 + state["epoch"]))
            while state["step"] < total_steps:
                window = [b for _, b in zip(range(t.grad_accum), loader)]
                if not window:  # defensive: an exhausted epoch moves to the next one
                    state["epoch"], state["micro_in_epoch"] = state["epoch"] + 1, 0
                    break
                res = optimizer_step(accelerator, model, optimizer, scheduler, window, t, world)
                loss, real_tokens = res.loss, res.tokens
                lr = scheduler.get_last_lr()[0]
                if not res.finite:
                    if main:
                        append_loss(run_dir / LOSS_LOG, state["step"] + 1, loss, lr, nonfinite=True)
                    _on_nonfinite(state, res, t, run_dir, say)
                state["step"] += 1
                state["micro_in_epoch"] += len(window)
                if state["micro_in_epoch"] >= len(epoch_batches):  # epoch done: the next step starts a new one
                    state["epoch"] += 1
                    state["micro_in_epoch"] = 0
                tokens_since += real_tokens
                if main and res.finite:
                    append_loss(run_dir / LOSS_LOG, state["step"], loss, lr)
                if state["step"] % max(1, t.log_every) == 0 or state["step"] == total_steps:
                    now = time.perf_counter()
                    tps = tokens_since / max(now - t_last, 1e-9)
                    t_last, tokens_since = now, 0
                    accelerator.log({"train/loss": loss, "train/lr": lr, "train/tokens_per_s": tps},
                                    step=state["step"])
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")
                bar.update(1)
                if t.save_every and state["step"] % t.save_every == 0 and state["step"] < total_steps:
                    check_finite_weights(accelerator, model, state["step"], run_dir, t)
                    save_checkpoint(accelerator, run_dir, state["step"], dict(state), t.keep_last, meta=meta)
                if state["micro_in_epoch"] == 0:
                    break
    finally:
        bar.close()
    accelerator.wait_for_everyone()
    check_finite_weights(accelerator, model, state["step"], run_dir, t)
    saved, err = {}, None
    try:
        saved = save_final(accelerator, model, processor, cfg, run_dir)
    except TrainingError as e:
        err = e
    if any_process(accelerator, err is not None):
        raise err or TrainingError("saving the final model failed on the main process")
    accelerator.end_training()
    if main:
        png = plot_losses(run_dir / LOSS_LOG, run_dir / "loss.png", title=f"{t.stage}: {run_dir.name}")
        skipped = f" ({state['nonfinite_skips']} non-finite step(s) skipped)" if state["nonfinite_skips"] else ""
        say(f"done: {state['step']} steps{skipped}. Saved: " + "; ".join(f"{k} -> {v}" for k, v in saved.items())
            + (f"; loss curve -> {png}" if png else ""))


def _last_good(run_dir: Path) -> str:
    ckpt = latest_checkpoint(run_dir)
    return (f"the last complete checkpoint, {ckpt.name}, is intact (continue from it with --resume)"
            if ckpt else "no checkpoint had been saved yet")


def _on_nonfinite(state: dict, res: StepResult, t, run_dir: Path, say) -> None:
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
        f"{found}: stopped ({why}); nothing was saved from this step on and {_last_good(run_dir)}. Lower "
        f"train.lr (now {t.lr:g}) or train.max_grad_norm, check the data, or set train.on_nonfinite=skip to "
        "drop such steps")


def check_finite_weights(accelerator, model, step: int, run_dir: Path, t) -> None:
    """Refuse to save NaN/inf trainable weights (checked on every process, decided together)."""
    bad = torch.zeros((), device=accelerator.device)
    for p in accelerator.unwrap_model(model).parameters():
        if p.requires_grad and p.numel():
            bad += (~torch.isfinite(p.detach())).sum()
    if any_process(accelerator, bool(bad.item())):
        raise NonFiniteError(
            f"the trainable weights are non-finite after step {step}; not saving them, and "
            f"{_last_good(run_dir)}. Lower train.lr (now {t.lr:g})")


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
            out = model(**mb, num_items_in_batch=n_items, supervised_logits_only=t.supervised_logits_only)
            # DDP averages gradients over processes; scale so the result is the global token mean.
            loss = out.loss * world
        accelerator.backward(loss)
        total += out.loss.detach()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    norm = None
    if t.max_grad_norm and t.max_grad_norm > 0:
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


def make_collator(cfg: RunConfig, processor):
    """The batch collator the recipe asks for: padding-free packing or right padding."""
    from llavakit.data.collate import PackingCollator, PadCollator

    if cfg.data.packing:
        return PackingCollator()
    return PadCollator(processor.tokenizer.pad_token_id, padding_side="right")


def save_final(accelerator, model, processor, cfg: RunConfig, run_dir: Path) -> dict:
    """Stage 1 keeps only the projector; full finetunes a complete model; LoRA the adapter + projector.

    Everything is written to ``RUN_DIR/final.tmp`` first and moved into place once complete, so a
    failed save (disk full) leaves no half-written model; it raises a `TrainingError` naming the file.
    """
    from safetensors.torch import save_file

    saved = {}
    unwrapped = accelerator.unwrap_model(model)
    state = accelerator.get_state_dict(model)  # gathers FSDP/DeepSpeed shards
    if not accelerator.is_main_process:
        return saved
    stage = cfg.train.stage
    staging = run_dir / "final.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir()
        proj = {k[len("multi_modal_projector."):]: v.contiguous() for k, v in state.items()
                if k.startswith("multi_modal_projector.")}
        if stage == "pretrain" or stage in ("lora", "qlora"):
            save_file(proj, str(staging / PROJECTOR_FILE), metadata={"format": "pt"})
            saved["projector"] = PROJECTOR_FILE
        if stage in ("lora", "qlora"):
            unwrapped.language_model.save_pretrained(staging / "adapter")
            saved["LoRA adapter"] = "adapter"
            if cfg.train.train_vision:
                vis = {k: v.contiguous() for k, v in state.items() if k.startswith("vision_tower.")}
                save_file(vis, str(staging / "vision.safetensors"), metadata={"format": "pt"})
                saved["vision tower"] = "vision.safetensors"
        if stage == "finetune":
            unwrapped.save_pretrained(staging / "model", state_dict=state, safe_serialization=True)
            processor.save_pretrained(staging / "model")
            saved["model"] = "model"
    except (OSError, RuntimeError) as e:  # torch/safetensors may report a failed write as RuntimeError
        err = write_error(e, staging, "the final model", run_dir, latest_checkpoint(run_dir))
        shutil.rmtree(staging, ignore_errors=True)
        raise err from e
    for name in saved.values():  # complete: move into place (replacing an older final save)
        dest = run_dir / name
        if dest.is_dir():
            shutil.rmtree(dest)
        os.replace(staging / name, dest)
    shutil.rmtree(staging, ignore_errors=True)
    return {k: str(run_dir / v) for k, v in saved.items()}
