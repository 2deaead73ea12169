"""`llavakit demo [--out DIR] [--seed N]`: the offline end-to-end demo (see pipeline.py)."""

from __future__ import annotations

import sys

DEMO_THREADS = 2


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output folder; must be new or empty (default runs/demo)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic world and of training")
    parser.add_argument("--scale", choices=["full", "small"], default="full",
                        help="'small' is a faster, weaker run (what the test suite uses)")


def run(args) -> int:
    import torch

    from .pipeline import run_demo

    # A fixed thread count, whatever the machine: CPU reductions split work by thread, so the same seed gives
    # the same numbers on a machine only when the thread count does not depend on its cores or load.
    torch.set_num_threads(DEMO_THREADS)
    try:
        run_demo(args.out, seed=args.seed, scale=args.scale)
    except (FileExistsError, FileNotFoundError) as e:
        print(f"llavakit demo: {e}", file=sys.stderr)
        return 2
    return 0
