"""Peak memory of the LM-head loss (forward + backward) with and without `train.loss_chunk_size`.

Each setting runs in a fresh subprocess; the number reported is the growth of the process's max RSS
(CPU) or `torch.cuda.max_memory_allocated` (CUDA) over what the inputs, the head and its weights already
held, i.e. logits, their gradient and the loss's own buffers. Seconds are one run on a shared machine:
indicative only.

    .venv/bin/python benchmarks/loss_memory.py                      # V=49152, N_sup=4096, D=576, fp32
    .venv/bin/python benchmarks/loss_memory.py --chunks 0 1024 256 --vocab 151936 --rows 2048 --hidden 896
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def peak_mib(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure(args) -> dict:
    import torch
    from torch import nn

    from llavakit.model.loss import linear_cross_entropy_sum

    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    head = nn.Linear(args.hidden, args.vocab, bias=False, device=args.device, dtype=dtype)
    hidden = torch.randn(args.rows, args.hidden, device=args.device, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, args.vocab, (args.rows,), device=args.device)
    head.weight.grad = torch.zeros_like(head.weight)  # held by the optimizer anyway: not counted
    before = peak_mib(args.device)
    start = time.perf_counter()
    loss = linear_cross_entropy_sum(hidden, head, targets, args.chunk) / args.rows
    loss.backward()
    if args.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"chunk": args.chunk, "loss": loss.item(), "peak_delta_mib": peak_mib(args.device) - before,
            "seconds": seconds}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--rows", type=int, default=4096, help="supervised tokens N_sup")
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--chunks", type=int, nargs="+", default=[0, 1024, 256], help="0 = unchunked")
    p.add_argument("--chunk", type=int, default=None, help=argparse.SUPPRESS)  # one measurement (subprocess)
    args = p.parse_args(argv)
    if args.chunk is not None:
        print(json.dumps(measure(args)))
        return 0
    common = [f"--vocab={args.vocab}", f"--rows={args.rows}", f"--hidden={args.hidden}", f"--dtype={args.dtype}",
              f"--device={args.device}"]
    print(f"LM-head loss, forward + backward: V={args.vocab}, N_sup={args.rows}, D={args.hidden}, {args.dtype}, "
          f"{args.device}\n\n| loss_chunk_size | peak memory growth (MiB) | seconds | loss |\n|---|---|---|---|")
    rows = []
    for chunk in args.chunks:
        out = subprocess.run([sys.executable, __file__, *common, f"--chunk={chunk}"], capture_output=True, text=True,
                             check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"| {chunk or '0 (off)'} | {r['peak_delta_mib']:,.0f} | {r['seconds']:.2f} | {r['loss']:.6f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
