"""Training throughput: llavakit beside the path users pick today, same shapes, weights, data and batch.

    python benchmarks/train_throughput.py                            # CPU shape: stage-2 and stage-1 tables
    python benchmarks/train_throughput.py --json perf.json           # + the rows as JSON (with ratio_vs_peer)
    python benchmarks/train_throughput.py --device cuda --shape gpu  # 1.1B Llama + CLIP-L/14-336, bf16, MFU
    python benchmarks/train_throughput.py --shape micro --steps 1    # seconds; what tests/test_benchmark_smoke.py runs

The peer ("the path users pick today"): transformers' `LlavaForConditionalGeneration` with the *same
weights* (llavakit exports its model to an llava-hf folder, the peer loads it), vision tower frozen,
trained by HF `Trainer` with the seed-004 collator: the conversation rendered by the processor's
chat template, ``processor(text, images, padding=True)``, labels = input ids with pad and image
tokens set to -100, so it supervises system prompt and questions as well as answers (its loss is not
llavakit's; its work per step is the same model on the same tokens). Images are decoded in that
collator, in the main process (``dataloader_num_workers=0``).

llavakit: a thin harness over ``train/loop.py``'s own pieces (``assemble``, ``prepare_data``,
``apply_stage``, ``epoch_order``, ``make_loader``, ``make_collator``, ``optimizer_step``), so each step is the
trainer's step, timed one by one. Each switch is a row: length grouping (``data.group_by_length``),
supervised-only logits (``train.supervised_logits_only``), padding-free packing (``data.packing``),
image decoding in dataloader workers (``data.num_workers``) and, for stage 1, the frozen-vision
feature cache (``train/feature_cache.py``).

Measurement. Every row runs in a fresh subprocess (so peak memory is its own): warm-up steps from
another epoch's order, then one full epoch, timed from the end of the last warm-up step to the end of
the last step, data loading included. Both sides walk the same seeded shuffle (llavakit's
``epoch_order``; the peer gets it as a pre-ordered dataset with ``train_sampling_strategy=
"sequential"``), so rows see the same samples. Real tokens = non-pad tokens; padding fraction = pad
slots / all slots; peak memory = the process's max RSS on CPU (``torch.cuda.max_memory_allocated``
on CUDA), and "Δ" = that peak minus the memory in use right before the first step. MFU counts 6N
FLOPs per token for trained weights, 4N for frozen weights gradients flow through, 2N per patch
token for the frozen vision tower (0 when its features come from the cache), the LM head only at
supervised positions, attention scores not at all; against ``--peak-tflops`` (989: H200 dense bf16).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# --- workload shapes ------------------------------------------------------------------------------
SHAPES = {
    # CLIP-shaped tower (4 layers, hidden 128, 64 px, patch 8 -> 64 image tokens), Llama-shaped LLM
    # (4 layers, hidden 256, vocabulary 4096: the LM head is 26% of the LLM's matmul weights, as in
    # Qwen2.5-0.5B; TinyLlama's is 6%). Stage 1 uses an 8-layer hidden-256 tower (6.3M weights),
    # larger than the LLM (5.0M with embeddings).
    "cpu": dict(
        vision=dict(image_size=64, patch_size=8, hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512),
        stage1_vision=dict(image_size=64, patch_size=8, hidden_size=256, num_layers=8, num_heads=4,
                           intermediate_size=1024),
        llm=dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=688),
        vocab=4096, model_vocab=0, samples=128, batch=8, answer=(3, 120), caption=(5, 40),
        source_image=(160, 120), precision="fp32", threads=1, workers=1),
    # TinyLlama-1.1B-shaped LLM (vocab 32000) + CLIP ViT-L/14-336-shaped tower, random weights, bf16.
    "gpu": dict(
        vision=dict(image_size=336, patch_size=14, hidden_size=1024, num_layers=24, num_heads=16,
                    intermediate_size=4096),
        stage1_vision=None,
        llm=dict(hidden_size=2048, num_layers=22, num_heads=32, num_kv_heads=4, intermediate_size=5632),
        vocab=4096, model_vocab=32000, samples=512, batch=8, answer=(3, 120), caption=(5, 40),
        source_image=(480, 360), precision="bf16", threads=0, workers=4),
    "micro": dict(
        vision=dict(image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64),
        stage1_vision=None,
        llm=dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128),
        vocab=1024, model_vocab=1536, samples=16, batch=4, answer=(3, 24), caption=(3, 10),
        source_image=(48, 36), precision="fp32", threads=1, workers=1),
}

WORKLOAD_VERSION = 1  # bump when the generated data changes
QUESTIONS = ["Describe the image in detail.", "What is in this picture?", "Explain what you see.",
             "Give a detailed account of the scene.", "What objects does the image show, and where?"]


@dataclass
class Row:
    name: str
    stage: int = 2
    system: str = "llavakit"  # or "peer"
    group: bool = False
    sup: bool = False
    pack: bool = False
    workers: int = 0
    cache: bool = False


def stage2_rows(workers: int) -> list[Row]:
    return [
        Row("peer: HF Llava + Trainer", system="peer"),
        Row("llavakit baseline (pad, shuffled, full logits)"),
        Row("  + length grouping", group=True),
        Row("  + supervised-only logits", sup=True),
        Row("  + packing", pack=True),
        Row(f"  + decoding in {workers} worker(s)", workers=workers),
        Row("llavakit grouping + sup-only + workers", group=True, sup=True, workers=workers),
        Row("llavakit all on (+ packing)", group=True, sup=True, pack=True, workers=workers),
    ]


def stage1_rows(workers: int) -> list[Row]:
    return [
        Row("peer: HF Llava + Trainer (stage 1)", stage=1, system="peer"),
        Row("llavakit stage 1 (pixels)", stage=1, group=True, sup=True, workers=workers),
        Row("llavakit stage 1 + feature cache", stage=1, group=True, sup=True, workers=workers, cache=True),
    ]


# --- the workload on disk -------------------------------------------------------------------------
def _words(rng: random.Random, n: int) -> list[str]:
    syll = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"] + ["the", "and", "with", "on", "in"]
    out = set()
    while len(out) < n:
        out.add("".join(rng.choice(syll) for _ in range(rng.randint(1, 3))))
    return sorted(out)


def _text_of_length(rng, words, tok, n_tokens: int) -> str:
    """Random sentences whose tokenized length is about `n_tokens`."""
    text, pieces = "", []
    while len(tok(text, add_special_tokens=False)["input_ids"]) < n_tokens:
        pieces.append(rng.choice(words))
        if len(pieces) % rng.randint(6, 12) == 0:
            pieces[-1] += "."
        text = " ".join(pieces).capitalize()
    return text


def _image(rng: random.Random, size: tuple[int, int]):
    from PIL import Image, ImageDraw

    im = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    d = ImageDraw.Draw(im)
    w, h = size
    for _ in range(rng.randint(3, 7)):
        x0, y0 = rng.randrange(w), rng.randrange(h)
        box = [x0, y0, x0 + rng.randint(4, w // 2), y0 + rng.randint(4, h // 2)]
        colour = tuple(rng.randrange(256) for _ in range(3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)(box, fill=colour)
    return im


def prepare_workload(shape_name: str, workdir: Path, seed: int = 0, say=print) -> Path:
    """Components, data (JPEGs + LLaVA JSON) and the llavakit/llava-hf model pair; reused if present."""
    import hashlib

    shape = SHAPES[shape_name]
    data_keys = ("vision", "stage1_vision", "llm", "vocab", "model_vocab", "samples", "answer", "caption",
                 "source_image")
    spec = json.dumps([WORKLOAD_VERSION, shape_name, {k: shape[k] for k in data_keys}, seed], sort_keys=True)
    wd = workdir / f"{shape_name}-{hashlib.sha256(spec.encode()).hexdigest()[:10]}"  # a new spec, a new folder
    if (wd / "ready.json").is_file():
        return wd
    import torch
    from transformers import AutoModelForCausalLM

    import llavakit
    from llavakit.data.conversation import Conversation, Turn
    from llavakit.data.dataset import SupervisedDataset
    from llavakit.demo.tiny import make_tokenizer, save_tiny_vision, tiny_llm_config
    from llavakit.interop import export_hf_llava

    say(f"[workload] writing {wd} (once)")
    rng = random.Random(seed)
    words = _words(rng, 3000)
    # Prompt text is frequent in the corpus, so it tokenizes about as compactly as with a real tokenizer
    # (the Vicuna system prompt is ~35 tokens with Llama's).
    from llavakit.data.templates import VICUNA_SYSTEM

    corpus = [" ".join(rng.choice(words) for _ in range(12)).capitalize() + "." for _ in range(4000)]
    corpus += [f"{VICUNA_SYSTEM} USER: {q} ASSISTANT:" for q in QUESTIONS] * 200
    tok = make_tokenizer(corpus, "llama", vocab_size=shape["vocab"])
    comp = wd / "components"
    cfg = tiny_llm_config("llama", vocab_size=max(len(tok), shape["model_vocab"]), **shape["llm"])
    cfg.bos_token_id, cfg.eos_token_id = tok.bos_token_id, tok.eos_token_id
    # bf16 shapes keep their weights in bf16 on disk (half the size); both sides load them as fp32
    # master weights and train under bf16 autocast.
    store = torch.bfloat16 if shape["precision"] == "bf16" else torch.float32
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(cfg).to(store).save_pretrained(comp / "llm")
    tok.save_pretrained(comp / "llm")
    towers = {2: shape["vision"], 1: shape["stage1_vision"] or shape["vision"]}
    for stage, vis in towers.items():
        kw = {k: v for k, v in vis.items() if k != "image_size"}
        save_tiny_vision(comp / f"vision_s{stage}", "clip", seed=seed, image_size=vis["image_size"], **kw)

    data = wd / "data"
    (data / "images").mkdir(parents=True, exist_ok=True)
    s2, s1 = [], []
    for i in range(shape["samples"]):
        name = f"{i:05d}.jpg"
        _image(rng, shape["source_image"]).save(data / "images" / name, quality=90)
        answer = _text_of_length(rng, words, tok, rng.randint(*shape["answer"]))
        q = rng.choice(QUESTIONS)
        s2.append({"id": f"s2-{i}", "image": name, "conversations": [
            {"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": answer}]})
        caption = _text_of_length(rng, words, tok, rng.randint(*shape["caption"]))
        s1.append({"id": f"s1-{i}", "image": name, "conversations": [
            {"from": "human", "value": "Render a short caption of the image.\n<image>"},
            {"from": "gpt", "value": caption}]})
    (data / "stage2.json").write_text(json.dumps(s2))
    (data / "stage1.json").write_text(json.dumps(s1))

    stats = {}
    for stage, template, rows in ((2, "vicuna_v1", s2), (1, "plain", s1)):
        torch.manual_seed(seed)
        model, processor = llavakit.build(comp / f"vision_s{stage}", comp / "llm", projector="mlp2x_gelu", dtype=store)
        processor.template = template
        model.save_pretrained(wd / f"llavakit_s{stage}")
        processor.save_pretrained(wd / f"llavakit_s{stage}")
        export_hf_llava(model, processor, wd / f"hf_s{stage}")
        convs = [Conversation([Turn("user", r["conversations"][0]["value"]),
                               Turn("assistant", r["conversations"][1]["value"])],
                              images=[str(data / "images" / r["image"])]) for r in rows]
        ds = SupervisedDataset(convs, processor, template)
        stats[stage] = [{"tokens": len(ds[i]["input_ids"]), "answer": int((ds[i]["labels"][1:] != -100).sum()),
                         "images": ds.num_images(i)} for i in range(len(ds))]
        del model
    (wd / "stats.json").write_text(json.dumps(stats))
    (wd / "ready.json").write_text(json.dumps({"shape": shape_name, "seed": seed, "vocab": len(tok) + 2}))
    return wd


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


def _orders(n: int, batch: int, warmup: int, steps: int, seed: int = 0):
    """(warm-up batches, timed batches) of sample indices: llavakit's shuffled order of epochs 1 and 0."""
    import torch

    def perm(epoch):  # = train/loop.py's epoch_order without grouping
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()

    cut = lambda order: [order[i:i + batch] for i in range(0, len(order), batch)]  # noqa: E731
    timed = cut(perm(0))
    return cut(perm(1))[:warmup], timed[:steps] if steps else timed


def _flops(model_parts: dict, stage: int, cached: bool, tokens: int, answer: int, images: int) -> float:
    """Useful FLOPs of a window: 6N trained, 4N frozen-with-gradient, 2N per patch token (frozen tower)."""
    p = model_parts
    llm = 6 if stage == 2 else 4
    f = llm * p["llm_body"] * tokens + llm * p["lm_head"] * answer
    f += 6 * p["projector"] * images * p["vision_tokens"]
    if not cached:
        f += 2 * p["vision"] * images * p["patch_tokens"]
    return float(f)


def _parts(vision: int, projector: int, llm_body: int, lm_head: int, vision_tokens: int, patch_tokens: int) -> dict:
    """Weight counts for `_flops` (the LLM body without its input embeddings: a lookup is no matmul)."""
    return {"vision": vision, "projector": projector, "llm_body": llm_body, "lm_head": lm_head,
            "vision_tokens": vision_tokens, "patch_tokens": patch_tokens}


def _n(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _result(row: Row, meter: Meter, base: float, samples: int, real: int, slots: int, flops: float,
            peak_tflops: float, extra: dict) -> dict:
    secs = meter.t1 - meter.t0
    out = {"row": row.name, "config": asdict(row), "steps_s": round(secs, 3), "samples": samples,
           "samples_per_s": samples / secs, "real_tokens_per_s": real / secs,
           "padding_fraction": 1 - real / max(slots, 1), "peak_mem_mib": meter.peak(),
           "delta_mem_mib": meter.peak() - base, "tflops": flops / secs / 1e12,
           "mfu": flops / secs / (peak_tflops * 1e12)}
    out.update(extra)
    return out


def run_llavakit(row: Row, wd: Path, args) -> dict:
    from accelerate import Accelerator
    from transformers import get_scheduler

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
                  "precision": args.precision, "report_to": "none", "output_dir": str(tmp / "run"),
                  "schedule": "constant", "warmup_ratio": 0.0, "seed": 0}})
    accelerator = Accelerator(mixed_precision={"fp32": "no", "bf16": "bf16"}[args.precision],
                              cpu=args.device == "cpu")
    quiet = lambda *a, **k: None  # noqa: E731
    model, processor = assemble(cfg)
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
    parts = _parts(_n(model.vision_tower), _n(model.multi_modal_projector), _n(lm) - head - emb, head,
                   c.vision_tokens, c.patch_grid**2 + c.vision_prefix_tokens)
    optimizer = make_optimizer(groups, 0.0)
    scheduler = get_scheduler("constant", optimizer)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    model.train()
    warm = rank_batches(epoch_order(dataset, cfg, 1, args.batch), args.batch, 1, 0)[:args.warmup]
    timed = rank_batches(epoch_order(dataset, cfg, 0, args.batch), args.batch, 1, 0)
    timed = timed[:args.steps] if args.steps else timed
    loader = make_loader(dataset, warm + timed, collator, cfg.data.num_workers)
    stats = json.loads((wd / "stats.json").read_text())[str(row.stage)]
    meter = Meter(args.device)
    base = meter.current()
    samples = real = slots = 0
    for i, (idx, mb) in enumerate(zip(warm + timed, loader)):
        if i >= len(warm):
            samples += len(idx)
            real += int(mb["attention_mask"].sum()) if "attention_mask" in mb else mb["input_ids"].numel()
            slots += mb["input_ids"].numel()
        optimizer_step(accelerator, model, optimizer, scheduler, [mb], cfg.train, 1)
        if i == len(warm) - 1:
            meter.start()
    meter.stop()
    done = [j for b in timed for j in b]
    flops = _flops(parts, row.stage, row.cache, sum(stats[j]["tokens"] for j in done),
                   sum(stats[j]["answer"] for j in done), sum(stats[j]["images"] for j in done))
    shutil.rmtree(tmp, ignore_errors=True)  # the run dir and a feature cache (GBs at the GPU shape)
    return _result(row, meter, base, samples, real, slots, flops, args.peak_tflops, extra)


def run_peer(row: Row, wd: Path, args) -> dict:
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration, Trainer, TrainerCallback, TrainingArguments

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
    warm, timed = _orders(len(rows), args.batch, args.warmup, args.steps)
    ordered = [rows[j] for b in warm + timed for j in b]
    pad_id, image_id = processor.tokenizer.pad_token_id, model.config.image_token_id
    log: list[tuple[int, int]] = []

    def collate(examples):  # the seed-004 collator
        texts = [processor.apply_chat_template(
            [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
             for t in ex["conversations"]], tokenize=False) for ex in examples]
        pics = [Image.open(images / ex["image"]).convert("RGB") for ex in examples]
        # The rendered text starts with <s> already: no second one from the tokenizer.
        batch = processor(text=texts, images=pics, padding=True, return_tensors="pt", add_special_tokens=False)
        labels = batch["input_ids"].clone()
        labels[labels == pad_id] = -100
        labels[labels == image_id] = -100
        batch["labels"] = labels
        log.append((int(batch["attention_mask"].sum()), batch["input_ids"].numel()))
        return batch

    meter = Meter(args.device)

    class Timer(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            if state.global_step == len(warm):
                meter.start()
            if state.global_step == len(warm) + len(timed):
                meter.stop()

    out_dir = tempfile.mkdtemp(prefix="peer-bench-")
    targs = TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=args.batch,
        max_steps=len(warm) + len(timed), learning_rate=2e-5 if row.stage == 2 else 1e-3,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        report_to=[], save_strategy="no", logging_strategy="no", dataloader_num_workers=0,
        remove_unused_columns=False, train_sampling_strategy="sequential", use_cpu=args.device == "cpu",
        bf16=bf16, seed=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=targs, train_dataset=ordered, data_collator=collate, callbacks=[Timer()])
    base = meter.current()  # the model is on its device now, as llavakit's is after accelerator.prepare
    trainer.train()
    shutil.rmtree(out_dir, ignore_errors=True)
    window = log[len(warm):len(warm) + len(timed)]
    c, vc = model.config, model.config.vision_config
    emb = inner.language_model.get_input_embeddings().weight.numel()
    parts = _parts(_n(inner.vision_tower), _n(inner.multi_modal_projector), _n(inner.language_model) - emb,
                   model.lm_head.weight.numel(), c.image_seq_length, (vc.image_size // vc.patch_size) ** 2 + 1)
    done = [j for b in timed for j in b]
    flops = _flops(parts, row.stage, False, sum(stats[j]["tokens"] for j in done),
                   sum(stats[j]["answer"] for j in done), sum(stats[j]["images"] for j in done))
    return _result(row, meter, base, len(done), sum(r for r, _ in window), sum(s for _, s in window), flops,
                   args.peak_tflops, {})


# --- orchestration --------------------------------------------------------------------------------
def run_row(row: Row, wd: Path, args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return (run_peer if row.system == "peer" else run_llavakit)(row, wd, args)


def run_isolated(row: Row, wd: Path, args) -> dict:
    """One row in a fresh interpreter (its own peak memory); the result comes back as JSON."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
        cmd = [sys.executable, __file__, *args.argv, "--_row", json.dumps(asdict(row)), "--_out", out.name]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"row {row.name!r} failed:\n{proc.stderr[-4000:]}")
        return json.loads(Path(out.name).read_text())


def format_table(rows: list[dict], peer: dict | None, mfu: bool) -> str:
    head = ["configuration", "samples/s", "real tok/s", "pad %", "peak MiB", "Δ MiB"] + (["MFU %"] if mfu else []) \
        + ["× peer", "worst/best run"]
    lines = []
    for r in rows:
        ratio = r["real_tokens_per_s"] / peer["real_tokens_per_s"] if peer else float("nan")
        cells = [r["row"], f"{r['samples_per_s']:.2f}", f"{r['real_tokens_per_s']:,.0f}",
                 f"{100 * r['padding_fraction']:.1f}", f"{r['peak_mem_mib']:,.0f}", f"{r['delta_mem_mib']:,.0f}"]
        cells += [f"{100 * r['mfu']:.1f}"] if mfu else []
        spread = r.get("runs_real_tokens_per_s") or [r["real_tokens_per_s"]]
        cells += [f"{ratio:.2f}", f"{min(spread) / max(spread):.2f}"]
        lines.append(cells)
    widths = [max(len(x[i]) for x in [head] + lines) for i in range(len(head))]
    fmt = lambda cells: "| " + " | ".join(  # noqa: E731
        c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    sep = "|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|"
    return "\n".join([fmt(head), sep] + [fmt(c) for c in lines])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="cpu")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--stages", default="2,1", help="which tables: '2', '1' or '2,1'")
    p.add_argument("--rows", default="", help="comma-separated row numbers per table (1 = peer), default all")
    p.add_argument("--steps", type=int, default=0, help="timed steps (default: one full epoch)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="runs per row, round robin; the best one is reported")
    p.add_argument("--batch", type=int, default=0, help="default: the shape's (8)")
    p.add_argument("--workers", type=int, default=-1, help="dataloader workers in the 'workers' rows "
                   "(default: the shape's, 1 on CPU, 4 on GPU)")
    p.add_argument("--precision", choices=["", "fp32", "bf16"], default="", help="default: the shape's (autocast)")
    p.add_argument("--threads", type=int, default=-1, help="torch threads (default: the shape's; 0 = torch's)")
    p.add_argument("--attn", default="auto", help="sdpa | eager | flash_attention_2 | auto (flash when installed)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="for MFU (989 = H200 dense bf16)")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "llavakit-bench")
    p.add_argument("--inline", action="store_true", help="run rows in this process (fast; memory not isolated)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--_row", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_out", default=None, help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    args.argv = [a for a in argv if not a.startswith("--_")]
    shape = SHAPES[args.shape]
    args.batch = args.batch or shape["batch"]
    args.threads = shape["threads"] if args.threads < 0 else args.threads
    args.workers = shape["workers"] if args.workers < 0 else args.workers
    args.precision = args.precision or shape["precision"]
    if args.attn == "auto":
        import importlib.util

        args.attn = "flash_attention_2" if args.device == "cuda" and importlib.util.find_spec("flash_attn") else "sdpa"
    if args.warmup < 1:
        p.error("--warmup must be >= 1 (the timed window starts at the end of a warm-up step)")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    wd = prepare_workload(args.shape, args.workdir)
    if args._row is not None:  # a child: one row
        result = run_row(Row(**json.loads(args._row)), wd, args)
        Path(args._out).write_text(json.dumps(result))
        return result

    import torch

    chosen = {int(x) for x in args.rows.split(",") if x}
    mfu = args.device == "cuda"
    report = {"date": datetime.date.today().isoformat(), "machine": _machine(args), "shape": args.shape,
              "shape_spec": shape, "device": args.device, "batch": args.batch, "attn": args.attn,
              "precision": args.precision, "workers": args.workers,
              "threads": args.threads or torch.get_num_threads(), "warmup": args.warmup, "command": _command(argv)}
    tables = {"2": stage2_rows(args.workers), "1": stage1_rows(args.workers)}
    for stage in [s for s in args.stages.split(",") if s]:
        rows = [r for i, r in enumerate(tables[stage], 1) if not chosen or i in chosen]
        runs: list[list[dict]] = [[] for _ in rows]
        for rep in range(args.repeats):  # round robin, so a noisy minute hits one run of a row, not all
            for r, got in zip(rows, runs):
                print(f"[stage {stage}, run {rep + 1}/{args.repeats}] {r.name.strip()} ...", flush=True)
                got.append(run_row(r, wd, args) if args.inline else run_isolated(r, wd, args))
        results = [_best_of(got) for got in runs]
        peer = next((r for r in results if r["config"]["system"] == "peer"), None)
        for r in results:
            r["ratio_vs_peer"] = r["real_tokens_per_s"] / peer["real_tokens_per_s"] if peer else None
        print(f"\nstage {stage} ({'projector + LLM train, vision frozen' if stage == '2' else 'projector trains'}), "
              f"shape {args.shape}, batch {args.batch}, {args.device}, attn {args.attn}, "
              f"threads {report['threads']}:")
        print(format_table(results, peer, mfu))
        report[f"stage{stage}"] = results
    _summarise(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return report


def _best_of(runs: list[dict]) -> dict:
    """The least disturbed run of a row (highest real tokens/s), with every run's figure kept."""
    best = dict(max(runs, key=lambda r: r["real_tokens_per_s"]))
    best["runs_real_tokens_per_s"] = [r["real_tokens_per_s"] for r in runs]
    return best


def _summarise(report: dict) -> None:
    ours = [r for r in report.get("stage2", []) if r["config"]["system"] == "llavakit"]
    if ours:
        best = max(ours, key=lambda r: r["real_tokens_per_s"])
        report["best"] = best["row"]
        report["ratio_vs_peer"] = best["ratio_vs_peer"]
        report["best_mfu"] = best["mfu"]
        if best["ratio_vs_peer"] is not None:
            mfu = f", MFU {100 * best['mfu']:.1f}%" if report["device"] == "cuda" else ""
            print(f"\nllavakit best (stage 2): {best['row'].strip()} -> {best['ratio_vs_peer']:.2f}x the peer's "
                  f"real tokens/s{mfu}")
    s1 = {r["config"]["cache"]: r for r in report.get("stage1", []) if r["config"]["system"] == "llavakit"}
    if True in s1 and False in s1:
        report["stage1_cache_speedup"] = s1[True]["samples_per_s"] / s1[False]["samples_per_s"]
        print(f"stage 1 feature cache: {report['stage1_cache_speedup']:.2f}x samples/s once built "
              f"(build: {s1[True]['cache_build_s']:.1f} s for {s1[True]['samples']} images)")


def _machine(args) -> str:
    import torch

    if args.device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def _command(argv) -> str:
    return "python benchmarks/train_throughput.py " + " ".join(argv)


if __name__ == "__main__":
    main()
