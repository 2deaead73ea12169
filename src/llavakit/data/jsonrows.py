"""JSON and JSONL files read row by row, in bounded memory, so that no single row can stop the reading.

Three layouts, told apart from the start of the file (`sniff`):

* a JSON array ``[{...}, {...}]`` — read incrementally: a buffer of about `CHUNK` characters is
  decoded element by element with ``json.JSONDecoder.raw_decode`` (C speed), so a 1 GB file needs a
  few MB, not its size times ten; rows are indexed by position;
* JSONL — one row per line, indexed by line (index = line number - 1);
* one or more pretty-printed objects one after the other (a ``.jsonl`` written with ``indent``).

What can be wrong with one row comes back as a `RowError` in its place (reason, hint, the id when it
can be salvaged) and the reading goes on: a JSONL line that is not valid JSON, bytes that are not
UTF-8 (decoded with ``surrogateescape``, so the rest of the row still parses and its id is known),
nesting deeper than `MAX_DEPTH` (checked before ``json`` recurses into a line; an array element too
deep for ``json`` is skipped by its brackets), a number too long to convert, a JSON array cut off at
the end of the file (its complete rows are read; the cut-off one is the problem).

What makes the *file* unreadable raises `DataSourceError`: a UTF-16/UTF-32 file (named, with the
command that converts it to UTF-8: decoding it here would hide that every other tool reading the file
expects UTF-8 too), a syntax error inside a JSON array (where that row ends, and so where the next one
starts, would be a guess; in JSONL a broken line is one bad row), brackets that do not match, one row
larger than `MAX_ROW_CHARS`, text after the array's closing ``]``.
"""

from __future__ import annotations

import codecs
import json
import re
from pathlib import Path
from typing import Any, Iterator

from .sources import DataSourceError, RowError

MAX_DEPTH = 64  # deepest nesting a row may have: a llava/messages row needs 4 or 5
CHUNK = 1 << 20  # characters read at a time
MAX_ROW_CHARS = 64 << 20  # one row larger than this makes the file unreadable (an unclosed string?)

_STRUCTURE = re.compile(r'["\[\]{},]')
_STRING_REST = re.compile(r'[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)  # from just after an opening quote to the closing one
_BAD_BYTE = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of a byte that is not UTF-8
_ID = re.compile(r'"id"\s*:\s*"?([^",}\n]{0,200})')
_CLOSE = {"]": "[", "}": "{"}
_WIDE_BOMS = (  # longest first: the UTF-32-LE BOM starts with the UTF-16-LE one
    (codecs.BOM_UTF32_LE, "UTF-32 (little-endian, with BOM)", "UTF-32"),
    (codecs.BOM_UTF32_BE, "UTF-32 (big-endian, with BOM)", "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16 (little-endian, with BOM)", "UTF-16"),
    (codecs.BOM_UTF16_BE, "UTF-16 (big-endian, with BOM)", "UTF-16"),
)


def printable(text: str) -> str:
    """`text` with undecodable bytes written as ``\\xNN`` (so a report can be printed and saved)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def salvage_id(text: str) -> str | None:
    """The ``"id"`` of a row that cannot be parsed, read from its raw text when it can be."""
    m = _ID.search(text)
    return printable(m.group(1)) if m else None


def open_text(path: Path):
    """The file as UTF-8 text (a UTF-8 BOM skipped, bad bytes kept as surrogate escapes, newlines as written).

    A UTF-16 or UTF-32 file is refused with the command that converts it: llavakit reads UTF-8 only."""
    with path.open("rb") as f:
        head = f.read(4)
    for bom, name, codec in _WIDE_BOMS:
        if head.startswith(bom):
            break
    else:
        name = codec = None
        if b"\x00" in head:  # JSON text starts with ASCII: NULs there mean a 2- or 4-byte encoding
            name, codec = "UTF-16 or UTF-32 (NUL bytes, no BOM)", "UTF-16LE"
    if name:
        raise DataSourceError(
            f"{path}: the file is encoded as {name}; llavakit reads JSON/JSONL as UTF-8. Convert it, e.g. "
            f"`iconv -f {codec} -t UTF-8 {path.name} > {path.stem}.utf8{path.suffix}` or `python -c \"import "
            f"pathlib; p = pathlib.Path('{path.name}'); pathlib.Path('{path.stem}.utf8{path.suffix}')"
            f".write_text(p.read_text('{codec.lower()}'), 'utf-8')\"`")
    return path.open(encoding="utf-8-sig", errors="surrogateescape", newline="")


def too_deep(text: str, start: int = 0, end: int | None = None, limit: int = MAX_DEPTH) -> bool:
    """Whether the JSON text nests more than `limit` arrays/objects (strings skipped). Cheap for
    ordinary rows: they hold fewer brackets than the limit, and then nothing is scanned."""
    end = len(text) if end is None else end
    if text.count("[", start, end) + text.count("{", start, end) <= limit:
        return False
    depth, pos = 0, start
    while True:
        m = _STRUCTURE.search(text, pos, end)
        if m is None:
            return False
        c, pos = m.group(), m.end()
        if c == '"':
            s = _STRING_REST.match(text, pos, end)
            if s is None:
                return False
            pos = s.end()
        elif c in "[{":
            depth += 1
            if depth > limit:
                return True
        elif c in "]}":
            depth -= 1


def decode_row(text: str, where: str, fix: str) -> Any:
    """One JSONL line -> the row, or a `RowError` (returned, not raised) saying what is wrong with it."""
    if too_deep(text):
        return RowError(f"too deeply nested: {where} nests more than {MAX_DEPTH} arrays/objects",
                        f"{fix} (a llava or messages row needs 5 levels)", id=salvage_id(text))
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        return RowError(f"unreadable json: {where}, column {e.colno}: {e.msg}", fix, id=salvage_id(text))
    except (ValueError, RecursionError) as e:  # a number too long to convert, ...
        return RowError(f"unreadable json: {where}: {e}", fix, id=salvage_id(text))
    bad = bad_byte(text)
    if bad is not None:
        return not_utf8(text, bad, f"{where}, column {bad + 1}", fix, row)
    return row


def bad_byte(text: str, start: int = 0, end: int | None = None) -> int | None:
    """Position of the first byte that was not UTF-8 (decoded with ``surrogateescape``), if any."""
    m = _BAD_BYTE.search(text, start, len(text) if end is None else end)
    return m.start() if m else None


def not_utf8(text: str, at: int, where: str, fix: str, row: Any = None, start: int = 0) -> RowError:
    """The `RowError` of a row whose text holds a byte that is not UTF-8 (the rest of the file may be fine)."""
    raw = row.get("id") if isinstance(row, dict) else None
    sid = printable(str(raw)) if isinstance(raw, (str, int)) and not isinstance(raw, bool) else None
    return RowError(f"not UTF-8: byte 0x{ord(text[at]) - 0xDC00:02x} at {where} is not valid UTF-8",
                    f"{fix}, or re-encode the file as UTF-8 (e.g. `iconv -f LATIN1 -t UTF-8`)",
                    id=sid if sid is not None else salvage_id(text[start:at + 2000]))


# --- the layouts -----------------------------------------------------------------------------------
def json_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(index, row) pairs; a row that cannot be read comes back as a `RowError` (see the module docstring)."""
    layout = sniff(path)
    if layout == "lines":
        yield from _lines(path)
    elif layout in ("array", "objects"):
        with open_text(path) as f:
            yield from _Values(f, path, array=layout == "array").rows()


def sniff(path: Path) -> str:
    """'array', 'lines', 'objects' (pretty-printed objects one after the other) or 'empty'."""
    with open_text(path) as f:
        head = ""
        while not head.strip() or "\n" not in head.lstrip():
            chunk = f.read(CHUNK)
            if not chunk or len(head) > MAX_ROW_CHARS:
                break
            head += chunk
    text = head.lstrip()
    if not text:
        return "empty"
    if text[0] == "[":
        return "array"
    line = text.split("\n", 1)[0]
    if text[0] != "{" or not isinstance(decode_row(line, "line 1", ""), RowError):
        return "lines"
    with open_text(path) as f:  # a first line that is not JSON: the start of a pretty-printed object?
        try:
            values = _Values(f, path, array=False)
            _, start, end = values.decode_value()
        except (DataSourceError, ValueError, RecursionError):
            return "lines"
        return "objects" if "\n" in values.buf[start:end] else "lines"


def _lines(path: Path) -> Iterator[tuple[int, Any]]:
    with open_text(path) as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                yield lineno - 1, decode_row(line, f"line {lineno}", f"fix or remove line {lineno} of {path.name} "
                                             "(each JSONL line must be one complete JSON object)")


class _Values:
    """JSON values read one at a time from a text file: the elements of an array, or values one after
    the other. Holds the current value and what was read past it, never the whole file."""

    def __init__(self, f, path: Path, array: bool):
        self.f, self.path, self.array = f, path, array
        self.buf, self.pos, self.eof = "", 0, False
        self.bad_bytes = False  # whether any text read so far was not UTF-8 (else rows are not searched)
        self.lines, self.col_base = 0, 0  # newlines in, and the last line's length of, what was dropped
        self.decoder = json.JSONDecoder()

    # --- buffer --------------------------------------------------------------------------------
    def more(self) -> bool:
        """Read another chunk (at least as much as is buffered, so a large value costs linear time),
        dropping what lies before ``self.pos``; False (and nothing moved) at the end of the file."""
        if self.eof:
            return False
        keep = min(self.pos, len(self.buf))
        chunk = self.f.read(max(CHUNK, len(self.buf) - keep))
        if not chunk:
            self.eof = True
            return False
        dropped = self.buf[:keep]
        self.lines += dropped.count("\n")
        nl = dropped.rfind("\n")
        self.col_base = len(dropped) - nl - 1 if nl >= 0 else self.col_base + len(dropped)
        self.buf, self.pos = self.buf[keep:] + chunk, self.pos - keep
        self.bad_bytes = self.bad_bytes or _BAD_BYTE.search(chunk) is not None
        return True

    def where(self, p: int) -> str:
        nl = self.buf.rfind("\n", 0, p)
        col = p - nl if nl >= 0 else self.col_base + p + 1
        return f"line {self.lines + self.buf.count(chr(10), 0, p) + 1}, column {col}"

    def skip_space(self) -> str:
        """The next non-whitespace character ('' at the end of the file), at ``self.pos``."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self.more():
                return ""

    def grow(self, start: int) -> bool:
        """More text for the value starting at `start`; False at the end of the file."""
        if len(self.buf) - start > MAX_ROW_CHARS:
            raise DataSourceError(f"{self.path}: the row at {self.where(start)} is larger than {MAX_ROW_CHARS >> 20} "
                                  "MiB or never ends (an unclosed string or bracket?); fix the file")
        self.pos = start
        return self.more()

    # --- values --------------------------------------------------------------------------------
    def decode_value(self) -> tuple[Any, int, int]:
        """(value, start, end) of the value at the current position; raises what ``json`` raises when
        it is broken (reading more first when it may only be cut off by the buffer's end)."""
        while True:
            start = self.pos
            try:
                value, end = self.decoder.raw_decode(self.buf, start)
            except json.JSONDecodeError as e:
                near_end = e.msg.startswith("Unterminated string") or e.pos >= len(self.buf) - 16
                if near_end and self.grow(start):
                    continue
                raise
            if end >= len(self.buf) - 1 and self.grow(start):  # a number may go on in the next chunk
                continue
            return value, start, end

    def value_end(self, start: int) -> int | None:
        """Where the value at `start` ends, from its brackets and strings alone (after a parse error);
        None when the file ends first. `DataSourceError` for brackets that do not match."""
        while True:
            stack, pos = [], start
            while True:
                m = _STRUCTURE.search(self.buf, pos)
                if m is None:
                    break
                c, pos = m.group(), m.end()
                if c == '"':
                    s = _STRING_REST.match(self.buf, pos)
                    if s is None:
                        break
                    pos = s.end()
                elif c in "[{":
                    stack.append(c)
                elif c in "]}" and stack:
                    if stack.pop() != _CLOSE[c]:
                        raise DataSourceError(f"{self.path}: unreadable JSON at {self.where(pos - 1)}: {c!r} does not "
                                              "close the bracket before it; the array's rows cannot be told apart. "
                                              "Fix the file, or convert it to JSONL")
                    if not stack:
                        return pos
                elif not stack:  # ',' or a closing bracket after a plain value
                    return pos - 1
            if not self.grow(start):
                return None
            start = self.pos

    def rows(self) -> Iterator[tuple[int, Any]]:
        index = 0
        if self.array:
            self.skip_space()
            self.pos += 1  # the '['
        while True:
            c = self.skip_space()
            if self.array and c == "]" and index == 0:  # an empty array
                self.pos += 1
                return self.trailing()
            if not c:
                if self.array:
                    yield index, RowError(f"truncated: the file ends at {self.where(self.pos)} before the JSON array "
                                          f"is closed; rows after #{index - 1} may be missing",
                                          "check that the file was written completely")
                return
            yield index, self.row(index)
            if self.pos < 0:  # the file ended inside the row
                return
            index += 1
            c = self.skip_space()
            if self.array and c == ",":
                self.pos += 1
            elif self.array and c == "]":
                self.pos += 1
                return self.trailing()
            elif self.array and c:
                raise DataSourceError(f"{self.path}: unreadable JSON at {self.where(self.pos)}: expected ',' or ']' "
                                      f"after row #{index - 1}, found {c!r}; fix the file, or convert it to JSONL")

    def row(self, index: int) -> Any:
        """The value at the current position, or its `RowError`; moves past it (to -1: the file ended)."""
        def where(p: int) -> str:  # built only for a report: counting lines is not free
            return f"row #{index} (from {self.where(p)})"

        def fix(p: int) -> str:
            return f"fix or remove {where(p)} of {self.path.name}"

        try:
            value, start, end = self.decode_value()
        except json.JSONDecodeError as e:
            start = self.pos
            if self.eof and (e.msg.startswith("Unterminated string") or e.pos >= len(self.buf.rstrip())):
                self.pos = -1
                return RowError(f"truncated: the file ends inside {where(start)}: {e.msg} at {self.where(e.pos)}",
                                "check that the file was written completely", id=salvage_id(self.buf[start:]))
            # Where a broken row ends would be a guess: the array as a whole is unreadable.
            raise DataSourceError(
                f"{self.path}: unreadable JSON at {self.where(e.pos)}, in {where(start)}: {e.msg}; fix the file (a "
                "JSON file must parse as a whole), or convert it to JSONL, where a broken line is one bad row") from None
        except (ValueError, RecursionError) as e:  # valid JSON Python cannot hold: skip the row by its brackets
            start = self.pos
            reason = (f"too deeply nested: {where(start)} nests more than {MAX_DEPTH} arrays/objects"
                      if isinstance(e, RecursionError) else f"unreadable json: {where(start)}: {e}")
            hint = fix(start)
            end = self.value_end(start)
            start = self.pos  # (reading more may have moved the row to the buffer's start)
            if end is None:
                self.pos = -1
                return RowError(f"truncated: the file ends inside {where(start)}", "check that the file was written "
                                "completely", id=salvage_id(self.buf[start:]))
            self.pos = end
            return RowError(reason, hint, id=salvage_id(self.buf[start:end]))
        self.pos = end
        if too_deep(self.buf, start, end):
            return RowError(f"too deeply nested: {where(start)} nests more than {MAX_DEPTH} arrays/objects",
                            fix(start), id=salvage_id(self.buf[start:min(end, start + 10000)]))
        bad = bad_byte(self.buf, start, end) if self.bad_bytes else None
        if bad is not None:
            return not_utf8(self.buf, bad, f"{self.where(bad)} (row #{index})", fix(start), value, start)
        return value

    def trailing(self) -> None:
        c = self.skip_space()
        if c:
            raise DataSourceError(f"{self.path}: unreadable JSON at {self.where(self.pos)}: text after the array's "
                                  "closing ']'; a .json file holds one array (use JSONL for several)")
