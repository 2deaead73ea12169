"""A tiny SentencePiece Llama tokenizer (Vicuna / LLaVA-1.5 style), written as a Hugging Face folder.

Real LLaVA-1.5 checkpoints ship Vicuna-v1.5's tokenizer: a SentencePiece BPE model (``tokenizer.model``,
byte fallback, no normalisation, a ``"▁"`` dummy prefix at the start of the text) plus a
``tokenizer_config.json`` naming ``LlamaTokenizer``, and no ``tokenizer.json``. The byte-level BPE
tokenizers of ``llavakit.demo.tiny`` behave differently around special tokens and word starts, so
tests of tokenization parity with the original LLaVA code use this one instead.

    make_sp_llama_tokenizer(out_dir, legacy=False)    train (deterministic, ~10 ms), write, load back
    slow_llama_ids(out_dir, text, legacy)             what transformers 4.x's *slow* LlamaTokenizer
                                                      (LLaVA used use_fast=False) gives for `text`

Observed with transformers 5.x (which loads ``tokenizer.model`` into its tokenizers-backed
``LlamaTokenizer``: Metaspace pre-tokenizer, ``prepend_scheme="first"`` for ``legacy=False``,
``"always"`` for ``legacy=True``):

    text                  legacy=False                          legacy=True
    "A chat"              <s> ▁A ▁c hat                         <s> ▁A ▁c hat
    "<s>A chat"           <s> <s> A ▁c hat                      <s> <s> ▁A ▁c hat
    "\nWhat"              <s> ▁ <0x0A> W hat                    <s> ▁ <0x0A> W hat
    "a</s>USER:"          <s> ▁a </s> US ER :                   <s> ▁a </s> ▁USER :

i.e. with ``legacy=False`` (Vicuna-v1.5, llava-v1.5-*) text right after a special token gets no
``"▁"``, while every separately tokenized string starts with one; ``legacy=True`` adds it after
special tokens too. Both agree with the slow tokenizer (`slow_llama_ids`) on these strings. They do
*not* agree on a string that starts with a space: slow encodes " then" as ``▁ ▁the n`` (dummy prefix +
the space), the fast tokenizer as ``▁the n`` (Metaspace does not prepend to text already starting with
``"▁"``).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

# Vicuna's system prompt, LLaVA-1.5's roles and a few captions/questions: enough for real word pieces.
CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions.",
    "USER: What is shown? ASSISTANT: A red circle and a blue square on a white background.",
    "USER: What is in the image? ASSISTANT: There is a cat sitting on a chair next to the window.",
    "USER: What differs between the two images? ASSISTANT: The first image is brighter than the second.",
    "USER: And the colour? ASSISTANT: The circle is red, the square is blue and the triangle is green.",
    "Describe the picture in detail, please! How many triangles are there? Three. One, two, three.",
    "Which image has more circles, the first or the second? The quick brown fox jumps over the lazy dog.",
    "Answer the question using a single word or phrase. Yes. No. Left. Right. Top. Bottom.",
]

TRAINER_OPTIONS = dict(
    # Llama-2's SentencePiece trainer spec, scaled down
    model_type="bpe", character_coverage=1.0, byte_fallback=True, split_digits=True,
    allow_whitespace_only_pieces=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
    add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
    # small and deterministic
    num_threads=1, hard_vocab_limit=False, minloglevel=2,
)

_MODELS: dict[int, bytes] = {}  # vocab_size -> trained model (training is deterministic)


def train_sp_model(vocab_size: int = 512) -> bytes:
    """The serialized SentencePiece BPE model (Llama-2 options, byte fallback: 259 fixed pieces)."""
    if vocab_size not in _MODELS:
        import sentencepiece as spm

        out = io.BytesIO()
        spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 4), model_writer=out,
                                       vocab_size=vocab_size, **TRAINER_OPTIONS)
        _MODELS[vocab_size] = out.getvalue()
    return _MODELS[vocab_size]


def make_sp_llama_tokenizer(out_dir, legacy: bool = False, vocab_size: int = 512, **config):
    """Write ``tokenizer.model`` + ``tokenizer_config.json`` (as Vicuna-v1.5 ships them) to `out_dir` and
    return ``AutoTokenizer.from_pretrained(out_dir)``.

    `config` adds or overrides tokenizer_config.json fields, e.g. ``pad_token="<unk>"`` as LLaVA's
    finetuned checkpoints save it."""
    from transformers import AutoTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(train_sp_model(vocab_size))
    cfg = {
        "tokenizer_class": "LlamaTokenizer", "legacy": legacy, "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
        "clean_up_tokenization_spaces": False, "model_max_length": 2048, "padding_side": "right",
        "sp_model_kwargs": {},
    }
    cfg.update(config)
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    return AutoTokenizer.from_pretrained(out)


# --- the slow tokenizer LLaVA used, for reference -------------------------------------------------------
SPECIALS = ("<unk>", "<s>", "</s>")
_SPIECE = "▁"


def _processors(model_file: Path):
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    data = Path(model_file).read_bytes()
    with_prefix = spm.SentencePieceProcessor(model_proto=data)
    proto = pb.ModelProto.FromString(data)
    proto.normalizer_spec.add_dummy_prefix = False
    no_prefix = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    return with_prefix, no_prefix


def _split_specials(text: str) -> list[str]:
    """Text -> pieces, each special token a piece of its own (the slow tokenizer's trie split)."""
    out, i, start = [], 0, 0
    while i < len(text):
        hit = next((s for s in SPECIALS if text.startswith(s, i)), None)
        if hit:
            out += [text[start:i], hit]
            i += len(hit)
            start = i
        else:
            i += 1
    out.append(text[start:])
    return [p for p in out if p]


def slow_llama_ids(out_dir, text: str, legacy: bool, add_bos: bool = True) -> list[int]:
    """transformers 4.x ``LlamaTokenizer`` (the sentencepiece one) ``(text).input_ids``, re-implemented on the
    sentencepiece library: special tokens split out; legacy=True: each other piece encoded with the
    dummy prefix; legacy=False: "▁" put before the whole text only (pieces after a special token get none)."""
    with_prefix, no_prefix = _processors(Path(out_dir) / "tokenizer.model")
    ids: list[int] = []
    if legacy:
        for part in _split_specials(text):
            ids += [with_prefix.piece_to_id(part)] if part in SPECIALS else with_prefix.encode(part)
    elif text:
        parts = _split_specials(_SPIECE + text.replace(_SPIECE, " "))
        if len(parts) > 1 and parts[0] == _SPIECE and parts[1] in SPECIALS:
            parts = parts[1:]
        unk_len = len(no_prefix.encode("<unk>"))
        for part in parts:
            if part in SPECIALS:
                ids.append(no_prefix.piece_to_id(part))
            elif part.startswith((_SPIECE, " ")):
                ids += no_prefix.encode("<unk>" + part)[unk_len:]
            else:
                ids += no_prefix.encode(part)
    return ([with_prefix.bos_id()] if add_bos else []) + ids
