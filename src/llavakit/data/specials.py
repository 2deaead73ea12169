"""Special-token text in data and user input: find it, and keep it plain text when tokenizing.

A tokenizer turns the *spelling* of its special tokens (``</s>``, ``<|im_end|>``, ``<s>`` ...) into
their control ids wherever it meets it. In the template's scaffolding that is the point; in a
conversation's content it is a hazard: an answer quoting ``</s>`` would be trained as an end of
sequence in mid-reply, a user typing ``<|im_end|><|im_start|>assistant`` would forge a turn.

So content is tokenized with special-token spellings as plain text. `mark_plain` wraps every such
spelling in a turn's content between two sentinel characters (Unicode noncharacters that occur
nowhere in the conversation) before the template renders it; `llavakit.data.tokenize` then cuts
its pieces at the sentinels and tokenizes a wrapped spelling with ``split_special_tokens=True``
(`plain_ids`). Everything else is tokenized exactly as before, as though a special token stood
where the spelling is (the tokenizer always cut the text there), so data without such text gets
the same ids as ever. The ``<image>`` (and ``<video>``) marker is not a special-token spelling here: it is the image.

Limit: with the ``auto`` template (the tokenizer's own ``chat_template``) the sentinels travel
through the Jinja template with the content; a template that rewrites content characters would
drop them, and the spelling is then tokenized as the template left it (stray sentinels are removed).

`special_text_warnings` is what ``llavakit data check`` reports about such text.
"""

from __future__ import annotations

import re
from typing import Sequence

from .conversation import IMAGE_MARKER, Conversation, Turn
from .video import VIDEO_MARKER

# Spellings checked when no tokenizer is at hand (``llavakit data check`` without ``--model``).
COMMON_SPECIAL_TEXTS = (
    "<s>", "</s>", "<unk>", "<pad>", "<bos>", "<eos>", "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "<start_of_turn>", "<end_of_turn>", "[INST]", "[/INST]", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>",
)
# Sentinel candidates: the 32 noncharacters Unicode reserves for internal use, then private-use characters.
_SENTINELS = [chr(c) for c in range(0xFDD0, 0xFDF0)] + [chr(c) for c in range(0xE000, 0xF900)]


def special_texts(tokenizer) -> list[str]:
    """Spellings of the tokenizer's special tokens (not the ``<image>`` / ``<video>`` markers, not whitespace),
    longest first."""
    found = set(getattr(tokenizer, "all_special_tokens", None) or [])
    for tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(tok, "special", False):
            found.add(str(tok))
    markers = (IMAGE_MARKER, VIDEO_MARKER)
    return sorted((t for t in found if t.strip() and not any(m in t for m in markers)), key=lambda t: (-len(t), t))


def _pattern(texts: Sequence[str]) -> re.Pattern | None:
    return re.compile("|".join(re.escape(t) for t in texts)) if texts else None


def special_pattern(tokenizer) -> re.Pattern | None:
    """A regex matching any special-token spelling of `tokenizer` (cached on it; None if it has none)."""
    try:
        key = len(tokenizer)  # tokens added later (``<image>``) change the length, and so the cache key
    except TypeError:  # not a tokenizer (a stand-in in tests): nothing to cache by
        key = None
    cached = getattr(tokenizer, "_llavakit_special_pattern", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    pattern = _pattern(special_texts(tokenizer))
    try:
        tokenizer._llavakit_special_pattern = (key, pattern)
    except AttributeError:  # pragma: no cover - slotted tokenizer objects
        pass
    return pattern


# --- content marking ------------------------------------------------------------------------------
def mark_plain(turns: list[Turn], tokenizer) -> tuple[list[Turn], tuple[str, str] | None]:
    """(turns, sentinels): special-token spellings in the contents wrapped as ``open + text + close``.
    Unchanged turns and None when no content holds one (the common case costs one regex search per turn)."""
    pattern = special_pattern(tokenizer)
    if pattern is None or not any(pattern.search(t.content) for t in turns):
        return turns, None
    used = set().union(*(set(t.content) for t in turns))
    free = (c for c in _SENTINELS if c not in used)
    open_, close = next(free), next(free)
    wrapped = open_ + r"\g<0>" + close
    return [Turn(t.role, pattern.sub(wrapped, t.content)) for t in turns], (open_, close)


def split_marked(text: str, sentinels: tuple[str, str] | None) -> list[tuple[str, bool]]:
    """`text` as ``(piece, plain)`` pieces: ``plain`` for a wrapped spelling (sentinels removed)."""
    if sentinels is None:
        return [(text, False)]
    open_, close = sentinels
    out = []
    for j, part in enumerate(re.split(f"{re.escape(open_)}([^{re.escape(open_ + close)}]*){re.escape(close)}", text)):
        part = part.replace(open_, "").replace(close, "")  # a sentinel the template separated from its pair
        if part:
            out.append((part, j % 2 == 1))
    return out


def special_ids(tokenizer) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", None) or [])
    for tid, tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(tok, "special", False):
            ids.add(tid)
    return ids


def plain_ids(text: str, tokenizer, anchor: tuple[str, int] | None = None) -> list[int]:
    """`text` (a special-token spelling) tokenized as plain text, as the middle of a text when an
    `anchor` special token is given (its own plain pieces are then taken off), else as a text's start."""
    def split(t: str) -> list[int]:
        return list(tokenizer(t, add_special_tokens=False, split_special_tokens=True)["input_ids"])

    ids = None
    if anchor is not None:
        lead, whole = split(anchor[0]), split(anchor[0] + text)
        if whole[:len(lead)] == lead and len(whole) > len(lead):
            ids = whole[len(lead):]
    if ids is None:
        ids = split(text)
    control = special_ids(tokenizer)
    if any(i in control for i in ids):  # a tokenizer that ignores split_special_tokens: one character at a time
        ids = [i for ch in text for i in split(ch)]
    return ids


# --- what `llavakit data check` says ---------------------------------------------------------------
def find_special_text(text: str, tokenizer=None) -> list[str]:
    """The special-token spellings in `text`, in order of first appearance (the tokenizer's, or
    `COMMON_SPECIAL_TEXTS` without one)."""
    pattern = special_pattern(tokenizer) if tokenizer is not None else _COMMON
    return list(dict.fromkeys(pattern.findall(text))) if pattern is not None else []


def special_text_warnings(conv: Conversation, tokenizer=None) -> list[tuple[str, str, str]]:
    """(severity, reason, hint): one warning naming the turns and spellings, if the sample has any."""
    where = []
    for k, turn in enumerate(conv.turns):
        if isinstance(turn.content, str):
            found = find_special_text(turn.content, tokenizer)
            if found:
                where.append(f"turn {k} ({turn.role}) contains {', '.join(repr(t) for t in found)}")
    if not where:
        return []
    whose = "the tokenizer's special tokens" if tokenizer is not None else "common special tokens"
    hint = ("it is trained as plain text, never as the control token; if it is left over from a rendered chat "
            "template (a reply ending in '</s>'), remove it")
    return [("warning", f"special-token text: {'; '.join(where)} (spelled like {whose})", hint)]


_COMMON = _pattern(sorted(COMMON_SPECIAL_TEXTS, key=lambda t: (-len(t), t)))
