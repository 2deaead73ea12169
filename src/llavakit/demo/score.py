"""Scoring the demo model on the held-out split, with the image and blind, side by side.

Each held-out row is asked twice with greedy decoding: once with its image(s), once with every
image replaced by a blank mid-grey one of the same size (the model then sees only the question).
A prediction is right when it equals the answer after ``normalize``. A model that really looks at
the image scores far above chance with it and about chance blind (the held-out split is balanced so
that any image-blind answerer scores exactly chance, see ``llavakit.demo.scenes``).
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from .scenes import QUESTION_TYPES, chance_by_type

BLANK_GREY = (128, 128, 128)
_NUMBERS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}


def normalize(text: str) -> str:
    """First line, lower case, no surrounding punctuation or leading article, number words as digits."""
    text = text.strip().split("\n", 1)[0].strip().lower()
    text = re.sub(r"^[\s\"'.,:;!?]+|[\s\"'.,:;!?]+$", "", text)
    text = re.sub(r"^(the|a|an)\s+", "", text)
    return _NUMBERS.get(text, text)


def blank_like(image: Image.Image) -> Image.Image:
    """A mid-grey RGB image of the same size: carries no information about the scene."""
    return Image.new("RGB", image.size, BLANK_GREY)


def _row_images(row: dict, image_folder: Path) -> list[Image.Image]:
    names = row["images"] if "images" in row else [row["image"]]
    return [Image.open(image_folder / n).convert("RGB") for n in names]


@torch.no_grad()
def predict(model, processor, rows: Sequence[dict], image_folder: str | Path, template: str | None = None, *,
            blind: bool = False, batch_size: int = 64, max_new_tokens: int = 4, suffix: str = "") -> list[str]:
    """Greedy answers (decoded, not normalised) for ``rows``.

    Each row's question (text with its ``<image>`` markers) is one user turn, prompted and tokenized
    exactly as ``llavakit chat`` / ``eval`` do (`llavakit.infer.generate.Generator`: the model's
    template and tokenization). With ``blind=True`` every image is swapped for ``blank_like(image)``.
    ``suffix``: a line added after each question (LLaVA-1.5's "Answer the question using a single word or
    phrase." for a model trained with it on short-answer data).
    """
    from llavakit.data.conversation import Turn
    from llavakit.infer.generate import GenerationSettings, Generator

    folder = Path(image_folder)
    generator = Generator(model, processor, template=template)
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    was_training = model.training
    model.eval()
    out: list[str] = []
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            images = [_row_images(r, folder) for r in chunk]
            if blind:
                images = [[blank_like(im) for im in ims] for ims in images]
            questions = [r["question"] + (f"\n{suffix}" if suffix else "") for r in chunk]
            out += generator.generate([[Turn("user", q)] for q in questions], images, settings)
    finally:
        model.train(was_training)
    return out


def accuracy_by_type(rows: Sequence[dict], predictions: Sequence[str]) -> dict[str, float]:
    right: dict[str, list[bool]] = defaultdict(list)
    for row, pred in zip(rows, predictions, strict=True):
        right[row["type"]].append(normalize(pred) == normalize(row["answer"]))
    return {t: sum(v) / len(v) for t, v in right.items()}


def score(model, processor, rows: Sequence[dict], image_folder: str | Path, template: str | None = None,
          **predict_kwargs) -> tuple[dict, list[dict]]:
    """Score with the image and blind. Returns (metrics, samples).

    metrics = {"types": {type: {"with_image": acc, "blind": acc, "chance": acc}}} in the world's type
    order; samples = one dict per row with the question, answer and both predictions.
    """
    seen = predict(model, processor, rows, image_folder, template, blind=False, **predict_kwargs)
    blind = predict(model, processor, rows, image_folder, template, blind=True, **predict_kwargs)
    with_acc, blind_acc, chance = accuracy_by_type(rows, seen), accuracy_by_type(rows, blind), chance_by_type(rows)
    order = [t for t in QUESTION_TYPES if t in with_acc] + sorted(set(with_acc) - set(QUESTION_TYPES))
    types = {t: {"with_image": round(with_acc[t], 4), "blind": round(blind_acc[t], 4), "chance": round(chance[t], 4)}
             for t in order}
    samples = [{"id": r["id"], "type": r["type"], "question": r["question"], "answer": r["answer"],
                "with_image": p, "blind": b} for r, p, b in zip(rows, seen, blind)]
    return {"types": types}, samples


def format_table(types: dict[str, dict[str, float]]) -> str:
    """The per-type accuracies as a fixed-width text table (percentages)."""
    lines = [f"{'question type':<14} {'with image':>10} {'blind':>7} {'chance':>7}"]
    lines.append("-" * len(lines[0]))
    for t, m in types.items():
        lines.append(f"{t:<14} {100 * m['with_image']:>9.1f}% {100 * m['blind']:>6.1f}% {100 * m['chance']:>6.1f}%")
    return "\n".join(lines)
