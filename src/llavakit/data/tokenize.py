"""Conversation -> token ids + labels + image slots, with the length policy.

Labels come from the template's spans, never from splitting a rendered string: the segments are
merged into runs of equal supervision, each run is tokenized on its own and assistant runs keep their
ids as labels (everything else is -100). Tokenizing per run gives exactly the ids the model sees at
inference: the prompt (`Template.render_prompt`) ends where a reply starts, so generation continues
from a token boundary there, and every reply ends with a special end-of-turn token, which tokenizers
always split at. (Whole-string tokenization could merge the header's last characters with the
reply's first ones into one token the model could never produce after the prompt.)

Runs after the first are tokenized behind an *anchor* special token that is then dropped, so a run
is tokenized as a mid-text piece: sentencepiece-style tokenizers (Metaspace, ``prepend_scheme
"first"``) then add their word-start marker only at the true start of the text, as for the whole
string. Byte-level BPE tokenizers (GPT-2/Qwen/Llama-3 style) never merge across the run boundaries
of the built-in templates; the one known difference is a reply that *starts* with newlines after a
header ending in a newline (Qwen's pre-tokenizer joins ``"\\n" + "\\n"`` in a whole string). A
SentencePiece tokenizer that puts its word-start marker after *every* special token (Llama with
``legacy=True``) gives a reply that starts without a space right after a header that does not end
in a special token (``chatml``'s ``"assistant\\n"``, ``mistral_instruct``'s ``"[/INST]"`` where
that is not a special token) a ``"▁"`` the whole string would not have.

``<image>`` markers never go through the tokenizer: image k becomes exactly ``image_tokens[k]`` copies
of ``image_token_id`` (`expand_image_tokens`; the counts come from the processor, which owns them:
``processor.image_token_counts``), unsupervised. ``<video>`` markers (models with a video token,
``processor.video_token_id``) are the tokenizer's added ``<video>`` token; video k then becomes
``video_tokens[k]`` copies of it (``processor.num_video_tokens(frames)``), unsupervised, the same way.

**Special-token text in content stays text**: a conversation's ``</s>``, ``<|im_end|>``, ``<s>`` ... is
tokenized as plain text, never as the control token (`llavakit.data.specials`: the spelling is cut out
of its piece and tokenized with ``split_special_tokens=True``; the text around it is tokenized as it
always was). Only the template's scaffolding yields special ids, so a reply's labels hold exactly one
end-of-turn token, and a chat user cannot forge one. Over-long samples are dropped or truncated by removing whole
trailing rounds (a user turn and the assistant reply after it) with their images; a cut never lands
inside an image's placeholders. `encode_prompt` tokenizes a generation prompt the same way.

**Tokenization modes** (the contract a checkpoint was trained with; recorded as
``processor.tokenization`` in its processor config, so training, chat, eval and export agree):

* ``llm`` (models llavakit builds): the rendered text is tokenized the way the base LLM's tokenizer
  tokenizes it with its own special-token handling. A leading bos the template writes is left to the
  tokenizer (``add_special_tokens=True``), so the first word keeps its word-start marker (``▁A``,
  not ``A``, for a SentencePiece Llama tokenizer with ``legacy=False``); later pieces are mid-text.
* ``llava`` (imported original-LLaVA checkpoints): as LLaVA's ``tokenizer_image_token`` — the text
  between images is cut into chunks and each chunk is tokenized as a text of its own (so it gets the
  tokenizer's word-start marker again after every image), with the bos of the first chunk only.
* ``text`` (llavakit checkpoints saved before the field existed): bos is part of the text and
  everything is tokenized with ``add_special_tokens=False``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .conversation import IMAGE_MARKER, Conversation, SampleError, Turn
from .specials import mark_plain, plain_ids, split_marked
from .templates import Template, TemplateError
from .text_ids import text_ids
from .video import VIDEO_MARKER

IGNORE_INDEX = -100
OVERFLOW_POLICIES = ("truncate", "drop")
TOKENIZATIONS = ("llm", "llava", "text")  # see the module docstring
LEGACY_TOKENIZATION = "text"  # what a processor config without the field was trained with


def expand_image_tokens(ids: Sequence[int], image_token_id: int, counts: int | Sequence[int],
                        labels: Sequence[int] | None = None):
    """Replace image k's single ``image_token_id`` by ``counts[k]`` copies (an int: the same count for
    every image). With `labels`, returns ``(ids, labels)``, the copies unsupervised.

    The one expansion of the project: the processor and `tokenize_segments` both use it."""
    ids = list(ids)
    labels = list(labels) if labels is not None else None
    where = [j for j, t in enumerate(ids) if t == image_token_id]  # found in one pass, then copied by slices
    if not isinstance(counts, int) and len(where) > len(counts):
        raise ValueError(f"the text has more than {len(counts)} image placeholder(s) but "
                         f"{len(counts)} image token count(s) were given")
    out: list[int] = []
    out_labels: list[int] = []
    last = 0
    for k, j in enumerate(where):
        n = counts if isinstance(counts, int) else counts[k]
        out += ids[last:j]
        out += [image_token_id] * n
        if labels is not None:
            out_labels += labels[last:j]
            out_labels += [IGNORE_INDEX] * n
        last = j + 1
    out += ids[last:]
    if labels is not None:
        out_labels += labels[last:]
    return (out, out_labels) if labels is not None else out


@dataclass
class EncodedSample:
    input_ids: list[int]  # [L], image k expanded to image_tokens[k] placeholder ids
    labels: list[int]  # [L], IGNORE_INDEX where not supervised
    num_images: int  # images that survive (the first `num_images` of conv.images)
    truncated: bool  # whether trailing rounds were removed to fit max_length
    num_videos: int = 0  # videos that survive (the first `num_videos` of conv.videos)

    def __len__(self) -> int:
        return len(self.input_ids)


class OverlongError(SampleError):
    """A sample longer than max_length that the length policy removes (dropped, not skipped)."""


def _anchor(tokenizer) -> tuple[str, int] | None:
    """A special token to tokenize mid-text pieces behind (see the module docstring).

    It must not swallow the whitespace after it (``rstrip``), or a reply's leading space would vanish.
    Kept on the tokenizer (per vocabulary size: adding tokens looks again), as `added_special_ids` does."""
    size = len(tokenizer)
    cached = getattr(tokenizer, "_llavakit_anchor", None)
    if cached is not None and cached[0] == size:
        return cached[1]
    found = _find_anchor(tokenizer)
    try:
        tokenizer._llavakit_anchor = (size, found)
    except AttributeError:  # pragma: no cover - slotted tokenizer objects
        pass
    return found


def _find_anchor(tokenizer) -> tuple[str, int] | None:
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    for text in (tokenizer.eos_token, tokenizer.bos_token, tokenizer.pad_token, tokenizer.unk_token):
        if not text:
            continue
        tid = tokenizer.convert_tokens_to_ids(text)
        info = added.get(tid)
        if tid is None or info is None or getattr(info, "rstrip", False):
            continue
        return text, tid
    return None


def _runs(segments) -> list[tuple[str, bool]]:
    """Merge neighbouring segments with the same supervision flag."""
    runs: list[list] = []
    for text, sup in segments:
        if runs and runs[-1][1] == sup:
            runs[-1][0] += text
        else:
            runs.append([text, sup])
    return [(t, s) for t, s in runs]


def check_tokenization(mode: str) -> str:
    if mode not in TOKENIZATIONS:
        raise ValueError(f"tokenization={mode!r} is not one of {list(TOKENIZATIONS)}")
    return mode


def added_special_ids(tokenizer) -> tuple[list[int], list[int]]:
    """(prefix, suffix): the ids ``add_special_tokens=True`` puts before and after a text."""
    cache = getattr(tokenizer, "_llavakit_added_special_ids", None)
    if cache is not None:
        return cache
    with_sp = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    n = len(plain)
    found = next((i for i in range(len(with_sp) - n + 1) if with_sp[i:i + n] == plain), None)
    if found is None:  # the text itself tokenizes differently: trust only a leading bos
        bos = tokenizer.bos_token_id
        found = 1 if bos is not None and with_sp[:1] == [bos] else 0
        n = len(with_sp) - found
    out = (list(with_sp[:found]), list(with_sp[found + n:]))
    try:
        tokenizer._llavakit_added_special_ids = out
    except AttributeError:  # pragma: no cover - slotted tokenizer objects
        pass
    return out


def tokenize_as_text_start(text: str, tokenizer, keep_prefix: bool = True) -> list[int]:
    """`text` tokenized as a text of its own, with the tokenizer's own special-token handling.

    A leading bos written into `text` is left to the tokenizer (it adds its own); the tokenizer's
    suffix (an eos some tokenizers append) is dropped; `keep_prefix=False` drops its prefix too."""
    prefix, suffix = added_special_ids(tokenizer)
    bos = tokenizer.bos_token
    if prefix and bos and text.startswith(bos):
        text = text[len(bos):]
    ids = list(text_ids(tokenizer, [text], add_special_tokens=True)[0])
    if prefix and ids[:len(prefix)] == prefix and not keep_prefix:
        ids = ids[len(prefix):]
    if suffix and ids[len(ids) - len(suffix):] == suffix:
        ids = ids[:len(ids) - len(suffix)]
    return ids


def tokenize_segments(segments, tokenizer, image_token_id: int, image_tokens: int | Sequence[int],
                      tokenization: str = "llm", sentinels: tuple[str, str] | None = None) -> tuple[list[int], list[int]]:
    """Segments -> (input_ids, labels), one tokenizer call for the mid-text pieces of the sample.

    `sentinels`: from `llavakit.data.specials.mark_plain`; the text between them is tokenized as plain text."""
    check_tokenization(tokenization)
    pieces: list[tuple[str | None, bool, bool]] = []  # (text, supervised, plain); text None = one image
    for text, sup in _runs(segments):
        for j, part in enumerate(text.split(IMAGE_MARKER)):
            if j:
                pieces.append((None, False, False))
            pieces += [(x, sup, plain) for x, plain in split_marked(part, sentinels) if x]
    # Under llm/llava the tokenizer adds its own prefix (bos): a bos the template wrote is taken off
    # the text, so what follows is tokenized as the start of a text (its word-start marker kept).
    prefix: list[int] = []
    if tokenization != "text":
        add, _ = added_special_ids(tokenizer)
        bos = tokenizer.bos_token
        wrote_bos = (bool(bos) and bool(pieces) and pieces[0][0] is not None and not pieces[0][2]
                     and pieces[0][0].startswith(bos))
        if add and (wrote_bos or tokenization == "llava"):  # LLaVA's first chunk always had its bos
            prefix = add
            if wrote_bos:
                rest = pieces[0][0][len(bos):]
                pieces = ([(rest, pieces[0][1], False)] if rest else []) + pieces[1:]

    def starts_text(k: int) -> bool:
        """Whether piece k is tokenized as the start of a text (see the module docstring)."""
        if tokenization == "llava":
            return k == 0 or pieces[k - 1][0] is None
        return tokenization == "llm" and k == 0 and bool(prefix)

    anchor = _anchor(tokenizer)
    texts, where = [], []
    by_piece: dict[int, list[int]] = {}
    for k, (part, _, plain) in enumerate(pieces):
        if part is None:
            continue
        if plain:
            by_piece[k] = plain_ids(part, tokenizer, anchor if k > 0 and not starts_text(k) else None)
            continue
        if starts_text(k):
            by_piece[k] = tokenize_as_text_start(part, tokenizer, keep_prefix=False)
            continue
        lead = anchor is not None and k > 0
        texts.append(anchor[0] + part if lead else part)
        where.append((k, lead))
    tokenized = text_ids(tokenizer, texts, add_special_tokens=False) if texts else []
    for (k, lead), ids in zip(where, tokenized):
        if lead:
            if not ids or ids[0] != anchor[1]:
                raise ValueError(f"tokenizing behind the anchor {anchor[0]!r} did not start with its id; this "
                                 "tokenizer splits special tokens differently and is not supported")
            ids = ids[1:]
        by_piece[k] = list(ids)
    input_ids: list[int] = []
    labels: list[int] = []
    for k, (part, sup, _) in enumerate(pieces):
        if part is None:
            input_ids.append(image_token_id)
            labels.append(IGNORE_INDEX)
            continue
        ids = by_piece[k]
        input_ids += ids
        labels += [t if sup and t != image_token_id else IGNORE_INDEX for t in ids]
    return expand_image_tokens(prefix + input_ids, image_token_id, image_tokens,
                               [IGNORE_INDEX] * len(prefix) + labels)


def _rounds(turns: list[Turn]) -> list[int]:
    """Cut points: number of turns kept when keeping the first k rounds, k = 1, 2, ...

    A round ends with an assistant turn; trailing non-assistant turns belong to no round."""
    return [i + 1 for i, t in enumerate(turns) if t.role == "assistant"]


def expand_video_tokens(ids: list[int], labels: list[int], video_token_id: int | None, video_tokens: Sequence[int],
                        expected: int) -> tuple[list[int], list[int]]:
    """Video k's single ``video_token_id`` (the tokenizer's ``<video>``) -> ``video_tokens[k]`` unsupervised copies;
    `expected` is the number of ``<video>`` markers of the text (an error if the tokenizer made another count)."""
    if video_token_id is None:
        return ids, labels
    found = sum(1 for t in ids if t == video_token_id)
    if found != expected:
        raise ValueError(f"the text has {expected} {VIDEO_MARKER} marker(s) but the tokenizer made {found} "
                         f"{VIDEO_MARKER} token(s); the tokenizer must have {VIDEO_MARKER} as one added token")
    return expand_image_tokens(ids, video_token_id, list(video_tokens), labels)


def check_videos(conv: Conversation, video_token_id: int | None) -> None:
    """`SampleError` for a sample with videos on a model without a video token, or with markers != videos."""
    if conv.videos and video_token_id is None:
        raise SampleError.of(conv, f"video unsupported: the sample has {len(conv.videos)} video(s) but this model "
                             f"takes no videos (no {VIDEO_MARKER} token)",
                             "train an image_tokens: anyres_max model (llavakit.build adds its <video> token), or "
                             "drop the sample")
    markers = conv.num_video_markers() if video_token_id is not None else 0
    if markers != len(conv.videos):
        raise SampleError.of(conv, f"video count mismatch: {markers} {VIDEO_MARKER} marker(s) but "
                             f"{len(conv.videos)} video(s)",
                             f"put exactly one {VIDEO_MARKER} where each video belongs (run `llavakit data check`)")


def encode(conv: Conversation, template: Template, tokenizer, image_token_id: int,
           image_tokens: int | Sequence[int], max_length: int | None = None, overflow: str = "truncate",
           tokenization: str = "llm", video_token_id: int | None = None,
           video_tokens: Sequence[int] = ()) -> EncodedSample:
    """One conversation -> `EncodedSample`; raises `SampleError` for a sample not to train on. ``video_tokens``:
    one placeholder count per video of ``conv.videos`` (models with a ``video_token_id``)."""
    if overflow not in OVERFLOW_POLICIES:
        raise ValueError(f"overflow={overflow!r} is not one of {list(OVERFLOW_POLICIES)}")
    markers = conv.num_markers()
    if markers != len(conv.images):
        raise SampleError.of(conv, f"{markers} {IMAGE_MARKER} marker(s) but {len(conv.images)} image(s)",
                             f"put exactly one {IMAGE_MARKER} where each image belongs (run `llavakit data check`)")
    check_videos(conv, video_token_id)

    def run(turns: list[Turn]) -> tuple[list[int], list[int]]:
        turns, sentinels = mark_plain(turns, tokenizer)
        try:
            segs = template.segments(turns)
        except TemplateError as e:
            raise SampleError.of(conv, f"template {template.name!r} cannot render it: {e}",
                                 "fix the turn roles or choose another template") from e
        got = tokenize_segments(segs, tokenizer, image_token_id, image_tokens, tokenization, sentinels)
        n_videos = sum(t.content.count(VIDEO_MARKER) for t in turns) if video_token_id is not None else 0
        return expand_video_tokens(*got, video_token_id, video_tokens, n_videos)

    ids, labels = run(conv.turns)
    if labels.count(IGNORE_INDEX) == len(labels):
        raise SampleError.of(conv, "no supervised token: the conversation has no assistant reply to learn",
                             "add an assistant turn or remove the sample")
    truncated = False
    kept_turns = conv.turns
    if max_length is not None and len(ids) > max_length:
        if overflow == "drop":
            raise OverlongError.of(conv, f"{len(ids)} tokens > max_length {max_length} (overflow='drop')",
                                   "raise max_length or use overflow='truncate'")
        # Keep the most leading rounds that fit; length grows with every round, so bisect.
        cuts = [c for c in _rounds(conv.turns) if c < len(conv.turns)]
        lo, hi, best = 0, len(cuts) - 1, None
        while lo <= hi:
            mid = (lo + hi) // 2
            got = run(conv.turns[:cuts[mid]])
            if len(got[0]) <= max_length:
                best, lo = (cuts[mid], got), mid + 1
            else:
                hi = mid - 1
        if best is None:
            first = len(run(conv.turns[:cuts[0]])[0]) if cuts else len(ids)
            raise OverlongError.of(
                conv, f"even its first round is {first} tokens > max_length {max_length}; it cannot be cut "
                      "at a turn boundary", "raise max_length, or shorten the first exchange")
        kept_turns, (ids, labels), truncated = conv.turns[:best[0]], best[1], True
    n_images = sum(t.content.count(IMAGE_MARKER) for t in kept_turns)
    n_videos = sum(t.content.count(VIDEO_MARKER) for t in kept_turns) if video_token_id is not None else 0
    return EncodedSample(ids, labels, n_images, truncated, n_videos)


def encode_prompt(turns: list[Turn], template: Template, tokenizer, image_token_id: int,
                  image_tokens: int | Sequence[int], tokenization: str = "llm", video_token_id: int | None = None,
                  video_tokens: Sequence[int] = ()) -> list[int]:
    """Ids of `template.render_prompt(turns)`, tokenized exactly as training tokenized that text (``<video>``
    markers expanded to ``video_tokens`` when the model has a ``video_token_id``)."""
    n_videos = sum(t.content.count(VIDEO_MARKER) for t in turns) if video_token_id is not None else 0
    turns, sentinels = mark_plain(turns, tokenizer)
    segs = template.segments(turns, add_generation_prompt=True)
    got = tokenize_segments(segs, tokenizer, image_token_id, image_tokens, tokenization, sentinels)
    return expand_video_tokens(*got, video_token_id, video_tokens, n_videos)[0]
