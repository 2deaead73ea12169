"""`llavakit smoke`: build a tiny random model from scratch-made components and generate.

Checks an install end to end without any download: components saved to a folder and loaded back
by path (the code path a hub id takes), a two-image prompt, greedy generation, save and reload.
"""

from __future__ import annotations

import tempfile
from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument("--out", default=None, help="where to write the tiny model (default: a temp dir)")


def run(args) -> int:
    import torch
    from PIL import Image

    import llavakit
    from llavakit.demo.tiny import save_tiny_llm, save_tiny_vision

    root = Path(args.out or tempfile.mkdtemp(prefix="llavakit-smoke-"))
    vision = save_tiny_vision(root / "vision", "clip")
    llm = save_tiny_llm(root / "llm", "llama")
    model, processor = llavakit.build(vision, llm, projector="mlp2x_gelu")
    images = [Image.new("RGB", (48, 32), (220, 30, 30)), Image.new("RGB", (32, 32), (30, 30, 220))]
    prompt = "USER: <image> and <image> Which one is red? ASSISTANT:"
    inputs = processor(text=prompt, images=images, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    text = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    reloaded, _ = llavakit.load(root / "model")
    with torch.no_grad():
        same = torch.equal(reloaded(**inputs).logits, model(**inputs).logits)
    print(f"built   : {vision} + {llm} ({sum(p.numel() for p in model.parameters()):,} parameters)")
    print(f"tokens  : {inputs['input_ids'].shape[1]} ({model.config.image_seq_length} per image, 2 images)")
    print(f"generate: {text!r} (random weights: the words mean nothing yet)")
    print(f"saved   : {root / 'model'}; reload gives identical logits: {same}")
    return 0 if same else 1
