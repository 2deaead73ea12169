"""`llavakit demo [--out DIR] [--seed N] [--llm tiny|smollm2] [--hires] [--threads N]`: the offline end-to-end demo (see
pipeline.py; `--llm smollm2` runs real_llm.py: the real SmolLM2-135M-Instruct as the LLM, from the `smollm2` extra;
`--hires` runs hires.py: high-resolution pictures, a tiled (anyres) model against a base-resolution one)."""

from __future__ import annotations

import sys

DEMO_THREADS = 2


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output folder; must be new or empty (default runs/demo)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic world and of training")
    parser.add_argument("--scale", choices=["full", "small"], default="full",
                        help="'small' is a faster, weaker run (what the test suite uses)")
    parser.add_argument("--llm", choices=["tiny", "smollm2"], default="tiny",
                        help="'tiny': a tiny Llama pretrained on the world's text (default); 'smollm2': the real "
                             "SmolLM2-135M-Instruct, also scored on keeping its language (pip install "
                             "'llavakit[smollm2]')")
    parser.add_argument("--hires", action="store_true",
                        help="the high-resolution demo instead: 96 px pictures with a detail only full-resolution "
                             "tiles show, one stage 2 with image_tokens anyres and one at base resolution (the "
                             "control), both scored (docs/demo.md)")
    parser.add_argument("--motion", action="store_true",
                        help="with --hires: also train a video model (image_tokens anyres_max) on the motion clips "
                             "and score it with the frames, blind and with one frame")
    parser.add_argument("--threads", type=int, default=DEMO_THREADS,
                        help=f"torch CPU threads (default {DEMO_THREADS}, what docs/demo.md measured; the same seed gives "
                             "the same numbers at the same count). Use 1 when another busy process shares 2 cores: "
                             "2 threads then wait for each other and a stage runs 8-20x slower")


def run(args) -> int:
    import torch

    threads = getattr(args, "threads", DEMO_THREADS)
    if threads < 1:
        print(f"llavakit demo: --threads {threads}: must be 1 or more", file=sys.stderr)
        return 2

    hires = getattr(args, "hires", False)
    if hires and getattr(args, "llm", "tiny") != "tiny":
        print("llavakit demo: --hires runs with the tiny LLM only (leave out --llm)", file=sys.stderr)
        return 2

    if getattr(args, "motion", False) and not hires:
        print("llavakit demo: --motion goes with --hires", file=sys.stderr)
        return 2
    if hires:
        from functools import partial

        from .hires import run_hires_demo

        demo = partial(run_hires_demo, motion=getattr(args, "motion", False))
    elif getattr(args, "llm", "tiny") == "smollm2":
        from .real_llm import MissingExtraError, run_real_demo, smollm2_gguf

        try:
            smollm2_gguf()
        except MissingExtraError as e:
            print(f"llavakit demo: {e}", file=sys.stderr)
            return 2
        demo = run_real_demo
    else:
        from .pipeline import run_demo as demo

    # A fixed thread count, whatever the machine: CPU reductions split work by thread, so the same seed gives
    # the same numbers on a machine only when the thread count does not depend on its cores or load.
    torch.set_num_threads(threads)
    try:
        demo(args.out, seed=args.seed, scale=args.scale)
    except (FileExistsError, FileNotFoundError) as e:
        print(f"llavakit demo: {e}", file=sys.stderr)
        return 2
    return 0
