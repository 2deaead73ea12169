"""`LlavakitConfig`: a composite transformers config (vision tower + projector + causal LM).

``vision_config`` and ``text_config`` are the components' own configs, so ``AutoModel.from_config``
rebuilds either one exactly; everything llavakit adds (projector name, feature layer, image token)
lives next to them. ``components`` records where the model was assembled from.
"""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

FEATURE_SELECT = ("patch", "cls_patch")
DTYPES = ("float32", "float16", "bfloat16")
IMAGE_TOKEN_POLICIES = ("base", "unpad", "anyres", "anyres_max")  # see LlavakitConfig.image_tokens
TILED_POLICIES = ("anyres", "anyres_max")  # policies whose images are a base tile + a pinpoint grid of tiles


def parse_dtype(dtype):
    """``"bfloat16"`` -> ``torch.bfloat16``; a torch dtype or None passes through."""
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES and dtype != "auto":
        raise ValueError(f"dtype {dtype!r} is not one of {list(DTYPES)}")
    return dtype if dtype == "auto" else getattr(torch, dtype)


class LlavakitConfig(PreTrainedConfig):
    model_type = "llavakit"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="clip_vision_model"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    projector: str = "mlp2x_gelu"
    # Hidden-state index (or indices, concatenated on the feature axis) taken from the vision tower.
    # -2 is LLaVA-1.5's choice: the penultimate layer of CLIP.
    vision_feature_layer: int | list[int] = -2
    # "patch" drops the tower's prefix tokens (CLIP's CLS), "cls_patch" keeps them.
    vision_feature_select: str = "patch"
    # How many tokens the tower puts before its patch tokens (1 for CLIP's CLS, 0 for SigLIP);
    # measured once by `build` with a dry forward, never guessed from a model name.
    vision_prefix_tokens: int = 0
    # How many tokens an image gets: "base" = every feature of the square the tower sees; "unpad" =
    # only the features over the image itself when it was padded to a square (LLaVA-NeXT's unpadding,
    # one tile; the processor counts them, `LlavakitProcessor.num_image_tokens`); "anyres" = LLaVA-NeXT's
    # tiles: a base tile + a grid of tiles chosen from `image_grid_pinpoints`, unpadded, with a learned
    # newline after each row (`llavakit.model.anyres`); "anyres_max" = LLaVA-OneVision's "anyres_max_N": as
    # anyres, but a grid map of more than `anyres_max_tiles` tiles' worth of features is bilinearly shrunk, and
    # each image of a multi-image sample gets its base tile + one newline only (`llavakit.model.onevision`).
    image_tokens: str = "base"
    # anyres / anyres_max: the [height, width] px resolutions the tile grid may take, each a multiple of the
    # encoder's input size; None = the policy's default for that size (LLaVA-NeXT's 5 grids for anyres,
    # OneVision's 1x1..6x6 tiles for anyres_max; filled in, so it is recorded).
    image_grid_pinpoints: list[list[int]] | None = None
    # anyres_max only: N of OneVision's "anyres_max_N" (its vision_aspect_ratio), the most base tiles' worth
    # of grid features an image keeps before they are interpolated down.
    anyres_max_tiles: int = 9
    image_token_id: int | None = None
    # anyres_max only: the id of the `<video>` placeholder (OneVision's video rule, `llavakit.model.video`); None =
    # the model takes no videos (every other policy, and anyres_max models built before video support)
    video_token_id: int | None = None
    pad_token_id: int | None = None
    # {"vision": id_or_path, "llm": id_or_path} the model was assembled from.
    components: dict | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.vision_feature_select not in FEATURE_SELECT:
            raise ValueError(
                f"vision_feature_select={self.vision_feature_select!r} is not one of {list(FEATURE_SELECT)}"
            )
        if self.image_tokens not in IMAGE_TOKEN_POLICIES:
            raise ValueError(f"image_tokens={self.image_tokens!r} is not one of {list(IMAGE_TOKEN_POLICIES)}")
        if isinstance(self.vision_feature_layer, (list, tuple)):
            self.vision_feature_layer = [int(x) for x in self.vision_feature_layer]
        if self.image_tokens in TILED_POLICIES and self.vision_config is not None:
            from .anyres import check_grid_pinpoints
            from .onevision import check_max_tiles, policy_grid_pinpoints

            tile = int(self.vision_config.image_size)
            self.image_grid_pinpoints = check_grid_pinpoints(self.image_grid_pinpoints or
                                                             policy_grid_pinpoints(self.image_tokens, tile), tile)
            self.anyres_max_tiles = check_max_tiles(self.anyres_max_tiles)
        # A tied-embedding LLM (e.g. Qwen2.5-0.5B) keeps its tying inside the composite model.
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True

    # --- derived geometry -------------------------------------------------------------------
    @property
    def feature_layers(self) -> list[int]:
        layer = self.vision_feature_layer
        return list(layer) if isinstance(layer, (list, tuple)) else [layer]

    @property
    def patch_grid(self) -> int:
        """Patches per side of the (square) image the tower sees."""
        vc = self.vision_config
        return int(vc.image_size) // int(vc.patch_size)

    @property
    def vision_tokens(self) -> int:
        """Tokens per image that enter the projector."""
        n = self.patch_grid**2
        return n + self.vision_prefix_tokens if self.vision_feature_select == "cls_patch" else n

    @property
    def image_seq_length(self) -> int:
        """Placeholder ids one `<image>` expands to = features the projector emits per image."""
        from .projectors import projector_output_tokens

        return projector_output_tokens(self.projector, self.vision_tokens, self.patch_grid,
                                       self.vision_feature_select, self.vision_prefix_tokens)
