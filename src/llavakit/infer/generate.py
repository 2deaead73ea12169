"""Generation shared by ``chat``, ``web`` and ``eval``: prompt, batch, generate, stream, stop.

A conversation (``list[Turn]`` whose user texts carry one ``<image>`` per image) is rendered with
the conversation template the model was trained with (`resolve_template`) and tokenized exactly as
training tokenized it (`llavakit.data.tokenize.encode_prompt`: per run of segments, each
``<image>`` expanded to the model's placeholder ids), then left-padded into one batch for
``model.generate``. Generation ends at the template's end-of-turn: single-token stop strings
become extra ``eos_token_id`` s, longer ones go to ``generate(stop_strings=...)``, and any stop
text that still reaches the output is cut off (`StopTrimmer`, which also holds back a stop
string's first characters while streaming, so they never flash on screen).

Videos (models with a ``<video>`` token, ``image_tokens: anyres_max``): ``videos[i]`` are conversation i's
videos, in ``<video>`` marker order, each a file path or a list of frames; they are sampled as the processor
says (``video_max_frames`` / ``video_fps``), each ``<video>`` expanded to the decoded frames' count, and sent as
``pixel_values_videos`` [V, F_max, 3, H, W] + ``video_num_frames`` [V], as the training collators do.

`ChatSession` is the multi-turn state (turns + images and videos + those waiting for the next question)
that the terminal chat and the web page both drive.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from PIL import Image
from transformers import BatchFeature, StoppingCriteria

from llavakit.data.conversation import IMAGE_MARKER, Turn, strip_markers
from llavakit.data.video import VIDEO_MARKER

FALLBACK_TEMPLATE = "vicuna_v1"  # models without a recorded template and without a chat_template


def resolve_template(processor, name: str | None = None):
    """The conversation template to prompt with.

    ``name`` (e.g. from ``--template``) wins; else the template the model was trained with
    (``processor.template``); else ``auto`` when the tokenizer has a chat_template; else vicuna_v1.
    """
    from llavakit.data.templates import AUTO, get_template

    tokenizer = processor.tokenizer
    if name is None:
        name = getattr(processor, "template", None)
    if name is None:
        name = AUTO if getattr(tokenizer, "chat_template", None) else FALLBACK_TEMPLATE
    return get_template(name, tokenizer)


def load_generator(model: str, device: str | None = None, dtype: str | None = None,
                   template: str | None = None) -> "Generator":
    """Open a saved model (``llavakit.load``) on ``device`` (default: cuda when available) for inference."""
    import llavakit

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    m, processor = llavakit.load(model, dtype=dtype)
    m.to(device).eval()
    return Generator(m, processor, template=template)


@dataclass
class GenerationSettings:
    """Decoding knobs. ``temperature == 0`` means greedy (deterministic) decoding."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    def generate_kwargs(self) -> dict:
        kw = {"max_new_tokens": self.max_new_tokens, "repetition_penalty": self.repetition_penalty}
        if self.temperature > 0:
            kw.update(do_sample=True, temperature=self.temperature, top_p=self.top_p)
        else:
            # Explicit values so a checkpoint's generation_config (often sampling) cannot switch it on.
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kw


class StopTrimmer:
    """Cuts text at the first stop string; while streaming, holds back a possible stop prefix."""

    def __init__(self, stop_strings: Sequence[str]):
        self.stops = [s for s in stop_strings if s]
        self.buffer = ""
        self.stopped = False
        self._started = False

    def push(self, chunk: str) -> str:
        """Feed generated text; returns the text that is safe to show now."""
        if self.stopped:
            return ""
        self.buffer += chunk
        hits = [i for i in (self.buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buffer, self.stopped = self.buffer[:min(hits)], "", True
            return self._lead(out)
        hold = 0
        for s in self.stops:  # longest suffix of the buffer that starts some stop string
            for k in range(min(len(s) - 1, len(self.buffer)), hold, -1):
                if s.startswith(self.buffer[-k:]):
                    hold = k
                    break
        out = self.buffer[:len(self.buffer) - hold]
        self.buffer = self.buffer[len(self.buffer) - hold:]
        return self._lead(out)

    def flush(self) -> str:
        """The held-back rest, once generation has ended."""
        out, self.buffer = ("" if self.stopped else self.buffer), ""
        return self._lead(out)

    def _lead(self, text: str) -> str:
        # Replies usually start with the space after "ASSISTANT:"; drop leading whitespace once.
        if not self._started:
            text = text.lstrip()
            self._started = bool(text)
        return text

    @classmethod
    def trim(cls, text: str, stop_strings: Sequence[str]) -> str:
        t = cls(stop_strings)
        return (t.push(text) + t.flush()).strip()


class _Cancelled(StoppingCriteria):
    """Ends generation once ``event`` is set."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class Generator:
    """A loaded model + processor + template: conversations in, replies out (batched or streamed)."""

    def __init__(self, model, processor, template: str | None = None):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.template = resolve_template(processor, template)
        self.stop_strings = list(self.template.stop_strings)
        stop_ids = self.template.stop_token_ids(self.tokenizer)
        eos = self.tokenizer.eos_token_id
        self.eos_token_ids = list(dict.fromkeys(([eos] if eos is not None else []) + stop_ids))
        # Stop strings that are not one token need the generate-time string matcher.
        self.multi_token_stops = [s for s in self.stop_strings
                                  if len(self.tokenizer(s, add_special_tokens=False)["input_ids"]) > 1]

    # --- prompts ----------------------------------------------------------------------------------
    def render(self, turns: list[Turn]) -> str:
        """The prompt text (for display and logs; the ids come from `encode`)."""
        return self.template.render_prompt(turns)

    def load_videos(self, conversations: Sequence[list[Turn]], videos) -> list[list[list[Image.Image]]]:
        """Each conversation's videos as sampled frames (a path is read, a frame list sampled); checks that the
        model takes videos and that every conversation has one ``<video>`` per video."""
        proc = self.processor
        videos = [list(v) for v in videos] if videos is not None else [[] for _ in conversations]
        if len(videos) != len(conversations):
            raise ValueError(f"got {len(conversations)} conversations but {len(videos)} video lists")
        video_id = getattr(proc, "video_token_id", None)
        if any(videos):
            proc.check_videos()  # a clear error for a model without videos
        for i, (turns, vs) in enumerate(zip(conversations, videos)):
            markers = sum(t.content.count(VIDEO_MARKER) for t in turns) if video_id is not None else 0
            if markers != len(vs):
                raise ValueError(f"conversation {i} has {markers} {VIDEO_MARKER} marker(s) but {len(vs)} video(s)")
        return [[proc.load_videos([v])[0] for v in vs] for vs in videos]

    def encode(self, conversations: Sequence[list[Turn]], images: Sequence[Sequence[Image.Image]], videos=None):
        """Left-padded model inputs; ``images[i]`` are conversation i's images, in marker order; ``videos[i]`` its
        videos (paths or frame lists; None: no videos)."""
        from llavakit.data.tokenize import encode_prompt

        if len(conversations) != len(images):
            raise ValueError(f"got {len(conversations)} conversations but {len(images)} image lists")
        proc = self.processor
        frames = self.load_videos(conversations, videos)
        video_id = getattr(proc, "video_token_id", None)
        ids = []
        for i, (turns, ims, vs) in enumerate(zip(conversations, images, frames)):
            markers = sum(t.content.count(IMAGE_MARKER) for t in turns)
            if markers != len(ims):
                raise ValueError(f"conversation {i} has {markers} {IMAGE_MARKER} marker(s) but {len(ims)} image(s)")
            ids.append(encode_prompt(turns, self.template, self.tokenizer, proc.image_token_id,
                                     proc.image_token_counts(ims), tokenization=proc.tokenization,
                                     video_token_id=video_id, video_tokens=[proc.num_video_tokens(len(v)) for v in vs]))
        batch = proc.pad(ids, padding_side="left")  # [B, L] ids and mask
        data = {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
        flat = [im for ims in images for im in ims]
        if flat:
            per_sample = [len(ims) for ims in images]  # anyres_max tiles an image only when alone in its prompt
            # [N_img, 3, H, W] in text order (anyres / anyres_max: every tile of every image)
            data["pixel_values"] = proc.preprocess_images(flat, batch_num_images=per_sample)
            if proc.counts_depend_on_size:
                data["image_sizes"] = proc.image_sizes(flat)  # [N_img, 2]
            data["batch_num_images"] = torch.tensor(per_sample, dtype=torch.long)  # [B], as the collators
        flat_videos = [v for vs in frames for v in vs]
        if flat_videos:  # [V, F_max, 3, H, W] in text order, + each video's real frames [V]
            data["pixel_values_videos"], data["video_num_frames"] = proc.preprocess_videos(flat_videos)
        return BatchFeature(data).to(self.model.device)

    def _generate_kwargs(self, settings: GenerationSettings) -> dict:
        kw = settings.generate_kwargs()
        kw.update(eos_token_id=self.eos_token_ids, pad_token_id=self.tokenizer.pad_token_id)
        if self.multi_token_stops:
            kw.update(stop_strings=self.multi_token_stops, tokenizer=self.tokenizer)
        return kw

    # --- batched ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, conversations: Sequence[list[Turn]], images: Sequence[Sequence[Image.Image]],
                 settings: GenerationSettings | None = None, videos=None) -> list[str]:
        """One reply per conversation. With greedy settings the replies do not depend on the batch."""
        settings = settings or GenerationSettings()
        inputs = self.encode(conversations, images, videos)
        out = self.model.generate(**inputs, **self._generate_kwargs(settings))
        new = out[:, inputs["input_ids"].shape[1]:]  # [B, T_new]; rows that stopped early are padded
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return [StopTrimmer.trim(t, self.stop_strings) for t in texts]

    # --- streamed ---------------------------------------------------------------------------------
    def stream(self, turns: list[Turn], images: Sequence[Image.Image],
               settings: GenerationSettings | None = None, videos: Sequence | None = None) -> Iterator[str]:
        """Yield the reply in pieces as the model produces them (generation runs in a thread)."""
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        settings = settings or GenerationSettings()
        inputs = self.encode([turns], [images], None if videos is None else [videos])
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        cancel = threading.Event()  # set when the consumer stops early (Ctrl-C, closed web page)
        failure: list[BaseException] = []

        def work():
            try:
                with torch.inference_mode():
                    self.model.generate(**inputs, streamer=streamer,
                                        stopping_criteria=StoppingCriteriaList([_Cancelled(cancel)]),
                                        **self._generate_kwargs(settings))
            except BaseException as e:  # re-raised in the caller's thread below
                failure.append(e)
                streamer.end()

        thread = threading.Thread(target=work, name="llavakit-generate", daemon=True)
        thread.start()
        trimmer = StopTrimmer(self.stop_strings)
        try:
            for piece in streamer:
                text = trimmer.push(piece)
                if text:
                    yield text
            rest = trimmer.flush().rstrip()
            if rest:
                yield rest
        finally:
            cancel.set()
            thread.join()
        if failure:
            raise failure[0]


@dataclass
class ChatSession:
    """Multi-turn chat state: finished turns, their images and videos, and those waiting for the next question.

    ``system`` replaces the template's default system prompt (sent as a leading system turn).

    Images and videos are re-sent with the whole conversation at every turn (no cache is kept between turns).
    A turn's images are placed before its text, one ``<image>`` line each, as in LLaVA, then its videos, one
    ``<video>`` line each. A video is kept as its sampled frames (`Generator.load_videos`).
    """

    generator: Generator
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    system: str | None = None
    turns: list[Turn] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)
    pending: list[Image.Image] = field(default_factory=list)
    videos: list[list[Image.Image]] = field(default_factory=list)  # each video's sampled frames
    pending_videos: list[list[Image.Image]] = field(default_factory=list)

    def add_image(self, image: Image.Image) -> int:
        """Attach an image to the next question; returns how many are waiting."""
        self.pending.append(image)
        return len(self.pending)

    def add_video(self, video) -> int:
        """Attach a video (a file path or a list of frames) to the next question, read and sampled now (a
        `VideoError` if unusable, a ValueError if the model takes no videos); returns how many are waiting."""
        processor = self.generator.processor
        processor.check_videos()
        self.pending_videos.append(processor.load_videos([video])[0])
        return len(self.pending_videos)

    def reset(self) -> None:
        self.turns, self.images, self.pending = [], [], []
        self.videos, self.pending_videos = [], []

    def clean(self, text: str) -> str:
        """Typed (or generated) text with no image marker, nor video marker when the model takes videos: markers
        come from attachments only."""
        text = strip_markers(text)
        if getattr(getattr(self.generator, "processor", None), "video_token_id", None) is not None:
            text = strip_markers(text, VIDEO_MARKER)
        return text

    def user_turn(self, text: str) -> Turn:
        # Markers come from attachments only; typed special-token text is tokenized as plain text.
        return Turn("user", (IMAGE_MARKER + "\n") * len(self.pending) + (VIDEO_MARKER + "\n") * len(self.pending_videos)
                    + self.clean(text))

    def ask(self, text: str) -> Iterator[str]:
        """Stream the reply to ``text``; the exchange joins the history once the reply is complete."""
        turn = self.user_turn(text)
        turns = ([Turn("system", self.clean(self.system))] if self.system else []) + self.turns + [turn]
        images = self.images + self.pending
        videos = self.videos + self.pending_videos
        pieces = []
        extra = {"videos": videos} if videos else {}  # a generator without video support is asked as before
        for piece in self.generator.stream(turns, images, self.settings, **extra):
            pieces.append(piece)
            yield piece
        # A reply that spells <image> must not become an image marker in the next prompt.
        self.turns += [turn, Turn("assistant", self.clean("".join(pieces).strip()))]
        self.images, self.pending = images, []
        self.videos, self.pending_videos = videos, []
