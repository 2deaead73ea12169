"""Sample order: exact-length grouping that keeps image and text-only samples apart, and a packer.

`LengthGroupedSampler` follows the idea of LLaVA's ``group_by_modality_length`` (LLaVA,
``llava/train/llava_trainer.py``) with exact lengths instead of word counts: image and text-only
samples are shuffled separately, cut into *mega-batches*, sorted by length inside each mega-batch
and cut into global batches of ``batch_size * world_size`` consecutive indices; the global batches of
both modalities are then shuffled together. Every global batch is single-modality except at most
one, made of the two modalities' leftovers, which comes last. The order depends only on
``(seed, epoch)``, so a resumed or re-sharded run replays the same samples.

`pack_indices` greedily fills bins of at most ``max_tokens`` tokens for the packing collator;
`PackedBatchSampler` applies it to each epoch of another sampler's order.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class LengthGroupedSampler(Sampler[int]):
    """Yields every index once per epoch; consecutive ``batch_size * world_size`` blocks are batches."""

    def __init__(self, lengths: Sequence[int], batch_size: int, has_image: Sequence[bool] | None = None,
                 seed: int = 0, world_size: int = 1, megabatch_mult: int = 50):
        if batch_size < 1 or world_size < 1:
            raise ValueError(f"batch_size ({batch_size}) and world_size ({world_size}) must be >= 1")
        if has_image is not None and len(has_image) != len(lengths):
            raise ValueError(f"has_image has {len(has_image)} entries but lengths has {len(lengths)}")
        self.lengths = list(lengths)
        self.has_image = list(has_image) if has_image is not None else None
        self.global_batch = batch_size * world_size
        self.megabatch = self.global_batch * max(1, megabatch_mult)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def _grouped(self, indices: list[int], g: torch.Generator) -> tuple[list[list[int]], list[int]]:
        """Full global batches (sorted by length within each mega-batch) and the leftover indices."""
        perm = [indices[i] for i in torch.randperm(len(indices), generator=g).tolist()]
        order: list[int] = []
        for start in range(0, len(perm), self.megabatch):
            mega = perm[start:start + self.megabatch]
            order += sorted(mega, key=lambda i: -self.lengths[i])  # stable: ties keep the random order
        n_full = len(order) // self.global_batch * self.global_batch
        batches = [order[i:i + self.global_batch] for i in range(0, n_full, self.global_batch)]
        return batches, order[n_full:]

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.has_image is None:
            groups = [list(range(len(self.lengths)))]
        else:
            groups = [[i for i, h in enumerate(self.has_image) if h], [i for i, h in enumerate(self.has_image) if not h]]
        batches: list[list[int]] = []
        leftover: list[int] = []
        for idx in groups:
            full, rest = self._grouped(idx, g)
            batches += full
            leftover += rest
        shuffled = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        leftover.sort(key=lambda i: -self.lengths[i])
        for b in shuffled:
            yield from b
        yield from leftover


def pack_indices(lengths: Sequence[int], max_tokens: int, order: Sequence[int] | None = None,
                 window: int = 64) -> list[list[int]]:
    """First-fit packing of ``order`` (default: 0..n-1) into bins of at most ``max_tokens`` tokens.

    Only the ``window`` most recently opened bins take new samples (older ones are closed), which keeps
    packing linear in the number of samples and the output close to ``order``. Bins are returned in
    the order they were opened, samples in each bin in ``order``."""
    if order is None:
        order = range(len(lengths))
    bins: list[list[int]] = []
    room: list[int] = []
    first_open = 0  # bins[first_open:] are open
    for i in order:
        n = lengths[i]
        if n > max_tokens:
            raise ValueError(f"sample {i} has {n} tokens > max_tokens {max_tokens}; set the dataset's "
                             f"max_length to at most {max_tokens} so the length policy handles it")
        for b in range(first_open, len(bins)):
            if n <= room[b]:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(max_tokens - n)
            first_open = max(first_open, len(bins) - window)
    return bins


class PackedBatchSampler(Sampler[list[int]]):
    """Batches of indices whose total length fits ``max_tokens``, following ``sampler``'s order."""

    def __init__(self, sampler, lengths: Sequence[int], max_tokens: int):
        self.sampler, self.lengths, self.max_tokens = sampler, list(lengths), max_tokens

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def _bins(self) -> list[list[int]]:
        return pack_indices(self.lengths, self.max_tokens, list(self.sampler))

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._bins()

    def __len__(self) -> int:
        return len(self._bins())
