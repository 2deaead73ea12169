"""Stage 0 of the offline demo: the backbones a user would otherwise download from the hub.

* ``pretrain_lm``: a tiny Llama-shaped causal LM (with its own byte-level BPE tokenizer) trained
  on the world's text, next-token prediction, one text per sequence.
* ``pretrain_clip``: a tiny CLIP (text + vision towers) trained with CLIP's contrastive objective
  (``CLIPModel(return_loss=True)``) on image-caption pairs.

Each is written with ``save_pretrained`` as an ordinary model folder (weights + config + tokenizer
and/or image processor), so ``llavakit.build`` later loads it by path through the Auto classes,
exactly as it would a hub model. Both are deterministic given ``seed`` and the thread count.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from .tiny import make_tokenizer, tiny_image_processor, tiny_llm_config


@dataclass
class Stage0Result:
    path: Path  # the saved model folder
    losses: list[float] = field(default_factory=list)  # training loss per step


def _cosine(optimizer, steps: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _loop(model, params, batches: Callable[[int], dict], steps: int, lr: float, warmup_ratio: float = 0.05,
          weight_decay: float = 0.0, log: Callable[[str], None] | None = None, log_every: int = 50) -> list[float]:
    """A plain AdamW loop with warmup + cosine decay; ``batches(step)`` gives the model's kwargs."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = _cosine(opt, steps, max(1, int(warmup_ratio * steps)))
    model.train()
    losses = []
    for step in range(steps):
        loss = model(**batches(step)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if log and (step % log_every == 0 or step == steps - 1):
            log(f"step {step + 1}/{steps} loss {losses[-1]:.4f}")
    model.eval()
    return losses


def pretrain_lm(texts: Sequence[str], out_dir: str | Path, *, seed: int = 0, vocab_size: int = 1024,
                hidden_size: int = 128, num_layers: int = 4, num_heads: int = 4, num_kv_heads: int = 2,
                max_length: int = 160, batch_size: int = 32, steps: int = 600, lr: float = 1e-3,
                max_position_embeddings: int = 512, tie_embeddings: bool = False,
                log: Callable[[str], None] | None = None) -> Stage0Result:
    """Train a tokenizer and a tiny Llama on ``texts`` (next-token loss); save both to ``out_dir``.

    Each text is one training sequence ``<s> text </s>`` (cut at ``max_length`` tokens), so a
    question is always seen together with the description it is about; a step draws
    ``batch_size`` random texts and pads them on the right (padding is not a target).
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    tok = make_tokenizer(texts, family="llama", vocab_size=vocab_size)
    cfg = tiny_llm_config("llama", vocab_size=len(tok), hidden_size=hidden_size, num_layers=num_layers,
                          num_heads=num_heads, num_kv_heads=num_kv_heads,
                          max_position_embeddings=max_position_embeddings)
    cfg.bos_token_id, cfg.eos_token_id = tok.bos_token_id, tok.eos_token_id
    cfg.tie_word_embeddings = tie_embeddings
    model = AutoModelForCausalLM.from_config(cfg)

    rows = [[tok.bos_token_id, *ids, tok.eos_token_id][:max_length]
            for ids in tok(list(texts), add_special_tokens=False)["input_ids"]]
    if not rows:
        raise ValueError("pretrain_lm needs at least one text")
    gen = torch.Generator().manual_seed(seed)

    def batch(step: int) -> dict:
        pick = [rows[i] for i in torch.randint(len(rows), (batch_size,), generator=gen).tolist()]
        width = max(len(r) for r in pick)
        ids = torch.tensor([r + [tok.eos_token_id] * (width - len(r)) for r in pick])  # [B, T]
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in pick])
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    losses = _loop(model, list(model.parameters()), batch, steps, lr, log=log)
    out = Path(out_dir)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return Stage0Result(out, losses)


def _unique_caption_batches(captions: Sequence[str], batch_size: int, rng: random.Random):
    """Endless batches of indices whose captions are all different (identical captions in one batch
    would be contrastive negatives of each other)."""
    if len(set(captions)) < batch_size:
        raise ValueError(f"CLIP batches need {batch_size} different captions; the pairs have {len(set(captions))}")
    while True:
        order = list(range(len(captions)))
        rng.shuffle(order)
        batch, seen = [], set()
        for i in order:
            if captions[i] in seen:
                continue
            batch.append(i)
            seen.add(captions[i])
            if len(batch) == batch_size:
                yield batch
                batch, seen = [], set()


def pretrain_clip(pairs: Sequence[tuple[str | Path, str]], out_dir: str | Path, *, seed: int = 0,
                  image_size: int = 48, patch_size: int = 16, hidden_size: int = 64, num_layers: int = 3,
                  num_heads: int = 4, text_hidden_size: int = 64, text_layers: int = 2, projection_dim: int = 64,
                  vocab_size: int = 400, batch_size: int = 64, steps: int = 900, lr: float = 2e-3,
                  position_std: float | None = 0.5, log: Callable[[str], None] | None = None) -> Stage0Result:
    """Train a tiny CLIP contrastively on (image path, caption) pairs; save it to ``out_dir``.

    The folder holds the whole ``CLIPModel`` (both towers), its tokenizer and a CLIP image
    processor, like a hub CLIP checkpoint; ``llavakit.build`` takes the vision tower out of it.
    """
    from PIL import Image
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    torch.manual_seed(seed)
    captions = [c for _, c in pairs]
    tok = make_tokenizer(captions, family="llama", vocab_size=vocab_size)
    # CLIP pools the text at the first end-of-text token; "</s>" has id 2, which CLIP's code reads as
    # a legacy config (pool at the largest id), so the text tower uses <|endoftext|> like OpenAI CLIP.
    tok.eos_token = tok.pad_token = "<|endoftext|>"
    eos = tok.eos_token_id
    ids = [row + [eos] for row in tok(captions)["input_ids"]]
    width = max(len(r) for r in ids)
    input_ids = torch.tensor([r + [eos] * (width - len(r)) for r in ids])  # [N, T]
    attention_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ids])

    processor = tiny_image_processor("clip", image_size)
    images = [Image.open(p).convert("RGB") for p, _ in pairs]
    pixel_values = torch.cat([processor(images[i:i + 256], return_tensors="pt")["pixel_values"]
                              for i in range(0, len(images), 256)])  # [N, 3, H, W]

    cfg = CLIPConfig(
        text_config=CLIPTextConfig(vocab_size=len(tok), hidden_size=text_hidden_size,
                                   intermediate_size=2 * text_hidden_size, num_hidden_layers=text_layers,
                                   num_attention_heads=num_heads, max_position_embeddings=max(32, width),
                                   bos_token_id=tok.bos_token_id, eos_token_id=eos, pad_token_id=eos).to_dict(),
        vision_config=CLIPVisionConfig(image_size=image_size, patch_size=patch_size, hidden_size=hidden_size,
                                       intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
                                       num_attention_heads=num_heads).to_dict(),
        projection_dim=projection_dim,
    )
    model = CLIPModel(cfg)
    if position_std:
        # CLIP initialises position embeddings ~25x smaller than patch embeddings (std 0.02 vs ~0.5);
        # after a short training, a patch token then barely knows where it is (a linear probe finds
        # its cell 17% of the time, 1/9 is chance). Starting them at patch scale gives ~98%, and the
        # LLM can answer "where" questions from the object's own token.
        with torch.no_grad():
            model.vision_model.embeddings.position_embedding.weight.normal_(0.0, position_std)
    batches = _unique_caption_batches(captions, batch_size, random.Random(seed))

    def batch(step: int) -> dict:
        idx = torch.tensor(next(batches))
        return {"input_ids": input_ids[idx], "attention_mask": attention_mask[idx],
                "pixel_values": pixel_values[idx], "return_loss": True}

    losses = _loop(model, list(model.parameters()), batch, steps, lr, log=log)
    out = Path(out_dir)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    processor.save_pretrained(out)
    return Stage0Result(out, losses)
