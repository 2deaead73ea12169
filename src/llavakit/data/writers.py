"""Writers: conversations back to a llava or messages ``.json`` array / ``.jsonl`` file (``data convert``)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any, Iterable

from PIL import Image

from .conversation import Conversation

ROW_SCHEMAS = ("llava", "messages")


def write_image_ref(ref: Any, base: Path, stem: str, conv: Conversation, k: int | str) -> str:
    """A path string for `ref`, relative to `base`; embedded images are saved under it first."""
    if isinstance(ref, dict):  # a datasets {"bytes", "path"} value
        ref = ref.get("bytes") or ref.get("path")
    if isinstance(ref, str):
        if "://" in ref:
            return ref
        rel = os.path.relpath(ref, base)
        return ref if rel.startswith("..") else rel
    folder = base / f"{stem}_images"
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{conv.index:07d}_{k}"
    if isinstance(ref, bytes):
        with Image.open(io.BytesIO(ref)) as im:  # keep the encoded bytes; only sniff the extension
            ext = (im.format or "bin").lower()
        (folder / f"{name}.{ext}").write_bytes(ref)
        return f"{folder.name}/{name}.{ext}"
    if isinstance(ref, Image.Image):
        ref.save(folder / f"{name}.png")
        return f"{folder.name}/{name}.png"
    raise TypeError(f"{conv.label}: cannot write image reference of type {type(ref).__name__}")


_LLAVA_ROLES = {"user": "human", "assistant": "gpt", "system": "system"}


def write_conversations(conversations: Iterable[Conversation], out_path: str | os.PathLike, to: str = "llava",
                        image_folder: str | os.PathLike | None = None) -> int:
    """Write conversations as a llava or messages ``.json`` array / ``.jsonl`` file; returns the count.

    Image paths are written relative to `image_folder` (default: the output file's folder), i.e.
    what to pass as ``--image-folder`` when reading the output. Images held as bytes or PIL (from
    a datasets source) are saved as files under it.
    """
    if to not in ROW_SCHEMAS:
        raise ValueError(f"unknown output format {to!r}; valid: {list(ROW_SCHEMAS)}")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    base = Path(os.path.abspath(image_folder or out.parent))
    rows = []
    for conv in conversations:
        images = [write_image_ref(ref, base, out.stem, conv, k) for k, ref in enumerate(conv.images)]
        row: dict[str, Any] = {} if conv.id is None else {"id": conv.id}
        videos = [[write_image_ref(f, base, out.stem, conv, f"v{k}_{j}") for j, f in enumerate(v)]
                  if isinstance(v, (list, tuple)) else write_image_ref(v, base, out.stem, conv, f"v{k}")
                  for k, v in enumerate(conv.videos)]
        if to == "llava":
            if len(images) == 1:
                row["image"] = images[0]
            elif images:
                row["images"] = images
            row["conversations"] = [{"from": _LLAVA_ROLES[t.role], "value": t.content} for t in conv.turns]
        else:
            row["messages"] = [{"role": t.role, "content": t.content} for t in conv.turns]
            if images:
                row["images"] = images
        if videos:
            row["videos"] = videos  # a list of videos (each a path or a list of frame paths), one <video> each
        rows.append(row)
    with out.open("w", encoding="utf-8") as f:
        if out.suffix.lower() == ".jsonl":
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        else:
            json.dump(rows, f, ensure_ascii=False, indent=1)
            f.write("\n")
    return len(rows)
