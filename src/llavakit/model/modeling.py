"""`LlavakitForConditionalGeneration`: vision tower -> projector -> spliced into any causal LM.

The three parts are ordinary transformers modules built with ``AutoModel.from_config`` (vision) and
``AutoModelForCausalLM.from_config`` (LLM), so ``save_pretrained``/``from_pretrained``, PEFT,
``generate`` and accelerate/FSDP work on the composite without glue. Image features are put in
place with one guarded ``masked_scatter`` (no per-sample loops): the processor has already expanded
every ``<image>`` into as many placeholder ids as the image has features (`LlavakitProcessor.image_token_counts`),
in text order. Under ``unpad`` / ``anyres`` / ``anyres_max`` the per-image features are cut (and, for the tiled
policies, laid out with row newlines; anyres_max also shrinks big grids and gives the images of multi-image
samples their base tile only, from ``batch_num_images``) from ``image_sizes`` by `select_image_features`, by the
same rules the processor counts with. Videos (``anyres_max`` + a ``<video>`` token: ``pixel_values_videos``
[V, F, 3, H, W], ``video_num_frames`` [V]) become per-frame features, 2x2-pooled, one newline per video
(`llavakit.model.video`), scattered over the ``<video>`` placeholders the same guarded way.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel

from .anyres import ImageNewline, anyres_features, num_tiles
from .onevision import anyres_max_features, tiled_images
from .video import frames_of, video_features
from .config import TILED_POLICIES, LlavakitConfig
from .loss import linear_cross_entropy_sum
from .projectors import build_projector


class LlavakitPreTrainedModel(PreTrainedModel):
    config_class = LlavakitConfig
    base_model_prefix = ""
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module):
        # The vision tower and the LLM initialise themselves; only the projector is ours.
        if isinstance(module, (nn.Linear, ImageNewline)):
            module.reset_parameters()


def _distributed() -> bool:
    """Whether this process is one of several in a torch.distributed job."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


class LlavakitForConditionalGeneration(LlavakitPreTrainedModel, GenerationMixin):
    def __init__(self, config: LlavakitConfig):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        in_dim = config.vision_config.hidden_size * len(config.feature_layers)
        self.multi_modal_projector = build_projector(config.projector, in_dim, config.text_config.hidden_size)
        if config.image_tokens in TILED_POLICIES:  # trained, saved and loaded with the projector (ImageNewline)
            self.multi_modal_projector.image_newline = ImageNewline(config.text_config.hidden_size)
        self.post_init()

    # --- plumbing the LLM's embeddings through, so resize/PEFT/generate see them ---------------
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value):
        self.language_model.set_output_embeddings(value)

    def get_decoder(self):
        return self.language_model.get_decoder()

    # --- generation -----------------------------------------------------------------------------
    def generate(self, *args, **kwargs):
        """`GenerationMixin.generate`, never emitting the image (or video) placeholder: its embedding row is the mean
        of all rows, so sampling could pick it, and the next step would then expect image features that
        do not exist. It is added to `suppress_tokens` (the caller's own are kept)."""
        placeholders = [t for t in (self.config.image_token_id, self.config.video_token_id) if t is not None]
        if placeholders:
            config = kwargs.get("generation_config") or self.generation_config
            given = kwargs.get("suppress_tokens", getattr(config, "suppress_tokens", None)) or []
            kwargs["suppress_tokens"] = list(dict.fromkeys([*given, *placeholders]))
        return super().generate(*args, **kwargs)

    # --- vision ---------------------------------------------------------------------------------
    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Selected vision-tower hidden states before the projector: [N_img, T, D_vis * n_layers]."""
        cfg = self.config
        trainable = torch.is_grad_enabled() and any(p.requires_grad for p in self.vision_tower.parameters())
        dtype = next(self.vision_tower.parameters()).dtype
        with torch.set_grad_enabled(trainable):
            out = self.vision_tower(pixel_values.to(dtype), output_hidden_states=True, return_dict=True)
        start = cfg.vision_prefix_tokens if cfg.vision_feature_select == "patch" else 0
        # CLIP puts CLS first; "patch" drops it (LLaVA's "default" strategy).
        hs = [out.hidden_states[layer][:, start:] for layer in cfg.feature_layers]
        return torch.cat(hs, dim=-1) if len(hs) > 1 else hs[0]

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [N_img, 3, H, W] -> projected features [N_img, image_seq_length, D_llm]."""
        return self.multi_modal_projector(self.vision_features(pixel_values))

    def select_image_features(self, image_features: torch.Tensor, image_sizes: torch.Tensor | None,
                              batch_num_images=None):
        """[N_img, T, D] -> the features each image keeps under the token policy, as a list of [T_i, D]
        (``base``: all T; ``unpad``: the feature-grid rows/columns over the image, not its padding; ``anyres`` /
        ``anyres_max``: `image_features` holds every tile, see `anyres_image_features`)."""
        if self.config.image_tokens == "base":
            return list(image_features)
        from .processor import feature_grid, unpadded_box

        if self.config.image_tokens in TILED_POLICIES:
            return self.anyres_image_features(image_features, image_sizes, batch_num_images)
        if image_sizes is None or len(image_sizes) != image_features.shape[0]:
            got = "none" if image_sizes is None else len(image_sizes)
            raise ValueError(f"image_tokens='unpad' needs image_sizes [N_img, 2] (width, height) for each of the "
                             f"{image_features.shape[0]} image(s), got {got}; the processor returns them")
        n, t, d = image_features.shape
        g = feature_grid(t)
        grid = image_features.reshape(n, g, g, d)  # row-major patch order
        out = []
        for k, (w, h) in enumerate(image_sizes.tolist()):
            top, bottom, left, right = unpadded_box(int(w), int(h), g)
            out.append(grid[k, top:bottom, left:right].reshape(-1, d))  # [T_k, D]
        return out

    def images_tiled(self, n_images: int, batch_num_images=None) -> list[bool]:
        """Per image, whether it is tiled: always under anyres; under anyres_max only when alone in its sample
        (``batch_num_images`` [B] images per sample; None = every image alone, as transformers)."""
        if self.config.image_tokens == "anyres_max":
            return tiled_images(batch_num_images, n_images)
        return [True] * n_images

    def tiles_per_image(self, image_sizes: torch.Tensor, batch_num_images=None) -> list[int]:
        """anyres / anyres_max: how many tiles (base + grid, or the base tile of an image of a multi-image
        sample) each image of ``image_sizes`` [N_img, 2] (width, height) has."""
        tile = int(self.config.vision_config.image_size)
        tiled = self.images_tiled(len(image_sizes), batch_num_images)
        return [num_tiles(int(w), int(h), self.config.image_grid_pinpoints, tile) if t else 1
                for (w, h), t in zip(image_sizes.tolist(), tiled)]

    def anyres_image_features(self, tile_features: torch.Tensor, image_sizes: torch.Tensor | None,
                              batch_num_images=None) -> list:
        """Tile features [sum of tiles, T, D] (every image's base tile, then its grid) -> per-image [T_i, D]."""
        policy = self.config.image_tokens
        if image_sizes is None:
            raise ValueError(f"image_tokens={policy!r} needs image_sizes [N_img, 2] (width, height); the processor "
                             "returns them")
        counts = self.tiles_per_image(image_sizes, batch_num_images)
        if sum(counts) != tile_features.shape[0]:
            hint = "" if policy == "anyres" or batch_num_images is not None else (
                "; an image of a multi-image sample has one tile under anyres_max: pass batch_num_images "
                "(images per sample, as the processor returns it)")
            raise ValueError(f"image_tokens={policy!r}: image_sizes {image_sizes.tolist()} need {counts} tiles "
                             f"({sum(counts)} in all), pixel_values hold {tile_features.shape[0]}{hint}")
        tile = int(self.config.vision_config.image_size)
        newline = self.multi_modal_projector.image_newline.weight
        pins = self.config.image_grid_pinpoints
        if policy == "anyres":
            return [anyres_features(f, (int(w), int(h)), pins, tile, newline)
                    for f, (w, h) in zip(tile_features.split(counts), image_sizes.tolist())]
        tiled = self.images_tiled(len(image_sizes), batch_num_images)
        return [anyres_max_features(f, (int(w), int(h)) if t else None, pins, tile, newline,
                                    self.config.anyres_max_tiles)
                for f, (w, h), t in zip(tile_features.split(counts), image_sizes.tolist(), tiled)]

    def get_video_features(self, pixel_values_videos: torch.Tensor, video_num_frames=None) -> list:
        """[V, F, 3, H, W] frames (each video's first ``video_num_frames[v]`` real, None = all F) -> per-video
        tokens [F_v * p*p + 1, D_llm]: tower + projector per frame, 2x2 pooled, one newline (`model.video`)."""
        if self.config.image_tokens != "anyres_max" or self.config.video_token_id is None:
            raise ValueError("videos need an image_tokens='anyres_max' model with a <video> token (LLaVA-OneVision's "
                             f"video rule); this one has image_tokens={self.config.image_tokens!r}, video_token_id="
                             f"{self.config.video_token_id}: build one with llavakit.build(..., image_tokens="
                             "'anyres_max') or import a llava-onevision checkpoint")
        frames, counts = frames_of(pixel_values_videos, video_num_frames)
        newline = self.multi_modal_projector.image_newline.weight
        return [video_features(f, newline) for f in self.get_image_features(frames).split(counts)]

    def splice(self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor, image_features, kind: str = "image"):
        """Write image (``kind="video"``: video) features over their placeholder positions, in order (one
        masked_scatter).

        `image_features`: [N_img, T, D], or a list of per-image [T_i, D] (counts may differ)."""
        token_id = self.config.video_token_id if kind == "video" else self.config.image_token_id
        mask = input_ids == token_id  # [B, L]
        n_slots = int(mask.sum())
        per_image = [f.shape[0] for f in image_features] if isinstance(image_features, (list, tuple)) \
            else [image_features.shape[1]] * image_features.shape[0]
        if n_slots != sum(per_image):
            raise ValueError(
                f"{kind} placeholders and {kind} features do not match: the text has {n_slots} placeholder "
                f"tokens, the {kind}s give {sum(per_image)} features ({len(per_image)} {kind}(s) with "
                f"{per_image} features each). Each <{kind}> must be expanded by the processor to its own "
                f"count (processor.{kind}_token_counts), with exactly one {kind} per <{kind}>."
            )
        if isinstance(image_features, (list, tuple)):
            feats = torch.cat(list(image_features), dim=0) if image_features else inputs_embeds.new_zeros(0, 1)
        else:
            feats = image_features.reshape(-1, image_features.shape[-1])
        feats = feats.to(inputs_embeds.device, inputs_embeds.dtype)
        return inputs_embeds.masked_scatter(mask.unsqueeze(-1).expand_as(inputs_embeds), feats)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              image_features: torch.Tensor | None = None, past_key_values=None,
              vision_features: torch.Tensor | None = None, image_sizes: torch.Tensor | None = None,
              batch_num_images=None, pixel_values_videos: torch.Tensor | None = None,
              video_num_frames=None) -> torch.Tensor:
        """Token embeddings with image (and video) features spliced in: [B, L, D_llm].

        Images come as `pixel_values`, as cached tower outputs `vision_features` (before the
        projector, e.g. from a stage-1 feature cache), or as ready `image_features`; videos as
        `pixel_values_videos` [V, F, 3, H, W] with `video_num_frames` [V] (`get_video_features`).
        """
        inputs_embeds = self.get_input_embeddings()(input_ids)
        anyres = self.config.image_tokens in TILED_POLICIES
        if anyres and vision_features is not None and vision_features.shape[0] > 0:
            raise ValueError(f"image_tokens={self.config.image_tokens!r} cannot take cached vision_features (the "
                             "cache holds one base-resolution tile per image); train stage 1 with "
                             "image_tokens='base' or no cache")
        if anyres and pixel_values is not None and pixel_values.dim() == 5 and image_sizes is not None:
            # transformers' LlavaNext / OneVision layout [N_img, max_tiles, 3, H, W]: keep each image's own tiles
            tiles = self.tiles_per_image(image_sizes, batch_num_images)
            pixel_values = torch.cat([pv[:n] for pv, n in zip(pixel_values, tiles)])
        if image_features is None and vision_features is not None and vision_features.shape[0] > 0:
            image_features = self.multi_modal_projector(vision_features.to(inputs_embeds.dtype))
        if image_features is None and pixel_values is not None and pixel_values.shape[0] > 0:
            image_features = self.get_image_features(pixel_values)
        prefill = past_key_values is None or past_key_values.get_seq_length() == 0
        videos = pixel_values_videos is not None and pixel_values_videos.shape[0] > 0
        if image_features is not None:
            if self.config.image_tokens != "base" and not isinstance(image_features, (list, tuple)):
                image_features = self.select_image_features(image_features, image_sizes, batch_num_images)
            inputs_embeds = self.splice(input_ids, inputs_embeds, image_features)
        elif prefill:
            self._no_placeholders(input_ids, "image")
        if videos:
            inputs_embeds = self.splice(input_ids, inputs_embeds, self.get_video_features(
                pixel_values_videos, video_num_frames), kind="video")
        elif prefill:
            self._no_placeholders(input_ids, "video")
        if image_features is not None or videos:
            return inputs_embeds
        if self.training and _distributed():
            # A batch without images on one rank while another rank's has some: sharded modules (FSDP,
            # DeepSpeed ZeRO-3) gather their weights collectively in forward, so every rank must run the
            # same modules every step or the others wait forever. A blank image goes through the same path
            # (tower + projector, or the projector alone when features come from a cache) and adds 0.
            if vision_features is not None:
                blank = self.multi_modal_projector(inputs_embeds.new_zeros(1, *vision_features.shape[1:]))
            else:
                size = int(self.config.vision_config.image_size)
                channels = int(getattr(self.config.vision_config, "num_channels", 3))
                blank = self.get_image_features(inputs_embeds.new_zeros(1, channels, size, size))
            if anyres:  # the newline too: every trainable weight takes part on every rank
                blank = blank.sum() + self.multi_modal_projector.image_newline.weight.sum()
            inputs_embeds = inputs_embeds + 0.0 * blank.sum().to(inputs_embeds.dtype)
        return inputs_embeds

    def _no_placeholders(self, input_ids: torch.Tensor, kind: str) -> None:
        """At prefill, a text with image (video) placeholders but no images (videos) is an error."""
        token_id = self.config.video_token_id if kind == "video" else self.config.image_token_id
        n = int((input_ids == token_id).sum()) if token_id is not None else 0
        if n:
            given = "pixel_values_videos" if kind == "video" else "pixel_values"
            raise ValueError(f"{kind} placeholders and {kind} features do not match: the text has {n} placeholder "
                             f"tokens but no {given} were given")

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        image_features: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
        supervised_logits_only: bool = False,
        loss_chunk_size: int = 0,
        cache=None,
        image_sizes: torch.Tensor | None = None,
        batch_num_images: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_num_frames: torch.Tensor | None = None,
        **kwargs,
    ):
        """Causal-LM outputs. With `labels` and `supervised_logits_only=True` the LM head runs only
        at supervised positions (most LLaVA tokens are image or prompt tokens), the loss is the same
        and `logits` is None; `loss_chunk_size` N > 0 then computes that loss N supervised rows of logits
        at a time (`model/loss.py`), never holding the whole `[N_sup, V]` block.

        The KV cache comes as `cache` (transformers >= 5.24's name) or `past_key_values` (before);
        it is handed to the LLM under the one name the LLM's own forward takes."""
        if cache is not None and past_key_values is not None and cache is not past_key_values:
            raise ValueError("pass the KV cache once, as `cache` or as `past_key_values`, not both")
        cache = cache if cache is not None else past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, pixel_values, image_features, cache, vision_features, image_sizes,
                                       batch_num_images, pixel_values_videos, video_num_frames)
        if use_cache is None and cache is None and (
                self.training or (attention_mask is None and position_ids is not None)):
            # No KV cache in training, and none for padding-free packed rows: transformers only
            # detects packed sequences (position ids restarting) when no cache is being built.
            use_cache = False
        if supervised_logits_only and labels is not None:
            return self._supervised_loss(inputs_embeds, attention_mask, position_ids, labels,
                                         chunk_size=loss_chunk_size, **kwargs)
        if cache is not None:
            kwargs[self._lm_cache_arg()] = cache
        return self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )

    def _lm_cache_arg(self) -> str:
        """The keyword the LLM's forward takes its KV cache by: ``cache`` (transformers >= 5.24) or
        ``past_key_values``. Read off the signature, so a PEFT wrapper or an older release both work."""
        import inspect

        lm = self.language_model
        base = getattr(lm, "get_base_model", lambda: lm)()
        params = inspect.signature(type(base).forward).parameters
        return "cache" if "cache" in params else "past_key_values"

    def _supervised_loss(self, inputs_embeds, attention_mask, position_ids, labels, num_items_in_batch=None,
                         chunk_size: int = 0, **kwargs):
        """Cross-entropy from LM-head rows at supervised positions only: [N_sup, V], not [B, L, V]
        (and with `chunk_size` > 0 only that many rows of it at a time)."""
        from transformers.modeling_outputs import CausalLMOutputWithPast

        decoder = self.language_model.get_decoder()
        hidden = decoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=False, **kwargs).last_hidden_state  # [B, L, D]
        targets = labels[:, 1:]  # position t predicts token t+1
        keep = targets != -100  # [B, L-1]
        head = self.language_model.get_output_embeddings()
        loss = linear_cross_entropy_sum(hidden[:, :-1][keep], head, targets[keep], chunk_size)  # rows [N_sup, D]
        denom = num_items_in_batch if num_items_in_batch is not None else keep.sum().clamp(min=1)
        return CausalLMOutputWithPast(loss=loss / denom, logits=None)
