"""The tokenizer of a llavakit LLM as llama.cpp GGUF keys (``tokenizer.ggml.*``).

Two kinds are exported, chosen from the tokenizer's ``tokenizer.json`` (the fast tokenizer llavakit
trains with):

* byte-level BPE (GPT-2 / Llama-3 / Qwen2) -> ``tokenizer.ggml.model = "gpt2"``: tokens, merges, the
  pre-tokenizer's name (``pre``).
* SentencePiece BPE (Llama-2, Vicuna, Mistral-v0.1: ``"▁"`` for spaces, byte fallback) ->
  ``"llama"`` (llama.cpp's SPM tokenizer): tokens, **scores** and token types. llama.cpp merges the
  adjacent pair whose concatenation is a token with the highest score, leftmost first, so the scores
  have to order the merges exactly as the Hugging Face tokenizer's merge list does. They come from the
  SentencePiece model (``tokenizer.model``) when the tokenizer was loaded from one and its pieces and
  scores agree with ``tokenizer.json``; otherwise (a checkpoint saved by transformers 5 has only
  ``tokenizer.json``) they are derived from the merge list: the k-th distinct token the merges produce
  scores ``-k``, the other normal tokens follow in id order (what SentencePiece's own scores look like).

Token types: SentencePiece's own (normal / unknown / control / byte / unused); added tokens
(``<image>``, ``<pad>``) ``control`` when special, else ``user_defined``; embedding rows without a
token ``[PAD<i>]`` ``unused``. Refused, with the reason: no byte fallback (llama.cpp has no fallback
for a character outside the vocabulary), a normalizer or pre-tokenizer llama.cpp does not run, a merge
list llama.cpp would not follow (two vocabulary tokens that form a third without a merge for them:
llama.cpp merges any such pair). Where the merges forming one token are not contiguous in the list,
every one of them gets the first one's priority, as in SentencePiece itself (logged).

Known differences of llama.cpp's SPM tokenizer (``llama-vocab.cpp``), which *always* puts ``"▁"``
before a text and before text that follows a special token (`spm_prompt_warnings` tells at export):
a text that starts with a space gets ``"▁▁"`` (the fast tokenizer adds no second one; transformers 4's
slow tokenizer and the sentencepiece library do), and a ``legacy=False`` tokenizer puts no ``"▁"``
after a special token where llama.cpp does.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SPIECE = "\u2581"
_BYTE = re.compile(r"<0x[0-9A-F]{2}>")
ADDED_SCORE = -1000.0  # llama.cpp's converters give added tokens and padding rows this score

# Split regexes of byte-level BPE pre-tokenizers -> llama.cpp's tokenizer.ggml.pre
_GPT2_REGEX = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_KNOWN_SPLITS = {
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""":
        "qwen2",
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""":
        "llama-bpe",
}


def tokenizer_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise ValueError(f"{type(tokenizer).__name__} is not a fast (tokenizers-backed) tokenizer; GGUF export "
                         "needs its tokenizer.json")
    return json.loads(backend.to_str())


def _items(part: dict | None) -> list[dict]:
    if not part:
        return []
    return list(part.get("pretokenizers") or part.get("normalizers") or []) if part.get("type") == "Sequence" \
        else [part]


def _is_sentencepiece(tj: dict) -> bool:
    """A BPE model whose spaces are ``"▁"`` (a Metaspace pre-tokenizer or a Replace normalizer)."""
    if (tj.get("model") or {}).get("type") != "BPE":
        return False
    if any(p.get("type") == "Metaspace" for p in _items(tj.get("pre_tokenizer"))):
        return True
    return any(n.get("type") == "Replace" and n.get("content") == SPIECE for n in _items(tj.get("normalizer")))


def tokenizer_kind(tokenizer) -> str:
    """``"gpt2"`` (byte-level BPE) or ``"llama"`` (SentencePiece); ValueError (naming what is supported)
    for a tokenizer llama.cpp cannot reproduce."""
    tj = tokenizer_json(tokenizer)
    if _is_sentencepiece(tj):
        _space_prefix(tj)
        _merge_scores(tj["model"], {a["content"] for a in tj.get("added_tokens", [])})
        return "llama"
    model_type = (tj.get("model") or {}).get("type")
    if model_type != "BPE":
        raise ValueError(f"tokenizer model {model_type!r}: GGUF export supports byte-level BPE and SentencePiece "
                         "BPE (Llama / Vicuna) tokenizers")
    _pre_type(tj)
    return "gpt2"


# --- byte-level BPE ("gpt2") ---------------------------------------------------------------------------
def _pre_type(tj: dict) -> str:
    """llama.cpp's tokenizer.ggml.pre for a byte-level BPE tokenizer.json, from its pre-tokenizer."""
    pre = tj.get("pre_tokenizer") or {}
    items = _items(pre)
    splits = [p for p in items if p.get("type") == "Split"]
    byte_level = [p for p in items if p.get("type") == "ByteLevel"]
    if not byte_level:
        raise ValueError("the tokenizer is neither byte-level BPE (no ByteLevel pre-tokenizer) nor SentencePiece "
                         "BPE; GGUF export supports GPT-2 / Llama-3 / Qwen2 style and Llama / Vicuna tokenizers")
    if not splits and byte_level[0].get("use_regex", True):
        return "gpt-2"
    if len(splits) == 1:
        pattern = splits[0].get("pattern", {})
        regex = pattern.get("Regex") or pattern.get("String")
        if regex == _GPT2_REGEX:
            return "gpt-2"
        if regex in _KNOWN_SPLITS:
            return _KNOWN_SPLITS[regex]
    raise ValueError("the tokenizer's pre-tokenizer is not one llavakit can name for llama.cpp (known: GPT-2, "
                     f"Llama-3 and Qwen2 split regexes); got {json.dumps(pre)[:300]}")


def _full_vocab(tj: dict) -> tuple[dict[int, str], dict[int, dict]]:
    vocab = {i: t for t, i in tj["model"]["vocab"].items()}
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    for i, a in added.items():
        vocab[i] = a["content"]
    return vocab, added


def _check_size(by_id: dict, n_vocab: int) -> None:
    if max(by_id) >= n_vocab:
        raise ValueError(f"the tokenizer has ids up to {max(by_id)} but the embeddings only {n_vocab} rows")


def _add_bpe(writer, tj: dict, n_vocab: int) -> None:
    import gguf

    pre = _pre_type(tj)
    by_id, added = _full_vocab(tj)
    _check_size(by_id, n_vocab)
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)


# --- SentencePiece BPE ("llama") -------------------------------------------------------------------------
def _space_prefix(tj: dict) -> bool:
    """tokenizer.ggml.add_space_prefix for a SentencePiece tokenizer.json; ValueError where llama.cpp's SPM
    tokenizer (no normalization, no word split, ``"▁"`` for every space) would tokenize differently."""
    model = tj["model"]
    if not model.get("byte_fallback"):
        raise ValueError("SentencePiece tokenizer without byte fallback: llama.cpp has no fallback for characters "
                         "outside its vocabulary (GGUF export supports Llama / Vicuna tokenizers, byte_fallback=True)")
    pres, norms = _items(tj.get("pre_tokenizer")), _items(tj.get("normalizer"))
    if pres:  # transformers 5: Metaspace, no normalizer
        meta = pres[0]
        if len(pres) > 1 or norms or meta.get("type") != "Metaspace" or meta.get("replacement") != SPIECE \
                or meta.get("split", False):
            raise ValueError("SentencePiece tokenizer with a pre-tokenizer/normalizer llama.cpp does not run "
                             "(supported: Metaspace '▁', split=False, no normalizer); got "
                             f"{json.dumps(tj.get('pre_tokenizer'))[:200]} / {json.dumps(tj.get('normalizer'))[:200]}")
        return meta.get("prepend_scheme", "always") != "never"
    kinds = [n.get("type") for n in norms]  # transformers 4's Llama tokenizer.json: Prepend("▁"), Replace(" ", "▁")
    replace_ok = any(n.get("type") == "Replace" and n.get("pattern", {}).get("String") == " "
                     and n.get("content") == SPIECE for n in norms)
    prepend = [n for n in norms if n.get("type") == "Prepend"]
    if not replace_ok or set(kinds) - {"Prepend", "Replace"} or any(p.get("prepend") != SPIECE for p in prepend):
        raise ValueError(f"SentencePiece tokenizer with a normalizer llama.cpp does not run: {json.dumps(norms)[:300]}")
    return bool(prepend)


def _merge_pairs(model: dict) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in model.get("merges", [])]


def _merge_scores(model: dict, added: set[str]) -> dict[str, float]:
    """token -> score that makes llama.cpp's highest-score-first merging follow the merge list's ranks
    (merge results only); ValueError where no per-token scores can."""
    vocab = model["vocab"]
    missing = [b for b in range(256) if f"<0x{b:02X}>" not in vocab]
    if missing:
        raise ValueError(f"SentencePiece tokenizer lacks {len(missing)} byte-fallback tokens "
                         f"(e.g. <0x{missing[0]:02X}>)")
    pairs = _merge_pairs(model)
    scores: dict[str, float] = {}
    last, scattered = None, 0
    for a, b in pairs:
        t = a + b
        if t not in vocab:
            raise ValueError(f"merge {a!r} + {b!r} gives {t!r}, which is not in the vocabulary")
        scattered += t in scores and t != last
        scores.setdefault(t, -float(len(scores)))  # a token's first merge sets its priority
        last = t
    if scattered:
        log.info("%d merges come after other tokens' merges although their token was formed earlier; llama.cpp "
                 "(like SentencePiece) gives every merge of a token the first one's priority", scattered)
    normal = {t for t in vocab if t not in added and not _BYTE.fullmatch(t)}
    known = set(pairs)
    for t in normal:
        for k in range(1, len(t)):
            if t[:k] in normal and t[k:] in normal and (t[:k], t[k:]) not in known:
                raise ValueError(f"{t[:k]!r} + {t[k:]!r} form the token {t!r} but the merge list has no such merge: "
                                 "llama.cpp would merge them, the tokenizer does not")
    return scores


@dataclass
class SpmVocab:
    tokens: list[str]
    scores: list[float]
    types: list[int]
    add_space_prefix: bool
    source: str  # "tokenizer.model" or "tokenizer.json"


def _sp_proto(tokenizer):
    """The tokenizer's SentencePiece model (``tokenizer.model``) if it was loaded from one, else None."""
    path = getattr(tokenizer, "vocab_file", None) or (getattr(tokenizer, "init_kwargs", None) or {}).get("vocab_file")
    if not path or not Path(path).is_file():
        return None
    from google.protobuf.message import DecodeError
    from sentencepiece import sentencepiece_model_pb2 as pb

    try:
        return pb.ModelProto.FromString(Path(path).read_bytes())
    except DecodeError:  # not a SentencePiece model
        return None


def spm_vocab(tokenizer, n_vocab: int) -> SpmVocab:
    """Tokens, scores and types for llama.cpp's SPM tokenizer (see the module docstring). Types are the
    Hugging Face tokenizer's view (what llavakit trained with); `tokenizer.model` only supplies scores."""
    import gguf

    tj = tokenizer_json(tokenizer)
    prefix = _space_prefix(tj)
    by_id, added = _full_vocab(tj)
    _check_size(by_id, n_vocab)
    base = tj["model"]["vocab"]
    merge_scores = _merge_scores(tj["model"], {a["content"] for a in added.values()})
    unk = tj["model"].get("unk_token") or tokenizer.unk_token
    rest = -float(len(merge_scores))
    tokens, scores, types = [], [], []
    for i in range(n_vocab):
        t = by_id.get(i)
        score = 0.0
        if t is None:
            t, kind, score = f"[PAD{i}]", gguf.TokenType.UNUSED, ADDED_SCORE
        elif t == unk:
            kind = gguf.TokenType.UNKNOWN
        elif i in added:
            kind = gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED
            score = 0.0 if t in base else ADDED_SCORE
        elif _BYTE.fullmatch(t):
            kind = gguf.TokenType.BYTE
        else:
            kind = gguf.TokenType.NORMAL
            if t not in merge_scores:  # single characters (and pieces no merge forms), in id order
                merge_scores[t] = rest
                rest -= 1.0
            score = merge_scores[t]
        tokens.append(t)
        scores.append(score)
        types.append(int(kind))
    vocab = SpmVocab(tokens, scores, types, prefix, "tokenizer.json")
    proto = _sp_proto(tokenizer)
    if proto is not None and _proto_agrees(proto, vocab, tj):
        vocab.scores[:len(proto.pieces)] = [float(p.score) for p in proto.pieces]
        vocab.source = "tokenizer.model"
    return vocab


def _proto_agrees(proto, vocab: SpmVocab, tj: dict) -> bool:
    """The SentencePiece model has the same pieces at the same ids, and its scores order the merges as the
    merge list does (else tokenizer.json, which the model was trained with, wins)."""
    if len(proto.pieces) > len(vocab.tokens) or proto.trainer_spec.model_type != proto.trainer_spec.BPE:
        return False
    if any(p.piece != vocab.tokens[i] for i, p in enumerate(proto.pieces)):
        return False
    score = {p.piece: p.score for p in proto.pieces}
    groups = list(dict.fromkeys(a + b for a, b in _merge_pairs(tj["model"])))
    return all(score[x] > score[y] for x, y in itertools.pairwise(groups))


def _add_spm(writer, tokenizer, n_vocab: int) -> str:
    v = spm_vocab(tokenizer, n_vocab)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(v.tokens)
    writer.add_token_scores(v.scores)
    writer.add_token_types(v.types)
    writer.add_add_space_prefix(v.add_space_prefix)
    return v.source


def spm_prompt_warnings(tokenizer, image_token: str | None, tokenization: str) -> list[str]:
    """Where llama.cpp will tokenize this SentencePiece tokenizer's prompts differently (module docstring)."""
    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    out = []
    special = tokenizer.eos_token or tokenizer.bos_token
    if special and ids(special + "a") != ids(special) + ids("a"):
        where = "the turn after '</s>' in a multi-turn prompt" + (", the first word after the bos the template "
                                                                  "writes (tokenization='text')"
                                                                  if tokenization == "text" else "")
        out.append(f"llama.cpp puts '▁' before text that follows a special token; this tokenizer does not "
                   f"(legacy=False), so such text ({where}) starts with a '▁' in llama.cpp it never had in training")
    if image_token and tokenization != "llava" and \
            ids("a" + image_token + "\nb") != ids("a") + ids(image_token) + ids("\nb"):
        out.append(f"llama.cpp tokenizes the text after each {image_token} as a text of its own (with a leading "
                   f"'▁'); this model was trained with tokenization={tokenization!r} and this tokenizer adds "
                   "no '▁' there, so llama.cpp's prompt has an extra '▁' after each image (original LLaVA's "
                   "tokenization='llava' matches llama.cpp)")
    return out


# --- both ---------------------------------------------------------------------------------------------------
def add_tokenizer(writer, tokenizer, n_vocab: int, chat_template: str | None) -> str:
    """Vocabulary (padded to the embedding rows), merges or scores, token types, special ids, chat template.
    Returns what the vocabulary came from ("tokenizer.json" or "tokenizer.model")."""
    if tokenizer_kind(tokenizer) == "llama":
        source = _add_spm(writer, tokenizer, n_vocab)
        log.info("GGUF tokenizer: SentencePiece ('llama'), scores from its %s", source)
    else:
        _add_bpe(writer, tokenizer_json(tokenizer), n_vocab)
        source = "tokenizer.json"
    # Whether the tokenizer itself starts a text with bos (the Llama ones do, Qwen2 does not).
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    add_bos = tokenizer.bos_token_id is not None and bool(ids) and ids[0] == tokenizer.bos_token_id
    add_eos = tokenizer.eos_token_id is not None and len(ids) > 1 and ids[-1] == tokenizer.eos_token_id
    for key, tid in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                     ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id)):
        if tid is not None:
            getattr(writer, f"add_{key}_token_id")(int(tid))
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    if chat_template:
        writer.add_chat_template(chat_template)
    return source
