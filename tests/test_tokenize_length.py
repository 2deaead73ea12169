"""Length policy: drop or truncate at a turn boundary, never inside an image; counted before training."""

from __future__ import annotations

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from PIL import Image

from llavakit.data.conversation import IMAGE_MARKER, Conversation, SampleError, Turn
from llavakit.data.dataset import SupervisedDataset
from llavakit.data.templates import get_template
from llavakit.data.tokenize import IGNORE_INDEX, OverlongError, encode
from llavakit.demo.tiny import make_tokenizer

IMG, SEQ = 100_000, 4
TOK = make_tokenizer(family="llama")

_text = st.text(alphabet=st.sampled_from(list("abc xyz.?\n0123")), max_size=12)
_user = st.lists(st.one_of(_text, st.just(IMAGE_MARKER)), min_size=1, max_size=3).map("".join)


@st.composite
def conversations(draw):
    turns = [Turn("system", draw(_text))] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 4))):
        turns += [Turn("user", draw(_user)), Turn("assistant", draw(_text))]
    n = sum(t.content.count(IMAGE_MARKER) for t in turns)
    return Conversation(turns, images=[f"{k}.png" for k in range(n)], index=1, source="gen")


def _image_runs(ids: list[int]) -> list[int]:
    runs, n = [], 0
    for t in ids + [None]:
        if t == IMG:
            n += 1
        elif n:
            runs.append(n)
            n = 0
    return runs


@pytest.mark.parametrize("name", ["vicuna_v1", "chatml", "llama_2"])
@settings(max_examples=40, deadline=None)
@given(conv=conversations(), slack=st.integers(-60, 5))
def test_truncation_keeps_whole_leading_rounds(name, conv, slack):
    t = get_template(name, TOK)
    full = encode(conv, t, TOK, IMG, SEQ)
    max_length = max(1, len(full) + slack)
    try:
        enc = encode(conv, t, TOK, IMG, SEQ, max_length=max_length, overflow="truncate")
    except OverlongError as e:
        event("first round too long")
        # Only when even the first round does not fit.
        first = [i for i, x in enumerate(conv.turns) if x.role == "assistant"][0] + 1
        assert len(_encode_prefix(conv, first, t)) > max_length
        assert "first round" in str(e) and "gen sample #1" in str(e)
        return
    event("truncated" if enc.truncated else "fits")
    assert len(enc) <= max_length
    assert enc.truncated == (len(full) > max_length)
    # A prefix of the full sample: same tokens, same labels, cut where a round ended.
    assert enc.input_ids == full.input_ids[:len(enc)] and enc.labels == full.labels[:len(enc)]
    assert any(y != IGNORE_INDEX for y in enc.labels)
    # Which rounds were kept: the cut whose own encoding has exactly this length.
    cuts = [i + 1 for i, x in enumerate(conv.turns) if x.role == "assistant"]
    kept = {len(_encode_prefix(conv, k, t)): k for k in cuts}[len(enc)]
    assert conv.turns[kept - 1].role == "assistant"
    # Images: whole, and exactly those of the kept turns.
    assert all(r % SEQ == 0 for r in _image_runs(enc.input_ids))
    assert enc.input_ids.count(IMG) == SEQ * enc.num_images
    assert enc.num_images == sum(x.content.count(IMAGE_MARKER) for x in conv.turns[:kept])


def _encode_prefix(conv: Conversation, k: int, t) -> list[int]:
    turns = conv.turns[:k]
    n = sum(x.content.count(IMAGE_MARKER) for x in turns)
    return encode(Conversation(turns, images=conv.images[:n]), t, TOK, IMG, SEQ).input_ids


@settings(max_examples=40, deadline=None)
@given(conv=conversations(), slack=st.integers(-30, 5))
def test_drop_removes_exactly_the_overlong(conv, slack):
    t = get_template("llama3", TOK)
    full = encode(conv, t, TOK, IMG, SEQ)
    max_length = max(1, len(full) + slack)
    if len(full) > max_length:
        with pytest.raises(OverlongError, match=f"{len(full)} tokens > max_length {max_length}"):
            encode(conv, t, TOK, IMG, SEQ, max_length=max_length, overflow="drop")
    else:
        enc = encode(conv, t, TOK, IMG, SEQ, max_length=max_length, overflow="drop")
        assert enc.input_ids == full.input_ids and not enc.truncated


def test_cut_lands_before_the_image_not_inside_it():
    t = get_template("chatml", TOK)
    conv = Conversation([Turn("user", "<image>\nwhat?"), Turn("assistant", "a cat"),
                         Turn("user", "and <image> here?"), Turn("assistant", "a dog")], images=["1.png", "2.png"])
    full = encode(conv, t, TOK, IMG, SEQ)
    second_image_at = [i for i, x in enumerate(full.input_ids) if x == IMG][SEQ]
    # A limit that falls inside the second image's placeholders: the whole second round goes.
    enc = encode(conv, t, TOK, IMG, SEQ, max_length=second_image_at + 2)
    assert enc.truncated and enc.num_images == 1 and enc.input_ids.count(IMG) == SEQ
    assert enc.input_ids == encode(Conversation(conv.turns[:2], images=["1.png"]), t, TOK, IMG, SEQ).input_ids


def test_unknown_overflow_policy():
    with pytest.raises(ValueError, match="truncate.*drop"):
        encode(Conversation([Turn("user", "a"), Turn("assistant", "b")]), get_template("plain"), TOK, IMG, SEQ,
               overflow="cut")


# --- the dataset applies the policy and reports it --------------------------------------------------
def _rgb(colour) -> Image.Image:
    return Image.new("RGB", (40, 30), colour)


def _samples() -> list[Conversation]:
    long_answer = "the quick brown fox jumps over the lazy dog " * 6
    return [
        Conversation([Turn("user", "<image>\nwhat?"), Turn("assistant", "a red square")], images=[_rgb("red")],
                     id="ok", index=0, source="train.json"),
        Conversation([Turn("user", "<image>\nwhat?"), Turn("assistant", "a blue one"), Turn("user", "<image>\nand?"),
                      Turn("assistant", long_answer)], images=[_rgb("blue"), _rgb("green")],
                     id="long-tail", index=1, source="train.json"),
        Conversation([Turn("user", "hi"), Turn("assistant", long_answer * 2)], id="too-long", index=2,
                     source="train.json"),
        Conversation([Turn("user", "<image>\nonly a question")], images=[_rgb("red")], id="no-answer", index=3,
                     source="train.json"),
        Conversation([Turn("user", "text only"), Turn("assistant", "fine")], id="text", index=4, source="train.json"),
    ]


@pytest.mark.parametrize("overflow", ["truncate", "drop"])
def test_dataset_report_counts_and_items(tiny_built, overflow):
    _, processor = tiny_built
    seq = processor.image_seq_length
    ds = SupervisedDataset(_samples(), processor, "vicuna_v1", max_length=140, overflow=overflow)
    r = ds.report
    assert (r.total, r.skipped) == (5, 1)
    if overflow == "truncate":
        assert (r.kept, r.truncated, r.dropped) == (3, 1, 1)
        kept_ids = ["ok", "long-tail", "text"]
    else:
        assert (r.kept, r.truncated, r.dropped) == (2, 0, 2)
        kept_ids = ["ok", "text"]
    assert [ds.conversation(i).id for i in range(len(ds))] == kept_ids
    reasons = {p.id: p.reason for p in r.problems}
    assert "no supervised token" in reasons["no-answer"] and "max_length 140" in reasons["too-long"]
    assert "3 of 5 samples kept" in str(r) or "2 of 5 samples kept" in str(r)
    assert all(p.source == "train.json" for p in r.problems)

    for i in range(len(ds)):
        item = ds[i]
        ids, labels = item["input_ids"], item["labels"]
        assert ids.dtype == labels.dtype == torch.long and ids.shape == labels.shape
        assert ds.lengths[i] == len(ids) <= 140
        n_img = int((ids == processor.image_token_id).sum()) // seq
        assert ds.has_image[i] == (n_img > 0)
        if n_img:
            assert item["pixel_values"].shape == (n_img, 3, 32, 32)
        else:
            assert item["pixel_values"] is None
        assert ((labels == IGNORE_INDEX) | (labels == ids)).all() and (labels != IGNORE_INDEX).any()
    if overflow == "truncate":  # the truncated sample keeps its first image only
        assert ds[1]["pixel_values"].shape[0] == 1 and ds.num_images(1) == 1


def test_dataset_image_errors_name_the_sample(tiny_built, tmp_path):
    _, processor = tiny_built
    conv = Conversation([Turn("user", "<image>\nwhat?"), Turn("assistant", "x")], images=[str(tmp_path / "nope.jpg")],
                        id="gone", index=9, source="train.json")
    ds = SupervisedDataset([conv], processor, "chatml")
    with pytest.raises(SampleError, match=r"train.json sample #9 \(id='gone'\).*image 0"):
        ds[0]


def test_dataset_strict_raises_the_first_problem(tiny_built):
    _, processor = tiny_built
    with pytest.raises(SampleError, match="no-answer"):
        SupervisedDataset(_samples()[3:4], processor, "chatml", strict=True)
