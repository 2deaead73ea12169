"""The offline demo, end to end: world -> stage 0 backbones -> stage 1 -> stage 2 -> scores.

Everything a user would do with real data happens here with synthetic data, through the same
entry points: the world is written as LLaVA JSON + PNGs and checked like `llavakit data check`
does; the "downloaded" backbones are trained here and saved as ordinary HF folders; stage 1 and
stage 2 run `llavakit train` on the recipes shipped in `llavakit/demo/recipes/`; the final model is scored on the
held-out split with its images and blind (each image replaced by a blank one).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path



@dataclass
class Scale:
    """Sizes of one demo run. `full` is the README's demo; `small` is the fast test's."""

    world: dict = field(default_factory=dict)  # write_world kwargs (default: its own sizes)
    lm: dict = field(default_factory=dict)  # pretrain_lm kwargs
    clip: dict = field(default_factory=dict)  # pretrain_clip kwargs
    stage1: list[str] = field(default_factory=list)  # `llavakit train` overrides
    stage2: list[str] = field(default_factory=list)


SCALES = {
    "full": Scale(),
    "small": Scale(world={"n_train": 1200, "n_test": 12}, lm={"steps": 300}, clip={"steps": 600},
                   stage1=["--train.max_steps=100"], stage2=["--train.max_steps=400"]),
}


def recipes_dir() -> Path:
    """The demo's two recipes, `stage1.yaml` and `stage2.yaml`, shipped inside the package
    (`llavakit/demo/recipes/`, package data), so `llavakit demo` works from an installed wheel too."""
    from importlib.resources import files

    d = Path(str(files("llavakit.demo") / "recipes"))
    if not ((d / "stage1.yaml").is_file() and (d / "stage2.yaml").is_file()):
        raise FileNotFoundError(f"the demo recipes stage1.yaml and stage2.yaml are missing from {d}; reinstall llavakit")
    return d


def check_data(paths, say) -> None:
    """What `llavakit data check` does, on both training files; the demo stops on any error."""
    from llavakit.data.formats import load_conversations
    from llavakit.data.validate import validate

    for f in (paths.stage1, paths.stage2):
        convs, problems = load_conversations(f, image_folder=paths.image_folder, on_error="collect")
        problems = validate((convs, problems), check_images=True)
        errors = [p for p in problems if p.severity == "error"]
        if errors:
            raise RuntimeError(f"the generated {f} failed validation: {errors[0]}")
        say(f"  data check {f.name}: {len(convs)} samples, 0 errors, {len(problems)} warnings")


def run_demo(out_dir: str | Path, seed: int = 0, scale: str = "full", say=print) -> dict:
    """Run the whole demo into `out_dir`; returns the metrics written to `out_dir/metrics.json`."""
    import torch

    import llavakit
    import llavakit.cli

    from .backbones import pretrain_clip, pretrain_lm
    from .clock import start_run
    from .score import format_table, score
    from .world import caption_pairs, read_test, text_corpus, write_world

    spec = SCALES[scale]
    out, clock = start_run(out_dir, seed, say)

    say(f"== 1/5 synthetic world (seed {seed}) -> {out / 'data'}")
    with clock.phase("world"):
        paths = write_world(out / "data", seed=seed, **spec.world)
        check_data(paths, say)

    say("== 2/5 stage 0: the backbones a user would download (tiny Llama LM, tiny CLIP)")
    with clock.phase("stage0_lm"):
        llm = pretrain_lm(text_corpus(paths.stage1, paths.stage2), out / "backbones" / "llm", seed=seed,
                          log=say, **spec.lm).path
    with clock.phase("stage0_clip"):
        vision = pretrain_clip(caption_pairs(paths.stage1, paths.image_folder), out / "backbones" / "clip", seed=seed,
                               log=say, **spec.clip).path

    recipes = recipes_dir()
    common = [f"--model.vision={vision}", f"--model.llm={llm}", f"--data.image_folder={paths.image_folder}",
              f"--train.seed={seed}", "--train.report_to=none"]
    s1, s2 = out / "stage1", out / "stage2"
    stages = [
        ("stage1", "3/5 stage 1: projector pretraining on captions", [f"--data.train={paths.stage1}", *spec.stage1]),
        ("stage2", "4/5 stage 2: visual instruction tuning",
         [f"--model.init_from={s1}", f"--data.train={paths.stage2}", *spec.stage2]),
    ]
    for name, title, extra in stages:
        say(f"== {title} (llavakit train {recipes / name}.yaml)")
        with clock.phase(name):
            argv = ["train", str(recipes / f"{name}.yaml"), f"--train.output_dir={out / name}", *common, *extra]
            if llavakit.cli.main(argv) != 0:
                raise RuntimeError(f"{name} failed (see above)")

    say("== 5/5 held-out scores, with the image and blind")
    with clock.phase("score"):
        model_dir = out / "model"
        shutil.copytree(s2 / "model", model_dir)
        model, processor = llavakit.load(model_dir)
        rows = read_test(paths.test)
        metrics, samples = score(model, processor, rows, paths.image_folder)
    times = clock.report()
    metrics = {"seconds": times["seconds"], "types": metrics["types"], "phases": times["phases"],
               "phases_cpu": times["phases_cpu"], "load_average": times["load_average"],
               "threads": torch.get_num_threads(), "seed": seed, "scale": scale}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    (out / "predictions.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    for stage in ("stage1", "stage2"):
        if (out / stage / "loss.png").is_file():
            shutil.copy(out / stage / "loss.png", out / f"loss_{stage}.png")
    example = sample_conversation(model, processor, rows, paths.image_folder)
    (out / "sample_conversation.txt").write_text(example)
    say("")
    say(format_table(metrics["types"]))
    say("")
    say(example)
    say(f"total {metrics['seconds']:.0f}s. Wrote {out / 'metrics.json'}, loss curves, {out / 'predictions.jsonl'}, "
        f"and the model: llavakit.load('{model_dir}')")
    return metrics


def sample_conversation(model, processor, rows, image_folder, types=("colour", "shape")) -> str:
    """A two-turn exchange about one held-out image, as text (prompted as `llavakit chat` does): the first
    held-out question of `types[0]` with its image, then the question text of `types[1]` about the same image."""
    from PIL import Image

    from llavakit.data.conversation import Turn
    from llavakit.infer.generate import GenerationSettings, Generator

    generator = Generator(model, processor)
    row = next(r for r in rows if r["type"] == types[0])
    names = [row["image"]]
    images = [Image.open(Path(image_folder) / n).convert("RGB") for n in names]
    second_q = next(r for r in rows if r["type"] == types[1])["question"].replace("<image>", "").strip()
    questions = [row["question"], second_q]  # the world's own phrasing; the first carries the image
    turns, lines = [], [f"[image: {', '.join(names)}]"]
    for q in questions:
        turns.append(Turn("user", q))
        answer = generator.generate([turns], [images], GenerationSettings(max_new_tokens=8))[0].strip()
        turns.append(Turn("assistant", answer))
        lines += [f"USER: {q.replace('<image>', '').strip()}", f"ASSISTANT: {answer}"]
    return "\n".join(lines)


def load_metrics(out_dir: str | Path) -> dict:
    return json.loads((Path(out_dir) / "metrics.json").read_text())


