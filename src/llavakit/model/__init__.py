"""Model: config, projectors, the composite model, assembly from components, processor."""

from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from .config import LlavakitConfig
from .modeling import LlavakitForConditionalGeneration
from .processor import LlavakitProcessor

AutoConfig.register("llavakit", LlavakitConfig, exist_ok=True)
AutoModelForImageTextToText.register(LlavakitConfig, LlavakitForConditionalGeneration, exist_ok=True)
AutoProcessor.register(LlavakitConfig, LlavakitProcessor, exist_ok=True)

__all__ = ["LlavakitConfig", "LlavakitForConditionalGeneration", "LlavakitProcessor"]
