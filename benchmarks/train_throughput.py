"""Training throughput: llavakit beside the path users pick today, same shapes, weights, data and batch.

    python benchmarks/train_throughput.py                            # CPU shape: stage-2 and stage-1 tables
    python benchmarks/train_throughput.py --json perf.json           # + the rows as JSON (with ratio_vs_peer)
    python benchmarks/train_throughput.py --device cuda --shape gpu  # 1.1B Llama + CLIP-L/14-336, bf16, MFU
    python benchmarks/train_throughput.py --shape micro --steps 1    # seconds; what tests/test_benchmark_smoke.py runs
    python benchmarks/train_throughput.py --shape real --threads 2   # SmolLM2-135M + CLIP-B/16 against TRL (~20 min)

The peer ("the path users pick today"): transformers' `LlavaForConditionalGeneration` with the *same
weights* (llavakit exports its model to an llava-hf folder, the peer loads it), vision tower frozen,
trained by HF `Trainer` with the seed-004 collator: the conversation rendered by the processor's
chat template, ``processor(text, images, padding=True)``, labels = input ids with pad and image
tokens set to -100, so it supervises system prompt and questions as well as answers (its loss is not
llavakit's; its work per step is the same model on the same tokens). Images are decoded in that
collator, in the main process (``dataloader_num_workers=0``).

llavakit: a thin harness over ``train/loop.py``'s own pieces (``assemble``, ``prepare_data``,
``apply_stage``, ``epoch_order``, ``make_loader``, ``make_collator``, ``optimizer_step``), so each step is the
trainer's step, timed one by one. Each switch is a row: length grouping (``data.group_by_length``),
supervised-only logits (``train.supervised_logits_only``), padding-free packing (``data.packing``),
image decoding in dataloader workers (``data.num_workers``), the chunked LM-head loss
(``train.loss_chunk_size``), gradient checkpointing and, for stage 1, the frozen-vision feature cache
(``train/feature_cache.py``).

TRL: its ``SFTTrainer`` on the same llava-hf weights and data order, set up as TRL documents VLM SFT
(``throughput_trl.py``), once with its defaults (gradient checkpointing on) and once without checkpointing;
the rows are left out, with a note, where trl is not installed (``pip install 'llavakit[bench]'``). The
``real`` shape (SmolLM2-135M-shaped LLM with SmolLM2's tokenizer, CLIP-B/16 at 224 px, 128 samples with one
or two images) times a few steps by default; ``--json`` then adds ``ratio_vs_trl`` (real tokens/s of the
best llavakit row over TRL's) and ``memory_ratio_vs_trl`` (peak memory of that row over TRL's).

Measurement. Every row runs in a fresh subprocess (so peak memory is its own): warm-up steps from
another epoch's order, then one full epoch (or ``--steps``), timed from the end of the last warm-up step
to the end of the last step, data loading included. Both sides walk the same seeded shuffle (llavakit's
``epoch_order``; the peer gets it as a pre-ordered dataset with ``train_sampling_strategy=
"sequential"``), so rows see the same samples (in an epoch; a window of ``--steps`` holds other samples
when length grouping reorders the batches). When only some steps are timed, the first warm-up step of
every row is the batch of the longest samples, so each peak memory includes the same worst batch. Real
tokens = non-pad tokens; padding fraction = pad slots / all slots; peak memory = the process's max RSS
on CPU (``torch.cuda.max_memory_allocated`` on CUDA), and "Δ" = that peak minus the memory in use right
before the first step. MFU counts 6N FLOPs per token for trained weights, 4N for frozen weights
gradients flow through, 2N per patch token for the frozen vision tower (0 when its features come from
the cache), the LM head only at supervised positions, attention scores not at all; against
``--peak-tflops`` (989: H200 dense bf16).

This file is the command line; the code is in four modules beside it: ``throughput_workload.py``
(shapes, rows, the data and models on disk), ``throughput_harness.py`` (timing one row, llavakit's
or the peer's, and its FLOPs), ``throughput_trl.py`` (TRL's row) and ``throughput_report.py`` (running
rows, tables, summary).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
from pathlib import Path

# The sibling modules below import each other by name: benchmarks/ is on sys.path when this file runs
# as a script; put it there too when the file is loaded by path from elsewhere.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from throughput_harness import Meter, run_llavakit, run_peer  # noqa: E402
from throughput_report import (best_of, command_line, format_table, machine_name, run_isolated,  # noqa: E402
                               run_row, summarise, trl_reference)
from throughput_workload import SHAPES, Row, prepare_workload, stage1_rows, stage2_rows  # noqa: E402

__all__ = ["SHAPES", "Meter", "Row", "format_table", "main", "prepare_workload", "run_isolated", "run_llavakit",
           "run_peer", "run_row", "stage1_rows", "stage2_rows"]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="cpu")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--stages", default="", help="which tables: '2', '1' or '2,1' (default: the shape's; real: 2)")
    p.add_argument("--rows", default="", help="comma-separated row numbers per table, in the order of "
                   "throughput_workload.stage2_rows / stage1_rows (1 = peer), default all")
    p.add_argument("--steps", type=int, default=-1, help="timed steps (default: the shape's; 0 = one full epoch; "
                   "one epoch except at the real shape, which times 2)")
    p.add_argument("--warmup", type=int, default=-1, help="warm-up steps (default: the shape's, 2; real: 1)")
    p.add_argument("--repeats", type=int, default=3, help="runs per row, round robin; the best one is reported")
    p.add_argument("--batch", type=int, default=0, help="default: the shape's (8)")
    p.add_argument("--workers", type=int, default=-1, help="dataloader workers in the 'workers' rows "
                   "(default: the shape's, 1 on CPU, 4 on GPU)")
    p.add_argument("--precision", choices=["", "fp32", "bf16"], default="", help="default: the shape's (autocast)")
    p.add_argument("--threads", type=int, default=-1, help="torch threads (default: the shape's; 0 = torch's)")
    p.add_argument("--attn", default="auto", help="sdpa | eager | flash_attention_2 | auto (flash when installed)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="for MFU (989 = H200 dense bf16)")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "llavakit-bench")
    p.add_argument("--inline", action="store_true", help="run rows in this process (fast; memory not isolated)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--_row", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_out", default=None, help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    args.argv = [a for a in argv if not a.startswith("--_")]
    shape = SHAPES[args.shape]
    args.batch = args.batch or shape["batch"]
    args.threads = shape["threads"] if args.threads < 0 else args.threads
    args.workers = shape["workers"] if args.workers < 0 else args.workers
    args.precision = args.precision or shape["precision"]
    args.stages = args.stages or shape.get("stages", "2,1")
    args.warmup = shape.get("warmup", 2) if args.warmup < 0 else args.warmup
    args.steps = shape.get("steps", 0) if args.steps < 0 else args.steps
    if "1" in args.stages.split(",") and "1" not in shape.get("stages", "2,1").split(","):
        p.error(f"--shape {args.shape} has no stage-1 workload: use --stages 2")
    if args.attn == "auto":
        import importlib.util

        args.attn = "flash_attention_2" if args.device == "cuda" and importlib.util.find_spec("flash_attn") else "sdpa"
    if args.warmup < 1:
        p.error("--warmup must be >= 1 (the timed window starts at the end of a warm-up step)")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    wd = prepare_workload(args.shape, args.workdir)
    if args._row is not None:  # a child: one row
        result = run_row(Row(**json.loads(args._row)), wd, args)
        Path(args._out).write_text(json.dumps(result))
        return result

    import importlib.util

    import torch

    chosen = {int(x) for x in args.rows.split(",") if x}
    has_trl = importlib.util.find_spec("trl") is not None
    mfu = args.device == "cuda"
    report = {"date": datetime.date.today().isoformat(), "machine": machine_name(args), "shape": args.shape,
              "shape_spec": shape, "device": args.device, "batch": args.batch, "attn": args.attn,
              "precision": args.precision, "workers": args.workers,
              "threads": args.threads or torch.get_num_threads(), "warmup": args.warmup, "steps": args.steps,
              "samples_in_dataset": shape["samples"], "command": command_line(argv),
              "tokenizer": json.loads((wd / "ready.json").read_text()).get("tokenizer", "a BPE trained on the data")}
    if has_trl:
        import trl

        report["trl_version"] = trl.__version__
    print(f"tokenizer: {report['tokenizer']}")
    tables = {"2": stage2_rows(args.workers), "1": stage1_rows(args.workers)}
    for stage in [s for s in args.stages.split(",") if s]:
        rows = [r for i, r in enumerate(tables[stage], 1) if (i in chosen if chosen else not r.compile)]
        if importlib.util.find_spec("bitsandbytes") is None and any(r.optim == "adamw_8bit" for r in rows):
            print("NOTE: bitsandbytes is not installed, the 8-bit AdamW row is left out (pip install 'llavakit[qlora]')")
            rows = [r for r in rows if r.optim != "adamw_8bit"]
        if not has_trl and any(r.system == "trl" for r in rows):
            print("NOTE: trl is not installed, the TRL rows are left out (pip install 'llavakit[bench]')")
            rows = [r for r in rows if r.system != "trl"]
        runs: list[list[dict]] = [[] for _ in rows]
        for rep in range(args.repeats):  # round robin, so a noisy minute hits one run of a row, not all
            for r, got in zip(rows, runs):
                print(f"[stage {stage}, run {rep + 1}/{args.repeats}] {r.name.strip()} ...", flush=True)
                try:
                    got.append(run_row(r, wd, args) if args.inline else run_isolated(r, wd, args))
                except RuntimeError as e:  # e.g. out of memory: the other rows still count
                    print(f"  FAILED: {str(e)[-2000:]}", flush=True)
                    report.setdefault("failed_rows", []).append(r.name.strip())
        results = [best_of(got) for got in runs if got]
        peer = next((r for r in results if r["config"]["system"] == "peer"), None)
        trl = trl_reference(results)
        for r in results:
            r["ratio_vs_peer"] = r["real_tokens_per_s"] / peer["real_tokens_per_s"] if peer else None
            r["ratio_vs_trl"] = r["real_tokens_per_s"] / trl["real_tokens_per_s"] if trl else None
        timed = f"{args.steps} timed steps ({args.steps * args.batch} samples)" if args.steps else "one epoch timed"
        print(f"\nstage {stage} ({'projector + LLM train, vision frozen' if stage == '2' else 'projector trains'}), "
              f"shape {args.shape}, batch {args.batch}, {args.device}, attn {args.attn}, "
              f"threads {report['threads']}, {shape['samples']} samples, {timed}:")
        print(format_table(results, peer, mfu, trl))
        report[f"stage{stage}"] = results
    summarise(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
