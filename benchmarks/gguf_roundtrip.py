"""Round trip of a trained llavakit model through GGUF and llama.cpp, in numbers (docs/interop.md).

For each dtype (f32, f16, q8_0): `llavakit export --format gguf` time, the two files' sizes, llama.cpp's
greedy answers to held-out image questions (llama-cpp-python, the exported text GGUF + mmproj), its
tokens/s next to llavakit's own greedy generation on the same CPU and questions, the fraction of answers
identical to llavakit's, and each side's accuracy against the reference answers. For a CLIP tower, also the
fraction identical to llavakit computing llama.cpp's own CLIP graph (CLS token after the patches,
ggml-org/llama.cpp#25814; `llamacpp_clip_order`): that one measures the export, the other the runtime too.

    .venv/bin/python benchmarks/gguf_roundtrip.py --model runs/demo/model \\
        --questions runs/demo/data/test.jsonl --image-folder runs/demo/data/images --json gguf.json

`--questions`: JSONL rows {"question" (with <image> markers), "image" or "images", "answer"}: the demo's
held-out split (`llavakit demo` writes it to OUT/data/test.jsonl) or any eval file of that form.
Needs the `llamacpp` extra (pip install 'llavakit[llamacpp]').
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

DTYPES = ("f32", "f16", "q8_0")


def load_rows(path: Path, limit: int | None) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows[:limit] if limit else rows


def row_images(row: dict, folder: Path) -> list:
    from PIL import Image

    names = row["images"] if "images" in row else [row["image"]]
    return [Image.open(folder / n).convert("RGB") for n in names]


def measure(model_dir: Path, rows: list[dict], folder: Path, max_new_tokens: int, threads: int, work: Path) -> dict:
    import torch

    import llavakit
    from llavakit.data.conversation import Turn
    from llavakit.demo.score import normalize
    from llavakit.infer.generate import GenerationSettings, Generator, StopTrimmer
    from llavakit.interop import export
    from llavakit.interop.gguf_mmproj import llamacpp_clip_order
    from llavakit.interop.gguf_runtime import LlamaCppLlava

    torch.set_num_threads(threads)
    model, processor = llavakit.load(model_dir)
    model.eval()
    gen = Generator(model, processor)
    convs = [[Turn("user", r["question"])] for r in rows]
    images = [row_images(r, folder) for r in rows]
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    t = time.perf_counter()
    ours = [gen.generate([c], [im], settings)[0] for c, im in zip(convs, images)]  # batch 1, like llama.cpp
    seconds = time.perf_counter() - t
    tokens = sum(len(processor.tokenizer(a, add_special_tokens=False)["input_ids"]) + 1 for a in ours)  # + the stop
    with llamacpp_clip_order(model):  # what llama.cpp's graph computes (unchanged for towers without CLS)
        as_llamacpp = [gen.generate([c], [im], settings)[0] for c, im in zip(convs, images)]
    result = {"model": str(model_dir), "params": sum(p.numel() for p in model.parameters()), "questions": len(rows),
              "max_new_tokens": max_new_tokens, "threads": threads, "llavakit_tok_s": round(tokens / seconds, 1),
              "llavakit_accuracy": round(sum(normalize(a) == normalize(r["answer"]) for a, r in zip(ours, rows)) / len(rows), 4)}
    for dtype in DTYPES:
        out = work / f"gguf-{dtype}"
        t = time.perf_counter()
        export((model, processor), out, format="gguf", dtype=dtype, overwrite=True)
        export_s = time.perf_counter() - t
        text_file, mmproj = out / f"model-{dtype}.gguf", out / f"mmproj-{dtype}.gguf"
        with LlamaCppLlava(text_file, mmproj, n_threads=threads) as runtime:
            t, tokens, theirs = time.perf_counter(), 0, []
            for conv, ims in zip(convs, images):
                prompt = gen.template.render_prompt(conv)
                bos = processor.tokenizer.bos_token
                if bos and prompt.startswith(bos):  # llama.cpp adds the bos itself
                    prompt = prompt[len(bos):]
                answer = runtime.answer(prompt, ims, max_new_tokens=max_new_tokens, stop_ids=gen.eos_token_ids)
                tokens += len(answer.ids) + 1
                theirs.append(StopTrimmer.trim(answer.text, gen.stop_strings).strip())
            seconds = time.perf_counter() - t
        result[dtype] = {
            "export_s": round(export_s, 2), "text_mib": round(text_file.stat().st_size / 2**20, 2),
            "mmproj_mib": round(mmproj.stat().st_size / 2**20, 2), "llamacpp_tok_s": round(tokens / seconds, 1),
            "same_answer": round(sum(a.strip() == b for a, b in zip(ours, theirs)) / len(rows), 4),
            "same_as_its_graph": round(sum(a.strip() == b for a, b in zip(as_llamacpp, theirs)) / len(rows), 4),
            "accuracy": round(sum(normalize(b) == normalize(r["answer"]) for b, r in zip(theirs, rows)) / len(rows), 4),
            "differ": [{"id": r.get("id"), "question": r["question"], "llavakit": a, "llama.cpp": b}
                       for a, b, r in zip(ours, theirs, rows) if a.strip() != b][:5]}
        print(f"{dtype}: {json.dumps(result[dtype])}", flush=True)
    return result


def table(result: dict) -> str:
    lines = ["| dtype | export | text GGUF | mmproj | llama.cpp tok/s | llavakit tok/s | same answer as llavakit "
             "| same as llavakit with llama.cpp's graph | accuracy (llama.cpp / llavakit) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for dtype in DTYPES:
        r = result[dtype]
        lines.append(f"| {dtype} | {r['export_s']:.2f} s | {r['text_mib']:.2f} MiB | {r['mmproj_mib']:.2f} MiB | "
                     f"{r['llamacpp_tok_s']:.0f} | {result['llavakit_tok_s']:.0f} | {100 * r['same_answer']:.1f}% | "
                     f"{100 * r['same_as_its_graph']:.1f}% | "
                     f"{100 * r['accuracy']:.1f}% / {100 * result['llavakit_accuracy']:.1f}% |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="a llavakit model folder (or a run's model/)")
    p.add_argument("--questions", type=Path, required=True, help="JSONL rows with question, image(s), answer")
    p.add_argument("--image-folder", type=Path, required=True)
    p.add_argument("--limit", type=int, default=None, help="first N rows only")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--threads", type=int, default=2, help="CPU threads for both runtimes")
    p.add_argument("--json", type=Path, default=None, help="write the result here")
    args = p.parse_args(argv)
    rows = load_rows(args.questions, args.limit)
    with tempfile.TemporaryDirectory() as work:
        result = measure(args.model, rows, args.image_folder, args.max_new_tokens, args.threads, Path(work))
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
