"""Running the rows (inline or each in a fresh process) and reporting them: the tables and the summary."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from throughput_harness import run_llavakit, run_peer
from throughput_trl import run_trl
from throughput_workload import Row

ENTRY = Path(__file__).resolve().with_name("train_throughput.py")  # what a row's fresh process runs


# --- orchestration --------------------------------------------------------------------------------
def run_row(row: Row, wd: Path, args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return {"peer": run_peer, "trl": run_trl, "llavakit": run_llavakit}[row.system](row, wd, args)


def run_isolated(row: Row, wd: Path, args) -> dict:
    """One row in a fresh interpreter (its own peak memory); the result comes back as JSON."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    if row.system != "llavakit" and row.malloc:  # llavakit rows set it through train.return_freed_memory
        env.update(MALLOC_MMAP_THRESHOLD_="1048576", MALLOC_TRIM_THRESHOLD_="1048576")
    with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
        cmd = [sys.executable, str(ENTRY), *args.argv, "--_row", json.dumps(asdict(row)), "--_out", out.name]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            why = " (killed: out of memory?)" if proc.returncode == -9 else ""
            raise RuntimeError(f"row {row.name!r} failed, exit {proc.returncode}{why}:\n{proc.stderr[-4000:]}")
        return json.loads(Path(out.name).read_text())


# --- the report -----------------------------------------------------------------------------------
def format_table(rows: list[dict], peer: dict | None, mfu: bool, trl: dict | None = None) -> str:
    """The table; with a TRL row, "× TRL" (real tokens/s) and "mem × TRL" (peak memory) against it."""
    head = ["configuration", "samples/s", "real tok/s", "pad %", "peak MiB", "Δ MiB"] + (["MFU %"] if mfu else []) \
        + ["× peer"] + (["× TRL", "mem × TRL"] if trl else []) + ["worst/best run"]
    ratio = lambda r, ref, key: r[key] / ref[key] if ref else float("nan")  # noqa: E731
    lines = []
    for r in rows:
        cells = [r["row"], f"{r['samples_per_s']:.2f}", f"{r['real_tokens_per_s']:,.0f}",
                 f"{100 * r['padding_fraction']:.1f}", f"{r['peak_mem_mib']:,.0f}", f"{r['delta_mem_mib']:,.0f}"]
        cells += [f"{100 * r['mfu']:.1f}"] if mfu else []
        cells += [f"{ratio(r, peer, 'real_tokens_per_s'):.2f}"]
        cells += [f"{ratio(r, trl, 'real_tokens_per_s'):.2f}", f"{ratio(r, trl, 'peak_mem_mib'):.2f}"] if trl else []
        spread = r.get("runs_real_tokens_per_s") or [r["real_tokens_per_s"]]
        cells += [f"{min(spread) / max(spread):.2f}"]
        lines.append(cells)
    widths = [max(len(x[i]) for x in [head] + lines) for i in range(len(head))]
    fmt = lambda cells: "| " + " | ".join(  # noqa: E731
        c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    sep = "|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|"
    return "\n".join([fmt(head), sep] + [fmt(c) for c in lines])


def best_of(runs: list[dict]) -> dict:
    """The least disturbed run of a row (highest real tokens/s), with every run's figure kept."""
    best = dict(max(runs, key=lambda r: r["real_tokens_per_s"]))
    best["runs_real_tokens_per_s"] = [r["real_tokens_per_s"] for r in runs]
    return best


def summarise(report: dict) -> None:
    ours = [r for r in report.get("stage2", []) if r["config"]["system"] == "llavakit"]
    if ours:
        best = max(ours, key=lambda r: r["real_tokens_per_s"])
        report["best"] = best["row"]
        report["ratio_vs_peer"] = best["ratio_vs_peer"]
        report["best_mfu"] = best["mfu"]
        if best["ratio_vs_peer"] is not None:
            mfu = f", MFU {100 * best['mfu']:.1f}%" if report["device"] == "cuda" else ""
            print(f"\nllavakit best (stage 2): {best['row'].strip()} -> {best['ratio_vs_peer']:.2f}x the peer's "
                  f"real tokens/s{mfu}")
        trl = trl_reference(report["stage2"])
        if trl is not None:  # the best llavakit row against TRL as it ships (the first TRL row: its defaults)
            report["trl_row"] = trl["row"]
            report["ratio_vs_trl"] = best["real_tokens_per_s"] / trl["real_tokens_per_s"]
            report["memory_ratio_vs_trl"] = best["peak_mem_mib"] / trl["peak_mem_mib"]
            print(f"against {trl['row']}: {report['ratio_vs_trl']:.2f}x its real tokens/s (target >= 2.0), "
                  f"{report['memory_ratio_vs_trl']:.2f}x its peak memory (target <= 0.5)")
            lean = min(ours, key=lambda r: r["peak_mem_mib"])  # the other end of the trade-off
            report["leanest"] = lean["row"]
            report["leanest_memory_ratio_vs_trl"] = lean["peak_mem_mib"] / trl["peak_mem_mib"]
            report["leanest_ratio_vs_trl"] = lean["real_tokens_per_s"] / trl["real_tokens_per_s"]
            print(f"lowest-memory llavakit row ({lean['row'].strip()}): {report['leanest_memory_ratio_vs_trl']:.2f}x "
                  f"TRL's peak memory at {report['leanest_ratio_vs_trl']:.2f}x its real tokens/s")
            trl_malloc = next((r for r in report["stage2"] if r["config"]["system"] == "trl" and r["config"]["ckpt"]
                               and r["config"].get("malloc")), None)
            if trl_malloc is not None:  # like for like: TRL with freed memory returned to the OS too
                report["leanest_memory_ratio_vs_trl_same_malloc"] = lean["peak_mem_mib"] / trl_malloc["peak_mem_mib"]
                print(f"  against TRL with the same malloc thresholds: "
                      f"{report['leanest_memory_ratio_vs_trl_same_malloc']:.2f}x its peak memory")
    s1 = {r["config"]["cache"]: r for r in report.get("stage1", []) if r["config"]["system"] == "llavakit"}
    if True in s1 and False in s1:
        report["stage1_cache_speedup"] = s1[True]["samples_per_s"] / s1[False]["samples_per_s"]
        print(f"stage 1 feature cache: {report['stage1_cache_speedup']:.2f}x samples/s once built "
              f"(build: {s1[True]['cache_build_s']:.1f} s for {s1[True]['samples']} images)")


def trl_reference(rows: list[dict]) -> dict | None:
    """The TRL row the ratios are taken against: TRL as it ships (its defaults, glibc's default malloc) when run,
    else the first TRL row; None without one."""
    trl = [r for r in rows if r["config"]["system"] == "trl"]
    shipped = [r for r in trl if r["config"].get("ckpt") and not r["config"].get("malloc", False)]
    return (shipped or trl or [None])[0]


def machine_name(args) -> str:
    import torch

    if args.device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def command_line(argv) -> str:
    return "python benchmarks/train_throughput.py " + " ".join(argv)
