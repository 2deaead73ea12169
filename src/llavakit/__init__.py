"""llavakit: give any causal language model eyes, the LLaVA way.

    model, processor = llavakit.build(vision="openai/clip-vit-large-patch14-336",
                                      llm="lmsys/vicuna-7b-v1.5", projector="mlp2x_gelu")
    model, processor = llavakit.load("runs/my-model")
"""

from .model import LlavakitConfig, LlavakitForConditionalGeneration, LlavakitProcessor
from .model.build import build, load

__version__ = "0.1.0"
__all__ = ["build", "load", "LlavakitConfig", "LlavakitForConditionalGeneration", "LlavakitProcessor"]
