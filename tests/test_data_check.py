"""`validate` and `llavakit data check/stats/convert`: every faulty sample named with a reason, no
error for a valid one, the --report JSON, the exit code."""

from __future__ import annotations

import io
import json
import logging
import re
import struct
import subprocess
import sys
import types
import zlib

import numpy as np
import pytest
from PIL import Image

from llavakit.cli import main
from llavakit.data.conversation import IMAGE_MARKER, Conversation, SampleError, Turn
from llavakit.data.formats import load_conversations
from llavakit.data.validate import DataValidationError, load_validated, summarize, validate

M = IMAGE_MARKER


def qa(q="What is it?", a="A square."):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


@pytest.fixture
def image_dir(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(d / "good.png")
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(d / "rgba.png")
    Image.new("P", (8, 8)).save(d / "gif_named.jpg", format="GIF")  # extension lies; still valid
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(buf, "PNG")
    (d / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (d / "corrupt.jpg").write_bytes(b"<html>404 not found</html>" * 8)
    (d / "empty.png").write_bytes(b"")
    (d / "a_folder.png").mkdir()
    (d / "bomb.png").write_bytes(png_header_only(50_000, 50_000))
    return d


# Valid samples: none of them may get an error.
VALID = [
    {"id": "v-single", "image": "good.png", "conversations": qa(f"{M}\nWhat colour?", "Red.")},
    {"id": "v-text", "conversations": qa("Hello?", "Hi.")},
    {"id": "v-multi", "images": ["good.png", "rgba.png"], "conversations": qa(f"{M} and {M}: same?", "No.")},
    {"id": "v-gif", "image": "gif_named.jpg", "conversations": qa(f"{M} Describe.", "Black.")},
    {"id": "v-system", "conversations": [{"from": "system", "value": "Be brief."}] + qa("Q1", "A1") + qa("Q2", "A2")},
    {"id": "v-nomarker", "image": "good.png", "conversations": qa("Describe it.", "Red.")},  # warning only
]

# Faulty samples: id -> the kind of error its reason must start with.
FAULTS = {
    "f-missing-key": ({"id": "f-missing-key", "image": "good.png"}, "missing key"),
    "f-wrong-type": ({"id": "f-wrong-type", "conversations": [{"from": "human", "value": 42}]}, "wrong type"),
    "f-unknown-role": ({"id": "f-unknown-role", "conversations": [{"from": "bot", "value": "x"}] + qa()},
                       "unknown role"),
    "f-image-missing": ({"id": "f-image-missing", "image": "nope.png", "conversations": qa(f"{M}Q")}, "image missing"),
    "f-image-empty": ({"id": "f-image-empty", "image": "empty.png", "conversations": qa(f"{M}Q")}, "image empty"),
    "f-image-corrupt": ({"id": "f-image-corrupt", "image": "corrupt.jpg", "conversations": qa(f"{M}Q")},
                        "image corrupt"),
    "f-image-truncated": ({"id": "f-image-truncated", "image": "truncated.png", "conversations": qa(f"{M}Q")},
                          "image truncated"),
    "f-image-folder": ({"id": "f-image-folder", "image": "a_folder.png", "conversations": qa(f"{M}Q")},
                       "image is a folder"),
    "f-bomb": ({"id": "f-bomb", "image": "bomb.png", "conversations": qa(f"{M}Q")}, "image too large"),
    "f-count": ({"id": "f-count", "image": "good.png", "conversations": qa(f"{M}{M} Q")}, "image count mismatch"),
    "f-marker-in-answer": ({"id": "f-marker-in-answer", "image": "good.png",
                            "conversations": qa("Q", f"Look: {M}")}, "image in assistant turn"),
    "f-starts-with-gpt": ({"id": "f-starts-with-gpt", "conversations": qa()[::-1]}, "role order"),
    "f-not-alternating": ({"id": "f-not-alternating",
                           "conversations": [{"from": "human", "value": "a"}] + qa()}, "role order"),
    "f-empty-turn": ({"id": "f-empty-turn", "conversations": qa("Q", "  ")}, "empty turn"),
    "f-nothing-to-supervise": ({"id": "f-nothing-to-supervise", "conversations": qa()[:1]}, "nothing to supervise"),
}
BROKEN_LINE = '{"id": "f-bad-json", "conversations": [{"from": "human", "value": "x"}\n'


@pytest.fixture
def faulty_file(tmp_path, image_dir):
    rows = [json.dumps(r) for r in VALID[:3]]
    rows += [json.dumps(row) for row, _ in FAULTS.values()]
    rows.insert(5, BROKEN_LINE.strip())
    rows += [json.dumps(r) for r in VALID[3:]]
    rows.append(json.dumps({"id": "v-single", "conversations": qa()}))  # duplicate id: a warning
    path = tmp_path / "data" / "train.jsonl"
    path.parent.mkdir()
    path.write_text("\n".join(rows) + "\n")
    return path


def by_id(problems, severity=None):
    out: dict = {}
    for p in problems:
        if severity in (None, p["severity"]):
            out.setdefault(p["id"], []).append(p)
    return out


def test_data_check_reports_every_fault_by_id(faulty_file, image_dir, tmp_path, capsys):
    report = tmp_path / "out" / "report.json"
    rc = main(["data", "check", str(faulty_file), "--image-folder", str(image_dir), "--report", str(report)])
    out = capsys.readouterr().out
    assert rc == 1

    rows = json.loads(report.read_text())
    assert isinstance(rows, list) and rows
    for r in rows:
        assert {"index", "id", "severity", "reason"} <= set(r)
        assert r["severity"] in ("error", "warning") and isinstance(r["index"], int) and r["reason"]
    errors = by_id(rows, "error")
    expected = {fid: kind for fid, (_, kind) in FAULTS.items()} | {"f-bad-json": "unreadable json"}
    for fid, kind in expected.items():
        assert fid in errors, f"{fid} was not reported"
        assert any(p["reason"].startswith(kind) for p in errors[fid]), (fid, errors[fid])
        assert any(fid in line and kind in line for line in out.splitlines()), fid  # one printed line per problem
    assert set(errors) == set(expected)  # valid samples have no error entries
    warnings = by_id(rows, "warning")
    assert warnings["v-nomarker"][0]["reason"].startswith("marker inserted")
    assert any(p["reason"].startswith("duplicate id") for p in warnings["v-single"])
    # Indices point at the line: JSONL index = line number - 1.
    lines = faulty_file.read_text().splitlines()
    for r in rows:
        if r["id"] in expected and r["id"] != "f-bad-json":
            assert json.loads(lines[r["index"]])["id"] == r["id"]
    # The summary table counts samples, not problems.
    assert "with errors" in out and f"{len(expected):>9}" in out.split("with errors")[1].splitlines()[0]


def test_valid_file_passes_with_an_empty_report(tmp_path, image_dir):
    data = tmp_path / "ok.json"
    data.write_text(json.dumps(VALID[:5]))
    report = tmp_path / "r.json"
    assert main(["data", "check", str(data), "--image-folder", str(image_dir), "--report", str(report)]) == 0
    assert json.loads(report.read_text()) == []


def test_check_as_a_subprocess(faulty_file, image_dir):
    proc = subprocess.run([sys.executable, "-m", "llavakit.cli", "data", "check", str(faulty_file),
                           "--image-folder", str(image_dir), "--images", "header"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "f-image-missing" in proc.stdout and "image missing" in proc.stdout
    assert "f-image-truncated" not in proc.stdout  # header-only checks cannot see truncation


def test_unreadable_json_array_is_reported(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": "a", "conversations": []},\n oops]')
    report = tmp_path / "r.json"
    assert main(["data", "check", str(bad), "--report", str(report)]) == 1
    (row,) = json.loads(report.read_text())
    assert row["severity"] == "error" and "line 2" in row["reason"]


# --- validate() on conversations built in memory ------------------------------------------------
def conv(*turns, images=(), id="x", index=0):
    return Conversation([Turn(r, c) for r, c in turns], list(images), id=id, index=index, source="mem")


def reasons(problems):
    return [(p.severity, p.reason.split(":")[0]) for p in problems]


def test_structure_checks():
    ok = conv(("system", "s"), ("user", "q"), ("assistant", "a"))
    assert validate([ok]) == []
    assert reasons(validate([conv(("user", "q"), ("assistant", "a"), ("user", "more?"))])) == [
        ("warning", "unanswered turn")]
    assert reasons(validate([conv(("user", "q"), ("system", "s"), ("assistant", "a"))])) == [("error", "role order")]
    assert reasons(validate([conv()])) == [("error", "no turns")]
    assert reasons(validate([conv(("user", None), ("assistant", "a"))])) == [("error", "wrong type")]
    assert ("error", "unknown role") in reasons(validate([conv(("robot", "q"), ("assistant", "a"))]))
    assert reasons(validate([conv(("user", f"{M}q"), ("assistant", "a"))], check_images=False)) == [
        ("error", "image count mismatch")]
    got = validate([conv(("system", f"{M}"), ("user", "q"), ("assistant", "a"), images=[b"x"])], check_images=False)
    assert reasons(got) == [("error", "image in system turn")]


def test_validate_keeps_reader_problems_and_sorts(tmp_path):
    rows = [{"id": "b", "conversations": [{"from": "gpt", "value": "a"}]}, {"id": "a", "conversations": 3}]
    convs, problems = load_conversations(rows, on_error="collect")
    got = validate((convs, problems))
    assert [(p.index, p.id, p.reason.split(":")[0]) for p in got] == [(0, "b", "role order"), (1, "a", "wrong type")]
    assert validate(convs) == got[:1]  # a plain list: only the new problems
    table = summarize(got, 2)
    assert re.search(r"with errors\s+2\n", table) and re.search(r"role order\s+1\s+0", table)


def test_load_validated_refuses_or_skips(tmp_path, caplog):
    rows = [{"id": "good", "conversations": qa()}, {"id": "bad", "conversations": qa()[:1]}]
    with pytest.raises(DataValidationError) as e:
        load_validated(rows)
    assert "1 of 2 samples" in str(e.value) and "'bad'" in str(e.value) and "skip_invalid" in str(e.value)
    with caplog.at_level(logging.WARNING):
        kept, problems = load_validated(rows, skip_invalid=True)
    assert [c.id for c in kept] == ["good"] and "skipped 1 of 2" in caplog.text


# --- token-level checks, against the encode() contract ------------------------------------------
def fake_encode(conv, template, tokenizer, image_token_id, image_tokens, max_length=None, overflow="truncate",
                tokenization="llm"):
    """Contract stand-in: one token per word, images expand; keeps whole leading rounds to fit."""
    def ids_labels(turns):
        ids, labels = [], []
        for t in turns:
            for word in t.content.replace(M, f" {M} ").split():
                n = image_tokens if word == M else 1
                ids += [image_token_id if word == M else 1] * n
                labels += ([1] if t.role == "assistant" and word != M else [-100]) * n
        return ids, labels

    if conv.meta.get("refuse"):
        raise SampleError.of(conv, "template cannot render it: made up", "choose another template")
    ids, labels = ids_labels(conv.turns)
    if all(x == -100 for x in labels):
        raise SampleError.of(conv, "no supervised token: nothing to learn", "add an answer")
    truncated = False
    if max_length is not None and len(ids) > max_length:
        if overflow == "drop":
            raise SampleError.of(conv, "dropped by the length policy", "raise max_length")
        rounds = [i + 1 for i, t in enumerate(conv.turns) if t.role == "assistant" and i + 1 < len(conv.turns)]
        for cut in reversed(rounds):
            ids, labels = ids_labels(conv.turns[:cut])
            if len(ids) <= max_length:
                break
        else:
            raise SampleError.of(conv, "first round does not fit", "raise max_length")
        truncated = True
    return types.SimpleNamespace(input_ids=ids, labels=labels, truncated=truncated)


@pytest.fixture
def fake_tokenize(monkeypatch):
    module = types.ModuleType("llavakit.data.tokenize")
    module.encode = fake_encode
    monkeypatch.setitem(sys.modules, "llavakit.data.tokenize", module)


def test_length_and_supervision_checks(fake_tokenize):
    kw = dict(tokenizer=object(), template=object(), image_token_id=9, image_tokens=4, check_images=False)
    short = conv(("user", "q"), ("assistant", "a b"), id="short")
    two_rounds = conv(("user", "q"), ("assistant", "a b"), ("user", "q " * 6), ("assistant", "c " * 6), id="cut")
    one_long = conv(("user", f"{M} q"), ("assistant", "a " * 20), images=[b"img"], id="huge")
    got = {p.id: p for p in validate([short, two_rounds, one_long], max_length=8, **kw)}
    assert "short" not in got
    assert got["cut"].severity == "warning" and got["cut"].reason.startswith("too long: 15 tokens > max_length 8")
    assert "keeps 2 of 8 supervised" in got["cut"].reason
    assert got["huge"].severity == "error" and "first round does not fit" in got["huge"].reason
    dropped = validate([two_rounds], max_length=8, overflow="drop", **kw)
    assert reasons(dropped) == [("error", "too long")]
    # encode's own refusal of a structurally fine sample is passed on with its reason and hint.
    refused = conv(("user", "q"), ("assistant", "a"), id="r")
    refused.meta["refuse"] = True
    (p,) = validate([refused], **kw)
    assert (p.id, p.severity, p.reason, p.hint) == ("r", "error", "template cannot render it: made up",
                                                    "choose another template")
    # Structurally broken samples are not tokenized again (their reason is already given).
    assert reasons(validate([conv(("assistant", "a"), id="x")], **kw)) == [("error", "role order")]


def test_real_encode_flags_long_samples(tiny_built, tmp_path, image_dir, capsys):
    pytest.importorskip("llavakit.data.tokenize")
    model, processor = tiny_built
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    rows = [{"id": "short", "image": "good.png", "conversations": qa(f"{M}\nWhat?", "Red.")},
            {"id": "long", "conversations": qa("Describe " * 5, "one two three " * 60)},
            {"id": "text", "conversations": qa("Q", "A")}]
    data = tmp_path / "d.json"
    data.write_text(json.dumps(rows))
    report = tmp_path / "r.json"
    rc = main(["data", "check", str(data), "--image-folder", str(image_dir), "--model", str(model_dir),
               "--template", "vicuna_v1", "--max-length", "120", "--overflow", "drop", "--report", str(report)])
    got = by_id(json.loads(report.read_text()))
    assert rc == 1 and set(got) == {"long"}
    assert got["long"][0]["severity"] == "error" and got["long"][0]["reason"].startswith("too long")
    # The model's own max length (2048 for the tiny Llama) is the default budget.
    assert main(["data", "check", str(data), "--image-folder", str(image_dir), "--model", str(model_dir),
                 "--template", "vicuna_v1"]) == 0
    assert main(["data", "check", str(data), "--model", str(tmp_path / "nope")]) == 2
    # stats measures in tokens with a model (image placeholders included) and marks the budget.
    capsys.readouterr()
    assert main(["data", "stats", str(data), "--image-folder", str(image_dir), "--model", str(model_dir),
                 "--template", "vicuna_v1", "--max-length", "120", "--histogram", str(tmp_path / "h.png")]) == 0
    out = capsys.readouterr().out
    assert "length in tokens" in out and "over max_length 120: 1" in out and (tmp_path / "h.png").stat().st_size


# --- stats and convert --------------------------------------------------------------------------
def test_stats_prints_counts_and_writes_histogram(tmp_path, image_dir, capsys):
    data = tmp_path / "ok.json"
    data.write_text(json.dumps(VALID))
    png = tmp_path / "hist" / "lengths.png"
    assert main(["data", "stats", str(data), "--image-folder", str(image_dir), "--histogram", str(png)]) == 0
    out = capsys.readouterr().out
    counts = {line[:32].strip(): line[32:].strip() for line in out.splitlines() if len(line) > 32}
    assert counts["samples read"] == "6" and counts["images"] == "5" and counts["text-only samples"] == "2"
    assert counts["multi-turn samples"] == "1" and counts["samples with a system prompt"] == "1"
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 100


def test_convert_cli(tmp_path, image_dir):
    src = image_dir / "in.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in VALID[:3]) + "\n{broken\n")
    out = image_dir / "out.json"
    assert main(["data", "convert", str(src), str(out), "--to", "messages"]) == 1  # one row left out
    rows = json.loads(out.read_text())
    assert [r["id"] for r in rows] == ["v-single", "v-text", "v-multi"]
    assert rows[2]["images"] == ["good.png", "rgba.png"] and rows[2]["messages"][0]["role"] == "user"
    assert main(["data", "check", str(out), "--image-folder", str(image_dir)]) == 0
