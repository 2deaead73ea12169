"""`SupervisedDataset`: conversations -> (input_ids, labels, pixel_values) items for training.

Tokenization happens once, up front, in the main process (fast tokenizers, one call per sample), so
the exact length of every sample (image placeholders included) is known before training starts: the
length-grouped sampler and the packer use it, and the report of kept / truncated / dropped / skipped
samples is printed before the first step. Images are decoded lazily in `__getitem__`, i.e. in the
dataloader workers. Token ids are stored as int32 arrays with a boolean "supervised" mask (labels
are rebuilt on access), which keeps a few hundred thousand samples small in memory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .conversation import Conversation, Problem, SampleError
from .images import ImageError, ImageLimits
from .templates import Template, get_template
from .tokenize import IGNORE_INDEX, OverlongError, encode

log = logging.getLogger(__name__)


@dataclass
class DatasetReport:
    """What the length policy and the checks did to the data, before training starts."""

    total: int = 0
    kept: int = 0  # in the dataset (truncated ones included)
    truncated: int = 0  # kept, with trailing rounds removed to fit max_length
    dropped: int = 0  # removed by the length policy
    skipped: int = 0  # removed because they cannot be trained on (no supervised token, ...)
    problems: list[Problem] = field(default_factory=list)  # one per dropped or skipped sample
    skipped_indices: list[int] = field(default_factory=list)  # source indices of the skipped ones

    def as_dict(self) -> dict:
        return {"total": self.total, "kept": self.kept, "truncated": self.truncated, "dropped": self.dropped,
                "skipped": self.skipped, "problems": [p.as_dict() for p in self.problems]}

    def __str__(self) -> str:
        text = (f"{self.kept} of {self.total} samples kept ({self.truncated} truncated at a turn boundary), "
                f"{self.dropped} dropped as too long, {self.skipped} skipped")
        for p in self.problems[:3]:
            text += f"\n  {p}"
        if len(self.problems) > 3:
            text += f"\n  ... and {len(self.problems) - 3} more"
        return text


def image_token_counts(conv: Conversation, processor, limits: ImageLimits | None = None
                       ) -> tuple[list[tuple[int, int]] | None, int | list[int]]:
    """(sizes, counts) for the conversation's images: sizes read from the image headers only when the
    processor's counts depend on them (else None and one count for all); a `SampleError` if unreadable
    or over ``limits`` (default: `ImageLimits()`)."""
    if not processor.counts_depend_on_size:
        return None, processor.num_image_tokens()
    limits = limits or ImageLimits()
    sizes = []
    for k, ref in enumerate(conv.images):
        try:
            sizes.append(limits.size(ref))
        except ImageError as e:
            raise SampleError.of(conv, f"image {k} cannot be opened: {e}", e.hint or "fix or remove the image") from e
    return sizes, processor.image_token_counts(sizes)


class SupervisedDataset(Dataset):
    """Items: ``{"input_ids": LongTensor[L], "labels": LongTensor[L], "pixel_values": FloatTensor[n,3,H,W] | None}``.

    ``template`` is a `Template` or a template name (resolved with the processor's tokenizer).
    Samples that cannot be trained on are left out and listed in `report`; ``strict=True`` raises
    the first `SampleError` instead. Images over ``image_limits`` (`ImageLimits`: pixels, longest side,
    aspect ratio; training passes ``data.max_pixels`` / ``max_side`` / ``max_aspect_ratio``) are refused
    from their header, before anything is decoded or resized.
    """

    def __init__(self, conversations: Sequence[Conversation], processor, template: Template | str,
                 max_length: int | None = None, overflow: str = "truncate",
                 image_loader: Callable | None = None, strict: bool = False,
                 image_limits: ImageLimits | None = None):
        self.processor = processor
        tokenizer = processor.tokenizer
        self.template = get_template(template, tokenizer) if isinstance(template, str) else template
        self.image_limits = image_limits or ImageLimits()
        self.image_loader = image_loader or self.image_limits.open  # picklable, for dataloader workers
        self.report = DatasetReport(total=len(conversations))
        self._convs: list[Conversation] = []
        self._ids: list[np.ndarray] = []  # [L] int32 each
        self._sup: list[np.ndarray] = []  # [L] bool each: position is supervised
        self._n_images: list[int] = []
        # (width, height) of each image, read from file headers, when token counts depend on it
        self._sizes: list[list[tuple[int, int]]] | None = [] if processor.counts_depend_on_size else None
        for conv in conversations:
            try:
                sizes, counts = image_token_counts(conv, processor, self.image_limits)
                enc = encode(conv, self.template, tokenizer, processor.image_token_id, counts,
                             max_length=max_length, overflow=overflow,
                             tokenization=processor.tokenization)
            except SampleError as e:
                if strict:
                    raise
                self.report.problems.append(e.problem)
                if isinstance(e, OverlongError):
                    self.report.dropped += 1
                else:
                    self.report.skipped += 1
                    self.report.skipped_indices.append(conv.index)
                continue
            labels = np.asarray(enc.labels, dtype=np.int64)
            self._convs.append(conv)
            self._ids.append(np.asarray(enc.input_ids, dtype=np.int32))
            self._sup.append(labels != IGNORE_INDEX)
            self._n_images.append(enc.num_images)
            if self._sizes is not None:
                self._sizes.append(sizes[:enc.num_images])
            self.report.truncated += int(enc.truncated)
        self.report.kept = len(self._convs)
        # Exact lengths (image placeholders included) and modality, for samplers and packers.
        self.lengths: list[int] = [len(x) for x in self._ids]
        self.has_image: list[bool] = [n > 0 for n in self._n_images]
        if self.report.dropped or self.report.skipped or self.report.truncated:
            log.info("%s", self.report)

    def __len__(self) -> int:
        return len(self._convs)

    def conversation(self, i: int) -> Conversation:
        return self._convs[i]

    def num_images(self, i: int) -> int:
        return self._n_images[i]

    def image_sizes(self, i: int) -> torch.Tensor | None:
        """[n, 2] (width, height) of sample i's images when the token policy needs them, else None."""
        if self._sizes is None or not self._n_images[i]:
            return None
        return torch.tensor(self._sizes[i], dtype=torch.long).reshape(-1, 2)

    def tokens(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids [L], labels [L]) of sample i, without opening its images."""
        ids = torch.from_numpy(self._ids[i].astype(np.int64))  # [L]
        labels = torch.where(torch.from_numpy(self._sup[i]), ids, torch.full_like(ids, IGNORE_INDEX))  # [L]
        return ids, labels

    def __getitem__(self, i: int) -> dict:
        ids, labels = self.tokens(i)
        n = self._n_images[i]
        pixel_values = None
        if n:
            conv = self._convs[i]
            images = []
            for k, ref in enumerate(conv.images[:n]):  # truncation keeps the leading images only
                try:
                    images.append(self.image_loader(ref))
                except Exception as e:
                    raise SampleError.of(conv, f"image {k} cannot be opened: {e}",
                                         getattr(e, "hint", "") or "fix or remove the image (run `llavakit data check`)"
                                         ) from e
            pixel_values = self.processor.preprocess_images(images)  # [n, 3, H, W]
        item = {"input_ids": ids, "labels": labels, "pixel_values": pixel_values}
        if self._sizes is not None:
            item["image_sizes"] = self.image_sizes(i)
        return item
