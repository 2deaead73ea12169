"""`LlavakitProcessor`: text + images -> model inputs, in transformers' processor convention.

The processor owns how many tokens each image gets (`num_image_tokens`, `image_token_counts`); every
``<image>`` becomes exactly that many placeholder ids, so the model only has to scatter. Images are
preprocessed by the vision encoder's own image processor, optionally after LLaVA's ``pad`` step
(expand to a square filled with the processor's mean colour, so nothing is cropped away).

Token policies (``image_tokens``, recorded with the model config too):

* ``base`` — every feature of the square the encoder sees: ``image_seq_length`` tokens per image.
* ``unpad`` (needs ``image_aspect="pad"`` and a square feature grid) — LLaVA-NeXT's unpadding on one
  tile: the feature-grid rows (or columns) that cover only the padding are dropped, so a 2:1 image
  gets about half the tokens. The count depends on the image's size (`unpadded_box`); the model
  receives the sizes as ``image_sizes`` [N, 2] (width, height) and cuts its features the same way.
* ``anyres`` (needs ``image_aspect="resize"`` and a square feature grid) — LLaVA-NeXT's tiles
  (`llavakit.model.anyres`): a base tile plus a grid chosen from ``image_grid_pinpoints``, unpadded, one
  newline per row. ``pixel_values`` then holds every tile of every image, base tile first, in image order:
  [sum of tiles, 3, H, W] (so batches concatenate like one-tile images); the model recounts each image's
  tiles from ``image_sizes``. Every image of a sample is tiled, as transformers' LlavaNext does.
* ``anyres_max`` — LLaVA-OneVision's ``anyres_max_N`` (`llavakit.model.onevision`): as ``anyres`` (OneVision's
  1x1..6x6 pinpoints by default), the grid map shrunk when it holds more than ``anyres_max_tiles`` tiles'
  worth of features; an image of a multi-image sample is padded to a square and gets its base tile + one
  newline only. The images a method is given are *one sample* (`image_token_counts`, `preprocess_images`)
  unless ``batch_num_images`` (images per sample, transformers' name) says otherwise; ``__call__`` counts them
  per text and returns ``batch_num_images`` for the model.

Videos (``anyres_max`` models with a ``<video>`` token: LLaVA-OneVision's rule, `llavakit.model.video`): each
``<video>`` marker takes one video (a file path or a list of frames), sampled to at most ``video_max_frames``
frames (and ``video_fps`` per second when set, `llavakit.data.video`), each frame one base tile; the marker
becomes ``frames * ceil(g/2)**2 + 1`` ``<video>`` ids. ``__call__`` returns ``pixel_values_videos``
[V, max frames, 3, H, W] (zero frames after a shorter video's own) and ``video_num_frames`` [V].

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
from llavakit.data.video import DEFAULT_MAX_FRAMES, VIDEO_MARKER, check_max_frames, load_video
from llavakit.model.anyres import anyres_tiles, anyres_token_count, check_grid_pinpoints, unpadded_extent
from llavakit.model.config import IMAGE_TOKEN_POLICIES, TILED_POLICIES
from llavakit.model.onevision import anyres_max_token_count, check_max_tiles, policy_grid_pinpoints, tiled_images
from llavakit.model.video import frame_tiles, stack_videos, video_token_count
from llavakit.data.tokenize import (LEGACY_TOKENIZATION, added_special_ids, check_tokenization,
                                    expand_image_tokens)

IMAGE_ASPECTS = ("resize", "pad")


def token_id_or_none(tokenizer, token: str) -> int | None:
    """The id of `token` in `tokenizer`, None when it does not have it (not the unknown token's id)."""
    tid = tokenizer.convert_tokens_to_ids(token)
    return None if tid is None or tid == tokenizer.unk_token_id else int(tid)


def unpadded_box(width: int, height: int, grid: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the feature rows/columns of a `grid` x `grid` map that cover a
    width x height image centred on a padded square (LLaVA-NeXT's rule: the scaled short side,
    rounded; the padding split evenly, floor on each side; `llavakit.model.anyres.unpadded_extent`)."""
    return unpadded_extent(width, height, grid, grid)


def feature_grid(image_seq_length: int) -> int:
    """Side of the square feature map of `image_seq_length` tokens (an error if it is not square)."""
    import math

    side = math.isqrt(int(image_seq_length))
    if side * side != int(image_seq_length):
        raise ValueError(f"{image_seq_length} features per image do not form a square grid; the 'unpad' "
                         "policy needs vision_feature_select='patch' and a square patch grid")
    return side


def expand_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA's `pad` aspect: centre the image on a square canvas of colour `fill`."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def encoder_input_size(image_processor) -> int:
    """Side (px) of the square an encoder's image processor outputs: its crop, else its resize target."""
    def field(obj, key):
        return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)

    crop, size = getattr(image_processor, "crop_size", None), getattr(image_processor, "size", None)
    if getattr(image_processor, "do_center_crop", False) and crop is not None and field(crop, "height"):
        return int(field(crop, "height"))
    side = (field(size, "height") or field(size, "shortest_edge")) if size is not None else None
    if not side:
        raise ValueError(f"cannot tell the input size of {type(image_processor).__name__} (size={size!r}, "
                         f"crop_size={crop!r}); image_tokens='anyres' needs square tiles of a known size")
    return int(side)


class LlavakitProcessor(ProcessorMixin):
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, image_token: str = IMAGE_MARKER,
                 image_seq_length: int = 1, image_aspect: str = "resize", template: str | None = None,
                 tokenization: str = LEGACY_TOKENIZATION, image_tokens: str = "base",
                 image_grid_pinpoints: list[list[int]] | None = None, anyres_max_tiles: int = 9,
                 video_token: str = VIDEO_MARKER, video_max_frames: int = DEFAULT_MAX_FRAMES,
                 video_fps: float | None = None, **kwargs):
        if image_aspect not in IMAGE_ASPECTS:
            raise ValueError(f"image_aspect={image_aspect!r} is not one of {list(IMAGE_ASPECTS)}")
        if image_tokens not in IMAGE_TOKEN_POLICIES:
            raise ValueError(f"image_tokens={image_tokens!r} is not one of {list(IMAGE_TOKEN_POLICIES)}")
        if image_tokens == "unpad":
            if image_aspect != "pad":
                raise ValueError("image_tokens='unpad' drops the features over LLaVA's square padding, so it "
                                 "needs image_aspect='pad'")
            feature_grid(image_seq_length)
        if image_tokens in TILED_POLICIES:
            if image_aspect != "resize":
                raise ValueError(f"image_tokens={image_tokens!r} tiles the image itself (its base tile is the whole "
                                 "image resized, as LLaVA-NeXT); use image_aspect='resize'")
            feature_grid(image_seq_length)
            tile = encoder_input_size(image_processor)
            image_grid_pinpoints = check_grid_pinpoints(image_grid_pinpoints or
                                                        policy_grid_pinpoints(image_tokens, tile), tile)
        # anyres / anyres_max: the [height, width] px the tile grid may take (recorded in processor_config.json)
        self.image_grid_pinpoints = image_grid_pinpoints
        # anyres_max: OneVision's N, the most tiles' worth of grid features an image keeps (`model.onevision`)
        self.anyres_max_tiles = check_max_tiles(anyres_max_tiles)
        self.image_tokens = image_tokens
        # videos (anyres_max): the marker / placeholder token, and how many frames a video keeps (`data.video`)
        self.video_token = video_token
        self.video_max_frames = check_max_frames(video_max_frames)
        self.video_fps = video_fps
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
        self.video_token_id = token_id_or_none(tokenizer, video_token) if image_tokens == "anyres_max" else None

    # --- token counts: the processor owns them ------------------------------------------------------
    @property
    def counts_depend_on_size(self) -> bool:
        """Whether an image's token count depends on its size (then callers must know the sizes)."""
        return self.image_tokens != "base"

    def num_image_tokens(self, image_size: tuple[int, int] | None = None, tiled: bool = True) -> int:
        """Placeholder ids for one image of ``image_size`` = (width, height); ``tiled=False``: an image of a
        multi-image sample under ``anyres_max`` (base tile + newline, whatever its size)."""
        if self.image_tokens == "base":
            return self.image_seq_length
        if self.image_tokens == "anyres_max" and not tiled:
            return anyres_max_token_count(0, 0, None, self.tile_size, feature_grid(self.image_seq_length),
                                          self.anyres_max_tiles, tiled=False)
        if image_size is None:
            raise ValueError(f"image_tokens={self.image_tokens!r}: the token count depends on the image size; "
                             "pass image_size=(width, height)")
        if self.image_tokens == "anyres":
            return anyres_token_count(*image_size, self.image_grid_pinpoints, self.tile_size,
                                      feature_grid(self.image_seq_length))
        if self.image_tokens == "anyres_max":
            return anyres_max_token_count(*image_size, self.image_grid_pinpoints, self.tile_size,
                                          feature_grid(self.image_seq_length), self.anyres_max_tiles)
        top, bottom, left, right = unpadded_box(*image_size, feature_grid(self.image_seq_length))
        return (bottom - top) * (right - left)

    @property
    def tile_size(self) -> int:
        """Side (px) of the encoder's square input: one anyres tile."""
        return encoder_input_size(self.image_processor)

    def image_token_counts(self, images: Sequence) -> list[int]:
        """One count per image of *one sample*: PIL images, (width, height) pairs, or references `open_image`
        reads (only their headers are read, and only when counts depend on the size). Under ``anyres_max`` the
        images of a sample with several get the base tile + newline each (OneVision's multi-image rule)."""
        if not self.counts_depend_on_size:
            return [self.image_seq_length] * len(images)
        from llavakit.data.images import image_size

        def size_of(im):
            if isinstance(im, (tuple, list)):
                return tuple(im)
            size = image_size(im, None)  # refuses sizes over the limits; EXIF-upright for references
            # an opened image is preprocessed as stored (no EXIF turn), so its tiles and count follow im.size
            return im.size if isinstance(im, Image.Image) else size

        sizes = [size_of(im) for im in images]
        alone = self.image_tokens != "anyres_max" or len(images) == 1  # else each gets base tile + newline
        return [self.num_image_tokens(size, tiled=alone) for size in sizes]

    # --- videos ---------------------------------------------------------------------------------
    def check_videos(self) -> None:
        """ValueError unless this processor takes videos (anyres_max with a ``<video>`` token)."""
        if self.image_tokens != "anyres_max" or self.video_token_id is None:
            raise ValueError(f"videos need image_tokens='anyres_max' and a {self.video_token!r} token in the tokenizer "
                             f"(LLaVA-OneVision's video rule); this processor has image_tokens={self.image_tokens!r}"
                             f", video token id {self.video_token_id}: "
                             "build the model with llavakit.build(..., image_tokens='anyres_max')")

    def num_video_tokens(self, num_frames: int) -> int:
        """Placeholder ids of one video of `num_frames` (sampled) frames: frames * ceil(g/2)**2 + 1."""
        return video_token_count(num_frames, feature_grid(self.image_seq_length))

    def video_token_counts(self, videos: Sequence) -> list[int]:
        """One count per video: a frame count (already sampled), a list of frames (sampled here), a tensor
        [F, 3, H, W], or a file path (its metadata only: `read_video` may find fewer frames in a file whose
        metadata overstates them; `__call__` counts the frames it decoded)."""
        from llavakit.data.video import probe_video, sampled_frame_count

        def frames(v):
            if isinstance(v, int) or torch.is_tensor(v):
                return v if isinstance(v, int) else v.shape[0]
            if isinstance(v, (list, tuple)):
                return min(len(v), self.video_max_frames)
            info = probe_video(v)
            return sampled_frame_count(info.frames, self.video_max_frames, self.video_fps, info.fps)

        self.check_videos()
        return [self.num_video_tokens(frames(v)) for v in videos]

    def load_videos(self, videos) -> list[list[Image.Image]]:
        """Videos (module docstring) -> each one's sampled frames; one path or one list of PIL frames is one video."""
        if videos is None:
            return []
        if isinstance(videos, (str, bytes)) or not isinstance(videos, Sequence) or \
                (videos and all(isinstance(f, Image.Image) for f in videos)):
            videos = [videos]
        return [load_video(v, self.video_max_frames, self.video_fps) for v in videos]

    def preprocess_videos(self, videos: Sequence[Sequence[Image.Image]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Sampled frames of each video -> (pixel_values_videos [V, max F, 3, H, W], video_num_frames [V]); each
        frame the whole frame resized to one tile, then the encoder's image processor (as a base tile)."""
        resample = getattr(self.image_processor, "resample", None)
        resample = Image.BICUBIC if resample is None else int(resample)
        return stack_videos([self.image_processor(frame_tiles(v, self.tile_size, resample), return_tensors="pt")
                             ["pixel_values"] for v in videos])

    # --- images ---------------------------------------------------------------------------------
    def _fill_colour(self) -> tuple[int, int, int]:
        mean = getattr(self.image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
        return tuple(int(255 * m) for m in mean)  # truncation, as LLaVA and transformers do

    def preprocess_images(self, images: Sequence[Image.Image], batch_num_images: Sequence[int] | None = None
                          ) -> torch.Tensor:
        """PIL images -> pixel_values [N, 3, H, W] (float32); under ``anyres`` / ``anyres_max`` every image's
        tiles, base tile first: [sum of tiles, 3, H, W]. ``batch_num_images`` (images per sample) matters to
        ``anyres_max`` only; None = `images` are one sample (an image of several: one square-padded tile)."""
        rgb = [im.convert("RGB") if im.mode != "RGB" else im for im in images]
        if self.image_tokens in TILED_POLICIES:
            resample = getattr(self.image_processor, "resample", None)
            resample = Image.BICUBIC if resample is None else int(resample)
            tiled = [True] * len(rgb) if self.image_tokens == "anyres" else \
                tiled_images([len(rgb)] if batch_num_images is None else batch_num_images, len(rgb))
            rgb = [t for im, tile in zip(rgb, tiled) for t in
                   (anyres_tiles(im, self.image_grid_pinpoints, self.tile_size, resample) if tile
                    else [expand_to_square(im, self._fill_colour())])]
        if self.image_aspect == "pad":
            rgb = [expand_to_square(im, self._fill_colour()) for im in rgb]
        return self.image_processor(rgb, return_tensors="pt")["pixel_values"]

    @staticmethod
    def image_sizes(images: Sequence[Image.Image]) -> torch.Tensor:
        """[N, 2] (width, height) of each original image: what `unpad` cuts the features by."""
        return torch.tensor([list(im.size) for im in images], dtype=torch.long).reshape(-1, 2)

    # --- text -----------------------------------------------------------------------------------
    def __call__(self, text=None, images=None, return_tensors=None, padding: bool = True,
                 padding_side: str | None = None, add_special_tokens: bool = True, videos=None,
                 **kwargs) -> BatchFeature:
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
        per_text = [t.count(self.image_token) for t in texts]  # images of each sample
        rows, at = [], 0
        for row, n in zip(ids, per_text):
            rows.append(expand_image_tokens(row, self.image_token_id, self.image_token_counts(flat_images[at:at + n])))
            at += n
        videos = self.load_videos(videos)
        if videos:  # without a video token "<video>" is plain text; with one, each marker needs a video
            self.check_videos()
        per_text_videos = [t.count(self.video_token) if self.video_token_id is not None else 0 for t in texts]
        if sum(per_text_videos) != len(videos):
            raise ValueError(f"the text has {sum(per_text_videos)} {self.video_token} marker(s) but {len(videos)} "
                             "video(s) were given; put exactly one marker where each video belongs")
        if videos:
            counts = [self.num_video_tokens(len(v)) for v in videos]
            rows = [expand_image_tokens(row, self.video_token_id, counts[sum(per_text_videos[:k]):])
                    for k, row in enumerate(rows)]
        ids = rows
        data = self.pad(ids, padding_side=padding_side) if padding else {"input_ids": ids}
        if flat_images:
            data["pixel_values"] = self.preprocess_images(flat_images, batch_num_images=per_text)
            if self.counts_depend_on_size:
                data["image_sizes"] = self.image_sizes(flat_images)
            if self.image_tokens == "anyres_max":  # which images are alone in their sample (transformers' name)
                data["batch_num_images"] = per_text
        if videos:
            data["pixel_values_videos"], data["video_num_frames"] = self.preprocess_videos(videos)
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

    def save_pretrained(self, save_directory, *args, **kwargs):
        """ProcessorMixin's save, plus the tokenizer's `legacy` flag, which transformers 5 does not write:
        a SentencePiece Llama tokenizer reloaded without it falls back to legacy=False and tokenizes text
        after special tokens differently from how the model was trained."""
        import json
        from pathlib import Path

        out = super().save_pretrained(save_directory, *args, **kwargs)
        legacy = getattr(self.tokenizer, "legacy", None)
        path = Path(save_directory) / "tokenizer_config.json"
        if isinstance(legacy, bool) and path.is_file():
            cfg = json.loads(path.read_text(encoding="utf-8"))
            if cfg.get("legacy") != legacy:
                cfg["legacy"] = legacy
                path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return out

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)
