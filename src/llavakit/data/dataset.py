"""`SupervisedDataset`: conversations -> (input_ids, labels, pixel_values) items for training.

Tokenization happens once, up front (fast tokenizers; a large dataset in forked worker processes,
`encode_all`), so the exact length of every sample (image placeholders included) is known before
training starts: the length-grouped sampler and the packer use it, and the report of kept /
truncated / dropped / skipped samples is printed before the first step. Images and videos are decoded lazily in
`__getitem__`, i.e. in the dataloader workers.

**Video counts.** A video's placeholder count follows from its sampled frame count
(``processor.num_video_tokens``), which up front is read from the file's metadata (`video_frame_counts`, nothing
decoded; a list of frames is exact) and stored with the sample. If decoding finds fewer frames than the metadata
promised (a file whose header overstates its length), `__getitem__` rewrites that video's placeholder run to the
decoded count, so the model always gets one feature per placeholder; only the sampler's length for that sample was
an estimate. Token ids live in a `TokenStore`: one flat int32
array plus offsets, labels as supervised spans (rebuilt on access), which the start-up cache
(`llavakit.data.token_cache`) memory-maps on a re-run.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .conversation import Conversation, Problem, SampleError
from .images import ImageError, ImageLimits
from .templates import Template, get_template
from .token_store import StoreBuilder, TokenStore, supervised_spans
from .text_ids import one_thread_per_tokenizer
from .tokenize import IGNORE_INDEX, OverlongError, encode
from .video import VideoError, VideoLimits, load_video, probe_video, sampled_frame_count

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


def image_token_counts(conv: Conversation, processor, limits: ImageLimits | None = None,
                       memo: dict | None = None) -> tuple[list[tuple[int, int]] | None, int | list[int]]:
    """(sizes, counts) for the conversation's images: sizes read from the image headers only when the
    processor's counts depend on them (else None and one count for all); a `SampleError` if unreadable
    or over ``limits`` (default: `ImageLimits()`). ``memo`` (path -> size) reads each file's header once."""
    if not processor.counts_depend_on_size:
        return None, processor.num_image_tokens()
    limits = limits or ImageLimits()
    sizes = []
    for k, ref in enumerate(conv.images):
        try:
            if memo is not None and isinstance(ref, str):
                if ref not in memo:
                    memo[ref] = limits.size(ref)
                sizes.append(memo[ref])
            else:
                sizes.append(limits.size(ref))
        except ImageError as e:
            raise SampleError.of(conv, f"image {k} cannot be opened: {e}", e.hint or "fix or remove the image") from e
    return sizes, processor.image_token_counts(sizes)


def video_frame_counts(conv: Conversation, processor, limits: VideoLimits | None = None,
                       memo: dict | None = None) -> list[int]:
    """Sampled frames of each of the conversation's videos, as the processor samples them (``video_max_frames`` /
    ``video_fps``): a file's from its metadata (`probe_video`, nothing decoded), a frame list's exactly; a
    `SampleError` naming the video when it is unusable or over ``limits``. [] for a model without videos."""
    if not conv.videos or getattr(processor, "video_token_id", None) is None:
        return []
    limits = limits or VideoLimits()
    out = []
    for k, ref in enumerate(conv.videos):
        try:
            if isinstance(ref, (list, tuple)):
                if not ref:
                    raise VideoError("video has no frames", "the frame list is empty")
                out.append(min(len(ref), processor.video_max_frames))
                continue
            key = str(ref)
            if memo is not None and ("video", key) in memo:
                info = memo[("video", key)]
            else:
                info = probe_video(key, limits)
                if memo is not None:
                    memo[("video", key)] = info
            out.append(sampled_frame_count(info.frames, processor.video_max_frames, processor.video_fps, info.fps))
        except VideoError as e:
            raise SampleError.of(conv, f"video {k} cannot be used: {e}", e.hint or "fix or remove the video") from e
    return out


def encode_sample(conv: Conversation, processor, template: Template, max_length: int | None, overflow: str,
                  limits: ImageLimits | None = None, memo: dict | None = None,
                  video_limits: VideoLimits | None = None):
    """(image sizes or None, video frame counts, `EncodedSample`) of one conversation with the processor's counts
    (videos: `video_frame_counts`) for the images that
    *survive* truncation. Under ``anyres_max`` an image's count depends on how many images its sample has (base
    tile + newline each when several): when truncation leaves one image of several, it is encoded again with
    that image's single-image (tiled) count, so the model, told the sample has one image, produces exactly it."""
    sizes, counts = image_token_counts(conv, processor, limits, memo)
    frames = video_frame_counts(conv, processor, video_limits, memo)
    video = dict(video_token_id=getattr(processor, "video_token_id", None),
                 video_tokens=[processor.num_video_tokens(f) for f in frames])
    enc = encode(conv, template, processor.tokenizer, processor.image_token_id, counts, max_length=max_length,
                 overflow=overflow, tokenization=processor.tokenization, **video)
    if getattr(processor, "image_tokens", "base") == "anyres_max" and len(conv.images) > 1 and enc.num_images == 1:
        counts = processor.image_token_counts(sizes[:1]) + list(counts[1:])  # the kept image, now alone: tiled
        # longer than before, so at most that one image survives again, and its count is then right
        enc = encode(conv, template, processor.tokenizer, processor.image_token_id, counts, max_length=max_length,
                     overflow=overflow, tokenization=processor.tokenization, **video)
    return sizes, frames, enc


# --- encoding every sample, in worker processes when there are many --------------------------------
_JOB: tuple | None = None  # (conversations, encode arguments) for forked workers; set only while a pool runs
CHUNK = 2000  # samples per task of a worker process
PARALLEL_FROM = 4 * CHUNK  # fewer samples than this are encoded in this process


def _encode_range(bounds: tuple[int, int]) -> list[tuple]:
    """(position, (ids, spans, n_images, sizes, truncated, n_videos, frames) or None, problem or None, overlong) per
    sample."""
    convs, processor, template, max_length, overflow, limits, video_limits = _JOB
    out, memo = [], {}
    for pos in range(*bounds):
        conv = convs[pos]
        try:
            sizes, frames, enc = encode_sample(conv, processor, template, max_length, overflow, limits, memo,
                                               video_limits)
        except SampleError as e:  # returned, not raised: a worker's exception would lose its `problem`
            out.append((pos, None, e.problem, isinstance(e, OverlongError)))
            continue
        ids = np.asarray(enc.input_ids, dtype=np.int32)
        out.append((pos, (ids, supervised_spans(enc.labels), enc.num_images, sizes, enc.truncated, enc.num_videos,
                           frames), None, False))
    return out


def default_workers() -> int:
    """Worker processes for encoding: the CPUs this process may use (at most 8); 1 where fork is unavailable."""
    import multiprocessing

    if "fork" not in multiprocessing.get_all_start_methods():
        return 1
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


def encode_all(conversations: Sequence[Conversation], processor, template: Template, max_length: int | None,
               overflow: str, limits: ImageLimits, workers: int = 1,
               video_limits: VideoLimits | None = None, parallel: bool | None = None,
               task: int | None = None) -> Iterator[tuple]:
    """Encode every conversation, in order: yields `_encode_range`'s tuples. ``workers`` > 1 forks that many
    processes (each encodes tasks of ``task`` samples, default CHUNK) when ``parallel`` is true — by default when
    there are at least PARALLEL_FROM samples; a caller encoding a large build chunk by chunk decides it for the
    build. The result is the same either way."""
    global _JOB
    n = len(conversations)
    step = max(1, task or CHUNK)
    ranges = [(a, min(n, a + step)) for a in range(0, n, step)]
    if parallel is None:
        parallel = n >= PARALLEL_FROM
    _JOB = (conversations, processor, template, max_length, overflow, limits, video_limits)
    try:
        with one_thread_per_tokenizer():
            yield from _run_ranges(ranges, workers, parallel)
    finally:
        _JOB = None


def _run_ranges(ranges: list[tuple[int, int]], workers: int, parallel: bool) -> Iterator[tuple]:
    if workers <= 1 or not parallel or len(ranges) < 2:
        for r in ranges:
            yield from _encode_range(r)
        return
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(min(workers, len(ranges))) as pool:
        for part in pool.imap(_encode_range, ranges):
            yield from part


def encode_into(builder: StoreBuilder, report: DatasetReport, conversations: Sequence[Conversation], processor,
                template: Template, max_length: int | None, overflow: str, limits: ImageLimits, workers: int = 1,
                video_limits: VideoLimits | None = None, strict: bool = False, parallel: bool | None = None,
                task: int | None = None) -> None:
    """Encode `conversations` (`encode_all`; ``parallel`` and ``task`` as there) and add them to `builder` and
    `report` (``total``, dropped, skipped, truncated). Called once per chunk, it builds the same store and report as
    once over all of them."""
    report.total += len(conversations)
    # closed at once on an exception (strict): its worker pool and tokenizer setting do not outlive the call
    with contextlib.closing(encode_all(conversations, processor, template, max_length, overflow, limits, workers,
                                       video_limits, parallel, task)) as results:
        for pos, done, problem, overlong in results:
            if problem is not None:
                if strict:
                    raise (OverlongError if overlong else SampleError)(problem)
                report.problems.append(problem)
                if overlong:
                    report.dropped += 1
                else:
                    report.skipped += 1
                    report.skipped_indices.append(problem.index)
                continue
            ids, spans, n_images, sizes, truncated, n_videos, frames = done
            builder.add(conversations[pos], ids, spans, n_images, sizes, n_videos, frames)
            report.truncated += int(truncated)


class SupervisedDataset(Dataset):
    """Items: ``{"input_ids": LongTensor[L], "labels": LongTensor[L], "pixel_values": FloatTensor[n,3,H,W] | None,
    "num_images": n}`` (+ ``"image_sizes"`` [n, 2] when counts depend on the image sizes; under anyres /
    anyres_max ``pixel_values`` holds every tile of the sample's images).

    ``template`` is a `Template` or a template name (resolved with the processor's tokenizer).
    Samples that cannot be trained on are left out and listed in `report`; ``strict=True`` raises
    the first `SampleError` instead. Images over ``image_limits`` (`ImageLimits`: pixels, longest side,
    aspect ratio; training passes ``data.max_pixels`` / ``max_side`` / ``max_aspect_ratio``) are refused
    from their header, before anything is decoded or resized, and video files over ``video_limits`` (`VideoLimits`:
    frame pixels, seconds, frames; ``data.video_max_*``) from their metadata. ``workers`` > 1 encodes large datasets in
    that many forked processes (`encode_all`; the result is the same). The tokens live in a `TokenStore`
    (flat arrays); `from_store` makes a dataset of one read back from the start-up cache.
    """

    def __init__(self, conversations: Sequence[Conversation], processor, template: Template | str,
                 max_length: int | None = None, overflow: str = "truncate",
                 image_loader: Callable | None = None, strict: bool = False,
                 image_limits: ImageLimits | None = None, workers: int = 1,
                 video_limits: VideoLimits | None = None):
        self._setup(processor, template, image_limits, image_loader, video_limits)
        report = DatasetReport()
        builder = StoreBuilder(with_sizes=processor.counts_depend_on_size)
        encode_into(builder, report, conversations, processor, self.template, max_length, overflow, self.image_limits,
                    workers, self.video_limits, strict)
        self._adopt(builder.finish(), report)
        if report.dropped or report.skipped or report.truncated:
            log.info("%s", report)

    @classmethod
    def from_store(cls, store: TokenStore, report: DatasetReport, processor, template: Template | str,
                   image_limits: ImageLimits | None = None,
                   image_loader: Callable | None = None,
                   video_limits: VideoLimits | None = None) -> "SupervisedDataset":
        """A dataset over an existing `TokenStore` (e.g. memory-mapped from the start-up cache)."""
        self = cls.__new__(cls)
        self._setup(processor, template, image_limits, image_loader, video_limits)
        self._adopt(store, report)
        return self

    def _setup(self, processor, template, image_limits, image_loader, video_limits=None) -> None:
        self.processor = processor
        self.template = get_template(template, processor.tokenizer) if isinstance(template, str) else template
        self.image_limits = image_limits or ImageLimits()
        self.image_loader = image_loader or self.image_limits.open  # picklable, for dataloader workers
        self.video_limits = video_limits or VideoLimits()

    def _adopt(self, store: TokenStore, report: DatasetReport) -> None:
        self.store, self.report = store, report
        report.kept = len(store)
        # Exact lengths (image placeholders included) and modality, for samplers and packers.
        self.lengths: list[int] = store.lengths()
        # image or video: the sampler keeps these and text-only samples apart where it can
        self.has_image: list[bool] = ((np.asarray(store.n_images) > 0) | (np.asarray(store.n_videos) > 0)).tolist()
        self._with_sizes = store.has_sizes

    def __len__(self) -> int:
        return len(self.store)

    def conversation(self, i: int) -> Conversation:
        """Sample i's id, index, source and images (the images that survived truncation). The turns are
        not kept after tokenization: read them from the data file (`conversation(i).index` is the row)."""
        return self.store.sample(i)

    def num_images(self, i: int) -> int:
        return int(self.store.n_images[i])

    def num_videos(self, i: int) -> int:
        return int(self.store.n_videos[i])

    def image_sizes(self, i: int) -> torch.Tensor | None:
        """[n, 2] (width, height) of sample i's images when the token policy needs them, else None."""
        if not self._with_sizes or not self.num_images(i):
            return None
        return torch.tensor(self.store.sizes(i), dtype=torch.long).reshape(-1, 2)

    def tokens(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids [L], labels [L]) of sample i, without opening its images."""
        return self.store.tokens(i)

    def __getitem__(self, i: int) -> dict:
        ids, labels = self.tokens(i)
        pixel_values = None
        if self.num_images(i):
            images = []
            for k, ref in enumerate(self.store.images(i)):  # truncation keeps the leading images only
                try:
                    images.append(self.image_loader(ref))
                except Exception as e:
                    raise SampleError.of(self.conversation(i), f"image {k} cannot be opened: {e}",
                                         getattr(e, "hint", "") or "fix or remove the image (run `llavakit data check`)"
                                         ) from e
            # [n, 3, H, W]; tiled policies: [tiles of all n images, 3, H, W] (`images` are one sample)
            pixel_values = self.processor.preprocess_images(images)
        # num_images: the collators turn it into batch_num_images (images per sample), which anyres_max needs
        item = {"input_ids": ids, "labels": labels, "pixel_values": pixel_values, "num_images": self.num_images(i)}
        if self._with_sizes:
            item["image_sizes"] = self.image_sizes(i)
        if self.num_videos(i):
            item["input_ids"], item["labels"], item["pixel_values_videos"], item["video_num_frames"] = \
                self._videos(i, ids, labels)
        return item

    def _videos(self, i: int, ids: torch.Tensor, labels: torch.Tensor):
        """Sample i's videos decoded: (ids, labels) with each video's placeholders = its decoded frames' count (see
        the module docstring), pixel_values_videos [V, F_max, 3, H, W], video_num_frames [V]."""
        proc = self.processor
        videos = []
        for k, ref in enumerate(self.store.videos(i)):
            try:
                videos.append(load_video(ref, proc.video_max_frames, proc.video_fps, self.video_limits,
                                         self.image_limits.max_pixels))
            except Exception as e:
                raise SampleError.of(self.conversation(i), f"video {k} cannot be used: {e}",
                                     getattr(e, "hint", "") or "fix or remove the video (run `llavakit data check`)"
                                     ) from e
        stored = self.store.video_frames(i)
        if [len(v) for v in videos] != stored:
            log.warning("%s: decoding found %s sampled frames where the metadata said %s; its video placeholders "
                        "follow the decoded frames", self.conversation(i).label, [len(v) for v in videos], stored)
            ids, labels = recount_videos(ids, labels, proc.video_token_id, [proc.num_video_tokens(f) for f in stored],
                                         [proc.num_video_tokens(len(v)) for v in videos])
        pixel_values_videos, video_num_frames = proc.preprocess_videos(videos)
        return ids, labels, pixel_values_videos, video_num_frames


def recount_videos(ids: torch.Tensor, labels: torch.Tensor, video_token_id: int, old: list[int], new: list[int]):
    """(ids, labels) with the placeholder run of video k (``old[k]`` ids, in order) made ``new[k]`` long."""
    keep_ids, keep_labels, at, k = [], [], 0, 0
    where = (ids == video_token_id).nonzero().flatten().tolist()
    pos = 0
    while k < len(old) and pos < len(where):
        start = where[pos]
        keep_ids.append(ids[at:start])
        keep_labels.append(labels[at:start])
        keep_ids.append(torch.full((new[k],), video_token_id, dtype=ids.dtype))
        keep_labels.append(torch.full((new[k],), IGNORE_INDEX, dtype=labels.dtype))
        at, pos, k = start + old[k], pos + old[k], k + 1
    keep_ids.append(ids[at:])
    keep_labels.append(labels[at:])
    return torch.cat(keep_ids), torch.cat(keep_labels)
