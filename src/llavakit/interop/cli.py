"""`llavakit export RUN_OR_MODEL_DIR OUT --format hf-llava`: write a checkpoint other tools load unchanged.

RUN_OR_MODEL_DIR is a saved llavakit model folder (config.json with model_type "llavakit"), e.g. the
output of `llavakit merge-lora`, or a finetune run folder, whose `model/` subfolder is then exported.
"""

from __future__ import annotations

import sys


def add_arguments(parser) -> None:
    from . import EXPORT_FORMATS

    parser.add_argument("src", metavar="RUN_OR_MODEL_DIR",
                        help="saved llavakit model folder, or a training run folder (uses RUN/model)")
    parser.add_argument("out", metavar="OUT", help="folder to write (must be new or empty, see --overwrite)")
    parser.add_argument("--format", default="hf-llava", choices=sorted(EXPORT_FORMATS),
                        help="hf-llava: transformers' LlavaForConditionalGeneration / vLLM (default)")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="cast the weights (default: keep the saved dtype)")
    parser.add_argument("--max-shard-size", default="5GB", help="split weight files above this size (default 5GB)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT, replacing weights")


def run(args) -> int:
    from . import export

    try:
        out = export(args.src, args.out, format=args.format, dtype=args.dtype, max_shard_size=args.max_shard_size,
                     overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"llavakit export: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.format} checkpoint to {out}")
    return 0
