"""`llavakit data {check,stats,convert,captions,generate}`: look at a dataset before spending GPU hours
on it, and build one (`llavakit.data.captions`, `llavakit.data.generate`).

* ``check``   validates every sample (readers + `validate`), prints one line per problem and a
              summary table, writes ``--report`` JSON, exits 1 when any sample has an error.
* ``stats``   counts samples / turns / images and draws a length histogram (tokens with ``--model``).
* ``convert`` rewrites a dataset as llava or messages JSON/JSONL.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .formats import FORMATS, ROW_SCHEMAS, DataSourceError, write_conversations
from .images import add_limit_arguments, limits_from_args
from .mixture import Mixture, load_mixture
from .validate import count_samples, format_problem, summarize, validate
from .video import add_video_limit_arguments, video_limits_from_args


def _add_source(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", metavar="DATA", help="JSON/JSONL file, datasets folder, parquet/arrow file, or a mixture "
                                                 "YAML (LLaVA-NeXT's datasets: [{json_path, sampling_strategy}])")
    p.add_argument("--image-folder", default=None,
                   help="folder image paths are relative to (default: the data file's folder)")
    p.add_argument("--format", default="auto", choices=FORMATS, help="row format (default: detected)")
    p.add_argument("--split", default="train", help="split of a datasets source (default: train)")
    p.add_argument("--seed", type=int, default=0, help="seed of random:N sampling in a mixture (data.seed)")


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, metavar="M",
                   help="llavakit model folder: enables token-level checks with its tokenizer")
    p.add_argument("--template", default=None, metavar="T",
                   help="conversation template (default: the model's, else 'auto')")
    p.add_argument("--max-length", type=int, default=None,
                   help="token budget per sample (default: the LLM's max_position_embeddings)")
    p.add_argument("--overflow", default="truncate", choices=("truncate", "drop"),
                   help="length policy training will use: over-long samples are truncated (a warning) "
                        "or dropped (an error)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    check = sub.add_parser("check", help="validate every sample; exit 1 on any error")
    _add_source(check)
    _add_model(check)
    check.add_argument("--report", default=None, metavar="FILE", help="write every problem as JSON here")
    check.add_argument("--images", default="full", choices=("full", "header", "skip"),
                       help="decode images fully (finds truncation), read headers only, or skip them")
    add_limit_arguments(check)  # --max-pixels / --max-side / --max-aspect-ratio
    add_video_limit_arguments(check)  # --video-max-frame-pixels / --video-max-seconds / --video-max-source-frames
    check.add_argument("--workers", type=int, default=None, help="threads checking images")
    check.add_argument("--max-warnings", type=int, default=200,
                       help="print at most this many warning lines (all are in --report)")

    stats = sub.add_parser("stats", help="sample / turn / image counts and a length histogram")
    _add_source(stats)
    _add_model(stats)
    stats.add_argument("--histogram", default=None, metavar="PNG",
                       help="where to write the histogram (default: DATA's name + .lengths.png, here)")
    stats.add_argument("--bins", type=int, default=50)

    from . import captions

    captions.add_arguments(sub.add_parser("captions", help="image-caption pairs -> stage-1 LLaVA JSON"))
    from . import generate_cli

    generate_cli.add_arguments(sub.add_parser(
        "generate", help="instruction data from a teacher behind an OpenAI-compatible endpoint"))

    convert = sub.add_parser("convert", help="rewrite a dataset as llava or messages JSON/JSONL")
    convert.add_argument("data", metavar="IN")
    convert.add_argument("out", metavar="OUT", help="output .json (array) or .jsonl file")
    convert.add_argument("--to", required=True, choices=ROW_SCHEMAS)
    convert.add_argument("--image-folder", default=None, help="folder IN's image paths are relative to")
    convert.add_argument("--out-image-folder", default=None,
                         help="folder OUT's image paths are written relative to (default: OUT's folder)")
    convert.add_argument("--format", default="auto", choices=FORMATS)
    convert.add_argument("--split", default="train")
    convert.add_argument("--seed", type=int, default=0, help="seed of random:N sampling in a mixture")


class _UsageError(Exception):
    """A bad --model / --template: nothing was checked."""


def run(args: argparse.Namespace) -> int:
    try:
        if args.action == "captions":
            from . import captions

            return captions.run(args)
        if args.action == "generate":
            from . import generate_cli

            return generate_cli.run(args)
        return {"check": _check, "stats": _stats, "convert": _convert}[args.action](args)
    except _UsageError as e:
        print(f"llavakit data {args.action}: {e}", file=sys.stderr)
        return 2
    except DataSourceError as e:
        print(f"llavakit data {args.action}: {e}", file=sys.stderr)
        if getattr(args, "report", None):
            _write_report(args.report, [{"index": -1, "id": None, "severity": "error", "reason": str(e)}])
        return 1


# --- model bits for token-level checks ----------------------------------------------------------
def _tokenizer_bits(args) -> dict:
    """validate()'s tokenizer keywords from --model / --template / --max-length (empty without --model)."""
    if not args.model:
        if args.template:
            print("note: --template is only used together with --model (it needs the tokenizer)", file=sys.stderr)
        return {"max_length": args.max_length, "overflow": args.overflow}
    from transformers import AutoConfig

    from llavakit import LlavakitProcessor

    from .dataset import image_token_counts, video_frame_counts
    from .templates import get_template

    try:
        processor = LlavakitProcessor.from_pretrained(args.model)
        config = AutoConfig.from_pretrained(args.model)
    except (OSError, ValueError) as e:
        raise _UsageError(f"--model {args.model} is not a llavakit model folder ({e})") from None
    max_length = args.max_length
    if max_length is None:
        max_length = getattr(getattr(config, "text_config", None), "max_position_embeddings", None)
    name = args.template or getattr(processor, "template", None) or "auto"
    limits, video_limits = limits_from_args(args), video_limits_from_args(args)
    try:
        template = get_template(name, processor.tokenizer)
    except ValueError as e:
        raise _UsageError(f"{e} (pass --template)") from None
    video_token_id = getattr(processor, "video_token_id", None)

    def video_tokens(conv):  # from each file's metadata (nothing decoded), as training counts them up front
        return [processor.num_video_tokens(f) for f in video_frame_counts(conv, processor, video_limits)]

    return dict(tokenizer=processor.tokenizer, template=template, image_token_id=processor.image_token_id,
                image_tokens=lambda conv: image_token_counts(conv, processor, limits)[1], max_length=max_length,
                overflow=args.overflow, tokenization=processor.tokenization, video_token_id=video_token_id,
                video_tokens=video_tokens)


def _write_report(path: str, rows: list[dict]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


# --- check --------------------------------------------------------------------------------------
def _check(args) -> int:
    bits = _tokenizer_bits(args)
    mixture = _read(args)
    convs, problems = mixture.conversations, mixture.problems
    problems = validate((convs, problems), check_images=args.images != "skip",
                        full_image_check=args.images == "full", **limits_from_args(args).as_kwargs(),
                        video_limits=video_limits_from_args(args),
                        workers=args.workers, progress=sys.stderr.isatty(), **bits)
    n = count_samples(convs, problems)
    warnings_shown = 0
    for p in problems:
        if p.severity == "warning":
            warnings_shown += 1
            if warnings_shown > args.max_warnings:
                continue
        print(format_problem(p, with_source=mixture.is_mixture))
    if warnings_shown > args.max_warnings:
        print(f"... {warnings_shown - args.max_warnings} more warnings not shown (see --report)")
    print(f"\n{args.data}\n{summarize(problems, n)}")
    _per_source(mixture, problems)
    if args.report:
        _write_report(args.report, [p.as_dict() for p in problems])
        print(f"report: {args.report}")
    errors = sum(p.severity == "error" for p in problems)
    if errors:
        print(f"\n{errors} error(s): fix them, or let training skip these samples.")
    return 1 if errors else 0


def _read(args) -> Mixture:
    return load_mixture(args.data, args.image_folder, args.format, seed=args.seed, split=args.split)


def _per_source(mixture: Mixture, problems) -> None:
    if mixture.is_mixture:
        print("\nper source:\n" + mixture.table(problems))


# --- stats --------------------------------------------------------------------------------------
def _lengths(convs, bits) -> tuple[list[int], str, int, int]:
    """Per-sample lengths (tokens with a model, else words), the unit, how many failed to encode, and the video
    placeholder tokens of the samples that did."""
    if "tokenizer" not in bits:
        return [sum(len(t.content.split()) for t in c.turns) for c in convs], "words (pass --model for tokens)", 0, 0
    from .tokenize import encode

    lengths, failed, video_tokens = [], 0, 0
    for c in convs:
        try:
            vcounts = bits["video_tokens"](c) if c.videos else []
            enc = encode(c, bits["template"], bits["tokenizer"], bits["image_token_id"], bits["image_tokens"](c),
                         tokenization=bits["tokenization"], video_token_id=bits["video_token_id"],
                         video_tokens=vcounts)
        except ValueError:
            failed += 1
            continue
        lengths.append(len(enc.input_ids))
        video_tokens += sum(vcounts[:enc.num_videos])
    return lengths, "tokens", failed, video_tokens


def _histogram(lengths: list[int], unit: str, bins: int, max_length: int | None, title: str, out: Path) -> None:
    # Figure + Agg canvas directly: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.hist(lengths, bins=bins, color="#4477aa")
    if max_length and "tokens" in unit:
        ax.axvline(max_length, color="#cc3311", linestyle="--", label=f"max_length {max_length}")
        ax.legend()
    ax.set_xlabel(f"length ({unit})")
    ax.set_ylabel("samples")
    ax.set_title(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)


def _stats(args) -> int:
    import numpy as np

    bits = _tokenizer_bits(args)
    mixture = _read(args)
    convs, problems = mixture.conversations, mixture.problems
    unreadable = len({p.index for p in problems if p.severity == "error"})
    n_images = [len(c.images) for c in convs]
    n_videos = [len(c.videos) for c in convs]
    n_turns = [len(c.turns) for c in convs]
    rows = [
        ("samples read", len(convs)),
        ("rows that could not be read", unreadable),
        ("text-only samples", sum(1 for k in n_images if k == 0)),
        ("samples with images", sum(1 for k in n_images if k > 0)),
        ("  with several images", sum(1 for k in n_images if k > 1)),
        ("images", sum(n_images)),
        ("samples with videos", sum(1 for k in n_videos if k > 0)),
        ("videos", sum(n_videos)),
        ("turns", sum(n_turns)),
        ("multi-turn samples", sum(1 for c in convs if sum(t.role == "user" for t in c.turns) > 1)),
        ("samples with a system prompt", sum(1 for c in convs if c.turns and c.turns[0].role == "system")),
    ]
    lengths, unit, failed, video_tokens = _lengths(convs, bits)
    if failed:
        rows.append(("could not be tokenized", failed))
    if "tokenizer" in bits and sum(n_videos):
        rows.append(("video tokens", video_tokens))
    for label, value in rows:
        print(f"{label:<32}{value:>10}")
    _per_source(mixture, problems)
    if mixture.is_mixture:
        width = max(len(s.name) for s in mixture.sources)
        print(f"\n{'source':<{width}}  {'samples':>9}{'images':>9}{'turns':>9}")
        for s in mixture.sources:
            mine = [c for c in convs if s.start <= c.index < s.stop]
            print(f"{s.name:<{width}}  {len(mine):>9}{sum(len(c.images) for c in mine):>9}"
                  f"{sum(len(c.turns) for c in mine):>9}")
    if lengths:
        arr = np.asarray(lengths)
        print(f"\nlength in {unit}:")
        for label, q in (("min", 0), ("median", 50), ("p90", 90), ("p99", 99), ("max", 100)):
            print(f"  {label:<8}{int(np.percentile(arr, q)):>10}")
        max_length = bits.get("max_length")
        if max_length and "tokens" in unit:
            print(f"  over max_length {max_length}: {int((arr > max_length).sum())}")
        out = Path(args.histogram or f"{Path(args.data).name}.lengths.png")
        _histogram(lengths, unit, args.bins, max_length, Path(args.data).name, out)
        print(f"histogram: {out}")
    return 0


# --- convert ------------------------------------------------------------------------------------
def _convert(args) -> int:
    mixture = _read(args)
    convs, problems = mixture.conversations, mixture.problems
    dropped = [p for p in problems if p.severity == "error"]
    for p in dropped:
        print(format_problem(p))
    n = write_conversations(convs, args.out, to=args.to, image_folder=args.out_image_folder)
    print(f"wrote {n} samples to {args.out} ({args.to})")
    if dropped:
        print(f"{len({p.index for p in dropped})} row(s) could not be read and were left out; "
              "run `llavakit data check` on the input for details")
        return 1
    return 0
