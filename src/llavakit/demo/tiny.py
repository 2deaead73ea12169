"""Tiny, randomly initialised backbones saved as ordinary Hugging Face model folders.

Nothing can be downloaded in our test and demo environments, so tests and the offline demo build
their own "hub models" here: a byte-level BPE tokenizer trained on a few sentences, a Llama-,
Mistral- or Qwen2-shaped causal LM, and a CLIP- or SigLIP-shaped vision encoder with its image
processor. Each is written with ``save_pretrained`` and then loaded back *by path*, through exactly
the code a hub id takes (``AutoConfig`` / ``AutoModel*`` / ``AutoTokenizer`` / ``AutoImageProcessor``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

# Special tokens every tiny tokenizer knows, so that any conversation template can be rendered
# with it (chatml, llama3, mistral, vicuna all use some of these).
SPECIAL_TOKENS = [
    "<unk>", "<s>", "</s>",
    "<|im_start|>", "<|im_end|>", "<|endoftext|>",
    "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "[INST]", "[/INST]",
]

# Per family: which tokens are bos/eos, whether bos is prepended, and a chat template in the
# family's own format (used by the ``auto`` conversation template).
FAMILIES = {
    "llama": dict(bos="<s>", eos="</s>", add_bos=True, chat_template=None),
    "mistral": dict(bos="<s>", eos="</s>", add_bos=True, chat_template=None),
    "qwen2": dict(
        bos=None,
        eos="<|im_end|>",
        add_bos=False,
        chat_template=(
            "{% for message in messages %}"
            "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
            "{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
        ),
    ),
}

_DEFAULT_CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "What is in the image? There is a red circle and a blue square on a white background.",
    "How many triangles are there? Three. Which image has more circles, the first or the second?",
    "USER: ASSISTANT: system user assistant yes no left right top bottom green yellow purple",
    "0 1 2 3 4 5 6 7 8 9 one two three four five six seven eight nine ten",
    "The quick brown fox jumps over the lazy dog. Describe the picture in detail, please!",
]


def make_tokenizer(texts: Iterable[str] | None = None, family: str = "llama", vocab_size: int = 400):
    """Train a byte-level BPE tokenizer and wrap it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if family not in FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; valid: {sorted(FAMILIES)}")
    spec = FAMILIES[family]
    corpus = list(texts) if texts is not None else []
    corpus += _DEFAULT_CORPUS
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    if spec["add_bos"]:
        bos = spec["bos"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    kwargs = dict(tokenizer_object=tok, eos_token=spec["eos"], unk_token="<unk>")
    if spec["bos"]:
        kwargs["bos_token"] = spec["bos"]
    fast = PreTrainedTokenizerFast(**kwargs)
    if spec["chat_template"]:
        fast.chat_template = spec["chat_template"]
    return fast


def tiny_llm_config(family: str, vocab_size: int, hidden_size: int = 64, num_layers: int = 2,
                    num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int | None = None,
                    max_position_embeddings: int = 2048, tie_word_embeddings: bool = False, **extra):
    """A small config of the given family (``llama``, ``mistral`` or ``qwen2``); ``tie_word_embeddings``
    shares the LM head with the input embedding (as Qwen2.5-0.5B and SmolLM2 do)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    classes = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}
    if family not in classes:
        raise ValueError(f"unknown tiny family {family!r}; valid: {sorted(classes)}")
    return classes[family](
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        **extra,
    )


def save_tiny_llm(out_dir: str | Path, family: str = "llama", texts: Iterable[str] | None = None,
                  seed: int = 0, vocab_size: int = 400, **config_kwargs) -> Path:
    """Write a random causal LM + tokenizer to ``out_dir`` and return the path."""
    import torch
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    tok = make_tokenizer(texts, family=family, vocab_size=vocab_size)
    cfg = tiny_llm_config(family, vocab_size=len(tok), **config_kwargs)
    cfg.bos_token_id = tok.bos_token_id
    cfg.eos_token_id = tok.eos_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def tiny_vision_config(kind: str = "clip", image_size: int = 32, patch_size: int = 8, hidden_size: int = 32,
                       num_layers: int = 3, num_heads: int = 4, intermediate_size: int | None = None):
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    classes = {"clip": CLIPVisionConfig, "siglip": SiglipVisionConfig}
    if kind not in classes:
        raise ValueError(f"unknown tiny vision kind {kind!r}; valid: {sorted(classes)}")
    return classes[kind](
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size or 2 * hidden_size,
    )


def tiny_image_processor(kind: str = "clip", image_size: int = 32):
    """The encoder family's own image processor (PIL backend: no torchvision needed)."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    if kind == "clip":
        return CLIPImageProcessorPil(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        )
    if kind == "siglip":
        return SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
    raise ValueError(f"unknown tiny vision kind {kind!r}; valid: ['clip', 'siglip']")


def save_tiny_vision(out_dir: str | Path, kind: str = "clip", seed: int = 0, image_size: int = 32,
                     **config_kwargs) -> Path:
    """Write a random CLIP/SigLIP vision tower + its image processor to ``out_dir``."""
    import torch
    from transformers import AutoModel

    out_dir = Path(out_dir)
    cfg = tiny_vision_config(kind, image_size=image_size, **config_kwargs)
    torch.manual_seed(seed)
    model = AutoModel.from_config(cfg)
    model.save_pretrained(out_dir)
    tiny_image_processor(kind, image_size).save_pretrained(out_dir)
    return out_dir
