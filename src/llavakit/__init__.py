"""llavakit: give any causal language model eyes, the LLaVA way.

    model, processor = llavakit.build(vision="openai/clip-vit-large-patch14-336",
                                      llm="lmsys/vicuna-7b-v1.5", projector="mlp2x_gelu")
    model, processor = llavakit.load("runs/my-model")
"""

from .model import LlavakitConfig, LlavakitForConditionalGeneration, LlavakitProcessor
from .model.build import build


def load(path, dtype=None, device_map=None, attn_implementation=None, **kwargs):
    """(model, processor) from a saved model: llavakit's own, a llava-hf checkpoint or an original-LLaVA one
    (the format is read from config.json). Every keyword reaches the loader of every format: `dtype`,
    `device_map`, `attn_implementation`, hub options (`revision`, `token`, ...) and the importers' own
    (`vision`, `llm`, `projector_bin` for original LLaVA); see `llavakit.interop.open_checkpoint`."""
    from .interop import open_checkpoint

    return open_checkpoint(path, dtype=dtype, device_map=device_map, attn_implementation=attn_implementation,
                           **kwargs)


__version__ = "0.1.0"
__all__ = ["build", "load", "LlavakitConfig", "LlavakitForConditionalGeneration", "LlavakitProcessor"]
