"""Motion questions of the hires demo (`llavakit demo --hires --motion`): a video stage 2 and its scores.

From the hires run's stage 1 (base resolution), `hires_stage2_motion.yaml` trains an `anyres_max` model (the policy
that takes videos: each frame a base tile, 2x2-pooled, one newline per video) on the clips of `motion.py`. Scored on
the held-out clips with the frames, blind (every frame a blank grey one), and with the single middle frame as an
image (the control: that frame carries nothing about the answer).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
from PIL import Image

from .score import blank_like, normalize


@torch.no_grad()
def predict_videos(model, processor, rows, image_folder, *, blind: bool = False, batch_size: int = 32) -> list[str]:
    """Greedy answers to rows with a ``video`` (a list of frame files), as `score.predict` does for images."""
    from llavakit.data.conversation import Turn
    from llavakit.infer.generate import GenerationSettings, Generator

    folder = Path(image_folder)
    generator = Generator(model, processor)
    settings = GenerationSettings(max_new_tokens=4)
    model.eval()
    out: list[str] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        videos = []
        for r in chunk:
            frames = [Image.open(folder / f).convert("RGB") for f in r["video"]]
            videos.append([[blank_like(f) for f in frames] if blind else frames])
        out += generator.generate([[Turn("user", r["question"])] for r in chunk], [[] for _ in chunk], settings,
                                  videos=videos)
    return out


def score_motion(model, processor, rows, image_folder) -> tuple[dict, list[dict]]:
    """{type: {"with_video", "blind", "single_frame", "chance"}} and the per-row samples."""
    from .hires_world import single_frame_rows
    from .score import predict

    seen = predict_videos(model, processor, rows, image_folder)
    blind = predict_videos(model, processor, rows, image_folder, blind=True)
    single = predict(model, processor, single_frame_rows(rows), image_folder)
    acc: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r, s, b, f in zip(rows, seen, blind, single):
        for key, pred in (("with_video", s), ("blind", b), ("single_frame", f)):
            acc[r["type"]][key].append(float(normalize(pred) == normalize(r["answer"])))
        acc[r["type"]]["chance"].append(1.0 / len(r["options"]))
    types = {t: {k: round(sum(v) / len(v), 4) for k, v in d.items()} for t, d in acc.items()}
    samples = [{"id": r["id"], "type": r["type"], "answer": r["answer"], "with_video": s, "blind": b,
                "single_frame": f} for r, s, b, f in zip(rows, seen, blind, single)]
    return types, samples
