"""A frozen-vision feature cache: the vision tower runs once per image, later epochs and runs read disk.

While the vision tower is frozen (stage 1, and stage 2 with ``train.train_vision: false``) its output
for an image never changes, so it can be computed once and stored. The store holds what
``model.vision_features(pixel_values)`` returns — the selected tower hidden states *before* the
projector, ``[T, D_vis * n_layers]`` per image — so the projector still trains on it, and
``model(..., vision_features=...)`` splices exactly what ``pixel_values`` would have given.

Keys. A store directory is named by the *encoder fingerprint*, a sha256 over everything that decides
the features of an image: the tower's config and every weight (and their dtype), the feature
settings (``vision_feature_layer``, ``vision_feature_select``, ``vision_prefix_tokens``), the image
processor's config and the processor's ``image_aspect``. Change any of them and the fingerprint, so
the directory, changes: nothing stale is ever read (the old directory stays until ``prune()``).
Inside a store, an image is found by the sha256 of its content (file bytes, raw bytes, or a decoded
image's mode, size and pixels), so renamed or duplicated files share one entry.

Layout on disk (``ROOT/<fingerprint[:16]>/``)::

    meta.json          the full fingerprint and what went into it, feature shape and dtype
    index.json         {image sha256: [shard, row]}   (written last, atomically)
    shard-00000.npy    numpy .npy, [rows, T, D], opened with mmap_mode="r" (bf16 stored as raw uint16)

Each ``build`` writes one new shard for the images it was missing, then the index; a crash leaves at
worst an unused shard. Shards are opened lazily in each process, so dataloader workers share pages
through the OS cache instead of pickling arrays.

Use (``train/loop.py`` does this when ``data.feature_cache`` is set)::

    cache = FeatureCache("cache/features", model, processor)
    cache.build(dataset, device="cuda")                # once; only missing images are computed
    dataset, collator = cache.wrap(dataset), cache.collator(collator)   # items carry vision_features
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..model.config import TILED_POLICIES

# torch dtype -> (numpy dtype stored on disk, name in meta.json); bf16 has no numpy type: raw bits.
_STORAGE = {torch.float32: (np.float32, "float32"), torch.float16: (np.float16, "float16"),
            torch.bfloat16: (np.uint16, "bfloat16")}
_TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
INDEX, META = "index.json", "meta.json"


class FeatureCacheError(RuntimeError):
    pass


# --- keys -------------------------------------------------------------------------------------------
def image_key(ref) -> str:
    """sha256 of an image's content: a path's file bytes, raw bytes, or a PIL image's pixels."""
    from PIL import Image

    h = hashlib.sha256()
    if isinstance(ref, dict):  # datasets' Image(decode=False) value
        ref = ref.get("bytes") or ref.get("path")
    if isinstance(ref, (str, os.PathLike)):
        with open(ref, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    elif isinstance(ref, (bytes, bytearray, memoryview)):
        h.update(bytes(ref))
    elif isinstance(ref, Image.Image):
        h.update(f"pil:{ref.mode}:{ref.size}".encode())
        h.update(ref.tobytes())
    else:
        raise FeatureCacheError(f"cannot key an image reference of type {type(ref).__name__}")
    return h.hexdigest()


def _public(d: dict) -> dict:
    """A config dict without bookkeeping keys (paths, versions, private fields)."""
    return {k: v for k, v in d.items() if not k.startswith("_") and k != "transformers_version"}


def encoder_fingerprint(model, processor) -> tuple[str, dict]:
    """(sha256 hex, the description it hashes): tower config + weights, feature settings, preprocessing."""
    cfg = model.config
    desc = {
        "vision_config": _public(cfg.vision_config.to_dict()),
        "feature": {"layer": cfg.vision_feature_layer, "select": cfg.vision_feature_select,
                    "prefix_tokens": cfg.vision_prefix_tokens},
        "image_processor": _public(processor.image_processor.to_dict()),
        "image_aspect": processor.image_aspect,
    }
    h = hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode())
    weights = hashlib.sha256()
    for name, t in sorted(model.vision_tower.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        weights.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        weights.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    desc["weights_sha256"] = weights.hexdigest()
    h.update(desc["weights_sha256"].encode())
    return h.hexdigest(), desc


# --- the store --------------------------------------------------------------------------------------
class FeatureCache:
    """A memory-mapped store of `model.vision_features` outputs for one encoder fingerprint."""

    def __init__(self, root: str | os.PathLike, model, processor):
        self.root = Path(root)
        self.model, self.processor = model, processor
        self.fingerprint, self.description = encoder_fingerprint(model, processor)
        self.directory = self.root / self.fingerprint[:16]
        self.index: dict[str, tuple[int, int]] = {}
        self.dtype: torch.dtype | None = None
        self.shape: tuple[int, int] | None = None  # [T, D] per image
        self._shards: dict[int, np.ndarray] = {}
        self._pid = os.getpid()
        self.reload()

    # state on disk
    def reload(self) -> None:
        """Read meta.json / index.json again (e.g. after another process built)."""
        meta, index = self.directory / META, self.directory / INDEX
        if meta.is_file():
            m = json.loads(meta.read_text())
            if m.get("fingerprint") != self.fingerprint:
                raise FeatureCacheError(f"{meta} belongs to another encoder ({m.get('fingerprint')}); "
                                        f"remove {self.directory}")
            self.dtype, self.shape = _TORCH[m["dtype"]], tuple(m["shape"])
        if index.is_file():
            self.index = {k: (int(s), int(r)) for k, (s, r) in json.loads(index.read_text()).items()}
        self._shards = {}

    def __getstate__(self) -> dict:
        # Dataloader workers get the index and the paths, not the model, the processor or open maps.
        return {**self.__dict__, "model": None, "processor": None, "_shards": {}}

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def _shard(self, s: int) -> np.ndarray:
        if os.getpid() != self._pid:  # a forked dataloader worker: open its own maps
            self._shards, self._pid = {}, os.getpid()
        if s not in self._shards:
            self._shards[s] = np.load(self.directory / f"shard-{s:05d}.npy", mmap_mode="r")
        return self._shards[s]

    def get(self, keys: Sequence[str]) -> torch.Tensor:
        """Features of these images, in order: [len(keys), T, D] in the tower's dtype."""
        if not keys:
            return torch.empty(0, *(self.shape or (0, 0)), dtype=self.dtype or torch.float32)
        rows = []
        for k in keys:
            if k not in self.index:
                raise FeatureCacheError(f"image {k[:12]}… is not in the feature cache {self.directory}; "
                                        "run FeatureCache.build(dataset) first")
            s, r = self.index[k]
            rows.append(np.array(self._shard(s)[r]))  # copy out of the map: [T, D]
        out = torch.from_numpy(np.stack(rows))
        return out.view(torch.bfloat16) if self.dtype == torch.bfloat16 else out

    def keys_of(self, dataset) -> list[list[str]]:
        """Image keys of every sample of a `SupervisedDataset`, in placeholder order."""
        return [[image_key(ref) for ref in dataset.conversation(i).images[:dataset.num_images(i)]]
                for i in range(len(dataset))]

    @torch.no_grad()
    def build(self, dataset, keys: list[list[str]] | None = None, batch_size: int = 32, device=None,
              num_workers: int = 0, say: Callable = print) -> int:
        """Compute and store the features of every image of `dataset` not yet cached; returns how many."""
        keys = keys if keys is not None else self.keys_of(dataset)
        todo: dict[str, object] = {}
        for i, ks in enumerate(keys):
            refs = dataset.conversation(i).images
            for k, ref in zip(ks, refs):
                if k not in self.index and k not in todo:
                    todo[k] = ref
        if not todo:
            return 0
        tower_device = next(self.model.vision_tower.parameters()).device
        device = torch.device(device) if device is not None else tower_device
        self.model.vision_tower.to(device)
        from torch.utils.data import DataLoader

        images = _Images(list(todo.values()), dataset.image_loader, self.processor)
        loader = DataLoader(images, batch_size=batch_size, num_workers=num_workers, collate_fn=torch.cat)
        shard_id = 1 + max((s for s, _ in self.index.values()), default=-1)
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / f"shard-{shard_id:05d}.npy.tmp"
        store, row = None, 0
        try:
            for pixel_values in loader:  # [b, 3, H, W]
                feats = self.model.vision_features(pixel_values.to(device)).cpu()  # [b, T, D]
                if store is None:
                    self._set_meta(feats)
                    np_dtype = _STORAGE[feats.dtype][0]
                    store = np.lib.format.open_memmap(tmp, mode="w+", dtype=np_dtype,
                                                      shape=(len(todo), *feats.shape[1:]))
                store[row:row + len(feats)] = _to_numpy(feats)
                row += len(feats)
            store.flush()
            del store
            os.replace(tmp, self.directory / f"shard-{shard_id:05d}.npy")
        finally:
            self.model.vision_tower.to(tower_device)
            if tmp.exists():
                tmp.unlink()
        for r, k in enumerate(todo):
            self.index[k] = (shard_id, r)
        _write_json(self.directory / INDEX, self.index)
        self._shards.pop(shard_id, None)
        say(f"feature cache {self.directory}: computed {len(todo)} image(s), {len(self.index)} cached")
        return len(todo)

    def _set_meta(self, feats: torch.Tensor) -> None:
        if feats.dtype not in _STORAGE:
            raise FeatureCacheError(f"vision features of dtype {feats.dtype} cannot be cached")
        shape, dtype = tuple(feats.shape[1:]), feats.dtype
        if self.shape is not None and (self.shape != shape or self.dtype != dtype):
            raise FeatureCacheError(f"{self.directory} holds {self.shape} {self.dtype} features, the tower now "
                                    f"gives {shape} {dtype}; remove the directory")
        self.shape, self.dtype = shape, dtype
        _write_json(self.directory / META, {"fingerprint": self.fingerprint, "shape": list(shape),
                                            "dtype": _STORAGE[dtype][1], "encoder": self.description})

    def prune(self) -> list[Path]:
        """Delete the stores of other fingerprints under `root` (stale encoders); returns what went."""
        gone = []
        for d in self.root.iterdir() if self.root.is_dir() else []:
            if d.is_dir() and d != self.directory and (d / META).is_file():
                shutil.rmtree(d)
                gone.append(d)
        return gone

    # training-side views
    def wrap(self, dataset, keys: list[list[str]] | None = None) -> "CachedFeatureDataset":
        return CachedFeatureDataset(dataset, self, keys if keys is not None else self.keys_of(dataset))

    @staticmethod
    def collator(inner: Callable) -> "FeatureCollator":
        return FeatureCollator(inner)


class _Images(Dataset):
    """Decode + preprocess one image per item (runs in dataloader workers when asked)."""

    def __init__(self, refs: list, loader: Callable, processor):
        self.refs, self.loader, self.processor = refs, loader, processor

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.processor.preprocess_images([self.loader(self.refs[i])])  # [1, 3, H, W]


def _to_numpy(feats: torch.Tensor) -> np.ndarray:
    if feats.dtype == torch.bfloat16:
        return feats.contiguous().view(torch.int16).numpy().view(np.uint16)
    return feats.contiguous().numpy()


def _write_json(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


# --- dataset and collator views ---------------------------------------------------------------------
def _text_item(dataset, i: int) -> dict:
    """A `SupervisedDataset` item without decoding its images: input_ids [L], labels [L]."""
    ids, labels = dataset.tokens(i)
    item = {"input_ids": ids, "labels": labels}
    sizes = dataset.image_sizes(i)
    if sizes is not None:  # a size-dependent token policy cuts the cached features by these
        item["image_sizes"] = sizes
    return item


class CachedFeatureDataset(Dataset):
    """A `SupervisedDataset` whose items carry ``vision_features`` [n, T, D] instead of ``pixel_values``."""

    def __init__(self, dataset, cache: FeatureCache, keys: list[list[str]]):
        missing = sum(k not in cache for ks in keys for k in ks)
        if missing:
            raise FeatureCacheError(f"{missing} image(s) of the dataset are not in {cache.directory}; "
                                    "run FeatureCache.build(dataset) first")
        self.dataset, self.cache, self.keys = dataset, cache, keys
        self.lengths, self.has_image = dataset.lengths, dataset.has_image  # for samplers and packers
        self.report = getattr(dataset, "report", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        item = _text_item(self.dataset, i)
        item["pixel_values"] = None
        item["vision_features"] = self.cache.get(self.keys[i])  # [0, T, D] for a text-only sample
        return item


class FeatureCollator:
    """Wraps a collator (pad or pack): batches ``vision_features`` of the samples in sample order."""

    def __init__(self, inner: Callable):
        self.inner = inner

    def __call__(self, features: Iterable[dict]) -> dict:
        features = list(features)
        batch = self.inner([{k: v for k, v in f.items() if k != "vision_features"} for f in features])
        vf = [f["vision_features"] for f in features if f.get("vision_features") is not None]
        if vf:  # present even when empty [0, T, D]: the model then knows features come from the cache
            batch["vision_features"] = torch.cat(vf)  # [N_img_total, T, D], placeholder order
        return batch


# --- the trainer's hook -----------------------------------------------------------------------------
def attach_feature_cache(cfg, model, processor, dataset, collator, accelerator=None, say: Callable = print):
    """`train/loop.py`'s hook for ``data.feature_cache: DIR``: build on the main process, wrap everywhere.

    Returns (dataset, collator) to train on."""
    from .config import ConfigError

    policy = getattr(model.config, "image_tokens", "base")
    if policy in TILED_POLICIES:  # the cache holds one base-resolution tile per image; these need every tile
        raise ConfigError(f"data.feature_cache cannot be used with image_tokens: {policy} (each image is several "
                          "tiles, the cache holds one): stage 1 at base resolution: use image_tokens: base for the "
                          "feature cache, as OneVision's stage 1 does, then start the tiled stage 2 from its projector "
                          "(or drop data.feature_cache)")
    if cfg.train.train_vision:
        raise ConfigError("data.feature_cache needs a frozen vision tower; unset train.train_vision or the cache")
    cache = FeatureCache(cfg.data.feature_cache, model, processor)
    keys = cache.keys_of(dataset)
    main = accelerator is None or accelerator.is_main_process
    if main:
        device = accelerator.device if accelerator is not None else None
        cache.build(dataset, keys, device=device, num_workers=cfg.data.num_workers, say=say)
    if accelerator is not None:
        accelerator.wait_for_everyone()
        cache.reload()
    return cache.wrap(dataset, keys), cache.collator(collator)


__all__ = ["CachedFeatureDataset", "FeatureCache", "FeatureCacheError", "FeatureCollator", "attach_feature_cache",
           "encoder_fingerprint", "image_key"]
