"""`llavakit eval`: batched evaluation of a saved model on a VQA-style JSONL file.

    llavakit eval --model runs/my-model --data textvqa_val.jsonl --metric vqav2 --batch-size 16

Writes ``predictions.jsonl``, ``metrics.json`` and ``run.json`` to ``--out`` (default
``eval-<data file name>``); run the same command again to resume after an interruption.
See docs/eval.md for the data format and how each metric scores.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from llavakit.eval.metrics import METRICS

AUTO_METRIC = "auto"


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="a saved llavakit model directory (or hub id)")
    parser.add_argument("--data", required=True, help="JSONL file, one question per line (see docs/eval.md)")
    parser.add_argument("--metric", default=AUTO_METRIC, choices=[AUTO_METRIC] + sorted(METRICS),
                        help="how to score (default auto: 'option' when every row has choices, else 'vqav2'). "
                        + "; ".join(f"{k}: {m.help}" for k, m in METRICS.items()))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default=None, help="output folder (default: eval-<data file name>)")
    parser.add_argument("--image-folder", default=None,
                        help="folder relative image paths are resolved against (default: the data file's folder)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--template", default=None,
                        help="conversation template (default: the one the model was trained with)")
    parser.add_argument("--prompt-suffix", default=None,
                        help="text appended to every question (default: the metric's LLaVA-style instruction; "
                             "'' for none)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N samples")
    from llavakit.data.images import add_limit_arguments

    add_limit_arguments(parser)  # --max-pixels / --max-side / --max-aspect-ratio
    parser.add_argument("--overwrite", action="store_true", help="discard earlier predictions in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])


def choose_metric(name: str, data: Path) -> str:
    """``auto``: 'option' when every row has choices, else 'vqav2'."""
    if name != AUTO_METRIC:
        return name
    with open(data, encoding="utf-8") as f:
        rows = []
        for line in f:
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    return "vqav2"  # read_samples reports the bad line
    has_choices = bool(rows) and all(isinstance(r, dict) and r.get("choices") for r in rows)
    return "option" if has_choices else "vqav2"


def run(args) -> int:
    import logging

    from llavakit.eval.metrics import get_metric
    from llavakit.eval.runner import EvalDataError, evaluate, file_sha256, model_fingerprint, read_samples
    from llavakit.infer.generate import GenerationSettings, load_generator

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    data = Path(args.data)
    try:
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
        metric = get_metric(choose_metric(args.metric, data) if data.is_file() else "vqav2")
        samples = read_samples(data, args.image_folder, metric)
    except (EvalDataError, ValueError) as e:
        print(f"llavakit eval: {e}", file=sys.stderr)
        return 2
    if args.limit is not None:
        samples = samples[:args.limit]
    out = Path(args.out or f"eval-{data.stem}")
    from llavakit.infer.logs import route_library_warnings

    route_library_warnings("eval", out / "library-warnings.log")
    try:
        generator = load_generator(args.model, device=args.device, dtype=args.dtype, template=args.template)
    except (OSError, ValueError) as e:  # no model there, a LoRA-only run, an unknown format
        print(f"llavakit eval: --model {args.model}: {e}", file=sys.stderr)
        return 2
    run_info = {"model": str(args.model), "model_fingerprint": model_fingerprint(args.model),
                "data": str(data.resolve()), "data_sha256": file_sha256(data),
                "image_folder": str(Path(args.image_folder).resolve()) if args.image_folder else None,
                "dtype": args.dtype or "default", "batch_size": args.batch_size}
    try:
        metrics = evaluate(generator, samples, out, metric, batch_size=args.batch_size, settings=settings,
                           prompt_suffix=args.prompt_suffix, run_info=run_info, overwrite=args.overwrite,
                           max_pixels=args.max_pixels, max_side=args.max_side, max_aspect_ratio=args.max_aspect_ratio,
                           progress=not args.no_progress, source=str(data))
    except EvalDataError as e:
        print(f"llavakit eval: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted; finished batches are in {out}. Run the same command again to resume.",
              file=sys.stderr)
        return 130
    print(json.dumps(metrics, indent=2))
    print(f"predictions: {out / 'predictions.jsonl'}\nmetrics:     {out / 'metrics.json'}", file=sys.stderr)
    return 0
