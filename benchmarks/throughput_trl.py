"""TRL's row: the same llava-hf model, data and order trained by TRL's `SFTTrainer`, set up as TRL documents VLM SFT.

TRL's documentation ("Training Vision Language Models" in https://huggingface.co/docs/trl/sft_trainer, and
"Vision datasets" in its dataset_formats page): a conversational dataset with a ``messages`` column and an
``images`` column (a list of images per sample, decoded by `datasets`' ``Image`` feature), the processor passed
as ``processing_class``, ``SFTConfig(max_length=None)`` so no image token is truncated. `SFTTrainer` then
picks its `DataCollatorForVisionLanguageModeling` itself: the processor's chat template renders each
conversation (the images as ``{"type": "image"}`` parts before the first user text, which the exported
template writes as ``<image>\\n``, exactly the markers of llavakit's data), padding to the longest, labels =
input ids with padding set to -100 (TRL's default, ``assistant_only_loss=False``: the prompt and image tokens
are supervised too). TRL 1.x computes the loss with its own chunked LM head (`add_fused_lm_head`), plus the
entropy and top-1 accuracy it logs.

What this harness sets besides: the vision tower frozen (stage 2), the shared settings of every row (batch,
learning rate 2e-5, constant schedule, no weight decay, clipping at 1.0, fp32 or bf16 as the others, no
logging/saving/eval, ``dataloader_num_workers=0``) and the shared data order (a pre-ordered dataset walked
with ``train_sampling_strategy="sequential"``, as the HF peer). Gradient checkpointing is TRL's default
(``SFTConfig.gradient_checkpointing=True``); the row's ``ckpt`` field keeps it or turns it off.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

from throughput_harness import Meter, llava_result, longest_batch, orders, window_timer
from throughput_workload import Row, image_names

MARKERS = re.compile(r"(<image>\s*)+")  # TRL puts the images before the first user text itself


def trl_dataset(rows: list[dict], images: Path):
    """LLaVA JSON rows as TRL's conversational vision dataset: ``messages`` + ``images`` (`datasets` ``Image``)."""
    from datasets import Dataset, Image, List

    role = {"human": "user", "gpt": "assistant"}
    data = {"messages": [[{"role": role[t["from"]], "content": MARKERS.sub("", t["value"]).strip()}
                          for t in r["conversations"]] for r in rows],
            "images": [[str(images / n) for n in image_names(r)] for r in rows]}
    return Dataset.from_dict(data).cast_column("images", List(Image()))


def run_trl(row: Row, wd: Path, args) -> dict:
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    from trl import SFTConfig, SFTTrainer

    hf = wd / f"hf_s{row.stage}"
    model = LlavaForConditionalGeneration.from_pretrained(hf, attn_implementation=args.attn, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(hf)
    model.model.vision_tower.requires_grad_(False)
    if row.stage == 1:  # stage 1: only the projector trains
        model.model.language_model.requires_grad_(False)
        model.lm_head.requires_grad_(False)
    rows = json.loads((wd / "data" / f"stage{row.stage}.json").read_text())
    stats = json.loads((wd / "stats.json").read_text())[str(row.stage)]
    warm, timed = orders(len(rows), args.batch, args.warmup, args.steps,
                         first=longest_batch(stats, args.batch) if args.steps else None)
    dataset = trl_dataset([rows[j] for b in warm + timed for j in b], wd / "data" / "images")

    meter = Meter(args.device)
    out_dir = tempfile.mkdtemp(prefix="trl-bench-")
    config = SFTConfig(
        output_dir=out_dir, max_length=None, per_device_train_batch_size=args.batch,
        max_steps=len(warm) + len(timed), learning_rate=2e-5 if row.stage == 2 else 1e-3,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        gradient_checkpointing=row.ckpt, bf16=args.precision == "bf16", report_to=[], save_strategy="no",
        logging_strategy="no", dataloader_num_workers=0, train_sampling_strategy="sequential",
        use_cpu=args.device == "cpu", seed=0, disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=processor,
                         callbacks=[window_timer(meter, len(warm), len(timed))])
    log: list[tuple[int, int]] = []
    collate = trainer.data_collator  # TRL's DataCollatorForVisionLanguageModeling; counted, not changed

    def counted(examples):
        batch = collate(examples)
        log.append((int(batch["attention_mask"].sum()), batch["input_ids"].numel()))
        return batch

    trainer.data_collator = counted
    base = meter.current()  # the model is on its device now, as llavakit's is after accelerator.prepare
    trainer.train()
    shutil.rmtree(out_dir, ignore_errors=True)
    result = llava_result(row, model, meter, base, stats, timed, log[len(warm):len(warm) + len(timed)], args)
    result["collator"] = type(collate).__name__
    return result
