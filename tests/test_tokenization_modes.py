"""The tokenization contract, per mode, against independent references.

* ``llm``: the ids are what the LLM's own tokenizer gives for the rendered conversation as one string
  with its own special-token handling (``tokenizer(text_without_leading_bos)``, bos added by it);
* ``llava``: what original LLaVA's ``tokenizer_image_token`` gives (chunks between images tokenized
  on their own, the first chunk's bos only), written here from its documented algorithm;
* ``text``: the pre-contract behaviour old checkpoints were trained with
  (``tokenizer(rendered_text, add_special_tokens=False)``).

Under every mode the labels are exactly the assistant replies (and their end-of-turn token): a
token is supervised iff the text it covers lies inside a reply span of the rendered conversation.
Tokenizers: llavakit's byte-level demo tokenizer and SentencePiece Llama tokenizers (Vicuna's kind)
with ``legacy`` True and False, trained in the test with the ``sentencepiece`` trainer.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from PIL import Image
from hypothesis import strategies as st

from llavakit.data.conversation import IMAGE_MARKER, Conversation, Turn
from llavakit.data.templates import get_template
from llavakit.data.tokenize import IGNORE_INDEX, TOKENIZATIONS, encode, encode_prompt
from llavakit.demo.tiny import make_tokenizer

from sptok import make_sp_llama_tokenizer

SEQ = 3


def _with_image_token(tok):
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_MARKER]})
    if tok.pad_token is None:
        tok.add_special_tokens({"pad_token": "<pad>"})
    return tok


@pytest.fixture(scope="module", params=["bytelevel", "sp_legacy_false", "sp_legacy_true"])
def tok(request, tmp_path_factory):
    if request.param == "bytelevel":
        return _with_image_token(make_tokenizer(family="llama"))
    legacy = request.param == "sp_legacy_true"
    return _with_image_token(make_sp_llama_tokenizer(tmp_path_factory.mktemp(request.param), legacy=legacy))


# Words the SentencePiece corpus knows plus odd characters (byte fallback); no leading spaces inside a
# chunk start, where the fast and slow SentencePiece tokenizers are known to differ (tests/sptok.py).
_word = st.sampled_from(["What", "is", "shown", "a", "red", "circle", "cat", "Yes", "No", "two", "3", "é", "?!"])
_text = st.lists(_word, min_size=1, max_size=5).map(" ".join)
_user = st.tuples(st.booleans(), _text, st.booleans()).map(
    lambda t: (IMAGE_MARKER + "\n" if t[0] else "") + t[1] + ("\n" + IMAGE_MARKER if t[2] else ""))


@st.composite
def conversations(draw):
    turns = [Turn("system", draw(_text))] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        turns += [Turn("user", draw(_user)), Turn("assistant", draw(_text))]
    n = sum(t.content.count(IMAGE_MARKER) for t in turns)
    return Conversation(turns, images=[f"{k}.png" for k in range(n)], index=0, source="gen")


def _expand(ids, image_id):
    out = []
    for t in ids:
        out += [image_id] * SEQ if t == image_id else [t]
    return out


def _reference_ids(text: str, tok, mode: str) -> list[int]:
    """The rendered text (with <image> markers) as the mode's reference tokenizes it, images expanded."""
    image_id = tok.convert_tokens_to_ids(IMAGE_MARKER)
    bos = tok.bos_token or ""
    adds_bos = tok("a")["input_ids"][:1] == [tok.bos_token_id]
    if mode == "text":
        return _expand(tok(text, add_special_tokens=False)["input_ids"], image_id)
    body = text[len(bos):] if adds_bos and bos and text.startswith(bos) else text
    if mode == "llm":
        special = adds_bos and bos and text.startswith(bos)
        return _expand(tok(body, add_special_tokens=bool(special))["input_ids"], image_id)
    # llava: tokenizer_image_token
    chunks = [tok(c)["input_ids"] for c in body.split(IMAGE_MARKER)]
    offset = 1 if adds_bos and chunks and chunks[0][:1] == [tok.bos_token_id] else 0
    ids = chunks[0][:offset]
    for i, c in enumerate(chunks):
        ids += ([image_id] if i else []) + c[offset:]
    return _expand(ids, image_id)


def _reply_spans(segments) -> list[tuple[int, int]]:
    spans, at = [], 0
    for text, sup in segments:
        if sup:
            spans.append((at, at + len(text)))
        at += len(text)
    return spans


@pytest.mark.parametrize("mode", TOKENIZATIONS)
@pytest.mark.parametrize("name", ["vicuna_v1", "llama_2", "chatml", "plain"])
@settings(max_examples=25, deadline=None)
@given(conv=conversations())
def test_ids_follow_the_mode_and_labels_are_exactly_the_replies(tok, mode, name, conv):
    if name == "chatml" and tok.name_or_path and "sp_legacy_true" in str(tok.name_or_path):
        # Known limit (module docstring of llavakit.data.tokenize): a reply that starts with no space
        # right after a non-special header ("assistant\n" + reply) under a SentencePiece tokenizer that
        # prepends "▁" after every special token (legacy=True); no chatml model has such a tokenizer.
        pytest.skip("chatml header ends mid-word for a legacy=True SentencePiece tokenizer")
    t = get_template(name, tok)
    image_id = tok.convert_tokens_to_ids(IMAGE_MARKER)
    enc = encode(conv, t, tok, image_id, SEQ, tokenization=mode)
    segs = t.segments(conv.turns)
    text = "".join(x for x, _ in segs)
    want = _reference_ids(text, tok, mode)
    assert enc.input_ids == want, (mode, text, tok.convert_ids_to_tokens(enc.input_ids),
                                   tok.convert_ids_to_tokens(want))

    # Labels: exactly the reply tokens. A reply's tokens are the difference between the reference
    # tokenization of the text up to the reply's end and of the text up to its start.
    sup_ids = [y for y in enc.labels if y != IGNORE_INDEX]
    assert sup_ids, "every sample supervises its replies"
    want_sup = []
    for a, b in _reply_spans(segs):
        before, upto = _reference_ids(text[:a], tok, mode), _reference_ids(text[:b], tok, mode)
        assert upto[:len(before)] == before, "a reply starts at a token boundary"
        want_sup += [x for x in upto[len(before):] if x != image_id]
    assert sup_ids == want_sup
    # ... and they sit where the reference puts them: label == id at every supervised position
    assert all(y == x for x, y in zip(enc.input_ids, enc.labels) if y != IGNORE_INDEX)
    assert all(y == IGNORE_INDEX for x, y in zip(enc.input_ids, enc.labels) if x == image_id)


@pytest.mark.parametrize("mode", TOKENIZATIONS)
def test_generation_prompt_is_the_training_prefix(tok, mode):
    """What chat/eval feed the model is exactly the training ids up to where the reply starts."""
    t = get_template("vicuna_v1", tok)
    image_id = tok.convert_tokens_to_ids(IMAGE_MARKER)
    turns = [Turn("user", IMAGE_MARKER + "\nWhat is shown?"), Turn("assistant", "a red circle")]
    enc = encode(Conversation(turns, images=["x.png"]), t, tok, image_id, SEQ, tokenization=mode)
    prompt = encode_prompt(turns[:1], t, tok, image_id, SEQ, tokenization=mode)
    first_sup = next(i for i, y in enumerate(enc.labels) if y != IGNORE_INDEX)
    assert enc.input_ids[:len(prompt)] == prompt and first_sup == len(prompt)


def test_llm_mode_keeps_the_first_words_word_start_marker(tmp_path):
    """Vicuna-v1.5's tokenizer (legacy=False): 'A chat ...' starts with '▁A' under llm and llava,
    with 'A' under the old text mode (what the contract fixes)."""
    tok = _with_image_token(make_sp_llama_tokenizer(tmp_path, legacy=False))
    t = get_template("vicuna_v1", tok)
    image_id = tok.convert_tokens_to_ids(IMAGE_MARKER)
    turns = [Turn("user", IMAGE_MARKER + "\nWhat is shown?")]
    first = {m: tok.convert_ids_to_tokens(encode_prompt(turns, t, tok, image_id, SEQ, tokenization=m)[:2])
             for m in TOKENIZATIONS}
    assert first["llm"] == first["llava"] == ["<s>", "▁A"]
    assert first["text"] == ["<s>", "A"]


def test_the_mode_is_saved_and_an_old_checkpoint_keeps_its_own(tiny_built, tmp_path):
    """build() records ``llm``; a processor config written before the field existed loads as ``text``
    and prompts the way that checkpoint was trained (bos as text, add_special_tokens=False)."""
    import json

    import llavakit
    from llavakit.infer.generate import Generator

    model, processor = tiny_built
    assert processor.tokenization == "llm"
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    _, again = llavakit.load(tmp_path / "m")
    assert again.tokenization == "llm"

    cfg_path = tmp_path / "m" / "processor_config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["tokenization"]
    cfg_path.write_text(json.dumps(cfg))
    old_model, old = llavakit.load(tmp_path / "m")
    assert old.tokenization == "text"
    turns = [Turn("user", IMAGE_MARKER + "\nWhat is shown?")]
    gen = Generator(old_model, old, template="vicuna_v1")
    got = gen.encode([turns], [[Image.new("RGB", (8, 8))]])["input_ids"][0].tolist()
    text = gen.template.render_prompt(turns)
    want = old.tokenizer(text, add_special_tokens=False)["input_ids"]
    image_id = old.image_token_id
    assert got == [x for t in want for x in ([image_id] * old.image_seq_length if t == image_id else [t])]


@pytest.mark.parametrize("legacy", [True, False])
def test_saved_processor_and_export_keep_the_tokenizers_legacy_flag(tiny_dirs, tmp_path, legacy):
    """transformers 5 does not save a Llama tokenizer's `legacy` flag; reloaded without it, a legacy=True
    tokenizer tokenizes text after a special token differently ("a</s>USER:")."""
    import llavakit
    from llavakit.interop import export
    from transformers import AutoProcessor

    tok = make_sp_llama_tokenizer(tmp_path / "sp", legacy=legacy)
    llm = tmp_path / "llm"
    from llavakit.demo.tiny import save_tiny_llm

    save_tiny_llm(llm, "llama")
    tok.save_pretrained(llm)  # the LLM's folder now carries the SentencePiece tokenizer
    (llm / "tokenizer_config.json").write_text(
        json.dumps({**json.loads((llm / "tokenizer_config.json").read_text()), "legacy": legacy}))
    model, processor = llavakit.build(tiny_dirs["clip"], llm)
    text = "a</s>USER: hi"
    want = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    _, again = llavakit.load(tmp_path / "m")
    assert again.tokenizer(text, add_special_tokens=False)["input_ids"] == want
    hp = AutoProcessor.from_pretrained(export((model, processor), tmp_path / "hf"))
    assert hp.tokenizer(text, add_special_tokens=False)["input_ids"] == want
