"""Batched, resumable evaluation over VQA-style JSONL: read -> prompt -> generate -> score -> write.

One JSON object per line::

    {"id": "q1", "question": "What colour is the bus?", "image": "val/1.jpg", "answers": ["red", "red", ...]}
    {"id": "q2", "question": "Which is bigger?", "images": ["a.jpg", "b.jpg"], "answer": "left"}
    {"id": "q3", "question": "Which animal can fly?", "image": "3.jpg", "choices": ["cat", "bird"], "answer": "B"}
    {"id": "q4", "question": "Which way does it move?", "video": "clips/4.mp4", "answer": "left"}

``id`` (or ``question_id``) defaults to the line's index; ``answers`` may also be VQAv2-style
``[{"answer": ...}, ...]``. Without ``<image>`` in the question, one ``<image>`` line per image goes
before it (LLaVA's layout); with markers, their number must equal the number of images. Choices
are listed under the question as ``A. ...`` lines unless the question already contains them.
``video`` (a file path, or a list of frame image paths: one video) or ``videos`` (a list of them) is asked the
same way with ``<video>`` (models that take videos: ``image_tokens: anyres_max`` with a ``<video>`` token).

The output folder holds ``run.json`` (what produced it), ``predictions.jsonl`` (one line per
sample, appended after every batch, so an interrupted run resumes where it stopped) and
``metrics.json``. Generation is greedy, and batches are left-padded, so the predictions do not
depend on ``--batch-size``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from llavakit.eval.metrics import Metric, get_metric
from llavakit.eval.samples import EvalDataError, EvalSample, read_samples, sample_turns

__all__ = ["EvalDataError", "EvalSample", "PREDICTIONS", "evaluate", "read_samples", "sample_turns"]

log = logging.getLogger(__name__)

PREDICTIONS = "predictions.jsonl"
METRICS_FILE = "metrics.json"
RUN_FILE = "run.json"
# run.json fields that must match for a resumed run to continue the same predictions: everything that
# changes a prediction (the model's files, the data's bytes, where images come from, the prompt, the
# decoding, the precision).
RESUME_KEYS = ("model", "model_fingerprint", "data", "data_sha256", "image_folder", "template", "prompt_suffix",
               "max_new_tokens", "dtype")
_FINGERPRINT_BYTES = 1 << 20


# --- the output folder ----------------------------------------------------------------------------
def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_fingerprint(path: str | os.PathLike) -> str:
    """A cheap identity of a saved model folder: its config and, per weight file, the name, the size and
    the first and last MiB (a safetensors header names every tensor and where it lies; retrained weights
    differ in the data). A hub id is its own fingerprint."""
    p = Path(path)
    if not p.is_dir():
        return f"id:{path}"
    if not (p / "config.json").is_file() and (p / "model" / "config.json").is_file():
        p = p / "model"  # a training run folder
    h = hashlib.sha256()
    for f in sorted(x for x in p.iterdir() if x.is_file() and (x.name == "config.json" or x.suffix in
                                                                  (".safetensors", ".bin", ".json"))):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}:".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(_FINGERPRINT_BYTES))
            if size > 2 * _FINGERPRINT_BYTES:
                fh.seek(size - _FINGERPRINT_BYTES)
                h.update(fh.read(_FINGERPRINT_BYTES))
    return h.hexdigest()


def load_predictions(path: Path) -> list[dict]:
    """Records already written. A last line cut short by an interruption is removed from the file."""
    if not path.exists():
        return []
    records: list[dict] = []
    good_end = 0
    with open(path, "rb") as f:
        lines = f.readlines()
    for k, raw in enumerate(lines):
        try:
            if not raw.endswith(b"\n"):
                raise ValueError("no newline")
            record = json.loads(raw)
        except ValueError:
            if k != len(lines) - 1:
                raise EvalDataError(f"{path} line {k + 1} is not a complete JSON record; the file is damaged. "
                                    "Delete the line (its sample is then evaluated again) or use --overwrite.")
            log.warning("%s: dropping an incomplete last line (interrupted write); its sample runs again", path)
            with open(path, "r+b") as f:
                f.truncate(good_end)
            break
        if not (isinstance(record, dict) and isinstance(record.get("id"), str) and "prediction" in record):
            raise EvalDataError(f"{path} line {k + 1} is JSON but not a prediction record (an object with 'id' and "
                                "'prediction'); the file was edited or damaged. Delete the line (its sample is then "
                                "evaluated again) or use --overwrite.")
        records.append(record)
        good_end += len(raw)
    return records


def prepare_output(out_dir: Path, run_info: dict, overwrite: bool = False) -> list[dict]:
    """Create/check the output folder; returns the prediction records to resume from."""
    out_dir.mkdir(parents=True, exist_ok=True)
    run_path, pred_path = out_dir / RUN_FILE, out_dir / PREDICTIONS
    if overwrite:
        for name in (PREDICTIONS, METRICS_FILE, RUN_FILE):
            (out_dir / name).unlink(missing_ok=True)
    done: list[dict] = []
    if pred_path.exists():
        old = json.loads(run_path.read_text()) if run_path.exists() else {}
        diffs = [f"{k}: {old.get(k)!r} then, {run_info.get(k)!r} now" for k in RESUME_KEYS
                 if old.get(k) != run_info.get(k)]
        if diffs:
            raise EvalDataError(f"{out_dir} holds predictions made with other settings ({'; '.join(diffs)}); "
                                "use --overwrite to start over, or another --out")
        done = load_predictions(pred_path)
    run_path.write_text(json.dumps(run_info, indent=2) + "\n")
    return done


def score_records(records: list[dict], metric: Metric) -> dict:
    """Re-score every stored prediction with ``metric`` and summarise."""
    scored = [metric.score(r["prediction"], r["answers"], r.get("choices")) for r in records]
    return metric.summarize(scored)


# --- the loop -------------------------------------------------------------------------------------

def evaluate(generator, samples: Sequence[EvalSample], out_dir: str | os.PathLike, metric: Metric | str,
             batch_size: int = 8, settings=None, prompt_suffix: str | None = None, run_info: dict | None = None,
             overwrite: bool = False, max_pixels: int | None = None, progress: bool = True,
             source: str = "<data>", max_side: int | None = None, max_aspect_ratio: float | None = None) -> dict:
    """Generate for every sample not yet in ``out_dir``, append, then score all; returns the metrics.

    Images over the size limits (``max_pixels`` / ``max_side`` / ``max_aspect_ratio``; None = the
    default, see `llavakit.data.images.ImageLimits`) stop the run before anything is generated.
    """
    from tqdm.auto import tqdm

    from llavakit.data.images import ImageError, ImageLimits
    from llavakit.data.video import probe_video
    from llavakit.infer.generate import GenerationSettings

    metric = get_metric(metric) if isinstance(metric, str) else metric
    settings = settings or GenerationSettings(max_new_tokens=32)
    if settings.temperature != 0:
        raise ValueError("evaluation decodes greedily; use temperature 0")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    suffix = metric.prompt_suffix if prompt_suffix is None else prompt_suffix
    out_dir = Path(out_dir)
    info = dict(run_info or {})
    info.update(template=generator.template.name, prompt_suffix=suffix, max_new_tokens=settings.max_new_tokens,
                metric=metric.name)
    done = prepare_output(out_dir, info, overwrite)
    done_ids = {r["id"] for r in done}
    todo = [s for s in samples if s.id not in done_ids]
    if done:
        log.info("resuming: %d of %d samples already in %s", len(samples) - len(todo), len(samples), out_dir)
    limits = ImageLimits.of(max_pixels, max_side, max_aspect_ratio)
    if any(s.videos for s in todo):
        generator.processor.check_videos()  # a model without videos says so before anything runs
    for s in todo:  # headers only: a bad image stops the run now, not hours in
        try:
            for p in s.images:
                limits.size(p)
            for v in s.videos:  # a file's metadata; a frame list's headers
                probe_video(v) if isinstance(v, str) else [limits.size(f) for f in v]
        except ImageError as e:  # a VideoError is one too
            raise EvalDataError(f"{s.label(source)}: {e} -> {e.hint}") from e

    bar = tqdm(total=len(samples), initial=len(samples) - len(todo), desc="eval", unit="sample",
               file=sys.stderr, disable=not progress, dynamic_ncols=True)
    with open(out_dir / PREDICTIONS, "a", encoding="utf-8") as out:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            conversations, images = [], []
            for s in batch:
                try:
                    images.append([limits.open(p) for p in s.images])
                except ImageError as e:
                    raise EvalDataError(f"{s.label(source)}: {e} -> {e.hint}") from e
                conversations.append(sample_turns(s, suffix))
            videos = [s.videos for s in batch]
            try:
                replies = generator.generate(conversations, images, settings, videos=videos) if any(videos) else \
                    generator.generate(conversations, images, settings)
            except ImageError as e:  # a video that fails to decode
                raise EvalDataError(f"{source}: a video of samples {[s.id for s in batch]}: {e} -> {e.hint}") from e
            for s, reply in zip(batch, replies):
                record = {"id": s.id, "index": s.index, "question": s.question, "prediction": reply,
                          "answers": s.answers, "choices": s.choices}
                record.update(metric.score(reply, s.answers, s.choices))
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()
            os.fsync(out.fileno())  # a batch is either fully on disk or redone after a crash
            bar.update(len(batch))
    bar.close()

    wanted = {s.id for s in samples}
    records = [r for r in load_predictions(out_dir / PREDICTIONS) if r["id"] in wanted]
    metrics = score_records(records, metric)
    metrics.update(metric=metric.name, samples=len(records))
    (out_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics

