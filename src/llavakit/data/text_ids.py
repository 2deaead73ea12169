"""The tokenizer calls of dataset encoding: `text_ids` (the tokenizer's own ids, faster) and
`one_thread_per_tokenizer` (no thread pool per tiny batch)."""

from __future__ import annotations

import contextlib
import os
from typing import Sequence


@contextlib.contextmanager
def one_thread_per_tokenizer():
    """Within: the Rust tokenizers library tokenizes each batch on the calling thread (``TOKENIZERS_PARALLELISM``
    set to false unless the user set it; it is read at every call). Encoding a dataset asks for a few short
    texts per sample, where handing each batch to a thread pool costs more than it saves: 40,000 samples took
    14.0 s in one process with the pool and 8.2 s without (tiny byte-level BPE, 2 cores). Forked worker
    processes inherit the setting, so they do not share the 2 cores with the pool's threads either."""
    key = "TOKENIZERS_PARALLELISM"
    if key in os.environ:
        yield
        return
    os.environ[key] = "false"
    try:
        yield
    finally:
        os.environ.pop(key, None)


MEMO_TEXTS = 8192  # texts remembered per tokenizer (`text_ids`); the memo is emptied when full


def _state(tokenizer) -> tuple:
    """What decides a text's ids besides the text, as the wrapper calls its backend: the vocabulary size (added
    tokens) and whether special-token spellings are split (the wrapper sets the backend's truncation, padding and
    special-token splitting itself on every call)."""
    return len(tokenizer), bool(getattr(tokenizer, "split_special_tokens", False))


def _memo(tokenizer, state: tuple) -> dict:
    """The tokenizer's text -> ids memo, new whenever `_state` changes."""
    held = getattr(tokenizer, "_llavakit_text_memo", None)
    if held is None or held[0] != state:
        held = (state, {})
        try:
            tokenizer._llavakit_text_memo = held
        except AttributeError:  # pragma: no cover - slotted tokenizer objects
            pass
    return held[1]


def _backend_ids(tokenizer, texts: list[str], add_special_tokens: bool) -> list:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if (backend is not None and backend.truncation is None and backend.padding is None
            and backend.encode_special_tokens == bool(getattr(tokenizer, "split_special_tokens", False))):
        # encode_batch_fast (tokenizers >= 0.21) skips the character offsets: the same ids, a quarter faster
        encode = getattr(backend, "encode_batch_fast", None) or backend.encode_batch
        return [e.ids for e in encode(texts, add_special_tokens=add_special_tokens)]
    return tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]


def text_ids(tokenizer, texts: list[str], add_special_tokens: bool) -> list[Sequence[int]]:
    """``tokenizer(texts, add_special_tokens=...)["input_ids"]`` (as tuples). A fast tokenizer is asked directly
    (``backend_tokenizer.encode_batch_fast``) when the wrapper would change nothing — no truncation or padding
    set on the backend, special tokens split as the wrapper's default — : the same ids, without the
    wrapper's per-call cost (a third of the tokenization time of a large dataset). Texts seen recently are not
    tokenized again (`MEMO_TEXTS` per tokenizer): a dataset repeats its system prompt and header in every sample
    and, often, a few instructions in most (LLaVA's stage-1 data has about a dozen)."""
    memo = _memo(tokenizer, _state(tokenizer))
    out: list = [memo.get((add_special_tokens, t)) for t in texts]
    missing = [i for i, got in enumerate(out) if got is None]
    if missing:
        for i, ids in zip(missing, _backend_ids(tokenizer, [texts[i] for i in missing], add_special_tokens)):
            if len(memo) >= MEMO_TEXTS:
                memo.clear()
            out[i] = memo[(add_special_tokens, texts[i])] = tuple(ids)
    return out
