"""Packed attention (`llavakit.model.packed_attention`) against the dense block-diagonal mask and against padding.

Two measurements meant to hold on a shared, busy CPU: CPU time of this process (`time.process_time`, one
torch thread), with the variants interleaved on the same inputs.

1. **Attention alone**: building the mask plus the attention function, forward + backward, at SmolLM2-135M's
   heads (9 query / 3 kv heads, head dim 64) for the sample lengths of `--lens`: a packed row with
   transformers' dense ``[ΣL, ΣL]`` mask (``sdpa``), the same row with ``sdpa_packed``, and the padded batch.
2. **Whole model**: the first `--batches` batches of 8 of the `--shape` workload (`throughput_workload.py`),
   forward + backward on one model: the length-grouped batches padded (the "length grouping" row), packed
   with the dense mask (before) and packed with ``sdpa_packed`` (now); and the shuffled batches packed with
   ``sdpa_packed`` (the "+ packing" row). With all 16 batches (one epoch) every variant sees the same samples.

    python benchmarks/throughput_packing.py                         # cpu workload, 16 batches (one epoch)
    python benchmarks/throughput_packing.py --sup --lens 112,150,176,190,200,160,229,190
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from throughput_workload import prepare_workload  # noqa: E402


def cpu_seconds(fn, repeats: int) -> float:
    """Best CPU time of `repeats` calls of `fn` (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.process_time()
        fn()
        best = min(best, time.process_time() - t)
    return best


def attention_alone(lens: list[int], repeats: int = 5) -> list[tuple[str, float]]:
    from transformers import LlamaConfig
    from transformers.masking_utils import create_causal_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from llavakit.model.packed_attention import PACKED_SDPA

    heads, kv_heads, dim = 9, 3, 64
    total, batch, longest = sum(lens), len(lens), max(lens)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = heads // kv_heads, True

    def config(impl):
        c = LlamaConfig(hidden_size=heads * dim, num_attention_heads=heads, num_key_value_heads=kv_heads,
                        num_hidden_layers=1)
        c._attn_implementation = impl
        return c

    def qkv(b, n):
        return [torch.randn(b, h, n, dim, requires_grad=True) for h in (heads, kv_heads, kv_heads)]

    def packed(impl):
        q, k, v = qkv(1, total)
        pos = torch.cat([torch.arange(n) for n in lens])[None]  # [1, ΣL], restarting per sample

        def step():
            mask = create_causal_mask(config(impl), torch.empty(1, total, 1), None, None, position_ids=pos)
            out = ALL_ATTENTION_FUNCTIONS[impl](module, q, k, v, mask, scaling=dim ** -0.5, position_ids=pos)[0]
            out.sum().backward()
        return step

    def padded():
        q, k, v = qkv(batch, longest)
        keep = (torch.arange(longest)[None] < torch.tensor(lens)[:, None]).long()  # [B, L]

        def step():
            mask = create_causal_mask(config("sdpa"), torch.empty(batch, longest, 1), keep, None)
            out = ALL_ATTENTION_FUNCTIONS["sdpa"](module, q, k, v, mask, scaling=dim ** -0.5)[0]
            out.sum().backward()
        return step

    return [("packed row, dense block-diagonal mask (sdpa)", cpu_seconds(packed("sdpa"), repeats)),
            (f"packed row, per sample ({PACKED_SDPA})", cpu_seconds(packed(PACKED_SDPA), repeats)),
            (f"padded batch [{batch}, {longest}] (sdpa)", cpu_seconds(padded(), repeats))]


def whole_model(wd: Path, n_batches: int, sup: bool) -> list[tuple[str, float, int]]:
    from llavakit.data.collate import PackingCollator, PadCollator
    from llavakit.model.packed_attention import PACKED_SDPA
    from llavakit.train.config import load_config
    from llavakit.train.loop import epoch_order, prepare_data, rank_batches
    from llavakit.train.recipes import apply_stage, assemble

    cfg = load_config(base={
        "model": {"init_from": str(wd / "llavakit_s2"), "attn_implementation": "sdpa", "dtype": "float32"},
        "data": {"train": str(wd / "data" / "stage2.json"), "image_folder": str(wd / "data" / "images"),
                 "template": "vicuna_v1", "group_by_length": True, "max_length": 4096, "check_images": False},
        "train": {"stage": "finetune", "batch_size": 8, "report_to": "none", "output_dir": str(wd / "unused")}})
    model, processor = assemble(cfg)
    processor.template = "vicuna_v1"
    dataset = prepare_data(cfg, processor, say=lambda *a, **k: None)
    model, _ = apply_stage(model, cfg)
    model.train()
    lm = model.language_model
    pad, pack = PadCollator(processor.tokenizer.pad_token_id), PackingCollator()
    grouped = rank_batches(epoch_order(dataset, cfg, 0, 8), 8, 1, 0)[:n_batches]
    cfg.data.group_by_length = False  # the "+ packing" row's batches: the plain seeded shuffle
    shuffled = rank_batches(epoch_order(dataset, cfg, 0, 8), 8, 1, 0)[:n_batches]
    modes = [("padded, length-grouped (sdpa)", "sdpa", pad, grouped),
             ("packed, length-grouped, dense mask (sdpa)", "sdpa", pack, grouped),
             (f"packed, length-grouped, per sample ({PACKED_SDPA})", PACKED_SDPA, pack, grouped),
             (f"packed, shuffled, per sample ({PACKED_SDPA})", PACKED_SDPA, pack, shuffled)]
    seconds, tokens = [0.0] * len(modes), [0] * len(modes)

    def step(batch):
        model.zero_grad(set_to_none=True)
        t = time.process_time()
        model(**batch, supervised_logits_only=sup).loss.backward()
        return time.process_time() - t

    for i in range(min(len(grouped), len(shuffled))):
        order = [*range(i % len(modes), len(modes)), *range(i % len(modes))]  # no variant always runs first
        for m in order:
            _, impl, collate, batches = modes[m]
            items = [dataset[j] for j in batches[i]]
            tokens[m] += sum(len(x["input_ids"]) for x in items)
            lm.set_attn_implementation(impl)
            batch = collate(items)
            if i == 0:
                step(batch)  # warm-up
            seconds[m] += step(batch)
    return [(name, s, n) for (name, *_), s, n in zip(modes, seconds, tokens)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="cpu", help="workload of throughput_workload.SHAPES (default cpu)")
    p.add_argument("--workdir", default="/tmp/llavakit-bench")
    p.add_argument("--lens", default="200,450,600,330", help="sample lengths for the attention-alone table")
    p.add_argument("--batches", type=int, default=16, help="grouped batches of 8 for the whole-model table")
    p.add_argument("--sup", action="store_true", help="train.supervised_logits_only in the whole-model table")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    lens = [int(x) for x in args.lens.split(",")]
    rows = attention_alone(lens)
    print(f"\nattention alone, 9/3 heads x 64, samples {lens} (ΣL = {sum(lens)}), CPU ms forward + backward:")
    print("| variant | ms | × dense |\n|---|---:|---:|")
    for name, s in rows:
        print(f"| {name} | {s * 1e3:.1f} | {rows[0][1] / s:.2f} |")
    wd = prepare_workload(args.shape, Path(args.workdir))
    rows = whole_model(wd, args.batches, args.sup)
    print(f"\nwhole model, shape {args.shape}, {args.batches} batches of 8, forward + backward, supervised-only logits "
          f"{'on' if args.sup else 'off'} (with every batch of the epoch, all variants train on the same samples):")
    print("| variant | real tokens | CPU s | real tok / CPU s | × padded |\n|---|---:|---:|---:|---:|")
    for name, s, n in rows:
        print(f"| {name} | {n:,} | {s:.2f} | {n / s:,.0f} | {(n / s) / (rows[0][2] / rows[0][1]):.2f} |")

if __name__ == "__main__":
    main()
