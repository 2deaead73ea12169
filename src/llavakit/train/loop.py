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
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from .checkpoint import (install_hooks, latest_checkpoint, load_checkpoint, remove_partial, save_checkpoint)
from .config import ConfigError, RunConfig
from .recipes import PROJECTOR_FILE, apply_stage, assemble, trainable_table
from .runlog import (LOSS_LOG, append_loss, flat_config, guard_output_dir, plot_losses, progress_bar, read_losses,
                     trackers, truncate_loss_log)

__all__ = ["train", "prepare_data", "epoch_order", "rank_batches", "make_loader", "make_optimizer", "make_collator",
           "optimizer_step", "save_final", "supervised_count", "read_losses", "plot_losses", "LOSS_LOG"]
log = logging.getLogger(__name__)


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
    problems = validate((convs, problems), check_images=d.check_images)
    bad = {p.index for p in problems if p.severity == "error"}
    template = get_template(d.template, processor.tokenizer)
    dataset = SupervisedDataset([c for c in convs if c.index not in bad], processor, template,
                                max_length=d.max_length, overflow=d.overflow)
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
    from accelerate.utils import DistributedDataParallelKwargs, set_seed
    from transformers import get_scheduler

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

    if main:
        guard_output_dir(run_dir, resume)
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / "config.yaml")
    accelerator.wait_for_everyone()
    set_seed(t.seed)

    model, processor = assemble(cfg)
    processor.template = cfg.data.template
    dataset = prepare_data(cfg, processor, say, run_dir if main else None)
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

    state = {"step": 0, "epoch": 0, "micro_in_epoch": 0}
    if resume:
        remove_partial(run_dir)
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            say(f"--resume: no complete checkpoint in {run_dir}; starting from step 0")
        else:
            state = load_checkpoint(accelerator, ckpt)
            say(f"resumed from {ckpt} (step {state['step']}, epoch {state['epoch']})")
    if main:
        truncate_loss_log(run_dir / LOSS_LOG, state["step"])

    say(f"training: {len(dataset)} samples, {total_steps} steps of {t.batch_size} x {world} process(es) x "
        f"{t.grad_accum} accumulation = {t.batch_size * world * t.grad_accum} samples/step")
    bar = progress_bar(total_steps, state["step"], main)
    model.train()
    t_last, tokens_since = time.perf_counter(), 0
    while state["step"] < total_steps:
        order = epoch_order(dataset, cfg, state["epoch"], t.batch_size * world)
        epoch_batches = rank_batches(order, t.batch_size, world, rank)
        loader = iter(make_loader(dataset, epoch_batches[state["micro_in_epoch"]:], collator, cfg.data.num_workers,
                                  seed=t.seed * 1000 + state["epoch"]))
        while state["step"] < total_steps:
            window = [b for _, b in zip(range(t.grad_accum), loader)]
            if not window:  # defensive: an exhausted epoch moves to the next one
                state["epoch"], state["micro_in_epoch"] = state["epoch"] + 1, 0
                break
            loss, real_tokens = optimizer_step(accelerator, model, optimizer, scheduler, window, t, world)
            state["step"] += 1
            state["micro_in_epoch"] += len(window)
            if state["micro_in_epoch"] >= len(epoch_batches):  # epoch done: the next step starts a new one
                state["epoch"] += 1
                state["micro_in_epoch"] = 0
            tokens_since += real_tokens
            lr = scheduler.get_last_lr()[0]
            if main:
                append_loss(run_dir / LOSS_LOG, state["step"], loss, lr)
            if state["step"] % max(1, t.log_every) == 0 or state["step"] == total_steps:
                now = time.perf_counter()
                tps = tokens_since / max(now - t_last, 1e-9)
                t_last, tokens_since = now, 0
                accelerator.log({"train/loss": loss, "train/lr": lr, "train/tokens_per_s": tps}, step=state["step"])
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")
            bar.update(1)
            if t.save_every and state["step"] % t.save_every == 0 and state["step"] < total_steps:
                save_checkpoint(accelerator, run_dir, state["step"], dict(state), t.keep_last)
            if state["micro_in_epoch"] == 0:
                break
    bar.close()
    accelerator.wait_for_everyone()
    saved = save_final(accelerator, model, processor, cfg, run_dir)
    accelerator.end_training()
    if world == 1:  # let a later run in this process (e.g. stage 2 after stage 1) choose its own precision
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    if main:
        png = plot_losses(run_dir / LOSS_LOG, run_dir / "loss.png", title=f"{t.stage}: {run_dir.name}")
        say(f"done: {state['step']} steps. Saved: " + "; ".join(f"{k} -> {v}" for k, v in saved.items())
            + (f"; loss curve -> {png}" if png else ""))
    return run_dir


def optimizer_step(accelerator, model, optimizer, scheduler, window, t, world) -> tuple[float, int]:
    """One optimizer step over an accumulation window; loss = Σ CE / supervised tokens of the global batch."""
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
    if t.max_grad_norm and t.max_grad_norm > 0:
        accelerator.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], t.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(accelerator.reduce(total, reduction="sum")), real


def make_collator(cfg: RunConfig, processor):
    """The batch collator the recipe asks for: padding-free packing or right padding."""
    from llavakit.data.collate import PackingCollator, PadCollator

    if cfg.data.packing:
        return PackingCollator()
    return PadCollator(processor.tokenizer.pad_token_id, padding_side="right")


def save_final(accelerator, model, processor, cfg: RunConfig, run_dir: Path) -> dict:
    """Stage 1 keeps only the projector; full finetunes a complete model; LoRA the adapter + projector."""
    from safetensors.torch import save_file

    saved = {}
    unwrapped = accelerator.unwrap_model(model)
    state = accelerator.get_state_dict(model)  # gathers FSDP/DeepSpeed shards
    if not accelerator.is_main_process:
        return saved
    stage = cfg.train.stage
    proj = {k[len("multi_modal_projector."):]: v.contiguous() for k, v in state.items()
            if k.startswith("multi_modal_projector.")}
    if stage == "pretrain" or stage in ("lora", "qlora"):
        save_file(proj, str(run_dir / PROJECTOR_FILE), metadata={"format": "pt"})
        saved["projector"] = str(run_dir / PROJECTOR_FILE)
    if stage in ("lora", "qlora"):
        unwrapped.language_model.save_pretrained(run_dir / "adapter")
        saved["LoRA adapter"] = str(run_dir / "adapter")
        if cfg.train.train_vision:
            vis = {k: v.contiguous() for k, v in state.items() if k.startswith("vision_tower.")}
            save_file(vis, str(run_dir / "vision.safetensors"), metadata={"format": "pt"})
            saved["vision tower"] = str(run_dir / "vision.safetensors")
    if stage == "finetune":
        unwrapped.save_pretrained(run_dir / "model", state_dict=state, safe_serialization=True)
        processor.save_pretrained(run_dir / "model")
        saved["model"] = str(run_dir / "model")
    return saved
