"""The tokenizer memo of `text_ids`: repeated texts (a system prompt, a header, a fixed instruction) are tokenized
once, and the ids are always those the tokenizer itself gives, also after tokens are added to it."""

from __future__ import annotations

import os

import pytest

import llavakit.data.text_ids as text_ids_module
from llavakit.data.conversation import Conversation, Turn
from llavakit.data.templates import get_template
from llavakit.data.text_ids import text_ids
from llavakit.data.tokenize import encode
from llavakit.demo.tiny import make_tokenizer

TEXTS = ["Describe the image briefly.", " the image", "Describe the image briefly.", "", "a\nb  c",
         " the image", "What colour is the circle? red"]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("special", [False, True])
def test_repeated_texts_get_the_tokenizers_own_ids(family, special):
    tok = make_tokenizer(family=family)
    want = [list(x) for x in tok(TEXTS, add_special_tokens=special)["input_ids"]]
    first = [list(x) for x in text_ids(tok, TEXTS, add_special_tokens=special)]
    again = [list(x) for x in text_ids(tok, list(reversed(TEXTS)), add_special_tokens=special)]
    assert first == want
    assert again == list(reversed(want))


def test_the_two_special_token_settings_are_not_confused():
    tok = make_tokenizer(family="llama")
    plain = text_ids(tok, ["hello"], add_special_tokens=False)[0]
    with_bos = text_ids(tok, ["hello"], add_special_tokens=True)[0]
    assert list(with_bos) == tok("hello", add_special_tokens=True)["input_ids"]
    assert list(plain) == tok("hello", add_special_tokens=False)["input_ids"]
    assert list(with_bos) != list(plain)


def test_adding_a_token_empties_the_memo():
    tok = make_tokenizer(family="llama")
    before = list(text_ids(tok, ["x <zq> y"], add_special_tokens=False)[0])
    tok.add_tokens(["<zq>"], special_tokens=True)
    after = list(text_ids(tok, ["x <zq> y"], add_special_tokens=False)[0])
    new_id = tok.convert_tokens_to_ids("<zq>")
    assert new_id not in before and new_id in after
    assert after == tok("x <zq> y", add_special_tokens=False)["input_ids"]


def test_the_memo_stays_bounded(monkeypatch):
    monkeypatch.setattr(text_ids_module, "MEMO_TEXTS", 4)
    tok = make_tokenizer(family="llama")
    texts = [f"sample number {i} says hello" for i in range(23)]
    got = [list(x) for x in text_ids(tok, texts, add_special_tokens=False)]
    for i in range(0, 23, 3):  # one at a time as a dataset's samples come
        assert list(text_ids(tok, [texts[i]], add_special_tokens=False)[0]) == got[i]
    assert got == [list(x) for x in tok(texts, add_special_tokens=False)["input_ids"]]
    assert len(tok._llavakit_text_memo[1]) <= 4


def test_a_dataset_encodes_the_same_with_a_warm_memo():
    """Encoding a conversation twice (the second time every piece comes from the memo) gives the same sample."""
    tok = make_tokenizer(family="llama")
    tpl = get_template("vicuna_v1", tok)
    conv = Conversation([Turn("user", "<image>\nWhat is it?"), Turn("assistant", "A red circle."),
                         Turn("user", "Where?"), Turn("assistant", "Top left.")], images=["a.png"], index=0,
                        source="t")
    first = encode(conv, tpl, tok, 100_000, 4)
    second = encode(conv, tpl, tok, 100_000, 4)
    assert list(first.input_ids) == list(second.input_ids)
    assert list(first.labels) == list(second.labels)
    tok._llavakit_text_memo = None
    cold = encode(conv, tpl, tok, 100_000, 4)
    assert list(cold.input_ids) == list(first.input_ids)


def test_encoding_leaves_the_users_environment_as_it_was(monkeypatch):
    from llavakit.data.text_ids import one_thread_per_tokenizer

    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    with pytest.raises(RuntimeError):
        with one_thread_per_tokenizer():
            assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
            raise RuntimeError("a failure mid-encoding")
    assert "TOKENIZERS_PARALLELISM" not in os.environ
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")  # the user's choice is kept
    with one_thread_per_tokenizer():
        assert os.environ["TOKENIZERS_PARALLELISM"] == "true"
    assert os.environ["TOKENIZERS_PARALLELISM"] == "true"


def test_switching_special_token_splitting_is_not_answered_from_the_memo():
    tok = make_tokenizer(family="llama")
    text = "done</s> next"
    whole = list(text_ids(tok, [text], add_special_tokens=False)[0])
    tok.split_special_tokens = True
    split = list(text_ids(tok, [text], add_special_tokens=False)[0])
    assert split == tok(text, add_special_tokens=False)["input_ids"]
    assert tok.eos_token_id in whole and tok.eos_token_id not in split
    tok.split_special_tokens = False
    assert list(text_ids(tok, [text], add_special_tokens=False)[0]) == whole
