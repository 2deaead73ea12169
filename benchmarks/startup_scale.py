"""Start-up at scale: seconds from `llavakit train` process start to the first training step done,
peak RSS and the dataset's share of it, for N synthetic samples, on a cold and a warm start-up cache.

The workload is tiny on purpose (a 2-layer Llama with a 400-token BPE vocabulary, a 32 px CLIP tower,
200 distinct 32 px JPEGs reused by every sample), so what is measured is start-up: reading, validating
and tokenizing the data, not the model. Each sample is a multi-turn LLaVA row (1-3 rounds; one in ten
text-only), written once per N as a JSON array.

For each N, in fresh subprocesses:

* ``cold``: the start-up cache is removed, then a 1-step ``llavakit train`` run (it builds the cache);
* ``warm``: the same run again into a new output folder (the cache is read);
* ``probe``: ``prepare_data`` alone, warm: the resident memory the dataset holds once built
  (RSS after minus before, the model already loaded).

"first step s" is the time from starting the process to the first line of ``losses.jsonl`` (written
when step 1 is done); "CPU s" the CPU time of the process and its tokenizing workers (on a busy
machine it says more than the wall clock); "peak RSS" the process's ``ru_maxrss``; "dataset MB" the
peak RSS minus the peak RSS of the warm run on 200 samples (the model, torch and Python are the rest).

    .venv/bin/python benchmarks/startup_scale.py --n 20000 200000 1000000 --json startup.json
    .venv/bin/python benchmarks/startup_scale.py --n 200 --json /tmp/s.json      # seconds (the smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

DISTINCT_IMAGES = 200
BASELINE_N = 200
WORDS = ("red blue green yellow circle square triangle left right top bottom small large image picture shows "
         "there is a an the of on in with near two three many one object shape colour corner middle behind "
         "bright dark round sharp edge line dot pattern scene background foreground").split()
QUESTIONS = ("What is in the image?", "Describe the picture.", "Which colour is the largest shape?",
             "How many objects are there?", "Where is the circle?")


def _sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."


def write_components(root: Path) -> dict:
    """Tiny vision tower + tiny Llama (once)."""
    from llavakit.demo.tiny import save_tiny_llm, save_tiny_vision

    comp = root / "components"
    if not (comp / "ready").is_file():
        corpus = [_sentence(random.Random(i), 8, 16) for i in range(500)] + list(QUESTIONS)
        save_tiny_vision(comp / "vision", "clip")
        save_tiny_llm(comp / "llm", "llama", texts=corpus)
        (comp / "ready").write_text("ok\n")
    return {"vision": str(comp / "vision"), "llm": str(comp / "llm")}


def write_images(root: Path) -> Path:
    """DISTINCT_IMAGES small JPEGs (once)."""
    from PIL import Image, ImageDraw

    folder = root / "images"
    if (folder / "ready").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for k in range(DISTINCT_IMAGES):
        im = Image.new("RGB", (32, 32), tuple(rng.randrange(256) for _ in range(3)))
        d = ImageDraw.Draw(im)
        for _ in range(3):
            x, y = rng.randrange(24), rng.randrange(24)
            d.rectangle([x, y, x + 8, y + 8], fill=tuple(rng.randrange(256) for _ in range(3)))
        im.save(folder / f"{k:04d}.jpg", quality=85)
    (folder / "ready").write_text("ok\n")
    return folder


def write_data(root: Path, n: int, seed: int = 0) -> Path:
    """N multi-turn LLaVA rows over the image pool, one JSON array (once per N)."""
    path = root / f"train-{n}.json"
    if path.is_file():
        return path
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    with tmp.open("w") as f:
        f.write("[\n")
        for i in range(n):
            turns = []
            for r in range(rng.randint(1, 3)):
                q = rng.choice(QUESTIONS)
                turns += [{"from": "human", "value": q}, {"from": "gpt", "value": _sentence(rng, 6, 24)}]
            row = {"id": f"s{i}", "conversations": turns}
            if rng.random() < 0.9:
                row["image"] = f"{rng.randrange(DISTINCT_IMAGES):04d}.jpg"
                turns[0]["value"] = "<image>\n" + turns[0]["value"]
            f.write(json.dumps(row) + (",\n" if i < n - 1 else "\n"))
        f.write("]\n")
    os.replace(tmp, path)
    return path


def write_config(root: Path, comp: dict, data: Path, images: Path, out: Path, cache: Path) -> Path:
    import yaml

    tree = {"model": {"vision": comp["vision"], "llm": comp["llm"], "projector": "mlp2x_gelu"},
            "data": {"train": str(data), "image_folder": str(images), "template": "vicuna_v1", "max_length": 512,
                     "cache_dir": str(cache)},
            "train": {"stage": "finetune", "output_dir": str(out), "max_steps": 1, "batch_size": 4, "lr": 1e-3,
                      "warmup_ratio": 0.0, "log_every": 1, "report_to": "none"}}
    path = root / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _env() -> dict:
    # TOKENIZERS_PARALLELISM is left as the user's: llavakit itself tokenizes without the thread pool while
    # it encodes a dataset (llavakit.data.text_ids.one_thread_per_tokenizer), and that is what is measured
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("TOKENIZERS_PARALLELISM", None)
    return env


def run_child(cmd: list[str], log: Path) -> tuple[float, int, int, float]:
    """(start time, exit status, peak RSS in bytes, CPU seconds with its worker processes) of one
    subprocess; its output goes to `log`."""
    start = time.time()
    with log.open("w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env())
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
    return start, p.returncode, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime


def time_train(root: Path, comp: dict, data: Path, images: Path, cache: Path, tag: str) -> dict:
    """One 1-step `llavakit train` run in a fresh process."""
    out = root / "runs" / tag
    shutil.rmtree(out, ignore_errors=True)
    cfg = write_config(root, comp, data, images, out, cache)
    log = root / "runs" / f"{tag}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    start, rc, peak, cpu = run_child([sys.executable, "-m", "llavakit.cli", "train", str(cfg)], log)
    losses = out / "losses.jsonl"
    if rc != 0 or not losses.is_file():
        raise SystemExit(f"{tag}: `llavakit train` failed (exit {rc}); see {log}:\n" + log.read_text()[-3000:])
    text = log.read_text()
    note = next((line for line in text.splitlines() if line.startswith("start-up cache:")), "")
    return {"first_step_s": round(losses.stat().st_mtime - start, 2), "peak_rss_mb": round(peak / 2**20, 1),
            "cpu_s": round(cpu, 1), "cache_hit": "start-up cache: hit" in text, "cache_note": note, "log": str(log)}


PROBE = r"""
import gc, json, sys, time
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
from llavakit.train import load_config
from llavakit.train.batches import prepare_data
from llavakit.train.recipes import assemble
cfg = load_config(sys.argv[1])
model, processor = assemble(cfg)
processor.template = cfg.data.template
gc.collect(); before = rss(); t = time.perf_counter()
ds = prepare_data(cfg, processor, say=lambda *a: None)
took = time.perf_counter() - t
gc.collect()
print(json.dumps({"prepare_s": round(took, 2), "dataset_rss_mb": round((rss() - before) / 2**20, 1),
                  "samples": len(ds)}))
"""


def probe(root: Path, comp: dict, data: Path, images: Path, cache: Path, tag: str) -> dict:
    """`prepare_data` alone: seconds and the resident memory the built dataset holds."""
    out = root / "runs" / tag
    cfg = write_config(root, comp, data, images, out, cache)
    r = subprocess.run([sys.executable, "-c", PROBE, str(cfg)], env=_env(), capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{tag}: probe failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def measure(root: Path, n: int, comp: dict, images: Path, baseline_mb: float | None) -> dict:
    t = time.perf_counter()
    data = write_data(root / "data", n)
    row = {"n": n, "data_mb": round(data.stat().st_size / 2**20, 1), "write_s": round(time.perf_counter() - t, 1)}
    cache = root / "cache" / str(n)
    shutil.rmtree(cache, ignore_errors=True)
    row["cold"] = time_train(root, comp, data, images, cache, f"cold-{n}")
    row["warm"] = time_train(root, comp, data, images, cache, f"warm-{n}")
    row["probe_warm"] = probe(root, comp, data, images, cache, f"probe-{n}")
    row["cache_mb"] = round(sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()) / 2**20, 1)
    for k in ("cold", "warm"):
        if baseline_mb is not None:
            row[k]["dataset_mb"] = round(row[k]["peak_rss_mb"] - baseline_mb, 1)
    return row


def table(rows: list[dict]) -> str:
    cols = [("samples", lambda r: f"{r['n']:,}"), ("data MB", lambda r: r["data_mb"]),
            ("cold first step s", lambda r: r["cold"]["first_step_s"]), ("cold CPU s", lambda r: r["cold"]["cpu_s"]),
            ("warm first step s", lambda r: r["warm"]["first_step_s"]), ("warm CPU s", lambda r: r["warm"]["cpu_s"]),
            ("cold peak RSS MB", lambda r: r["cold"]["peak_rss_mb"]),
            ("warm peak RSS MB", lambda r: r["warm"]["peak_rss_mb"]),
            ("cold dataset MB", lambda r: r["cold"].get("dataset_mb", "-")),
            ("warm dataset MB", lambda r: r["warm"].get("dataset_mb", "-")),
            ("held (probe) MB", lambda r: r["probe_warm"]["dataset_rss_mb"]), ("cache MB", lambda r: r["cache_mb"])]
    lines = ["| " + " | ".join(name for name, _ in cols) + " |", "|" + "---:|" * len(cols)]
    lines += ["| " + " | ".join(str(get(r)) for _, get in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[20000, 200000], help="sample counts to measure")
    ap.add_argument("--workdir", default=None, help="where components, images, data and runs go "
                    "(default: a temporary folder, removed at the end)")
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args(argv)
    import tempfile

    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="llavakit-startup-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        comp = write_components(root)
        images = write_images(root)
        base = measure(root, BASELINE_N, comp, images, None)
        baseline_mb = base["warm"]["peak_rss_mb"]  # model, torch and Python, with a 200-sample dataset
        rows = [measure(root, n, comp, images, baseline_mb) if n != BASELINE_N else base for n in args.n]
        for r in rows:
            for k in ("cold", "warm"):
                r[k].setdefault("dataset_mb", round(r[k]["peak_rss_mb"] - baseline_mb, 1))
        print(table(rows))
        if args.json:
            Path(args.json).write_text(json.dumps({"baseline_peak_rss_mb": baseline_mb, "cpus": os.cpu_count(),
                                                   "rows": rows}, indent=1) + "\n")
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
