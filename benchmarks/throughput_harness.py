"""The two harnesses that time one row: llavakit's own training pieces and the HF Llava + Trainer peer.

The measuring helpers (`Meter`, `orders`, `weight_parts`, `flops_of`, `result_row`) are shared with TRL's
harness in `throughput_trl.py`."""

from __future__ import annotations

import json
import os
import resource
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from throughput_workload import Row, image_names


# --- measuring ----------------------------------------------------------------------------------
def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class Meter:
    """Peak memory + wall time of the timed window, on CPU or CUDA."""

    def __init__(self, device: str):
        import torch

        self.torch, self.cuda = torch, device == "cuda"
        self.t0 = self.t1 = None
        self.base = self.current()

    def current(self) -> float:
        return self.torch.cuda.memory_allocated() / 2**20 if self.cuda else _rss_mib()

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def start(self):
        self.sync()
        self.t0 = time.perf_counter()

    def stop(self):
        self.sync()
        self.t1 = time.perf_counter()

    def peak(self) -> float:
        if self.cuda:
            return self.torch.cuda.max_memory_allocated() / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def longest_batch(stats: list[dict], batch: int) -> list[int]:
    """The `batch` longest samples: the first warm-up step of every row when only some steps are timed, so
    each row's peak memory includes the worst batch whichever batches its timed window holds."""
    return sorted(range(len(stats)), key=lambda j: -stats[j]["tokens"])[:batch]


def orders(n: int, batch: int, warmup: int, steps: int, seed: int = 0, first: list[int] | None = None):
    """(warm-up batches, timed batches) of sample indices: llavakit's shuffled order of epochs 1 and 0;
    `first` replaces the first warm-up batch."""
    import torch

    def perm(epoch):  # = train/loop.py's epoch_order without grouping
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()

    cut = lambda order: [order[i:i + batch] for i in range(0, len(order), batch)]  # noqa: E731
    timed, warm = cut(perm(0)), cut(perm(1))[:warmup]
    return ([first] + warm[1:] if first else warm), timed[:steps] if steps else timed


def flops_of(model_parts: dict, stage: int, cached: bool, tokens: int, answer: int, images: int) -> float:
    """Useful FLOPs of a window: 6N trained, 4N frozen-with-gradient, 2N per patch token (frozen tower)."""
    p = model_parts
    llm = 6 if stage == 2 else 4
    f = llm * p["llm_body"] * tokens + llm * p["lm_head"] * answer
    f += 6 * p["projector"] * images * p["vision_tokens"]
    if not cached:
        f += 2 * p["vision"] * images * p["patch_tokens"]
    return float(f)


def weight_parts(vision: int, projector: int, llm_body: int, lm_head: int, vision_tokens: int,
                 patch_tokens: int) -> dict:
    """Weight counts for `flops_of` (the LLM body without its input embeddings: a lookup is no matmul)."""
    return {"vision": vision, "projector": projector, "llm_body": llm_body, "lm_head": lm_head,
            "vision_tokens": vision_tokens, "patch_tokens": patch_tokens}


def n_weights(module) -> int:
    return sum(p.numel() for p in module.parameters())


def result_row(row: Row, meter: Meter, base: float, samples: int, real: int, slots: int, flops: float,
               peak_tflops: float, extra: dict) -> dict:
    secs = meter.t1 - meter.t0
    out = {"row": row.name, "config": asdict(row), "steps_s": round(secs, 3), "samples": samples,
           "samples_per_s": samples / secs, "real_tokens_per_s": real / secs,
           "padding_fraction": 1 - real / max(slots, 1), "peak_mem_mib": meter.peak(),
           "delta_mem_mib": meter.peak() - base, "tflops": flops / secs / 1e12,
           "mfu": flops / secs / (peak_tflops * 1e12)}
    out.update(extra)
    return out


class step_profiler:
    """``LLAVAKIT_BENCH_PROFILE=DIR``: torch.profiler over the timed steps of a llavakit row, its top operators by
    self CPU time written to DIR/<row>.txt (profiling slows the steps: use such a run for the profile only)."""

    def __init__(self, row: Row):
        self.out, self.prof = os.environ.get("LLAVAKIT_BENCH_PROFILE"), None
        self.name = "".join(c if c.isalnum() else "_" for c in row.name.strip()).strip("_")

    def __enter__(self):
        if self.out:
            from torch.profiler import ProfilerActivity, profile

            self.prof = profile(activities=[ProfilerActivity.CPU])
            self.prof.__enter__()
        return self

    def __exit__(self, *exc):
        if self.prof is not None:
            self.prof.__exit__(*exc)
            table = self.prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
            Path(self.out).mkdir(parents=True, exist_ok=True)
            (Path(self.out) / f"{self.name}.txt").write_text(table)
            self.prof = None


def run_llavakit(row: Row, wd: Path, args) -> dict:
    from accelerate import Accelerator
    from transformers import get_scheduler

    from llavakit.model.packed_attention import use_packed_attention
    from llavakit.train.host_memory import return_freed_memory
    from llavakit.train.optim import attach_in_backward
    from llavakit.train.config import load_config
    from llavakit.train.loop import (epoch_order, make_collator, make_loader, make_optimizer, optimizer_step,
                                     prepare_data, rank_batches)
    from llavakit.train.recipes import apply_stage, assemble

    tmp = Path(tempfile.mkdtemp(prefix="llavakit-bench-"))
    template = "vicuna_v1" if row.stage == 2 else "plain"
    cfg = load_config(base={
        "model": {"init_from": str(wd / f"llavakit_s{row.stage}"), "attn_implementation": args.attn,
                  "dtype": "float32"},
        "data": {"train": str(wd / "data" / f"stage{row.stage}.json"), "image_folder": str(wd / "data" / "images"),
                 "template": template, "packing": row.pack, "group_by_length": row.group,
                 "num_workers": row.workers, "max_length": 4096, "check_images": False},
        "train": {"stage": "finetune" if row.stage == 2 else "pretrain", "batch_size": args.batch,
                  "lr": 2e-5 if row.stage == 2 else 1e-3, "supervised_logits_only": row.sup,
                  "loss_chunk_size": row.chunk, "gradient_checkpointing": row.ckpt,
                  "compile": row.compile, "optimizer": row.optim, "optimizer_in_backward": row.in_bwd,
                  "return_freed_memory": row.malloc,
                  **({"max_grad_norm": 0.0} if row.in_bwd else {}),
                  "precision": args.precision, "report_to": "none", "output_dir": str(tmp / "run"),
                  "schedule": "constant", "warmup_ratio": 0.0, "seed": 0}})
    accelerator = Accelerator(mixed_precision={"fp32": "no", "bf16": "bf16"}[args.precision],
                              cpu=args.device == "cpu")
    quiet = lambda *a, **k: None  # noqa: E731
    if cfg.train.return_freed_memory and args.device == "cpu":  # as the trainer does
        return_freed_memory()
    model, processor = assemble(cfg)
    if cfg.data.packing:  # as the trainer does: an sdpa/eager LLM attends per packed sample, with no dense mask
        use_packed_attention(model)
    processor.template = template
    dataset = prepare_data(cfg, processor, say=quiet)
    model, groups = apply_stage(model, cfg)
    collator = make_collator(cfg, processor)
    extra = {}
    if row.cache:
        from llavakit.train.feature_cache import attach_feature_cache

        cfg.data.feature_cache = str(tmp / "features")  # a fresh (cold) cache: its build time is reported
        model.to(accelerator.device)
        t = time.perf_counter()
        dataset, collator = attach_feature_cache(cfg, model, processor, dataset, collator, accelerator, say=quiet)
        extra["cache_build_s"] = time.perf_counter() - t
        extra["cache_build_images_per_s"] = len(dataset) / extra["cache_build_s"]
    c, lm = model.config, model.language_model
    head, emb = lm.get_output_embeddings().weight.numel(), lm.get_input_embeddings().weight.numel()
    parts = weight_parts(n_weights(model.vision_tower), n_weights(model.multi_modal_projector),
                         n_weights(lm) - head - emb, head, c.vision_tokens, c.patch_grid**2 + c.vision_prefix_tokens)
    optimizer = make_optimizer(groups, 0.0, row.optim)
    scheduler = get_scheduler("constant", optimizer)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    attach_in_backward(accelerator, optimizer, cfg.train)  # as the trainer does
    model.train()
    warm = rank_batches(epoch_order(dataset, cfg, 1, args.batch), args.batch, 1, 0)[:args.warmup]
    timed = rank_batches(epoch_order(dataset, cfg, 0, args.batch), args.batch, 1, 0)
    timed = timed[:args.steps] if args.steps else timed
    stats = json.loads((wd / "stats.json").read_text())[str(row.stage)]
    if args.steps:
        warm[0] = longest_batch(stats, args.batch)
    loader = make_loader(dataset, warm + timed, collator, cfg.data.num_workers)
    meter = Meter(args.device)
    base = meter.current()
    samples = real = slots = 0
    profiler = step_profiler(row)
    for i, (idx, mb) in enumerate(zip(warm + timed, loader)):
        if i >= len(warm):
            samples += len(idx)
            real += int(mb["attention_mask"].sum()) if "attention_mask" in mb else mb["input_ids"].numel()
            slots += mb["input_ids"].numel()
        optimizer_step(accelerator, model, optimizer, scheduler, [mb], cfg.train, 1)
        if i == len(warm) - 1:
            meter.start()
            profiler.__enter__()
    meter.stop()
    profiler.__exit__(None, None, None)
    done = [j for b in timed for j in b]
    flops = flops_of(parts, row.stage, row.cache, sum(stats[j]["tokens"] for j in done),
                     sum(stats[j]["answer"] for j in done), sum(stats[j]["images"] for j in done))
    shutil.rmtree(tmp, ignore_errors=True)  # the run dir and a feature cache (GBs at the GPU shape)
    return result_row(row, meter, base, samples, real, slots, flops, args.peak_tflops, extra)


def run_peer(row: Row, wd: Path, args) -> dict:
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration, Trainer, TrainingArguments

    bf16 = args.precision == "bf16"
    hf = wd / f"hf_s{row.stage}"
    model = LlavaForConditionalGeneration.from_pretrained(hf, attn_implementation=args.attn, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(hf)
    processor.tokenizer.padding_side = "right"
    inner = model.model
    inner.vision_tower.requires_grad_(False)
    if row.stage == 1:  # stage 1: only the projector trains
        inner.language_model.requires_grad_(False)
        model.lm_head.requires_grad_(False)
    rows = json.loads((wd / "data" / f"stage{row.stage}.json").read_text())
    images = wd / "data" / "images"
    stats = json.loads((wd / "stats.json").read_text())[str(row.stage)]
    warm, timed = orders(len(rows), args.batch, args.warmup, args.steps,
                         first=longest_batch(stats, args.batch) if args.steps else None)
    ordered = [rows[j] for b in warm + timed for j in b]
    pad_id, image_id = processor.tokenizer.pad_token_id, model.config.image_token_id
    log: list[tuple[int, int]] = []

    def collate(examples):  # the seed-004 collator
        texts = [processor.apply_chat_template(
            [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
             for t in ex["conversations"]], tokenize=False) for ex in examples]
        pics = [Image.open(images / name).convert("RGB") for ex in examples for name in image_names(ex)]
        # The rendered text starts with <s> already: no second one from the tokenizer.
        batch = processor(text=texts, images=pics, padding=True, return_tensors="pt", add_special_tokens=False)
        labels = batch["input_ids"].clone()
        labels[labels == pad_id] = -100
        labels[labels == image_id] = -100
        batch["labels"] = labels
        log.append((int(batch["attention_mask"].sum()), batch["input_ids"].numel()))
        return batch

    meter = Meter(args.device)
    out_dir = tempfile.mkdtemp(prefix="peer-bench-")
    targs = TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=args.batch,
        max_steps=len(warm) + len(timed), learning_rate=2e-5 if row.stage == 2 else 1e-3,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        report_to=[], save_strategy="no", logging_strategy="no", dataloader_num_workers=0,
        remove_unused_columns=False, train_sampling_strategy="sequential", use_cpu=args.device == "cpu",
        bf16=bf16, seed=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=targs, train_dataset=ordered, data_collator=collate,
                      callbacks=[window_timer(meter, len(warm), len(timed))])
    base = meter.current()  # the model is on its device now, as llavakit's is after accelerator.prepare
    trainer.train()
    shutil.rmtree(out_dir, ignore_errors=True)
    return llava_result(row, model, meter, base, stats, timed, log[len(warm):len(warm) + len(timed)], args)


def window_timer(meter: Meter, n_warm: int, n_timed: int):
    """A `TrainerCallback` that starts `meter` at the end of the last warm-up step, stops it after the last step."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            if state.global_step == n_warm:
                meter.start()
            if state.global_step == n_warm + n_timed:
                meter.stop()

    return Timer()


def llava_result(row: Row, model, meter: Meter, base: float, stats: list[dict], timed: list[list[int]],
                 window: list[tuple[int, int]], args) -> dict:
    """The result of a row trained as a transformers `LlavaForConditionalGeneration` (the peer, TRL);
    `window`: (real tokens, slots) of each timed batch."""
    inner, c, vc = model.model, model.config, model.config.vision_config
    emb = inner.language_model.get_input_embeddings().weight.numel()
    parts = weight_parts(n_weights(inner.vision_tower), n_weights(inner.multi_modal_projector),
                         n_weights(inner.language_model) - emb, model.lm_head.weight.numel(), c.image_seq_length,
                         (vc.image_size // vc.patch_size) ** 2 + 1)
    done = [j for b in timed for j in b]
    flops = flops_of(parts, row.stage, False, sum(stats[j]["tokens"] for j in done),
                     sum(stats[j]["answer"] for j in done), sum(stats[j]["images"] for j in done))
    return result_row(row, meter, base, len(done), sum(r for r, _ in window), sum(s for _, s in window), flops,
                      args.peak_tflops, {})
