"""Readers: llava JSON/JSONL (+ xtuner spelling), messages/ShareGPT, HF datasets; convert back out."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from llavakit.data.conversation import IMAGE_MARKER, SampleError
from llavakit.data.formats import (DataSourceError, detect_format, iter_conversations, load_conversations,
                                   parse_row, write_conversations)
from llavakit.data.images import open_image


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def qa(q="What is it?", a="A square."):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (8, 8), (255, 0, 0)).save(folder / "red.png")
    Image.new("RGB", (8, 8), (0, 0, 255)).save(folder / "sub" / "blue.png")
    return folder


# --- llava --------------------------------------------------------------------------------------
def test_llava_json_rows_normalised(tmp_path, images):
    rows = [
        {"id": "a", "image": "red.png", "conversations": qa(f"{IMAGE_MARKER}\nWhat colour?", "Red.")},
        {"id": 7, "images": ["red.png", "sub/blue.png"],
         "conversations": [{"from": "system", "value": "Be brief."}]
         + qa(f"{IMAGE_MARKER}{IMAGE_MARKER} Same?", "No.")},
        {"id": "text", "conversations": qa("Hi", "Hello.")},
    ]
    data = tmp_path / "train.json"
    data.write_text(json.dumps(rows))
    assert detect_format(data) == "llava"
    convs, problems = load_conversations(data, image_folder=images)
    assert problems == []
    a, b, t = convs
    assert [x.index for x in convs] == [0, 1, 2] and [x.id for x in convs] == ["a", "7", "text"]
    assert a.source == str(data)
    assert [(x.role, x.content) for x in a.turns] == [("user", f"{IMAGE_MARKER}\nWhat colour?"), ("assistant", "Red.")]
    assert a.images == [str(images / "red.png")]
    assert b.turns[0].role == "system" and b.images == [str(images / "red.png"), str(images / "sub" / "blue.png")]
    assert t.images == [] and t.num_markers() == 0


def test_paths_default_to_the_data_files_folder(tmp_path, images, monkeypatch):
    data = write_jsonl(images / "d.jsonl", [{"image": "sub/blue.png", "conversations": qa(IMAGE_MARKER)}])
    monkeypatch.chdir(tmp_path)  # must not matter
    (conv,), _ = load_conversations(data)
    assert conv.images == [str(images / "sub" / "blue.png")] and conv.id is None
    assert open_image(conv.images[0]).getpixel((0, 0)) == (0, 0, 255)


def test_single_image_without_marker_gets_one_with_a_warning(tmp_path, images):
    data = write_jsonl(tmp_path / "d.jsonl", [
        {"id": "m", "image": "red.png",
         "conversations": [{"from": "system", "value": "s"}] + qa("Describe.", "Red.")},
        {"id": "two", "images": ["red.png", "red.png"], "conversations": qa("Compare.", "Same.")},
    ])
    (one, two), problems = load_conversations(data, image_folder=images, on_error="collect")
    assert one.turns[1].content == f"{IMAGE_MARKER}\nDescribe." and one.turns[0].content == "s"
    assert [(p.id, p.severity, p.reason.split(":")[0]) for p in problems] == [("m", "warning", "marker inserted")]
    assert two.num_markers() == 0  # several images: never guessed, validation reports the mismatch


def test_xtuner_conversation_spelling(tmp_path, images):
    data = write_jsonl(tmp_path / "x.jsonl", [
        {"id": "fv", "image": "red.png", "conversation": qa(f"{IMAGE_MARKER}Q", "A")},
        {"id": "io", "conversation": [{"system": "S", "input": "Q1", "output": "A1"},
                                      {"input": "Q2", "output": "A2"}]},
    ])
    (fv, io_), problems = load_conversations(data, image_folder=images)
    assert problems == [] and fv.turns[1].content == "A"
    assert [(t.role, t.content) for t in io_.turns] == [
        ("system", "S"), ("user", "Q1"), ("assistant", "A1"), ("user", "Q2"), ("assistant", "A2")]


def test_json_file_holding_jsonl_and_blank_lines(tmp_path):
    data = tmp_path / "really_lines.json"
    data.write_text("\n\n".join(json.dumps({"id": i, "conversations": qa()}) for i in "ab"))
    convs, _ = load_conversations(data)
    assert [(c.id, c.index) for c in convs] == [("a", 0), ("b", 2)]  # JSONL index = line number - 1
    pretty = tmp_path / "one.jsonl"
    pretty.write_text(json.dumps({"id": "p", "conversations": qa()}, indent=2))
    assert [c.id for c in load_conversations(pretty)[0]] == ["p"]
    first_broken = tmp_path / "first_broken.jsonl"
    first_broken.write_text('{"id": "x", "conv\n' + json.dumps({"id": "y", "conversations": qa()}) + "\n")
    convs, problems = load_conversations(first_broken, on_error="collect")  # detected past the bad line
    assert [c.id for c in convs] == ["y"] and [(p.index, p.id) for p in problems] == [(0, "x")]


# --- messages -----------------------------------------------------------------------------------
def test_messages_string_and_parts_content(tmp_path, images):
    rows = [
        {"id": "s", "images": ["red.png"],
         "messages": [{"role": "user", "content": f"{IMAGE_MARKER} What?"}, {"role": "assistant", "content": "Red."}]},
        {"id": "p", "images": ["red.png", "sub/blue.png"], "messages": [
            {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"},
                                         {"type": "text", "text": "differ?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Yes."}]}]},
        {"id": "inline", "messages": [
            {"role": "user", "content": [{"type": "image", "image": "sub/blue.png"},
                                         {"type": "text", "text": "Colour?"}]},
            {"role": "assistant", "content": "Blue."}]},
    ]
    data = write_jsonl(tmp_path / "m.jsonl", rows)
    assert detect_format(data) == "messages"
    (s, p, inline), problems = load_conversations(data, image_folder=images)
    assert problems == []
    assert s.turns[0].content == f"{IMAGE_MARKER} What?" and s.images == [str(images / "red.png")]
    assert [t.role for t in p.turns] == ["system", "user", "assistant"]
    assert p.turns[1].content == f"{IMAGE_MARKER}\nand\n{IMAGE_MARKER}\ndiffer?" and len(p.images) == 2
    assert inline.images == [str(images / "sub" / "blue.png")] and inline.num_markers() == 1


def test_python_list_source_and_explicit_format():
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    convs, _ = load_conversations(rows, format="messages")
    assert convs[0].source == "<list>" and convs[0].turns[1].content == "yo"
    with pytest.raises(SampleError, match="no 'conversations'"):
        load_conversations(rows, format="llava")


# --- HF datasets --------------------------------------------------------------------------------
def trl_rows():
    """Rows shaped like TRL's llava-instruct-mix-vsft: messages with typed parts + PIL images."""
    red, blue = Image.new("RGB", (6, 6), (255, 0, 0)), Image.new("RGB", (6, 6), (0, 0, 255))
    user = lambda text: {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": text}]}
    answer = lambda text: {"role": "assistant", "content": [{"type": "text", "text": text}]}
    return {
        "messages": [[user("Colour?"), answer("Red.")], [user("Colour?"), answer("Blue.")]],
        "images": [[red], [blue]],
    }


def check_trl(convs, problems):
    assert problems == [] and [c.index for c in convs] == [0, 1]
    assert convs[0].turns[0].content == f"{IMAGE_MARKER}\nColour?" and convs[1].turns[1].content == "Blue."
    # Images stay encoded (decoded later, in workers) and decode to the right pixels.
    assert all(isinstance(c.images[0], bytes) for c in convs)
    assert open_image(convs[1].images[0]).getpixel((0, 0)) == (0, 0, 255)


def test_hf_dataset_object_in_memory_and_streaming():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict(trl_rows())
    check_trl(*load_conversations(ds))
    check_trl(*load_conversations(ds.to_iterable_dataset()))
    stream = iter_conversations(ds, streaming=True)
    assert next(stream).turns[1].content == "Red."
    dd = datasets.DatasetDict({"train": ds})
    check_trl(*load_conversations(dd))
    with pytest.raises(DataSourceError, match="no split 'test'"):
        load_conversations(dd, split="test")


def test_hf_on_disk_and_parquet_streaming(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict(trl_rows())
    ds.save_to_disk(str(tmp_path / "saved"))
    assert detect_format(tmp_path / "saved") == "hf"
    check_trl(*load_conversations(tmp_path / "saved"))
    ds.to_parquet(str(tmp_path / "part.parquet"))
    check_trl(*load_conversations(tmp_path / "part.parquet", streaming=True))


def test_hf_rows_with_image_paths_resolve_against_image_folder(images):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"id": ["a"], "image": ["red.png"], "conversations": [qa(IMAGE_MARKER + "Q")]})
    (conv,), _ = load_conversations(ds, image_folder=images)
    assert conv.images == [str(images / "red.png")] and conv.id == "a"


# --- bad rows -----------------------------------------------------------------------------------
BAD_ROWS = [
    ({"id": "k", "image": "x.png"}, "missing key"),
    ({"id": "t", "conversations": "hello"}, "wrong type"),
    ({"id": "v", "conversations": [{"from": "human", "value": 3}]}, "wrong type"),
    ({"id": "f", "conversations": [{"value": "hi"}]}, "missing key"),
    ({"id": "r", "conversations": [{"from": "bot", "value": "hi"}]}, "unknown role"),
    ({"id": "i", "image": 5, "conversations": qa()}, "wrong type"),
    ({"id": "e", "image": " ", "conversations": qa()}, "wrong type"),
    ({"id": "b", "image": "a.png", "images": ["b.png"], "conversations": qa()}, "wrong type"),
    ({"id": ["x"], "conversations": qa()}, "wrong type"),
    ([1, 2], "wrong type"),
]


@pytest.mark.parametrize("row, kind", BAD_ROWS)
def test_bad_rows_are_problems_never_conversations(row, kind):
    conv, problems = parse_row(row, "llava", index=4, source="f.json")
    assert conv is None and len(problems) == 1
    p = problems[0]
    assert (p.index, p.severity, p.source) == (4, "error", "f.json")
    assert p.reason.startswith(kind + ":") and p.hint
    if isinstance(row, dict) and isinstance(row["id"], str):
        assert p.id == row["id"]


def test_raise_names_file_index_id_reason_and_fix(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": "ok", "conversations": qa()},
                                              {"id": "bad", "conversations": [{"from": "bot", "value": "x"}]}])
    with pytest.raises(SampleError) as e:
        load_conversations(data)
    text = str(e.value)
    assert str(data) in text and "#1" in text and "'bad'" in text and "unknown role" in text and "->" in text
    convs, problems = load_conversations(data, on_error="collect")
    assert [c.id for c in convs] == ["ok"] and [p.id for p in problems] == ["bad"]


def test_unreadable_jsonl_line_keeps_reading_and_salvages_the_id(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"id": "a", "conversations": qa()}) + "\n"
                    + '{"id": "broken", "conversations": [\n'
                    + json.dumps({"id": "c", "conversations": qa()}) + "\n")
    convs, problems = load_conversations(data, on_error="collect")
    assert [c.id for c in convs] == ["a", "c"]
    (p,) = problems
    assert (p.index, p.id) == (1, "broken") and p.reason.startswith("unreadable json: line 2")


def test_unknown_keys_warn_in_files(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": "u", "imgae": "x.png", "conversations": qa()}])
    (conv,), (p,) = load_conversations(data, on_error="collect")
    assert p.severity == "warning" and "'imgae'" in p.reason and conv.id == "u"


def test_empty_sources_read_as_nothing(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n")
    assert load_conversations(tmp_path / "e.jsonl") == ([], [])
    assert load_conversations([]) == ([], [])


def test_unreadable_sources(tmp_path):
    with pytest.raises(DataSourceError, match="no such file"):
        load_conversations(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": 1,\n "conversations": ]')
    with pytest.raises(DataSourceError, match="line 2"):
        load_conversations(bad)
    odd = tmp_path / "d.txt"
    odd.write_text("x")
    with pytest.raises(DataSourceError, match="--format"):
        detect_format(odd)
    other = write_jsonl(tmp_path / "other.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataSourceError, match="cannot tell the row format"):
        load_conversations(other)


# --- writing ------------------------------------------------------------------------------------
def test_convert_round_trip_llava_messages_llava(tmp_path, images):
    rows = [{"id": "a", "image": "red.png", "conversations": qa(f"{IMAGE_MARKER}\nQ", "A")},
            {"id": "b", "images": ["red.png", "sub/blue.png"],
             "conversations": [{"from": "system", "value": "S"}] + qa(f"{IMAGE_MARKER}{IMAGE_MARKER}Q", "A")},
            {"id": "c", "conversations": qa()}]
    src = images / "in.json"
    src.write_text(json.dumps(rows))
    convs, _ = load_conversations(src)
    write_conversations(convs, images / "out.jsonl", to="messages")
    back, _ = load_conversations(images / "out.jsonl")
    assert back[1].images == convs[1].images and json.loads((images / "out.jsonl").read_text().splitlines()[0])[
        "images"] == ["red.png"]  # written relative to the output's folder
    write_conversations(back, images / "again.json", to="llava")
    assert json.loads((images / "again.json").read_text()) == rows


def test_write_saves_embedded_images(tmp_path):
    datasets = pytest.importorskip("datasets")
    convs, _ = load_conversations(datasets.Dataset.from_dict(trl_rows()))
    out = tmp_path / "out" / "llava.json"
    assert write_conversations(convs, out, to="llava") == 2
    rows = json.loads(out.read_text())
    assert rows[0]["image"] == "llava_images/0000000_0.png"
    back, _ = load_conversations(out)
    assert open_image(back[1].images[0]).getpixel((0, 0)) == (0, 0, 255)
    assert back[0].turns[0].content == f"{IMAGE_MARKER}\nColour?"


def test_bytes_refs_keep_their_encoding(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, "JPEG")
    rows = [{"messages": [{"role": "user", "content": IMAGE_MARKER}, {"role": "assistant", "content": "x"}],
             "images": [{"bytes": buf.getvalue(), "path": None}]}]
    convs, _ = load_conversations(rows)
    write_conversations(convs, tmp_path / "o.jsonl", to="messages")
    assert (tmp_path / "o_images" / "0000000_0.jpeg").read_bytes() == buf.getvalue()
