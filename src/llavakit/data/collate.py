"""Batching: a padding collator and a padding-free packing collator.

Both take `SupervisedDataset` items (``input_ids`` [L], ``labels`` [L], ``pixel_values`` [n,3,H,W] or
None, ``num_images``, ``image_sizes`` [n, 2] when counts depend on sizes) and concatenate the images of the
batch in sample order, which is the order their placeholders appear in the flattened ``input_ids``, so the
model's single ``masked_scatter`` puts each image in its own sample; ``batch_num_images`` [B] says how many
images each sample has (`image_fields`). Videos (items with ``pixel_values_videos`` [V_i, F_i, 3, H, W] and
``video_num_frames`` [V_i]) go the same way: ``pixel_values_videos`` [V_total, F_max, 3, H, W] in the order of the
``<video>`` placeholders across the batch (a shorter video's frames followed by zero frames) and
``video_num_frames`` [V_total]; both are left out when the batch has no video. Videos are not images:
``batch_num_images`` does not count them (transformers' LlavaOnevision neither).

Packing (transformers 5.x): all samples go in one row [1, ΣL] with ``position_ids`` restarting at 0 per
sample and *no* ``attention_mask``. transformers' ``masking_utils.find_packed_sequence_indices`` then
detects the sample boundaries from the position ids and builds a block-diagonal causal mask (eager,
sdpa, flex), and flash-attention detects them too (``_is_packed_sequence``) or uses the optional
``cu_seq_lens_*`` / ``max_length_*`` kwargs. That detection is skipped whenever a KV cache exists, and
causal LMs create one when ``use_cache`` is true (their config default), so packed batches carry
``use_cache=False``. Each sample's first label is -100, so no sample learns to predict the next one.
"""

from __future__ import annotations

import torch

from .tokenize import IGNORE_INDEX


def _pixel_values(features: list[dict]) -> torch.Tensor | None:
    pv = [f["pixel_values"] for f in features if f.get("pixel_values") is not None and len(f["pixel_values"])]
    return torch.cat(pv, dim=0) if pv else None  # [N_img_total, 3, H, W]


def num_images(item: dict) -> int | None:
    """Images of one item: its ``num_images``, else the rows of its ``image_sizes``, else 0 for an item without
    ``pixel_values``; None when it cannot be told (pixel rows are tiles under anyres, not images)."""
    if item.get("num_images") is not None:
        return int(item["num_images"])
    if item.get("image_sizes") is not None:
        return len(item["image_sizes"])
    pv = item.get("pixel_values")
    return 0 if pv is None or not len(pv) else None


def image_fields(features: list[dict]) -> dict:
    """``pixel_values`` [N_img_total, 3, H, W] (under anyres / anyres_max: every tile) and, when items carry them,
    ``image_sizes`` [N_img_total, 2], concatenated in sample order (= placeholder order); and when the batch has
    images, ``batch_num_images`` [B] (images per sample, in order, 0 for a text-only one: transformers'
    LlavaOnevision name), which tells the model which images were alone in their sample (anyres_max tiles only
    those; the processor counted them so)."""
    out = {}
    pv = _pixel_values(features)
    if pv is not None:
        out["pixel_values"] = pv
        counts = [num_images(f) for f in features]
        if None not in counts:
            out["batch_num_images"] = torch.tensor(counts, dtype=torch.long)  # [B]
    sizes = [f["image_sizes"] for f in features if f.get("image_sizes") is not None and len(f["image_sizes"])]
    if sizes:
        out["image_sizes"] = torch.cat(sizes, dim=0)
    return out


def video_fields(features: list[dict]) -> dict:
    """``pixel_values_videos`` [V_total, F_max, 3, H, W] (zero frames after a shorter video's own) and
    ``video_num_frames`` [V_total], in sample order (= the order of the ``<video>`` placeholders); {} without videos."""
    videos = [(f["pixel_values_videos"], f["video_num_frames"]) for f in features
              if f.get("pixel_values_videos") is not None and len(f["pixel_values_videos"])]
    if not videos:
        return {}
    most = max(int(pv.shape[1]) for pv, _ in videos)
    first = videos[0][0]
    out = first.new_zeros(sum(int(pv.shape[0]) for pv, _ in videos), most, *first.shape[2:])
    at = 0
    for pv, _ in videos:
        out[at:at + pv.shape[0], :pv.shape[1]] = pv
        at += pv.shape[0]
    frames = torch.cat([_as_long(n).reshape(-1) for _, n in videos])
    return {"pixel_values_videos": out, "video_num_frames": frames}


def _as_long(x) -> torch.Tensor:
    return x.long() if torch.is_tensor(x) else torch.tensor(x, dtype=torch.long)


class PadCollator:
    """Pads ``input_ids`` with ``pad_token_id``, ``labels`` with -100; returns tensors [B, L]."""

    def __init__(self, pad_token_id: int, padding_side: str = "right", pad_to_multiple_of: int | None = None):
        if pad_token_id is None:
            raise ValueError("PadCollator needs a pad_token_id (llavakit.build adds <pad> when a tokenizer has none)")
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side={padding_side!r} is not one of ['right', 'left']")
        self.pad_token_id = int(pad_token_id)
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict:
        ids = [_as_long(f["input_ids"]) for f in features]
        labels = [_as_long(f["labels"]) for f in features]
        width = max(len(x) for x in ids)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            width = (width + m - 1) // m * m
        b = len(ids)
        input_ids = torch.full((b, width), self.pad_token_id, dtype=torch.long)  # [B, L]
        out_labels = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)  # [B, L]
        mask = torch.zeros((b, width), dtype=torch.long)  # [B, L]
        for i, (x, y) in enumerate(zip(ids, labels)):
            n = len(x)
            sl = slice(0, n) if self.padding_side == "right" else slice(width - n, width)
            input_ids[i, sl], out_labels[i, sl], mask[i, sl] = x, y, 1
        batch = {"input_ids": input_ids, "attention_mask": mask, "labels": out_labels}
        batch.update(image_fields(features))
        batch.update(video_fields(features))
        return batch


class PackingCollator:
    """All samples of the batch in one row [1, ΣL], without padding; attention stays within samples.

    ``return_flash_kwargs`` adds ``cu_seq_lens_q/k`` (int32 [B+1]) and ``max_length_q/k`` (int), which
    flash-attention uses directly instead of deriving them from ``position_ids``.
    """

    def __init__(self, return_flash_kwargs: bool = False):
        self.return_flash_kwargs = return_flash_kwargs

    def __call__(self, features: list[dict]) -> dict:
        ids = [_as_long(f["input_ids"]) for f in features]
        labels = []
        for f in features:
            y = _as_long(f["labels"]).clone()
            y[:1] = IGNORE_INDEX  # predicted from the previous sample's last token: never supervised
            labels.append(y)
        lens = [len(x) for x in ids]
        batch = {
            "input_ids": torch.cat(ids).unsqueeze(0),  # [1, ΣL]
            "labels": torch.cat(labels).unsqueeze(0),  # [1, ΣL]
            "position_ids": torch.cat([torch.arange(n) for n in lens]).unsqueeze(0),  # [1, ΣL]
            "use_cache": False,  # a cache disables transformers' packed-sequence masking
        }
        if self.return_flash_kwargs:
            cu = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)  # [B+1]
            batch.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lens), max_length_k=max(lens))
        batch.update(image_fields(features))
        batch.update(video_fields(features))
        return batch


def packed_lengths(position_ids: torch.Tensor) -> list[int]:
    """Sample lengths of a packed row, from its position ids ([1, ΣL] or [ΣL]) restarting at 0."""
    pos = position_ids.reshape(-1)
    starts = (pos == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        raise ValueError("position_ids of a packed row must start at 0 for every sample")
    return [b - a for a, b in zip(starts, starts[1:] + [pos.numel()])]


def unpack(values: torch.Tensor, position_ids: torch.Tensor) -> list[torch.Tensor]:
    """Split a packed output [1, ΣL, ...] (e.g. logits) back into one [L_i, ...] tensor per sample."""
    return list(values.reshape(-1, *values.shape[2:]).split(packed_lengths(position_ids)))
