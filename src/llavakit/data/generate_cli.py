"""`llavakit data generate`: the command line and the run loop around `llavakit.data.generate`'s tasks —
bounded concurrency, the budget, a progress bar (requests, tokens, failures, ETA), Ctrl-C that lets the
requests in flight finish and be written, and the report of rejects."""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

from .generate import Item, Job, Ledger, input_problem, make_job, read_items, run_task
from .instruct import RESPONSE_FORMATS, TEXT_KINDS
from .teacher import Budget, Teacher

MAX_FIRST_FAILURES = 5  # this many failed tasks before any success: the endpoint is wrong, stop


def add_arguments(p) -> None:
    p.add_argument("data", metavar="IN", help="JSON/JSONL rows {id, image, caption|captions, boxes} or LLaVA rows "
                                               "(e.g. `data captions` output); CSV/TSV, image folder or datasets")
    p.add_argument("out", metavar="OUT", help="JSONL of LLaVA rows to append to (OUT.log.jsonl keeps the tasks done)")
    p.add_argument("--mode", default="text", choices=("text", "image"),
                   help="text: the teacher reads captions + boxes; image: it sees the image")
    p.add_argument("--base-url", required=True, help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--model", required=True, help="model name the endpoint serves")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", metavar="VAR",
                   help="environment variable holding the API key (unset: no key is sent)")
    p.add_argument("--kinds", default=",".join(TEXT_KINDS), type=lambda s: [k.strip() for k in s.split(",") if k.strip()],
                   help=f"text mode: which of {list(TEXT_KINDS)} to write per sample (default: all three)")
    p.add_argument("--turns", type=int, default=4, help="image mode: question/answer pairs per image")
    p.add_argument("--prompts", default=None, metavar="DIR",
                   help="folder with your <kind>.yaml prompts and detailed.txt (default: the shipped ones)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight at most")
    p.add_argument("--max-tokens", type=int, default=1024, help="max_tokens of each reply")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--response-format", default="json_object", choices=RESPONSE_FORMATS,
                   help="json_object (widest support), json_schema (OpenAI, vLLM, llama.cpp), "
                        "json_object+schema (llama-cpp-python: constrained to the schema), none")
    p.add_argument("--max-requests", type=int, default=None, help="budget: requests in all runs together")
    p.add_argument("--max-total-tokens", type=int, default=None, help="budget: prompt + reply tokens, all runs")
    p.add_argument("--max-retries", type=int, default=6, help="retries of one request (429, 5xx, timeouts, ...)")
    p.add_argument("--backoff", type=float, default=1.0, help="first wait before a retry, doubled each time (s)")
    p.add_argument("--max-backoff", type=float, default=60.0, help="longest wait before a retry (s)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for one reply")
    p.add_argument("--seed", type=int, default=0, help="instruction draws, marker sides, and the teacher's seed")
    p.add_argument("--image-folder", default=None, help="folder IN's image paths are relative to")
    p.add_argument("--out-image-folder", default=None, help="folder OUT's image paths are relative to")
    p.add_argument("--image-max-side", type=int, default=1024, help="image mode: longest side sent to the teacher")
    p.add_argument("--split", default="train")
    p.add_argument("--streaming", action="store_true")
    p.add_argument("--report", default=None, metavar="FILE", help="rejects as JSON (default: OUT.rejects.json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def generate(job: Job, items: list[Item], ledger: Ledger, concurrency: int, progress: bool = True,
             say=print) -> tuple[Counter, str]:
    """Run every task not done yet; (counts per status, why it stopped early or '')."""
    from tqdm.auto import tqdm

    todo = [(item, kind) for item in items for kind in job.kinds if f"{item.id}-{kind}" not in ledger.done]
    counts: Counter = Counter()
    budget, stop, last_error = job.teacher.budget, "", ""
    bar = tqdm(total=len(todo), desc="generate", unit="task", disable=not progress, dynamic_ncols=True)
    tasks, running = iter(todo), set()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        try:
            while True:
                while not stop and len(running) < concurrency:
                    stop = budget.exhausted()
                    if counts["failed"] >= MAX_FIRST_FAILURES and not (counts["ok"] or counts["rejected"]):
                        stop = f"the first {counts['failed']} tasks all failed; last error: {last_error}"
                    nxt = None if stop else next(tasks, None)
                    if nxt is None:
                        break
                    running.add(pool.submit(run_task, job, *nxt))
                if not running:
                    break
                finished, running = wait(running, return_when=FIRST_COMPLETED)
                for f in finished:
                    entry, row = f.result()
                    ledger.record(entry, row)
                    counts[entry["status"]] += 1
                    if entry["status"] == "failed":
                        budget.add(failures=1)
                        last_error = entry["reason"]
                    bar.update(1)
                    bar.set_postfix(req=budget.requests, tok=budget.tokens, ok=counts["ok"],
                                    rej=counts["rejected"], fail=budget.failures, refresh=False)
        except KeyboardInterrupt:
            stop = "interrupted"
            say(f"\ninterrupted: writing the {len(running)} replies in flight, then stopping")
            for f in running:
                entry, row = f.result()
                ledger.record(entry, row)
                counts[entry["status"]] += 1
    bar.close()
    counts["not started"] = len(todo) - sum(counts[k] for k in ("ok", "rejected", "failed"))
    return counts, stop


def _report(ledger: Ledger, bad: list[dict], path: Path, say) -> None:
    rejects = bad + [{k: e.get(k) for k in ("task", "index", "reason", "reply")} for e in ledger.entries
                     if e.get("status") == "rejected"]
    path.write_text(json.dumps(rejects, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    reasons = Counter(r["reason"].split(":")[0] for r in rejects)
    if reasons:
        say("rejects (all runs):" + "".join(f"\n  {n:>7}  {reason}" for reason, n in reasons.most_common()))
    say(f"report: {path}")


def run(args) -> int:
    say = print
    out = Path(args.out)
    if out.suffix.lower() != ".jsonl":
        print(f"llavakit data generate: OUT must be a .jsonl file (it is appended to as tasks finish): {out}",
              file=sys.stderr)
        return 2
    unknown = [k for k in args.kinds if k not in TEXT_KINDS]
    if args.mode == "text" and (unknown or not args.kinds):
        print(f"llavakit data generate: --kinds {','.join(args.kinds)}: use some of {list(TEXT_KINDS)}", file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(out)
    requests, tokens = ledger.spent()
    budget = Budget(args.max_requests, args.max_total_tokens, requests, tokens)
    teacher = Teacher(args.base_url, args.model, os.environ.get(args.api_key_env), timeout=args.timeout,
                      max_retries=args.max_retries, backoff=args.backoff, max_backoff=args.max_backoff, budget=budget)
    job = make_job(args, teacher)
    items, bad = [], []
    for item in read_items(args.data, args.image_folder, args.split, args.streaming):
        why = input_problem(item, args.mode)
        if why:
            bad.append({"task": f"{item.id}-*", "index": item.index, "reason": why})
        else:
            items.append(item)
    for b in bad[:10]:
        say(f"skipped input #{b['index']} ({b['task'][:-2]!r}): {b['reason']}")
    already = sum(f"{i.id}-{k}" in ledger.done for i in items for k in job.kinds)
    if already:
        say(f"resuming: {already} of {len(items) * len(job.kinds)} tasks already done in {out}")
    counts, stop = generate(job, items, ledger, args.concurrency, progress=not args.no_progress, say=say)
    say(f"{counts['ok']} samples written, {counts['rejected']} rejected, {counts['failed']} failed "
        f"(retried on the next run), {counts['not started']} not started, {len(bad)} inputs skipped; "
        f"{budget.requests} requests, {budget.tokens} tokens in all runs")
    _report(ledger, bad, Path(args.report or out.with_name(out.name + ".rejects.json")), say)
    if stop or counts["failed"]:
        say(f"stopped: {stop}" if stop else "some tasks failed")
        say("run the same command again to continue where this run stopped")
        return 1
    say(f"done: {out}; check it with: llavakit data check {out}")
    return 0
