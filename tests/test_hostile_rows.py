"""Hostile inputs to the readers: every bad row is a reported row (file, line/index, id, reason), never a
crash, and ``skip_invalid`` trains on the rest. Whole-file problems are a `DataSourceError` that says what
to do. A large JSON array is read in bounded memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from llavakit.data.conversation import SampleError
from llavakit.data.formats import DataSourceError, load_conversations
from llavakit.data.validate import DataValidationError, load_validated


def qa(q="What is it?", a="A square."):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def good(id):
    return json.dumps({"id": id, "conversations": qa()})


DEEP = '{"id": "deep", "conversations": ' + "[" * 100_000 + "]" * 100_000 + "}"
LATIN1 = '{"id": "latin", "conversations": [{"from": "human", "value": "caf\xe9?"}, {"from": "gpt", "value": "x"}]}'
NUMBER_PART = json.dumps({"id": "num", "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]},
                                                    {"role": "assistant", "content": "ok"}]})
SURROGATE = '{"id": "sur", "conversations": [{"from": "human", "value": "\\ud800?"}, {"from": "gpt", "value": "x"}]}'
HUGE_NUMBER = '{"id": "big", "conversations": [], "n": ' + "9" * 5000 + "}"


def messages(id):
    return json.dumps({"id": id, "messages": [{"role": "user", "content": "q?"}, {"role": "assistant", "content": "a"}]})


# name -> (file name, bytes, good ids, [(index, id, reason kind, where)])
CASES = {
    "jsonl non-UTF-8 byte": (
        "d.jsonl", b"\n".join([good("a").encode(), LATIN1.encode("latin-1"), good("c").encode()]) + b"\n",
        ["a", "c"], [(1, "latin", "not UTF-8", "line 2")]),
    "jsonl 100,000-deep line": (
        "d.jsonl", "\n".join([good("a"), DEEP, good("c")]).encode() + b"\n",
        ["a", "c"], [(1, "deep", "too deeply nested", "line 2")]),
    "jsonl number in a text part": (
        "d.jsonl", "\n".join([messages("a"), NUMBER_PART, messages("c")]).encode(),
        ["a", "c"], [(1, "num", "wrong type", "messages[0].content[0].text")]),
    "jsonl unpaired surrogate escape": (
        "d.jsonl", "\n".join([good("a"), SURROGATE, good("c")]).encode(),
        ["a", "c"], [(1, "sur", "not UTF-8", "conversations[0].value")]),
    "jsonl number too long to convert": (
        "d.jsonl", "\n".join([good("a"), HUGE_NUMBER, good("c")]).encode(),
        ["a", "c"], [(1, "big", "unreadable json", "line 2")]),
    "array non-UTF-8 byte": (
        "d.json", b"[\n" + b",\n".join([good("a").encode(), LATIN1.encode("latin-1"), good("c").encode()]) + b"\n]",
        ["a", "c"], [(1, "latin", "not UTF-8", "line 3")]),
    "array 100,000-deep element": (
        "d.json", ("[\n" + ",\n".join([good("a"), DEEP, good("c")]) + "\n]").encode(),
        ["a", "c"], [(1, "deep", "too deeply nested", "row #1 (from line 3")]),
    "array element with a number in a text part": (
        "d.json", ("[" + ",\n".join([messages("a"), NUMBER_PART, messages("c")]) + "]").encode(),
        ["a", "c"], [(1, "num", "wrong type", "messages[0].content[0].text")]),
    "array element with a number too long to convert": (
        "d.json", ("[" + ",\n".join([good("a"), HUGE_NUMBER, good("c")]) + "]").encode(),
        ["a", "c"], [(1, "big", "unreadable json", "row #1 (from line 2")]),
    "truncated array": (
        "d.json", ("[\n" + ",\n".join([good("a"), good("b"), good("c")]))[:-25].encode(),
        ["a", "b"], [(2, "c", "truncated", "row #2 (from line 4")]),
    "array cut after a comma": (
        "d.json", ("[\n" + ",\n".join([good("a"), good("b")]) + ",\n").encode(),
        ["a", "b"], [(2, None, "truncated", "line 4")]),
}


def write(tmp_path, name):
    file, data, _, _ = CASES[name]
    path = tmp_path / file
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_rows_are_reported_and_skipped(tmp_path, name):
    path = write(tmp_path, name)
    _, _, good_ids, expected = CASES[name]
    convs, problems = load_conversations(path, on_error="collect")
    assert [c.id for c in convs] == good_ids
    got = [(p.index, p.id, p.reason.split(":")[0]) for p in problems if p.severity == "error"]
    assert got == [(i, id, kind) for i, id, kind, _ in expected]
    for p, (_, _, _, where) in zip(problems, expected):
        assert where in p.reason and p.hint and p.source == str(path)
    # skip_invalid: the good rows are what training gets, the bad ones are in the report
    kept, found = load_validated(path, skip_invalid=True, check_images=False)
    assert [c.id for c in kept] == good_ids
    assert {(p.index, p.id) for p in found if p.severity == "error"} == {(i, id) for i, id, _, _ in expected}


@pytest.mark.parametrize("name", sorted(CASES))
def test_without_skip_the_error_names_file_line_id_and_reason(tmp_path, name):
    path = write(tmp_path, name)
    (index, id, kind, where), = CASES[name][3]
    with pytest.raises(SampleError) as e:
        load_conversations(path)
    text = str(e.value)
    assert str(path) in text and f"#{index}" in text and kind in text and where in text
    assert (repr(id) if id is not None else "no id") in text
    with pytest.raises(DataValidationError) as e:
        load_validated(path, check_images=False)
    text = str(e.value)
    assert str(path) in text and f"#{index}" in text and kind in text and where in text
    if id is not None:
        assert repr(id) in text


@pytest.mark.parametrize("encoding, name", [("utf-16", "UTF-16"), ("utf-16-be", "UTF-16"), ("utf-32", "UTF-32")])
def test_a_wide_encoding_is_a_source_error_that_says_how_to_convert(tmp_path, encoding, name):
    path = tmp_path / "d.json"
    text = "[" + good("a") + "]"
    path.write_bytes(text.encode(encoding) if encoding != "utf-16-be" else b"\xfe\xff" + text.encode(encoding))
    for kwargs in ({}, {"on_error": "collect"}):
        with pytest.raises(DataSourceError) as e:
            load_conversations(path, **kwargs)
        assert name in str(e.value) and "iconv" in str(e.value) and str(path) in str(e.value)
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_bytes((good("a") + "\n").encode("utf-16-le"))  # no BOM: told by the NUL bytes
    with pytest.raises(DataSourceError, match="UTF-16"):
        load_conversations(jsonl, on_error="collect")


def test_a_utf8_bom_is_fine(tmp_path):
    path = tmp_path / "d.json"
    path.write_bytes(b"\xef\xbb\xbf[" + good("a").encode() + b"]")
    assert [c.id for c in load_conversations(path)[0]] == ["a"]


def test_broken_array_structure_is_a_source_error_with_line_and_row(tmp_path):
    path = tmp_path / "d.json"
    path.write_text("[\n" + good("a") + ',\n{"id": "b", "conversations": [1 2]},\n' + good("c") + "\n]")
    with pytest.raises(DataSourceError) as e:
        load_conversations(path, on_error="collect")
    assert "line 3" in str(e.value) and "row #1" in str(e.value) and "JSONL" in str(e.value)
    path.write_text("[" + good("a") + "] [" + good("b") + "]")
    with pytest.raises(DataSourceError, match="after the array"):
        load_conversations(path, on_error="collect")


def test_rows_spanning_the_read_buffer(tmp_path, monkeypatch):
    """Rows cut by the reader's buffer at every possible place still come back whole, with right lines."""
    from llavakit.data import jsonrows

    monkeypatch.setattr(jsonrows, "CHUNK", 7)
    rows = [{"id": f"r{i}", "n": 10 ** i, "conversations": qa(a="é" * i)} for i in range(12)]
    path = tmp_path / "d.json"
    path.write_text("[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n,oops]", encoding="utf-8")
    got = []
    with pytest.raises(DataSourceError, match="line 14"):
        for index, row in jsonrows.json_rows(path):
            got.append((index, row))
    assert got == list(enumerate(rows))


def test_pretty_printed_objects_one_after_the_other(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"id": i, "conversations": qa()}, indent=2) for i in "pq"))
    assert [c.id for c in load_conversations(path)[0]] == ["p", "q"]


MEMORY_PROBE = textwrap.dedent("""
    import json, resource, sys
    from pathlib import Path
    from llavakit.data.formats import iter_conversations

    path = Path(sys.argv[1])
    warm = path.with_name("warm.json")  # imports (datasets, PIL, ...) are not what is measured
    turns = [{"from": "human", "value": "<image>\\nq"}, {"from": "gpt", "value": "a"}]
    warm.write_text(json.dumps([{"id": "w", "image": "x.jpg", "conversations": turns}]))
    list(iter_conversations(warm))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    n = sum(1 for _ in iter_conversations(path, on_error="collect", problems=[]))
    print(json.dumps({"rows": n, "growth_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before}))
""")


def test_a_large_json_array_is_read_in_bounded_memory(tmp_path):
    path = tmp_path / "big.json"
    row = {"id": "", "image": "x.jpg", "conversations": qa("<image>\nWhat is shown? " * 3, "A red circle. " * 6)}
    n = 0
    with path.open("w") as f:
        f.write("[")
        while f.tell() < 50_000_000:
            row["id"] = f"r{n}"
            f.write(("," if n else "") + "\n" + json.dumps(row))
            n += 1
        f.write("\n]\n")
    size_kb = path.stat().st_size // 1024
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(path)], capture_output=True, text=True, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["rows"] == n
    assert got["growth_kb"] < size_kb / 10, (got, size_kb)  # json.load needs ~4x the file size
