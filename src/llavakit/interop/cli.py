"""`llavakit export RUN_OR_MODEL_DIR OUT --format hf-llava|hf-llava-next|hf-llava-onevision|gguf`: write a
checkpoint other tools load unchanged. An ``image_tokens: anyres`` model exported as hf-llava is written as
hf-llava-next (LLaVA-NeXT), an ``anyres_max`` one as hf-llava-onevision (LLaVA-OneVision).

`--format gguf` writes model-<dtype>.gguf + mmproj-<dtype>.gguf + an Ollama Modelfile for llama.cpp
(`--dtype f32|f16|q8_0`, default f16; see docs/gguf.md).

RUN_OR_MODEL_DIR is a saved llavakit model folder (config.json with model_type "llavakit"), e.g. the
output of `llavakit merge-lora`, or a finetune run folder, whose `model/` subfolder is then exported.
"""

from __future__ import annotations

import sys


HF_DTYPES = ("float32", "float16", "bfloat16")
GGUF_ONLY_DTYPES = ("f32", "f16", "q8_0")


def add_arguments(parser) -> None:
    from . import EXPORT_FORMATS

    parser.add_argument("src", metavar="RUN_OR_MODEL_DIR",
                        help="saved llavakit model folder, or a training run folder (uses RUN/model)")
    parser.add_argument("out", metavar="OUT", help="folder to write (must be new or empty, see --overwrite)")
    parser.add_argument("--format", default="hf-llava", choices=sorted(EXPORT_FORMATS),
                        help="hf-llava: transformers' LlavaForConditionalGeneration / vLLM (default; an anyres "
                             "model is written as hf-llava-next, an anyres_max one as hf-llava-onevision); "
                             "hf-llava-next: LlavaNextForConditionalGeneration; hf-llava-onevision: "
                             "LlavaOnevisionForConditionalGeneration; gguf: llama.cpp / Ollama (text model + mmproj)")
    parser.add_argument("--dtype", default=None, choices=[*HF_DTYPES, *GGUF_ONLY_DTYPES],
                        help="hf-llava: cast the weights to float32/float16/bfloat16 (default: keep the saved "
                             "dtype); gguf: f32, f16 (default) or q8_0")
    parser.add_argument("--max-shard-size", default="5GB", help="split weight files above this size (default 5GB)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT, replacing weights")


def run(args) -> int:
    from . import export

    if args.format != "gguf" and args.dtype in GGUF_ONLY_DTYPES:
        print(f"llavakit export: --dtype {args.dtype} is for --format gguf; {args.format} takes "
              f"{', '.join(HF_DTYPES)}", file=sys.stderr)
        return 2
    try:
        out = export(args.src, args.out, format=args.format, dtype=args.dtype, max_shard_size=args.max_shard_size,
                     overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"llavakit export: {e}", file=sys.stderr)
        return 2
    from . import checkpoint_format

    written = args.format if args.format == "gguf" else checkpoint_format(out)  # anyres: hf-llava-next, ...
    print(f"wrote {written} checkpoint to {out}")
    return 0
