"""`llavakit demo [--out DIR] [--seed N]`: the offline end-to-end demo (see pipeline.py)."""

from __future__ import annotations

import sys


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output folder; must be new or empty (default runs/demo)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic world and of training")
    parser.add_argument("--scale", choices=["full", "small"], default="full",
                        help="'small' is a faster, weaker run (what the test suite uses)")


def run(args) -> int:
    import torch

    from .pipeline import run_demo

    torch.set_num_threads(max(1, min(torch.get_num_threads(), 8)))
    try:
        run_demo(args.out, seed=args.seed, scale=args.scale)
    except (FileExistsError, FileNotFoundError) as e:
        print(f"llavakit demo: {e}", file=sys.stderr)
        return 2
    return 0
