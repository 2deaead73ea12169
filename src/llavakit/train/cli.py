"""`llavakit train CONFIG.yaml [--section.key=value ...] [--resume [--resume-allow KEY,...]]`.

Exit status: 0 done; 2 refused to start (config error, the output folder is in use or holds another
run, a resume whose config differs); 1 stopped during training (non-finite loss, a failed save,
unreadable checkpoints) - the message says what is intact.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML recipe with model / data / train sections (see configs/)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in train.output_dir from its newest complete checkpoint")
    parser.add_argument("--resume-allow", action="append", default=[], metavar="KEY,...",
                        help="with --resume: config keys that may differ from the checkpoint's (e.g. "
                             "max_steps,lr; 'rng_state' accepts an unreadable RNG state, a non-exact resume); "
                             "same as --train.resume_allow=[...]")
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
    if args.resume_allow and not args.resume:
        parser.error("--resume-allow only applies with --resume")
    args.overrides = rest
    return args


def run(args) -> int:
    from .config import ConfigError, TrainingError, load_config
    from .loop import train

    overrides = getattr(args, "overrides", [])
    allow = [k.strip() for a in getattr(args, "resume_allow", None) or [] for k in a.split(",") if k.strip()]
    try:
        cfg = load_config(args.config, overrides)
        cfg.train.resume_allow = list(cfg.train.resume_allow) + [k for k in allow if k not in cfg.train.resume_allow]
        train(cfg, resume=args.resume)
    except ConfigError as e:
        print(f"llavakit train: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"llavakit train: stopped: {e}", file=sys.stderr)
        return 1
    return 0
