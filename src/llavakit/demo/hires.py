"""`llavakit demo --hires`: the offline demo of high-resolution images, tiles (`anyres`) against base resolution.

The same road as the default demo (``pipeline.py``), on the world of ``hires_world.py``: 96x96 pictures of a big
shape and a small tag of one-pixel lines in a corner, whose pattern only full-resolution tiles show.

1. world: the pictures, their captions, four-turn Q&A (detail, corner, colour, shape), the CLIP pairs, a
   balanced held-out split; checked like `llavakit data check`. The motion clips (``motion.py``) are written
   too; with ``motion=True`` (`--motion`) a third stage 2 trains an ``anyres_max`` model on them (``motion_run.py``).
2. stage 0: a tiny Llama on the world's text and a tiny CLIP (48 px, patch 16) on the pictures (shrunk) and on
   their tags' tiles (full resolution), each saved as an HF folder and loaded by path.
3. stage 1 (`hires_stage1.yaml`): the projector on captions, at base resolution.
4. stage 2 twice from that stage 1, same data, steps and seed: `hires_stage2_anyres.yaml` (base tile + 2x2 tiles,
   51 tokens a picture) and the control `hires_stage2_base.yaml` (the picture shrunk, 9 tokens).
5. scores of both models on the held-out split, with the picture and blind (a blank grey one of the same size).

Output in --out: `metrics.json` ({"seconds", "policies": {policy: {"image_tokens", "types": {type: {"with_image",
"blind", "chance"}}}}, "motion", "phases", "phases_cpu", "load_average", "threads", "seed", "scale", "mode"}),
the printed table, `loss_stage1.png` / `loss_stage2_anyres.png` / `loss_stage2_base.png`,
`predictions_anyres.jsonl` / `predictions_base.jsonl`, `sample_conversation.txt`, and the two models,
`model_anyres/` and `model_base/`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .hires_scenes import HIRES_SIZE, HIRES_TYPES

POLICIES = ("anyres", "base")  # stage-2 runs: the tiled model and its base-resolution control
MOTION_NOT_TRAINED = ("written (frames as images, rows with 'video' and '<video>'), not trained or scored: "
                      "add --motion to train and score them")


@dataclass
class HiresScale:
    """Sizes of one hires run. `full` is what docs/demo.md measured; `small` is the slow test's."""

    world: dict = field(default_factory=dict)  # write_hires_world kwargs
    motion: dict = field(default_factory=dict)  # write_motion kwargs
    lm: dict = field(default_factory=lambda: {"steps": 300})  # pretrain_lm kwargs (the default demo: 600)
    clip: dict = field(default_factory=dict)  # pretrain_clip kwargs
    stage1: list[str] = field(default_factory=list)  # `llavakit train` overrides
    stage2: list[str] = field(default_factory=list)  # both stage-2 runs


HIRES_SCALES = {
    "full": HiresScale(),
    "small": HiresScale(world={"n_train": 800, "n_test": 24}, motion={"n_train": 40, "n_test": 8},
                        lm={"steps": 150}, clip={"steps": 300}, stage1=["--train.max_steps=60"],
                        stage2=["--train.max_steps=200"]),
}


def hires_recipes() -> dict[str, Path]:
    """The recipes `--hires` runs (stage 1, both stage 2s, the motion stage 2), shipped in the package."""
    from .pipeline import recipes_dir

    d = recipes_dir()
    names = {"stage1": "hires_stage1.yaml", **{f"stage2_{p}": f"hires_stage2_{p}.yaml" for p in (*POLICIES, "motion")}}
    out = {k: d / v for k, v in names.items()}
    missing = [str(p) for p in out.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"the hires demo recipes {missing} are missing; reinstall llavakit")
    return out


def run_hires_demo(out_dir: str | Path, seed: int = 0, scale: str | HiresScale = "full", say=print,
                   motion: bool = False) -> dict:
    """Run the hires demo into `out_dir`; returns the metrics written to `out_dir/metrics.json`. `scale`: a name
    of `HIRES_SCALES` or a `HiresScale` (the plumbing test's few steps). `motion`: also train an `anyres_max` model
    on the motion clips (`hires_stage2_motion.yaml`) and score it (`motion_run.py`)."""
    import torch

    import llavakit
    import llavakit.cli

    from .backbones import pretrain_clip, pretrain_lm
    from .clock import start_run
    from .hires_world import clip_pairs, write_hires_world, write_motion
    from .pipeline import check_data, sample_conversation
    from .score import score
    from .world import read_test, text_corpus

    spec = scale if isinstance(scale, HiresScale) else HIRES_SCALES[scale]
    recipes = hires_recipes()
    out, clock = start_run(out_dir, seed, say)

    say(f"== 1/6 high-resolution world (seed {seed}) -> {out / 'data'}")
    with clock.phase("world"):
        paths = write_hires_world(out / "data", seed=seed, **spec.world)
        check_data(paths, say)
        clips = write_motion(out / "data", seed=seed, **spec.motion)
        if not motion:
            say(f"  motion clips {clips.train.name}, {clips.test.name}: {MOTION_NOT_TRAINED}")

    say("== 2/6 stage 0: tiny Llama LM on the world's text, tiny CLIP on pictures and tag tiles")
    with clock.phase("stage0_lm"):
        llm = pretrain_lm(text_corpus(paths.stage1, paths.stage2), out / "backbones" / "llm", seed=seed,
                          log=say, **spec.lm).path
    with clock.phase("stage0_clip"):
        vision = pretrain_clip(clip_pairs(paths), out / "backbones" / "clip", seed=seed, log=say, **spec.clip).path

    common = [f"--model.vision={vision}", f"--model.llm={llm}", f"--data.image_folder={paths.image_folder}",
              f"--train.seed={seed}", "--train.report_to=none"]
    runs = [("stage1", "3/6 stage 1: projector on captions (base resolution)",
             [f"--data.train={paths.stage1}", *spec.stage1])]
    runs += [(f"stage2_{p}", f"{4 + k}/6 stage 2 with image_tokens {p}",
              [f"--model.init_from={out / 'stage1'}", f"--data.train={paths.stage2}", *spec.stage2])
             for k, p in enumerate(POLICIES)]
    if motion:
        runs.append(("stage2_motion", "5b/6 stage 2 on the motion clips (anyres_max, videos)",
                     [f"--model.init_from={out / 'stage1'}", f"--data.train={clips.train}", *spec.stage2]))
    for name, title, extra in runs:
        say(f"== {title} (llavakit train {recipes[name]})")
        with clock.phase(name):
            argv = ["train", str(recipes[name]), f"--train.output_dir={out / name}", *common, *extra]
            if llavakit.cli.main(argv) != 0:
                raise RuntimeError(f"{name} failed (see above)")

    say("== 6/6 held-out scores of both models, with the picture and blind")
    rows = read_test(paths.test)
    policies, predictions = {}, {}
    with clock.phase("score"):
        for p in POLICIES:
            model_dir = out / f"model_{p}"
            shutil.copytree(out / f"stage2_{p}" / "model", model_dir)
            model, processor = llavakit.load(model_dir)
            m, predictions[p] = score(model, processor, rows, paths.image_folder)
            policies[p] = {"image_tokens": processor.image_token_counts([(HIRES_SIZE, HIRES_SIZE)])[0],
                           "types": {t: m["types"][t] for t in HIRES_TYPES}}
            if p == "anyres":
                example = sample_conversation(model, processor, rows, paths.image_folder, types=("detail", "corner"))
        motion_metrics = {"trained": False, "why": MOTION_NOT_TRAINED}
        if motion:
            from .motion_run import score_motion

            shutil.copytree(out / "stage2_motion" / "model", out / "model_motion")
            model, processor = llavakit.load(out / "model_motion")
            motion_metrics = {"trained": True}
            motion_metrics["types"], predictions["motion"] = score_motion(model, processor, read_test(clips.test),
                                                                          clips.image_folder)
    times = clock.report()
    metrics = {"seconds": times["seconds"], "policies": policies,
               "motion": {**motion_metrics, "train_clips": len(json.loads(clips.train.read_text())),
                          "test_rows": len(read_test(clips.test))},
               "phases": times["phases"], "phases_cpu": times["phases_cpu"], "load_average": times["load_average"],
               "threads": torch.get_num_threads(), "seed": seed,
               "scale": scale if isinstance(scale, str) else "custom", "mode": "hires"}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    for p in predictions:
        (out / f"predictions_{p}.jsonl").write_text("".join(json.dumps(s) + "\n" for s in predictions[p]))
    for stage in ("stage1", *(f"stage2_{p}" for p in (*POLICIES, "motion"))):
        if (out / stage / "loss.png").is_file():
            shutil.copy(out / stage / "loss.png", out / f"loss_{stage}.png")
    (out / "sample_conversation.txt").write_text(example)
    say("")
    say(format_hires_table(policies))
    if motion:
        say(format_motion_table(motion_metrics["types"]))
    say("")
    say(example)
    say(f"total {metrics['seconds']:.0f}s. Wrote {out / 'metrics.json'}, loss curves, predictions, and the models: "
        f"llavakit.load('{out / 'model_anyres'}') (and the control, model_base)")
    return metrics


def format_hires_table(policies: dict) -> str:
    """Per type and policy, the accuracies as a fixed-width text table (percentages)."""
    lines = [f"{'question type':<14} {'image tokens':<13} {'with image':>10} {'blind':>7} {'chance':>7}"]
    lines.append("-" * len(lines[0]))
    for t in HIRES_TYPES:
        for p, m in policies.items():
            r = m["types"][t]
            tokens = f"{p} ({m['image_tokens']})"
            lines.append(f"{t:<14} {tokens:<13} {100 * r['with_image']:>9.1f}% {100 * r['blind']:>6.1f}% "
                         f"{100 * r['chance']:>6.1f}%")
    return "\n".join(lines)


def format_motion_table(types: dict) -> str:
    """Motion accuracies: with the frames, blind, with the middle frame alone, chance (percentages)."""
    lines = [f"{'question type':<14} {'with video':>10} {'blind':>7} {'1 frame':>8} {'chance':>7}"]
    lines.append("-" * len(lines[0]))
    for t, r in types.items():
        lines.append(f"{t:<14} {100 * r['with_video']:>9.1f}% {100 * r['blind']:>6.1f}% "
                     f"{100 * r['single_frame']:>7.1f}% {100 * r['chance']:>6.1f}%")
    return "\n".join(lines)
