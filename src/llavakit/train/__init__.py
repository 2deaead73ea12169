"""Training: typed config, stage recipes, the accelerate loop, checkpoints, LoRA merge."""

from .config import RunConfig, load_config


def run_training(config, overrides=(), resume: bool = False):
    """Train from a YAML path or a `RunConfig`; returns the run directory (a `pathlib.Path`)."""
    from .loop import train

    cfg = config if isinstance(config, RunConfig) else load_config(config, overrides)
    return train(cfg, resume=resume)


__all__ = ["RunConfig", "load_config", "run_training"]
