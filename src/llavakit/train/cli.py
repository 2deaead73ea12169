"""`llavakit train CONFIG.yaml [--section.key=value ...] [--resume]`."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML recipe with model / data / train sections (see configs/)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in train.output_dir from its newest complete checkpoint")
    parser.epilog = ("Any config value can be overridden: --train.lr=2e-5 --data.packing=true "
                     "--model.llm=path/to/llm (values are parsed as YAML).")
    parser.set_defaults(_overrides_ok=True)


def parse(argv: list[str]):
    """Split our own flags from `--section.key=value` overrides."""
    parser = argparse.ArgumentParser(prog="llavakit train")
    add_arguments(parser)
    args, rest = parser.parse_known_args(argv)
    bad = [r for r in rest if not (r.startswith("--") and "=" in r and "." in r.split("=", 1)[0])]
    if bad:
        parser.error(f"unrecognised arguments {bad}; overrides look like --train.lr=2e-5")
    args.overrides = rest
    return args


def run(args) -> int:
    from .config import ConfigError, load_config
    from .loop import train

    overrides = getattr(args, "overrides", [])
    try:
        cfg = load_config(args.config, overrides)
        train(cfg, resume=args.resume)
    except ConfigError as e:
        print(f"llavakit train: {e}", file=sys.stderr)
        return 2
    return 0
