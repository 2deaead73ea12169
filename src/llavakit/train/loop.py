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
from pathlib import Path

from .checkpoint import (any_process, install_hooks, latest_checkpoint, load_latest, remove_partial, save_checkpoint,
                         write_error)
from .config import ConfigError, RunConfig, TrainingError
from .recipes import PROJECTOR_FILE, apply_stage, assemble, trainable_table
from .runlog import (LOSS_LOG, RNG_ALLOW, RunLock, append_loss, check_resume_config, check_resume_data,
                     data_fingerprint, flat_config, guard_output_dir, plot_losses, progress_bar, read_losses, trackers,
                     truncate_loss_log, write_run_config)
from .host_memory import return_freed_memory
from .optim import attach_in_backward
from .schedule import make_scheduler
from .step import (NonFiniteError, StepResult, check_finite_weights, make_optimizer, on_nonfinite, optimizer_step,
                   supervised_count)
from .batches import epoch_order, make_collator, make_loader, prepare_data, rank_batches

__all__ = ["train", "prepare_data", "prepare_data_once", "epoch_order", "rank_batches", "make_loader", "make_optimizer",
           "make_collator", "optimizer_step", "save_final", "supervised_count", "read_losses", "plot_losses", "LOSS_LOG",
           "NonFiniteError", "StepResult"]
log = logging.getLogger(__name__)

FINISHED = "finished.json"  # written when a run saved its final model: {"step", "total_steps", "saved"}


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
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes == 1:
        wanted = ("FSDP" if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" else
                  "DeepSpeed" if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" else "it")
        raise ConfigError(
            f"launched as {launched} processes, but accelerate set up each one as a single-process run, so they "
            f"would train separately into the same folder. accelerate runs {wanted} only on GPUs (or other "
            "accelerators) and this machine has none; on CPU launch with configs/accelerate/ddp.yaml and "
            "ACCELERATE_USE_CPU=1 (gloo), or run on GPUs")
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


def refuse_finished_resume(run_dir: Path, t) -> None:
    """`--resume` on a run that already reached its last step would retrain the steps after its last
    checkpoint and overwrite the final model: refuse (before anything is written), and say how to train
    longer."""
    done = run_dir / FINISHED
    if not done.is_file():
        return
    finished = json.loads(done.read_text())
    names = {"model": "model", "projector": PROJECTOR_FILE, "LoRA adapter": "adapter", "vision tower": "vision.safetensors"}
    if not all((run_dir / names.get(k, k)).exists() for k in finished.get("saved", [])):
        return  # its final save is gone: resuming writes it again
    more = (t.max_steps > finished["step"]) if t.max_steps > 0 else \
        (finished.get("max_steps", 0) > 0 or t.epochs > finished.get("epochs", 0))
    if not more:
        ckpt = latest_checkpoint(run_dir)
        raise ConfigError(
            f"{run_dir} already finished at step {finished['step']} and saved its final model; --resume has "
            "nothing to do. To train longer, raise train.max_steps or train.epochs (and pass --resume-allow "
            f"max_steps or epochs): training then continues from "
            f"{ckpt.name if ckpt else 'step 0 (no checkpoint was kept)'}")


def headline_lr(optimizer, scheduler) -> float:
    """The learning rate the progress bar and the loss log show: the LLM's when it trains (what `train.lr`
    sets), else the first group's (the projector's in stage 1)."""
    lrs = scheduler.get_last_lr()
    for group, lr in zip(optimizer.param_groups, lrs):
        if str(group.get("name", "")).startswith("llm"):
            return lr
    return lrs[0]


def _claim_run_dir(run_dir: Path, cfg: RunConfig, resume: bool, world: int, lock: RunLock, say) -> None:
    stale = lock.acquire()
    if stale:
        say(f"warning: cleared a stale lock in {run_dir} left by PID {stale} (no running process holds it)")
    guard_output_dir(run_dir, resume)
    if resume:
        remove_partial(run_dir)
        check_resume_config(run_dir, cfg, world, say)
        refuse_finished_resume(run_dir, cfg.train)
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


def prepare_data_once(cfg: RunConfig, processor, accelerator, say, run_dir: Path):
    """`prepare_data` on every process, the work done once: with the start-up cache on and several
    processes, the main process reads, checks and tokenizes the data and writes the cache while the
    others wait, then they read it. An error on the main process (bad rows, unreadable file) stops
    every process with its message: no rank is left waiting."""
    main = accelerator.is_main_process
    if not cfg.data.cache or accelerator.num_processes == 1:
        return prepare_data(cfg, processor, say, run_dir if main else None)
    built = {}
    _on_main(accelerator, lambda: built.setdefault("dataset", prepare_data(cfg, processor, say, run_dir)))
    return built["dataset"] if main else prepare_data(cfg, processor, say, None)


def _run(cfg: RunConfig, resume: bool, accelerator, run_dir: Path, log_with, say) -> None:
    from accelerate.utils import set_seed

    from llavakit.model.packed_attention import PACKED_SDPA, use_packed_attention

    t = cfg.train
    main = accelerator.is_main_process
    set_seed(t.seed)
    if t.return_freed_memory and accelerator.device.type == "cpu":  # before the weights and data are allocated
        return_freed_memory()

    model, processor = assemble(cfg)
    if cfg.data.packing and use_packed_attention(model):  # sdpa/eager: no dense [ΣL, ΣL] mask per packed row
        say(f"packing: the LLM attends within each packed sample ({PACKED_SDPA} attention)")
    processor.template = cfg.data.template
    dataset = prepare_data_once(cfg, processor, accelerator, say, run_dir)
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
    optimizer = make_optimizer(groups, t.weight_decay, t.optimizer, device=accelerator.device.type)
    scheduler = make_scheduler(t.schedule, optimizer, int(round(t.warmup_ratio * total_steps)), total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    attach_in_backward(accelerator, optimizer, t)  # train.optimizer_in_backward: backward updates the weights
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
                lr = headline_lr(optimizer, scheduler)
                if not res.finite:
                    if main:
                        append_loss(run_dir / LOSS_LOG, state["step"] + 1, loss, lr, nonfinite=True)
                    on_nonfinite(state, res, t, run_dir, say)
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
                    logged = {"train/loss": loss, "train/lr": lr, "train/tokens_per_s": tps}
                    if res.grad_norm is not None:  # the norm before clipping (or of the in-backward updates)
                        logged["train/grad_norm"] = res.grad_norm
                    accelerator.log(logged, step=state["step"])
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
    if accelerator.num_processes > 1:
        # Free the DDP model here, every rank together, while the process group is alive: end_training destroys
        # the group, and a gloo group freed later by the model's reducer (its last reference) can wait forever
        # for its worker threads once the other rank has exited (seen once in CI: rank 1 in ~ProcessGroupGloo).
        accelerator.wait_for_everyone()
        del model
        accelerator.free_memory()
        accelerator.wait_for_everyone()
    accelerator.end_training()
    if main:
        (run_dir / FINISHED).write_text(json.dumps({"step": state["step"], "max_steps": t.max_steps,
                                                    "epochs": t.epochs, "saved": sorted(saved)}) + "\n")
        png = plot_losses(run_dir / LOSS_LOG, run_dir / "loss.png", title=f"{t.stage}: {run_dir.name}")
        skipped = f" ({state['nonfinite_skips']} non-finite step(s) skipped)" if state["nonfinite_skips"] else ""
        say(f"done: {state['step']} steps{skipped}. Saved: " + "; ".join(f"{k} -> {v}" for k, v in saved.items())
            + (f"; loss curve -> {png}" if png else ""))


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
            # Only the LoRA weights: the embedding rows llavakit added (<image>, <pad>) are rebuilt exactly
            # by `build` (mean of the trained rows) and LoRA never trains the embeddings, so PEFT's default
            # of saving a resized embedding (and a tied head) in full would only grow the adapter.
            unwrapped.language_model.save_pretrained(staging / "adapter", save_embedding_layers=False)
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
