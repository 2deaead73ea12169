"""`LlavakitProcessor`: text + images -> model inputs, in transformers' processor convention.

Every ``<image>`` in the text becomes exactly ``image_seq_length`` placeholder ids (the number of
features the model's projector emits per image), so the model only has to scatter. Images are
preprocessed by the vision encoder's own image processor, optionally after LLaVA's ``pad`` step
(expand to a square filled with the processor's mean colour, so nothing is cropped away).

``tokenization`` records how the checkpoint was trained to see text (`llavakit.data.tokenize`):
``llm`` and ``text`` tokenize a text in one piece (with ``add_special_tokens`` as given), ``llava``
tokenizes the chunks between images separately, as original LLaVA's ``tokenizer_image_token``.
A processor config without the field is an older llavakit checkpoint and gets ``text``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image
from transformers import BatchFeature, ProcessorMixin

from llavakit.data.conversation import IMAGE_MARKER
from llavakit.data.tokenize import LEGACY_TOKENIZATION, added_special_ids, check_tokenization

IMAGE_ASPECTS = ("resize", "pad")


def expand_image_tokens(ids: Sequence[int], image_token_id: int, n: int) -> list[int]:
    """Replace each single ``image_token_id`` by ``n`` copies of it."""
    out: list[int] = []
    for t in ids:
        if t == image_token_id:
            out.extend([image_token_id] * n)
        else:
            out.append(t)
    return out


def expand_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA's `pad` aspect: centre the image on a square canvas of colour `fill`."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


class LlavakitProcessor(ProcessorMixin):
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, image_token: str = IMAGE_MARKER,
                 image_seq_length: int = 1, image_aspect: str = "resize", template: str | None = None,
                 tokenization: str = LEGACY_TOKENIZATION, **kwargs):
        if image_aspect not in IMAGE_ASPECTS:
            raise ValueError(f"image_aspect={image_aspect!r} is not one of {list(IMAGE_ASPECTS)}")
        self.tokenization = check_tokenization(tokenization)
        self.image_token = image_token
        self.image_seq_length = int(image_seq_length)
        self.image_aspect = image_aspect
        # Name of the conversation template (llavakit.data.templates) the model was trained with;
        # chat and eval render prompts with it. None until a training run sets it.
        self.template = template
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {image_token!r} token; build the model with llavakit.build")

    # --- images ---------------------------------------------------------------------------------
    def _fill_colour(self) -> tuple[int, int, int]:
        mean = getattr(self.image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
        return tuple(int(255 * m) for m in mean)  # truncation, as LLaVA and transformers do

    def preprocess_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> pixel_values [N, 3, H, W] (float32)."""
        rgb = [im.convert("RGB") if im.mode != "RGB" else im for im in images]
        if self.image_aspect == "pad":
            rgb = [expand_to_square(im, self._fill_colour()) for im in rgb]
        return self.image_processor(rgb, return_tensors="pt")["pixel_values"]

    # --- text -----------------------------------------------------------------------------------
    def __call__(self, text=None, images=None, return_tensors=None, padding: bool = True,
                 padding_side: str | None = None, add_special_tokens: bool = True, **kwargs) -> BatchFeature:
        if text is None:
            raise ValueError("LlavakitProcessor needs `text` (with one <image> per image)")
        texts = [text] if isinstance(text, str) else list(text)
        flat_images = self._flatten_images(texts, images)
        counts = [t.count(self.image_token) for t in texts]
        if sum(counts) != len(flat_images):
            raise ValueError(
                f"the text has {sum(counts)} {self.image_token} marker(s) but {len(flat_images)} image(s) were "
                "given; put exactly one marker where each image belongs"
            )
        if self.tokenization == "llava":
            ids = [self.chunked_ids(t, add_special_tokens) for t in texts]
        else:
            ids = self.tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
        ids = [expand_image_tokens(row, self.image_token_id, self.image_seq_length) for row in ids]
        data = self.pad(ids, padding_side=padding_side) if padding else {"input_ids": ids}
        if flat_images:
            data["pixel_values"] = self.preprocess_images(flat_images)
        if return_tensors not in (None, "pt"):
            raise ValueError("LlavakitProcessor returns PyTorch tensors only (return_tensors='pt')")
        if return_tensors == "pt" and not padding and len(ids) > 1:
            raise ValueError("return_tensors='pt' with several texts needs padding=True")
        return BatchFeature(data=data, tensor_type=return_tensors)

    def chunked_ids(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Original LLaVA's ``tokenizer_image_token``: each chunk between images tokenized as a text
        of its own, the tokenizer's prefix (bos) kept for the first chunk only; one image id per image."""
        prefix, suffix = added_special_ids(self.tokenizer) if add_special_tokens else ([], [])
        chunks = self.tokenizer(text.split(self.image_token), add_special_tokens=add_special_tokens)["input_ids"]
        out: list[int] = []
        for i, ids in enumerate(chunks):
            ids = list(ids)
            if i and prefix and ids[:len(prefix)] == prefix:
                ids = ids[len(prefix):]
            if suffix and ids[len(ids) - len(suffix):] == suffix:
                ids = ids[:len(ids) - len(suffix)]
            out += ([self.image_token_id] if i else []) + ids
        return out

    def pad(self, ids: list[list[int]], padding_side: str | None = None) -> dict:
        side = padding_side or self.tokenizer.padding_side
        pad_id = self.tokenizer.pad_token_id
        width = max(len(r) for r in ids)
        out_ids, out_mask = [], []
        for row in ids:
            fill = width - len(row)
            if side == "left":
                out_ids.append([pad_id] * fill + row)
                out_mask.append([0] * fill + [1] * len(row))
            else:
                out_ids.append(row + [pad_id] * fill)
                out_mask.append([1] * len(row) + [0] * fill)
        return {"input_ids": out_ids, "attention_mask": out_mask}

    def _flatten_images(self, texts: list[str], images) -> list[Image.Image]:
        if images is None:
            return []
        if isinstance(images, Image.Image):
            return [images]
        images = list(images)
        if images and all(isinstance(x, (list, tuple)) for x in images):
            if len(images) != len(texts):
                raise ValueError(f"got {len(texts)} texts but {len(images)} image lists")
            for i, (t, ims) in enumerate(zip(texts, images)):
                if t.count(self.image_token) != len(ims):
                    raise ValueError(
                        f"text {i} has {t.count(self.image_token)} {self.image_token} marker(s) but "
                        f"{len(ims)} image(s)"
                    )
            return [im for ims in images for im in ims]
        return images

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)
