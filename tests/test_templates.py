"""Conversation templates: pinned renders, the Jinja export, and label properties (hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llavakit.data.conversation import IMAGE_MARKER, Conversation, SampleError, Turn
from llavakit.data.templates import TEMPLATES, TemplateError, get_template, jinja_chat_template
from llavakit.data.tokenize import IGNORE_INDEX, encode, encode_prompt
from llavakit.demo.tiny import make_tokenizer

IMG = 100_000  # a placeholder id outside every tiny vocabulary: markers never reach the tokenizer
SEQ = 3  # placeholders per image

TOKENIZERS = {fam: make_tokenizer(family=fam) for fam in ("llama", "mistral", "qwen2")}

SYS = Turn("system", "Be brief.")
TWO_ROUNDS = [Turn("user", "<image>\nWhat is it?"), Turn("assistant", "A cat."),
              Turn("user", "Colour?"), Turn("assistant", "Black.")]
VICUNA_SYS = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
              "helpful, detailed, and polite answers to the user's questions.")

# Rendered with the default bos/eos (<s>, </s>): (without system turn, with system turn, prompt after round 1)
PINNED = {
    "plain": ("<s><image>A cat.</s>Black.</s>",
              "<s><image>A cat.</s>Black.</s>",
              "<s><image>A cat.</s>"),
    "vicuna_v1": (f"<s>{VICUNA_SYS} USER: <image>\nWhat is it? ASSISTANT: A cat.</s>USER: Colour? ASSISTANT: Black.</s>",
                  "<s>Be brief. USER: <image>\nWhat is it? ASSISTANT: A cat.</s>USER: Colour? ASSISTANT: Black.</s>",
                  f"<s>{VICUNA_SYS} USER: <image>\nWhat is it? ASSISTANT: A cat.</s>USER: Colour? ASSISTANT:"),
    "llama_2": ("<s>[INST] <image>\nWhat is it? [/INST] A cat. </s><s>[INST] Colour? [/INST] Black. </s>",
                "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n<image>\nWhat is it? [/INST] A cat. </s>"
                "<s>[INST] Colour? [/INST] Black. </s>",
                "<s>[INST] <image>\nWhat is it? [/INST] A cat. </s><s>[INST] Colour? [/INST]"),
    "mistral_instruct": ("<s>[INST] <image>\nWhat is it? [/INST]A cat.</s>[INST] Colour? [/INST]Black.</s>",
                         "<s>[INST] Be brief.\n\n<image>\nWhat is it? [/INST]A cat.</s>[INST] Colour? [/INST]Black.</s>",
                         "<s>[INST] <image>\nWhat is it? [/INST]A cat.</s>[INST] Colour? [/INST]"),
    "chatml": ("<|im_start|>user\n<image>\nWhat is it?<|im_end|>\n<|im_start|>assistant\nA cat.<|im_end|>\n"
               "<|im_start|>user\nColour?<|im_end|>\n<|im_start|>assistant\nBlack.<|im_end|>\n",
               "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<image>\nWhat is it?<|im_end|>\n"
               "<|im_start|>assistant\nA cat.<|im_end|>\n<|im_start|>user\nColour?<|im_end|>\n"
               "<|im_start|>assistant\nBlack.<|im_end|>\n",
               "<|im_start|>user\n<image>\nWhat is it?<|im_end|>\n<|im_start|>assistant\nA cat.<|im_end|>\n"
               "<|im_start|>user\nColour?<|im_end|>\n<|im_start|>assistant\n"),
    "llama3": ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is it?<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\nA cat.<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nColour?<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\nBlack.<|eot_id|>",
               "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is it?<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\nA cat.<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nColour?<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\nBlack.<|eot_id|>",
               "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is it?<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\nA cat.<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nColour?<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    # Gemma's documented turn format: <start_of_turn>{user|model}\n ... <end_of_turn>\n after bos; it has no
    # system role, so a system text opens the first user turn followed by a blank line (as Gemma-3's own does).
    "gemma": ("<s><start_of_turn>user\n<image>\nWhat is it?<end_of_turn>\n<start_of_turn>model\nA cat.<end_of_turn>\n"
              "<start_of_turn>user\nColour?<end_of_turn>\n<start_of_turn>model\nBlack.<end_of_turn>\n",
              "<s><start_of_turn>user\nBe brief.\n\n<image>\nWhat is it?<end_of_turn>\n<start_of_turn>model\n"
              "A cat.<end_of_turn>\n<start_of_turn>user\nColour?<end_of_turn>\n<start_of_turn>model\nBlack.<end_of_turn>\n",
              "<s><start_of_turn>user\n<image>\nWhat is it?<end_of_turn>\n<start_of_turn>model\nA cat.<end_of_turn>\n"
              "<start_of_turn>user\nColour?<end_of_turn>\n<start_of_turn>model\n"),
}

# What each reply must look like once supervised: (text before the answer, text after it).
# Written out here, independently of templates.py.
REPLY = {"plain": ("", "{eos}"), "vicuna_v1": (" ", "{eos}"), "llama_2": (" ", " {eos}"),
         "mistral_instruct": ("", "{eos}"), "chatml": ("", "<|im_end|>"), "llama3": ("", "<|eot_id|>"),
         "gemma": ("", "<end_of_turn>"), "auto": ("", "<|im_end|>")}


def test_table_covers_the_issue():
    assert set(TEMPLATES) == set(PINNED)


@pytest.mark.parametrize("name", sorted(PINNED))
def test_pinned_renders(name):
    t = get_template(name)
    plain, with_system, prompt = PINNED[name]
    assert t.render(TWO_ROUNDS) == plain
    assert t.render([SYS] + TWO_ROUNDS) == with_system
    assert t.render_prompt(TWO_ROUNDS[:3]) == prompt
    assert "".join(x for x, _ in t.segments(TWO_ROUNDS)) == plain


def test_bos_eos_follow_the_tokenizer():
    qwen = TOKENIZERS["qwen2"]  # no bos, eos <|im_end|>
    assert get_template("vicuna_v1", qwen).render(TWO_ROUNDS[:2]).startswith(VICUNA_SYS)
    assert get_template("plain", qwen).render(TWO_ROUNDS[:2]) == "<image>A cat.<|im_end|>"
    assert get_template("chatml").stop_strings == ["<|im_end|>"]
    assert get_template("llama3").stop_strings == ["<|eot_id|>"]
    assert get_template("vicuna_v1", TOKENIZERS["llama"]).stop_strings == ["</s>"]


def test_bos_only_when_the_tokenizer_uses_one():
    tok = make_tokenizer(family="qwen2")
    tok.bos_token = "<|endoftext|>"  # declared, but the tokenizer never prepends it (GPT-2 style)
    assert get_template("vicuna_v1", tok).render(TWO_ROUNDS[:2]).startswith(VICUNA_SYS)
    assert jinja_chat_template("vicuna_v1", tokenizer=tok).count("<|endoftext|>") == 0


def test_system_override_and_default():
    t = get_template("chatml", system="Answer the questions.")
    assert t.render(TWO_ROUNDS[:2]).startswith("<|im_start|>system\nAnswer the questions.<|im_end|>\n")
    assert t.render([SYS] + TWO_ROUNDS[:2]).startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_unknown_template_lists_valid_names():
    with pytest.raises(TemplateError, match="valid:.*'chatml'.*'vicuna_v1'.*auto"):
        get_template("vicuna")


def test_auto_needs_a_chat_template():
    with pytest.raises(TemplateError, match="chat_template"):
        get_template("auto", TOKENIZERS["llama"])


def test_auto_matches_the_tokenizers_own_rendering():
    tok = TOKENIZERS["qwen2"]
    t = get_template("auto", tok)
    msgs = [{"role": x.role, "content": x.content} for x in [SYS] + TWO_ROUNDS]
    assert t.render([SYS] + TWO_ROUNDS) == tok.apply_chat_template(msgs, tokenize=False)
    assert t.render_prompt([SYS] + TWO_ROUNDS[:3]) == tok.apply_chat_template(
        msgs[:4], tokenize=False, add_generation_prompt=True)
    assert [s for s in t.segments(TWO_ROUNDS[:2]) if s[1]] == [("A cat.<|im_end|>", True)]


def test_auto_refuses_a_template_that_rewrites_history():
    tok = make_tokenizer(family="qwen2")
    # Only the last assistant turn is rendered in full: renders of growing prefixes are not prefixes.
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
                         "<|im_start|>assistant\n...<|im_end|>\n{% else %}<|im_start|>{{ m['role'] }}\n"
                         "{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}")
    with pytest.raises(TemplateError, match="prefix-stable|cannot"):
        get_template("auto", tok).segments(TWO_ROUNDS)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_jinja_export_renders_identically_and_masks_the_same_tokens(name, family):
    tok = make_tokenizer(family=family)
    # llama: bos/eos as Jinja variables; qwen2: written in for this tokenizer.
    tok.chat_template = jinja_chat_template(name, tokenizer=tok if family == "qwen2" else None)
    t = get_template(name, tok)
    for turns in (TWO_ROUNDS, [SYS] + TWO_ROUNDS, [Turn("user", 'odd "quotes" \\ {braces} é🙂'),
                                                     Turn("assistant", "ok\n")]):
        msgs = [{"role": x.role, "content": x.content} for x in turns]
        assert tok.apply_chat_template(msgs, tokenize=False) == t.render(turns)
        assert tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True) == \
            t.render_prompt(turns[:-1])
    # transformers' own assistant mask (from {% generation %} and char offsets of the whole string)
    # agrees token for token with our per-run labels.
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_MARKER]})
    img = tok.convert_tokens_to_ids(IMAGE_MARKER)
    msgs = [{"role": x.role, "content": x.content} for x in [SYS] + TWO_ROUNDS]
    out = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    enc = encode(Conversation([SYS] + TWO_ROUNDS, images=["a.png"]), t, tok, img, 1)
    assert out["input_ids"] == enc.input_ids
    assert out["assistant_masks"] == [int(y != IGNORE_INDEX) for y in enc.labels]
    assert sum(out["assistant_masks"]) > 0


# --- label properties over random conversations ------------------------------------------------
_CHARS = list("abcxyzABC .,!?:;-'\"{}()0123\n\té中🙂")
_text = st.text(alphabet=st.sampled_from(_CHARS), max_size=16)
_user = st.lists(st.one_of(_text, st.just(IMAGE_MARKER)), min_size=1, max_size=4).map("".join)


@st.composite
def conversations(draw):
    turns = [Turn("system", draw(_text))] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        turns += [Turn("user", draw(_user)), Turn("assistant", draw(_text))]
    if draw(st.integers(0, 4)) == 0:
        turns.append(Turn("user", draw(_user)))  # a trailing question without an answer
    n = sum(t.content.count(IMAGE_MARKER) for t in turns)
    return Conversation(turns, images=[f"img{k}.png" for k in range(n)], index=0, source="random")


def _decode_with_images(tok, ids: list[int]) -> str:
    """Decode, writing each run of SEQ placeholders back as one <image> marker."""
    out, run, n_img = [], [], 0
    for t in ids + [None]:
        if t == IMG:
            n_img += 1
            continue
        if n_img:
            assert n_img % SEQ == 0, "image placeholders were split"
            out.append(tok.decode(run, skip_special_tokens=False, clean_up_tokenization_spaces=False))
            out.append(IMAGE_MARKER * (n_img // SEQ))
            run, n_img = [], 0
        if t is not None:
            run.append(t)
    out.append(tok.decode(run, skip_special_tokens=False, clean_up_tokenization_spaces=False))
    return "".join(out)


CASES = [(name, fam) for name in sorted(TEMPLATES) for fam in sorted(TOKENIZERS)] + [("auto", "qwen2")]


@pytest.mark.parametrize("name,family", CASES)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv=conversations())
def test_supervised_tokens_are_exactly_the_replies(name, family, conv):
    tok = TOKENIZERS[family]
    t = get_template(name, tok)
    enc = encode(conv, t, tok, IMG, SEQ)
    ids, labels = enc.input_ids, enc.labels
    assert len(ids) == len(labels)
    assert all(y == IGNORE_INDEX or y == x for x, y in zip(ids, labels))
    # Images: SEQ placeholders per marker, never supervised.
    assert ids.count(IMG) == SEQ * conv.num_markers() and IMG not in labels
    assert enc.num_images == len(conv.images) and not enc.truncated
    # The ids are a tokenization of exactly the rendered text.
    assert _decode_with_images(tok, ids) == t.render(conv.turns)
    # Supervised = every assistant answer with the template's affixes, nothing else.
    lead, end = (x.replace("{eos}", tok.eos_token) for x in REPLY[name])
    expected = "".join(lead + x.content + end for x in conv.turns if x.role == "assistant")
    sup = [y for y in labels if y != IGNORE_INDEX]
    assert tok.decode(sup, skip_special_tokens=False, clean_up_tokenization_spaces=False) == expected
    # Inference sees the same tokens: the prompt before the last answer is a prefix of the sample,
    # and the answer's tokens follow it.
    last = max(i for i, x in enumerate(conv.turns) if x.role == "assistant")
    prompt = encode_prompt(conv.turns[:last], t, tok, IMG, SEQ)
    assert ids[:len(prompt)] == prompt
    answer = tok(lead + conv.turns[last].content + end, add_special_tokens=False)["input_ids"]
    if lead + conv.turns[last].content:  # the reply's first token is the first supervised one after the prompt
        assert labels[len(prompt)] != IGNORE_INDEX
    assert tok.decode(ids[len(prompt):len(prompt) + len(answer)], skip_special_tokens=False,
                      clean_up_tokenization_spaces=False).startswith(lead + conv.turns[last].content)


@pytest.mark.parametrize("name", sorted(TEMPLATES) + ["auto"])
def test_nothing_supervised_is_an_error_naming_the_sample(name):
    tok = TOKENIZERS["qwen2"]
    conv = Conversation([Turn("user", "<image>\nhello")], images=["x.png"], id="s7", index=7, source="data.json")
    with pytest.raises(SampleError, match=r"data.json sample #7 \(id='s7'\).*no supervised token"):
        encode(conv, get_template(name, tok), tok, IMG, SEQ)


def test_bad_samples_are_sample_errors():
    tok = TOKENIZERS["llama"]
    t = get_template("vicuna_v1", tok)
    late_system = Conversation([Turn("user", "a"), Turn("system", "b"), Turn("assistant", "c")], index=3)
    with pytest.raises(SampleError, match="system turn may only come first"):
        encode(late_system, t, tok, IMG, SEQ)
    missing = Conversation([Turn("user", "<image><image>a"), Turn("assistant", "c")], images=["one.png"], index=4)
    with pytest.raises(SampleError, match="2 <image> marker.*1 image"):
        encode(missing, t, tok, IMG, SEQ)


def _metaspace_tokenizer():
    """A sentencepiece-style (Metaspace, prepend_scheme='first') BPE tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from llavakit.demo.tiny import _DEFAULT_CORPUS, SPECIAL_TOKENS

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=True)
    raw.train_from_iterator(_DEFAULT_CORPUS + ["Be brief. What is it? A cat. Colour? Black."],
                            trainers.BpeTrainer(vocab_size=500, special_tokens=SPECIAL_TOKENS, show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_sentencepiece_style_pieces_get_no_extra_word_start(name):
    # Tokenized alone, "A cat." would start with "▁A"; after "[/INST]" or a header the whole string
    # has "A". Pieces are tokenized behind an anchor special token, so they match the whole string.
    tok = _metaspace_tokenizer()
    t = get_template(name, tok)
    turns = [SYS, Turn("user", "What is it?"), Turn("assistant", "A cat."), Turn("user", "Colour?"),
             Turn("assistant", "Black.")]
    enc = encode(Conversation(turns), t, tok, IMG, SEQ)
    assert enc.input_ids == tok(t.render(turns), add_special_tokens=False)["input_ids"]
