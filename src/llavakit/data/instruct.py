"""What `llavakit data generate` asks a teacher, and how its replies become (or do not become) samples.

Kinds (`KINDS`), as in LLaVA-Instruct-158K: ``conversation`` (several question/answer turns),
``detail`` (a question drawn from `prompts/detailed.txt`, the teacher's description as the answer),
``reasoning`` (questions that need reasoning, answered step by step) — text mode, the teacher reads
captions and boxes (`context`); ``image`` — an image-capable teacher sees the image.

The prompts are files (`prompts/<kind>.yaml`: ``system``, optional ``user`` template, ``examples`` of
``context`` -> ``reply``), so a user edits a copy and passes its folder with ``--prompts``.

Replies are JSON (`SCHEMAS`). `parse_reply` repairs what is common and harmless — code fences, text
around the JSON, trailing commas, a reply cut off after some complete pairs (those pairs are kept) —
and otherwise rejects with a reason. `clean_pairs` drops pairs that are empty, hold ``<image>``, or
mention the caption / descriptions / boxes / coordinates (LLaVA's prompts forbid it: the student sees
an image, not its caption).
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .conversation import IMAGE_MARKER

KINDS = ("conversation", "detail", "reasoning", "image")
TEXT_KINDS = KINDS[:3]
_QA = {"type": "object", "properties": {"qa": {"type": "array", "minItems": 1, "items": {
    "type": "object", "properties": {"question": {"type": "string"}, "answer": {"type": "string"}},
    "required": ["question", "answer"]}}}, "required": ["qa"]}
SCHEMAS = {"conversation": _QA, "reasoning": _QA, "image": _QA,
           "detail": {"type": "object", "properties": {"description": {"type": "string"}},
                      "required": ["description"]}}
# What the student must never read: it sees the image, not the teacher's inputs.
LEAKS = re.compile(r"\b(captions?|bounding[- ]box(es)?|(the|these|those) boxes|box coordinates|coordinates|"
                   r"(the|these|those|given|provided) (descriptions?|sentences))\b", re.IGNORECASE)
RESPONSE_FORMATS = ("json_object", "json_schema", "json_object+schema", "none")


@dataclass
class Prompt:
    system: str
    user: str = "{context}"
    examples: list[tuple[str, str]] = field(default_factory=list)


def load_prompt(kind: str, folder: str | os.PathLike | None = None) -> Prompt:
    import yaml

    name = f"{kind}.yaml"
    where = Path(folder) / name if folder else None
    if where is not None and not where.is_file():
        raise FileNotFoundError(f"{where}: no prompt for kind {kind!r} in --prompts {folder} "
                                f"(copy the shipped prompts folder and edit it)")
    text = where.read_text(encoding="utf-8") if where else \
        resources.files("llavakit.data").joinpath("prompts", name).read_text(encoding="utf-8")
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict) or not isinstance(data.get("system"), str):
        raise ValueError(f"{where or name}: a prompt file needs 'system' (text), optional 'user' and 'examples'")
    examples = [(str(e["context"]).strip(), str(e["reply"]).strip()) for e in data.get("examples") or []]
    return Prompt(data["system"].strip(), str(data.get("user") or "{context}").strip(), examples)


def context(captions: list[str], boxes: list[dict]) -> str:
    """What a text teacher reads: one caption per line, then ``label: [x1, y1, x2, y2]`` per box."""
    lines = list(captions)
    lines += [f"{b['label']}: [{', '.join(f'{v:.2f}' for v in b['box'])}]" for b in boxes]
    return "\n".join(lines)


def check_boxes(raw: Any) -> list[dict]:
    """Boxes as ``[{"label", "box": [x1, y1, x2, y2]}]`` normalised to 0..1; ValueError saying what is wrong."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ValueError(f"'boxes' is {type(raw).__name__}, expected a list of {{label, box}}")
    out = []
    for k, b in enumerate(raw):
        if not isinstance(b, dict) or not isinstance(b.get("label"), str):
            raise ValueError(f"boxes[{k}] needs a 'label' (text) and a 'box' [x1, y1, x2, y2]")
        box = b.get("box", b.get("bbox"))
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
            raise ValueError(f"boxes[{k}].box is {box!r}, expected four numbers [x1, y1, x2, y2]")
        x1, y1, x2, y2 = box
        if not (0 <= x1 <= x2 <= 1 and 0 <= y1 <= y2 <= 1):
            raise ValueError(f"boxes[{k}].box {box} is not normalised: need 0 <= x1 <= x2 <= 1 and 0 <= y1 <= y2 <= 1 "
                             "(divide pixel coordinates by the image's width and height)")
        out.append({"label": b["label"], "box": [float(v) for v in box]})
    return out


def messages(kind: str, prompt: Prompt, ctx: str = "", turns: int = 4, image_url: str | None = None) -> list[dict]:
    """Chat messages: system, the few-shot examples as user/assistant pairs, then this sample."""
    fill = {"turns": turns, "context": ctx}
    out = [{"role": "system", "content": prompt.system.replace("{turns}", str(turns))}]
    for example_context, reply in prompt.examples:
        out += [{"role": "user", "content": prompt.user.replace("{context}", example_context)},
                {"role": "assistant", "content": reply}]
    text = prompt.user
    for key, value in fill.items():
        text = text.replace("{" + key + "}", str(value))
    if image_url is None:
        out.append({"role": "user", "content": text})
    else:
        out.append({"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                                {"type": "text", "text": text}]})
    return out


def response_format(kind: str, how: str) -> dict | None:
    if how == "none":
        return None
    if how == "json_object":
        return {"type": "json_object"}
    if how == "json_object+schema":  # llama-cpp-python's extension: the reply is constrained to the schema
        return {"type": "json_object", "schema": SCHEMAS[kind]}
    return {"type": "json_schema", "json_schema": {"name": f"llavakit_{kind}", "schema": SCHEMAS[kind]}}


class Rejected(ValueError):
    """A reply that gives no sample; the message is the reason logged."""


_FENCE = re.compile(r"```(?:json)?\s*(.*?)(?:```|$)", re.DOTALL)
_TRAILING_COMMA = re.compile(r",\s*([}\]])")


def parse_reply(text: str, kind: str) -> tuple[Any, str]:
    """(the reply's JSON, what was repaired or ''); `Rejected` when nothing usable is in it."""
    notes = []
    fenced = _FENCE.search(text)
    if fenced:
        text = fenced.group(1)
        notes.append("code fence removed")
    start = min([i for i in (text.find("{"), text.find("[")) if i >= 0], default=-1)
    if start < 0:
        raise Rejected("not JSON: the reply holds no '{' or '['")
    if start > 0 and text[:start].strip():
        notes.append("text before the JSON removed")
    body = text[start:]
    decoder = json.JSONDecoder()
    for candidate, note in ((body, ""), (_TRAILING_COMMA.sub(r"\1", body), "trailing commas removed")):
        try:
            value, end = decoder.raw_decode(candidate)
        except json.JSONDecodeError:
            continue
        if candidate[end:].strip():
            notes.append("text after the JSON removed")
        return value, "; ".join(notes + ([note] if note else []))
    salvaged = _salvage(body, kind)
    if salvaged is None:
        raise Rejected("malformed JSON that could not be repaired: " + body[:80].replace("\n", " "))
    return salvaged, "; ".join(notes + ["cut-off or malformed JSON: complete parts kept"])


def _salvage(body: str, kind: str) -> Any:
    """The complete question/answer objects (or the complete description) in a broken reply."""
    decoder = json.JSONDecoder()
    if kind == "detail":
        m = re.search(r'"description"\s*:\s*("(?:[^"\\]|\\.)*")', body)
        return {"description": json.loads(m.group(1))} if m else None
    pairs, i = [], body.find("{", 1)
    while i >= 0:
        try:
            value, end = decoder.raw_decode(body, i)
        except json.JSONDecodeError:
            i = body.find("{", i + 1)
            continue
        if isinstance(value, dict) and "question" in value and "answer" in value:
            pairs.append(value)
        i = body.find("{", end)
    return {"qa": pairs} if pairs else None


def qa_pairs(value: Any, kind: str) -> list[tuple[str, str]]:
    """(question, answer) pairs from parsed JSON; `Rejected` when the shape is wrong."""
    if kind == "detail":
        text = value.get("description") if isinstance(value, dict) else None
        if not isinstance(text, str):
            raise Rejected("wrong shape: expected {\"description\": \"...\"}")
        return [("", text)]
    items = value.get("qa") if isinstance(value, dict) else value
    if not isinstance(items, list):
        raise Rejected("wrong shape: expected {\"qa\": [{\"question\", \"answer\"}, ...]}")
    out = []
    for item in items:
        if not isinstance(item, dict):
            raise Rejected(f"wrong shape: a qa item is {type(item).__name__}, not an object")
        q, a = item.get("question"), item.get("answer")
        out.append((q if isinstance(q, str) else "", a if isinstance(a, str) else ""))
    return out


def clean_pairs(pairs: list[tuple[str, str]], kind: str) -> tuple[list[tuple[str, str]], list[str]]:
    """Pairs a student may learn from, and why each other one was dropped."""
    kept, dropped = [], []
    for q, a in pairs:
        q, a = " ".join(q.split()) if kind != "detail" else "", a.strip()
        leak = LEAKS.search(f"{q}\n{a}")
        if (kind != "detail" and not re.search(r"\w", q)) or not re.search(r"\w", a):
            dropped.append("empty question or answer")  # "" or a placeholder such as "..."
        elif IMAGE_MARKER in q or IMAGE_MARKER in a:
            dropped.append(f"holds {IMAGE_MARKER}")
        elif leak:
            dropped.append(f"mentions {leak.group(0)!r} (the student sees the image, not the teacher's input)")
        else:
            kept.append((q, a))
    return kept, dropped


def to_turns(pairs: list[tuple[str, str]], kind: str, key: str, seed: int,
             detail_questions: list[str]) -> list[dict]:
    """LLaVA ``conversations``: the image marker before or after the first question, as in LLaVA's data."""
    rng = random.Random(f"{seed}:{key}")
    if kind == "detail":
        pairs = [(rng.choice(detail_questions), pairs[0][1])]
    turns = []
    for k, (q, a) in enumerate(pairs):
        if k == 0:
            q = f"{IMAGE_MARKER}\n{q}" if rng.random() < 0.5 else f"{q}\n{IMAGE_MARKER}"
        turns += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return turns
