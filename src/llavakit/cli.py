"""`llavakit` command line: one entry point, one module per sub-command.

Each sub-command module exposes ``add_arguments(parser)`` and ``run(args) -> int``; it is imported
only when that sub-command runs, so ``llavakit --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("llavakit.data.cli", "check, stats, convert; build data: captions (stage 1), generate (teacher via an OpenAI-compatible API)"),
    "train": ("llavakit.train.cli", "train from a YAML recipe (stage 1 pretrain, stage 2 finetune/LoRA/QLoRA)"),
    "merge-lora": ("llavakit.train.merge", "merge a LoRA run into a standalone model"),
    "demo": ("llavakit.demo.cli", "offline end-to-end demo: synthetic data, tiny backbones, both stages, scores"),
    "chat": ("llavakit.infer.chat", "multi-turn terminal chat with images"),
    "web": ("llavakit.infer.web", "web chat page (Gradio)"),
    "eval": ("llavakit.eval.cli", "batched evaluation on VQA-style JSONL"),
    "export": ("llavakit.interop.cli", "export to formats transformers / vLLM load unchanged"),
    "smoke": ("llavakit.smoke", "build a tiny random model offline and generate (install check)"),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llavakit",
        description="Give any causal language model eyes, the LLaVA way.",
    )
    p.add_argument("--version", action="version", version=f"llavakit {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return p


def _version() -> str:
    from llavakit import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        _parser().parse_args(argv or ["--help"])
        return 0
    name, rest = argv[0], argv[1:]
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    if hasattr(module, "parse"):  # commands with free-form extras (train's --section.key=value)
        args = module.parse(rest)
    else:
        parser = argparse.ArgumentParser(prog=f"llavakit {name}", description=help_text)
        module.add_arguments(parser)
        args = parser.parse_args(rest)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
