"""One typed config tree for a training run: `model`, `data`, `train`.

Read from YAML, overridden from the command line with ``--section.key=value`` (values parsed as
YAML, so ``--train.lr=2e-5`` is a float and ``--data.packing=true`` a bool), validated (unknown keys
are errors that list the valid ones) and written back in full to ``RUN_DIR/config.yaml``.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

STAGES = ("pretrain", "finetune", "lora", "qlora")
SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class ModelConfig:
    vision: str | None = None  # hub id or path of the vision encoder
    llm: str | None = None  # hub id or path of the causal LM
    projector: str = "mlp2x_gelu"
    vision_feature_layer: int | list[int] = -2
    vision_feature_select: str = "patch"
    image_aspect: str = "resize"  # "pad" = LLaVA's expand-to-square
    # "base" | "unpad" (drop the features over the padding; needs image_aspect "pad") | "anyres" (LLaVA-NeXT's
    # tiles) | "anyres_max" (LLaVA-OneVision's anyres_max_N); see docs/interop.md
    image_tokens: str = "base"
    # anyres / anyres_max: [[height, width], ...] px the tile grid may take, each a multiple of the encoder's
    # input size (None = the policy's default: LLaVA-NeXT's 5 grids / OneVision's 1x1..6x6 tiles)
    image_grid_pinpoints: list[list[int]] | None = None
    # anyres_max: OneVision's N, the most base tiles' worth of grid features an image keeps (None = 9)
    anyres_max_tiles: int | None = None
    # Start from: a stage-1 run dir (projector weights only), a llavakit model dir, or an
    # llava-hf / original-LLaVA checkpoint. vision/llm are then taken from it.
    init_from: str | None = None
    attn_implementation: str | None = "sdpa"
    dtype: str | None = None  # weights dtype when loading (None = the checkpoint's / fp32)
    trust_remote_code: bool = False  # for LLMs that ship their own modelling code (e.g. InternLM2)


@dataclass
class DataConfig:
    # LLaVA JSON/JSONL, messages JSON/JSONL, an HF dataset dir, or a mixture: a list of sources
    # ({path, image_folder, format, sampling, split, name}) or LLaVA-NeXT's data YAML (llavakit.data.mixture)
    train: str | list | None = None
    seed: int = 0  # draws of random:N / random:P% sampling in a mixture (not train.seed: data stays put)
    image_folder: str | None = None
    format: str = "auto"
    template: str = "vicuna_v1"
    max_length: int = 2048
    overflow: str = "truncate"  # or "drop"
    packing: bool = False  # padding-free packing of several samples per row
    group_by_length: bool = True  # exact-length, modality-aware grouping
    skip_invalid: bool = False  # train on the valid samples when validation finds errors
    check_images: bool = True  # open every image during validation
    num_workers: int = 0
    # Image size limits, checked from each image's header before decoding (llavakit.data.images.ImageLimits);
    # None = the default (89,478,485 pixels, 8192 px longest side, aspect ratio 20), 0 = no limit.
    max_pixels: int | None = None  # width x height (decompression bombs)
    max_side: int | None = None  # longest side: LLaVA's pad processes a square of it
    max_aspect_ratio: float | None = None  # long side / short side: a short-side resize multiplies pixels by it
    # Video size limits, checked from each video file's metadata before decoding and again while decoding
    # (llavakit.data.video.VideoLimits); None = the default (3840x2160 pixels a frame, 600 s, 18,000 frames), 0 = no
    # limit. A video given as a list of frame images is checked frame by frame against max_pixels instead.
    video_max_frame_pixels: int | None = None  # width x height of one frame
    video_max_seconds: float | None = None  # duration
    video_max_source_frames: int | None = None  # frames in the file (the worst case decodes them all)
    # Folder of a frozen-vision feature cache (train/feature_cache.py): the vision tower runs once per
    # image and later epochs/runs read its outputs from disk. Needs train.train_vision: false.
    feature_cache: str | None = None
    # Start-up cache (llavakit.data.token_cache): validation + tokenization results of JSON/JSONL data, written
    # once and memory-mapped by later runs on the same inputs. Folder: cache_dir, else $LLAVAKIT_DATA_CACHE,
    # else RUN_DIR/data_cache. cache: false reads and tokenizes everything every time.
    cache: bool = True
    cache_dir: str | None = None
    # Processes that tokenize a large dataset (forked; 0 = the CPUs this process may use, at most 8; 1 = none)
    preprocess_workers: int = 0


@dataclass
class LoraConfig:
    r: int = 64
    alpha: int = 16
    dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"


@dataclass
class TrainConfig:
    stage: str = "finetune"
    output_dir: str = "runs/llavakit"
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 8  # per device, per micro-step
    grad_accum: int = 1
    lr: float = 2e-5  # LLM (and projector unless projector_lr is set)
    projector_lr: float | None = None
    train_vision: bool = False
    vision_lr: float | None = None
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    schedule: str = "cosine"
    max_grad_norm: float = 1.0
    # "adamw" (torch's; its fused kernel where the device has one) or "adamw_8bit" (bitsandbytes, extra
    # llavakit[qlora]: the two moments in 8 bits, a quarter of fp32's memory; slower per step on CPU)
    optimizer: str = "adamw"
    # Update each weight inside backward as soon as its gradient is ready and free that gradient (train/optim.py):
    # no full set of gradients in memory. Needs max_grad_norm: 0, grad_accum: 1, on_nonfinite: stop, one process.
    optimizer_in_backward: bool = False
    # CPU: blocks of 1 MiB and more are mapped and unmapped directly (glibc mallopt), so freed memory goes back to
    # the OS instead of staying in a fragmented heap (train/host_memory.py); no effect on GPU memory
    return_freed_memory: bool = False
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    # LM head + loss only at supervised positions (same loss, no [B, L, vocab] logits tensor)
    supervised_logits_only: bool = True
    # With it, 0 = the supervised rows' [N_sup, vocab] logits at once; N > 0 = N rows at a time, forward and
    # backward (model/loss.py; Liger's fused kernel on CUDA when liger_kernel is installed): the same loss,
    # without the largest fp32 tensors at a 50k-150k vocabulary. A LoRA-wrapped LM head computes unchunked.
    loss_chunk_size: int = 0
    # torch.compile each decoder layer of the LLM (in place: weight names and checkpoints unchanged). On CPU
    # inductor needs a C++ compiler (g++/clang++). The first steps are slow while it compiles.
    compile: bool = False
    seed: int = 0
    save_every: int = 0  # steps; 0 = only at the end
    keep_last: int = 2
    log_every: int = 10
    report_to: str = "tensorboard"  # tensorboard | wandb | none
    # A non-finite loss or gradient norm: "stop" (raise, naming the step; nothing non-finite is saved)
    # or "skip" (drop that optimizer step, at most max_nonfinite_skips times in the run, then stop).
    on_nonfinite: str = "stop"
    max_nonfinite_skips: int = 10
    # --resume refuses a config that differs from the checkpoint's; these keys (e.g. [max_steps, lr],
    # "rng_state" for a checkpoint whose RNG state is unreadable) may differ. CLI: --resume-allow.
    resume_allow: list[str] = field(default_factory=list)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


class ConfigError(ValueError):
    pass


class TrainingError(RuntimeError):
    """A started run that had to stop (non-finite loss, disk full, unreadable checkpoint)."""


def _from_dict(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where}; valid keys: {sorted(known)}")
    kwargs = {}
    hints = typing.get_type_hints(cls)
    for name, value in data.items():
        sub = _nested_type(cls, name)
        kwargs[name] = _from_dict(sub, value or {}, f"{where}.{name}") if sub else _coerce(
            value, hints[name], f"{where}.{name}")
    return cls(**kwargs)


def _coerce(value, annotation, where: str):
    """YAML 1.1 reads `2e-5` as a string; give numbers their field's type, and say when impossible."""
    allowed = set(typing.get_args(annotation)) or {annotation}
    if value is None and type(None) in allowed:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return value
    if float in allowed and not isinstance(value, float):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}={value!r} is not a number") from None
    if int in allowed and isinstance(value, str) and str not in allowed:
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{where}={value!r} is not an integer") from None
    return value


def _nested_type(cls, name):
    return {(RunConfig, "model"): ModelConfig, (RunConfig, "data"): DataConfig,
            (RunConfig, "train"): TrainConfig, (TrainConfig, "lora"): LoraConfig}.get((cls, name))


def apply_override(tree: dict, override: str) -> None:
    """Apply one ``--section.key=value`` (or ``section.key=value``) to a nested dict in place."""
    text = override[2:] if override.startswith("--") else override
    if "=" not in text:
        raise ConfigError(f"override {override!r} must look like --section.key=value")
    dotted, raw = text.split("=", 1)
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {k!r} is not a section")
    node[keys[-1]] = yaml.safe_load(raw) if raw != "" else None


LIMIT_KEYS = {"max_pixels": int, "max_side": int, "max_aspect_ratio": float, "video_max_frame_pixels": int,
              "video_max_seconds": float, "video_max_source_frames": int}  # DataConfig's size limits, by type


def check_data_limits(d: DataConfig) -> None:
    """The image and video size limits of `data`: unset (None = the default), 0 (no limit) or a positive number
    (an integer for pixel, side and frame counts)."""
    for key, kind in LIMIT_KEYS.items():
        value = getattr(d, key)
        if value is None:
            continue
        number = (int,) if kind is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, number) or value < 0 or value != value:
            what = "an integer" if kind is int else "a number"
            raise ConfigError(f"data.{key}={value!r} must be {what} >= 0 (unset = the default, 0 = no limit)")


def check_image_policy(m: ModelConfig) -> None:
    """`model.image_tokens` / `image_grid_pinpoints` / `anyres_max_tiles`: known values that fit together (the
    pinpoints' multiple-of-the-tile check needs the encoder, `recipes.apply_image_policy` does it)."""
    from llavakit.model.config import IMAGE_TOKEN_POLICIES, TILED_POLICIES

    if m.image_tokens not in IMAGE_TOKEN_POLICIES:
        raise ConfigError(f"model.image_tokens={m.image_tokens!r} is not one of {list(IMAGE_TOKEN_POLICIES)}")
    tiled = m.image_tokens in TILED_POLICIES
    if tiled and m.image_aspect != "resize":
        raise ConfigError(f"model.image_tokens={m.image_tokens!r} tiles the image itself (its base tile is the whole "
                          f"image resized): set model.image_aspect: resize (got {m.image_aspect!r})")
    pins = m.image_grid_pinpoints
    if pins is not None:
        if not tiled:
            raise ConfigError(f"model.image_grid_pinpoints is only used with model.image_tokens anyres or anyres_max "
                              f"(got image_tokens {m.image_tokens!r}); remove it or choose a tiled policy")
        pairs = isinstance(pins, list) and pins and all(
            isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                 and v > 0 for v in p) for p in pins)
        if not pairs:
            raise ConfigError(f"model.image_grid_pinpoints={pins!r} must be a non-empty list of [height, width] "
                              "pairs of positive integers (px, each a multiple of the encoder's input size), "
                              "e.g. [[384, 768], [768, 384], [768, 768]]")
    n = m.anyres_max_tiles
    if n is not None:
        if m.image_tokens != "anyres_max":
            raise ConfigError(f"model.anyres_max_tiles is only used with model.image_tokens anyres_max (got "
                              f"{m.image_tokens!r}); remove it or set image_tokens: anyres_max")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"model.anyres_max_tiles={n!r} must be a positive integer (OneVision's anyres_max_9: 9)")


def in_backward_checks(t: TrainConfig) -> list[tuple[bool, str]]:
    """What train.optimizer_in_backward rules out: each weight is updated before the global gradient norm is
    known (no clipping, no skipped step) and before a later micro-batch could add to its gradient."""
    if t.optimizer_in_backward is not True:
        return []
    why = "train.optimizer_in_backward updates each weight as soon as backward has its gradient, so "
    return [
        (not t.max_grad_norm or t.max_grad_norm <= 0,
         why + f"the global gradient norm is only known afterwards and cannot clip: set train.max_grad_norm: 0 "
         f"(now {t.max_grad_norm!r}) or turn optimizer_in_backward off"),
        (t.grad_accum == 1, why + f"micro-batches cannot accumulate (train.grad_accum={t.grad_accum}): set "
         "grad_accum: 1 and raise batch_size, or turn optimizer_in_backward off"),
        (t.on_nonfinite == "stop", why + "a non-finite step cannot be skipped: set train.on_nonfinite: stop"),
        (t.precision != "fp16", why + "fp16's loss scaler must see every gradient before the update: use "
         "train.precision bf16 or fp32"),
    ]


def validate(cfg: RunConfig) -> RunConfig:
    t, d = cfg.train, cfg.data
    if isinstance(t.resume_allow, str):  # --train.resume_allow=max_steps,lr
        t.resume_allow = [k.strip() for k in t.resume_allow.split(",") if k.strip()]
    checks = [
        (t.stage in STAGES, f"train.stage={t.stage!r} is not one of {list(STAGES)}"),
        (t.schedule in SCHEDULES, f"train.schedule={t.schedule!r} is not one of {list(SCHEDULES)}"),
        (t.precision in PRECISIONS, f"train.precision={t.precision!r} is not one of {list(PRECISIONS)}"),
        (d.overflow in ("truncate", "drop"), f"data.overflow={d.overflow!r} must be 'truncate' or 'drop'"),
        (t.batch_size >= 1 and t.grad_accum >= 1, "train.batch_size and train.grad_accum must be >= 1"),
        (t.on_nonfinite in ("stop", "skip"), f"train.on_nonfinite={t.on_nonfinite!r} must be 'stop' or 'skip'"),
        (t.max_nonfinite_skips >= 0, "train.max_nonfinite_skips must be >= 0"),
        (t.optimizer in ("adamw", "adamw_8bit"), f"train.optimizer={t.optimizer!r} is not one of ['adamw', 'adamw_8bit']"),
        (isinstance(t.optimizer_in_backward, bool), f"train.optimizer_in_backward={t.optimizer_in_backward!r} must be "
         "true or false"),
        *in_backward_checks(t),
        (isinstance(t.return_freed_memory, bool), f"train.return_freed_memory={t.return_freed_memory!r} must be "
         "true or false"),
        (isinstance(t.loss_chunk_size, int) and not isinstance(t.loss_chunk_size, bool) and t.loss_chunk_size >= 0,
         f"train.loss_chunk_size={t.loss_chunk_size!r} must be an integer >= 0 (0 = no chunking, N = rows of "
         "logits per chunk)"),
        (t.loss_chunk_size == 0 or t.supervised_logits_only,
         f"train.loss_chunk_size={t.loss_chunk_size} chunks the supervised-only loss: it needs "
         "train.supervised_logits_only: true (or set train.loss_chunk_size: 0)"),
        (isinstance(t.compile, bool), f"train.compile={t.compile!r} must be true or false"),
        (isinstance(d.cache, bool), f"data.cache={d.cache!r} must be true or false"),
        (d.cache_dir is None or (isinstance(d.cache_dir, str) and d.cache_dir.strip() != ""),
         f"data.cache_dir={d.cache_dir!r} must be a folder path (or unset)"),
        (isinstance(d.preprocess_workers, int) and not isinstance(d.preprocess_workers, bool)
         and d.preprocess_workers >= 0,
         f"data.preprocess_workers={d.preprocess_workers!r} must be an integer >= 0 (0 = one per CPU)"),
        (d.train is not None, "data.train is not set: point it at a LLaVA JSON/JSONL, messages file or HF dataset"),
        (cfg.model.init_from is not None or (cfg.model.vision and cfg.model.llm),
         "set model.vision and model.llm (hub ids or paths), or model.init_from"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
    check_image_policy(cfg.model)
    check_data_limits(d)
    from llavakit.data.mixture import check_train_entries
    from llavakit.data.sources import DataSourceError

    try:
        check_train_entries(d.train)
    except DataSourceError as e:
        raise ConfigError(str(e)) from None
    return cfg


def load_config(path: str | Path | None = None, overrides=(), base: dict | None = None) -> RunConfig:
    """YAML file (or `base` dict) + overrides -> validated `RunConfig`."""
    tree: dict[str, Any] = {}
    if base:
        tree = yaml.safe_load(yaml.safe_dump(base))
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping with model / data / train sections")
        tree.update(loaded)
    for o in overrides:
        apply_override(tree, o)
    try:
        cfg = _from_dict(RunConfig, tree, "config")
    except TypeError as e:  # pragma: no cover - dataclass arg errors are caught above
        raise ConfigError(str(e)) from e
    return validate(cfg)


def replace(cfg: RunConfig, **sections) -> RunConfig:
    return dataclasses.replace(cfg, **sections)
