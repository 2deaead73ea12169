"""`llavakit merge-lora RUN_DIR OUT`: fold a LoRA run into a standalone llavakit model.

Rebuilds the base model the run started from (its `config.yaml`), loads the run's projector (and
vision tower, if it trained), applies the LoRA adapter, merges it into the LLM weights and saves a
normal model directory that `llavakit.load` opens.
"""

from __future__ import annotations

import sys
from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", help="a finished `stage: lora` run directory (holds adapter/ and config.yaml)")
    parser.add_argument("out", help="where to write the merged model")


def merge_lora(run_dir: str | Path, out: str | Path | None = None):
    """Returns the merged (model, processor); saves them to `out` when given."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from .config import ConfigError, load_config
    from .recipes import PROJECTOR_FILE, assemble, load_projector

    run_dir = Path(run_dir)
    if not (run_dir / "adapter").is_dir() or not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir} is not a finished LoRA run (expected {run_dir}/adapter and config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
    cfg.train.stage = "finetune"  # assemble the full-precision base; never re-quantise for merging
    model, processor = assemble(cfg)
    load_projector(model, run_dir / PROJECTOR_FILE)
    if (run_dir / "vision.safetensors").is_file():
        vis = load_file(str(run_dir / "vision.safetensors"))
        model.load_state_dict(vis, strict=False)
    model.language_model = PeftModel.from_pretrained(model.language_model, run_dir / "adapter").merge_and_unload()
    processor.template = cfg.data.template
    if out is not None:
        model.save_pretrained(out)
        processor.save_pretrained(out)
    return model, processor


def run(args) -> int:
    from .config import ConfigError

    try:
        merge_lora(args.run_dir, args.out)
    except ConfigError as e:
        print(f"llavakit merge-lora: {e}", file=sys.stderr)
        return 2
    print(f"merged model written to {args.out}")
    return 0
