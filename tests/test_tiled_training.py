"""Training, data tools and generation with variable image-token counts: ``image_tokens: anyres`` (LLaVA-NeXT tiles)
and ``anyres_max`` (LLaVA-OneVision), on samples with one image, several images or none, of several image sizes.

What a user relies on: the YAML keys reach the model; every sample's placeholders are the processor's counts and the
model produces exactly that many features from a collated batch (padding or packing; ``batch_num_images`` tells it
which images were alone); only the answers are supervised; a resumed run ends where an uninterrupted one does;
batched generation equals one prompt at a time; the start-up cache and ``llavakit data stats`` see the real counts.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

import llavakit
from llavakit.data.collate import PackingCollator, PadCollator
from llavakit.data.dataset import SupervisedDataset
from llavakit.data.formats import load_conversations
from llavakit.train import load_config, run_training
from llavakit.train.config import ConfigError
from llavakit.train.loop import read_losses

TILED = ("anyres", "anyres_max")
SIZES = [(61, 46), (29, 86), (48, 48), (120, 20), (90, 64)]  # (width, height); the tiny encoders see 32 px tiles
PINS = [[32, 32], [32, 64], [64, 32], [64, 64], [32, 96], [96, 32]]  # tiny pinpoints: up to 3 tiles a side
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _image(size, seed):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(size[1], size[0], 3, generator=g) * 255).byte().numpy())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """12 LLaVA-JSON rows: one image, two images, text only, and a two-round one-image conversation."""
    root = tmp_path_factory.mktemp("tiled_data")
    (root / "images").mkdir()
    for k, s in enumerate(SIZES):
        _image(s, k).save(root / "images" / f"{k}.png")
    rows = []
    for i in range(12):
        a, b = f"{i % 5}.png", f"{(i + 2) % 5}.png"
        kind = i % 4
        if kind == 0:
            rows.append({"id": f"one{i}", "image": a, "conversations": [
                {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": f"a noise picture {i}"}]})
        elif kind == 1:
            rows.append({"id": f"two{i}", "images": [a, b], "conversations": [
                {"from": "human", "value": "<image>\n<image>\nWhich is wider?"},
                {"from": "gpt", "value": f"the {i}th"}]})
        elif kind == 2:
            rows.append({"id": f"text{i}", "conversations": [
                {"from": "human", "value": f"Count to {i}."}, {"from": "gpt", "value": f"done {i}"}]})
        else:
            rows.append({"id": f"turns{i}", "image": a, "conversations": [
                {"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": f"noise {i}"},
                {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": f"yes {i}"}]})
    (root / "train.json").write_text(json.dumps(rows))
    return root


def _images_of(row) -> list[str]:
    return row.get("images") or ([row["image"]] if "image" in row else [])


def _answers(row) -> list[str]:
    return [t["value"] for t in row["conversations"] if t["from"] == "gpt"]


def _tree(tiny_dirs, data, out, policy, packing=False, **train):
    model = {"vision": str(tiny_dirs["siglip"]), "llm": str(tiny_dirs["qwen2"]), "image_tokens": policy,
             "image_grid_pinpoints": PINS, "attn_implementation": "eager"}
    if policy == "anyres_max":
        model["anyres_max_tiles"] = 2  # small enough that the 2x3-tile grids are shrunk
    return {"model": model,
            "data": {"train": str(data / "train.json"), "image_folder": str(data / "images"), "template": "vicuna_v1",
                     "max_length": 1024, "packing": packing, "cache": False},
            "train": {"stage": "finetune", "output_dir": str(out), "max_steps": 2, "batch_size": 4, "lr": 1e-3,
                      "warmup_ratio": 0.0, "log_every": 1, "report_to": "none", "seed": 0, **train}}


@pytest.fixture(scope="module")
def built(tiny_dirs, data, tmp_path_factory):
    """policy -> (model, processor): tiny SigLIP + tiny Qwen2, PINS, anyres_max_tiles 2, assembled from a recipe."""
    from llavakit.train.recipes import assemble

    out = {}
    for policy in TILED:
        torch.manual_seed(0)
        cfg = load_config(base=_tree(tiny_dirs, data, tmp_path_factory.mktemp("unused"), policy))
        model, processor = assemble(cfg)
        processor.template = "vicuna_v1"
        out[policy] = (model.eval(), processor)
    return out


# --- config ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", TILED)
def test_recipe_keys_reach_the_model_and_processor(built, policy):
    model, processor = built[policy]
    assert model.config.image_tokens == processor.image_tokens == policy
    assert model.config.image_grid_pinpoints == processor.image_grid_pinpoints == PINS
    if policy == "anyres_max":
        assert model.config.anyres_max_tiles == processor.anyres_max_tiles == 2
    # a 120x20 image alone: the 1x3-tile grid, unpadded (12 x 2 features) + a newline per row + the base tile
    assert processor.image_token_counts([(120, 20)]) == [16 + 12 * 2 + 2]


@pytest.mark.parametrize("model_keys, match", [
    ({"image_tokens": "tiles"}, r"model.image_tokens='tiles' is not one of \['base', 'unpad', 'anyres', 'anyres_max'"),
    ({"image_tokens": "base", "image_grid_pinpoints": [[32, 64]]}, "model.image_grid_pinpoints is only used with"),
    ({"image_tokens": "anyres", "image_grid_pinpoints": [32, 64]}, r"model.image_grid_pinpoints=\[32, 64\] must be"),
    ({"image_tokens": "anyres", "image_grid_pinpoints": [[32, 0]]}, "pairs of positive integers"),
    ({"image_tokens": "anyres", "anyres_max_tiles": 4}, "model.anyres_max_tiles is only used with .*anyres_max"),
    ({"image_tokens": "anyres_max", "anyres_max_tiles": 0}, "model.anyres_max_tiles=0 must be a positive integer"),
    ({"image_tokens": "anyres", "image_aspect": "pad"}, "set model.image_aspect: resize"),
])
def test_bad_image_policy_keys_are_config_errors(tiny_dirs, data, tmp_path, model_keys, match):
    tree = _tree(tiny_dirs, data, tmp_path / "run", "anyres")
    tree["model"] = {k: v for k, v in tree["model"].items() if k not in ("image_grid_pinpoints", "anyres_max_tiles")}
    tree["model"].update(model_keys)
    with pytest.raises(ConfigError, match=match):
        load_config(base=tree)


def test_pinpoints_that_are_not_tile_multiples_are_refused_when_the_model_is_assembled(tiny_dirs, data, tmp_path):
    from llavakit.train.recipes import assemble

    tree = _tree(tiny_dirs, data, tmp_path / "run", "anyres")
    tree["model"]["image_grid_pinpoints"] = [[32, 48]]
    with pytest.raises(ConfigError, match=r"model.image_grid_pinpoints: .*multiple of the encoder's input size 32"):
        assemble(load_config(base=tree))


# --- data: counts, labels, batches ---------------------------------------------------------------------------
def _dataset(data, processor, **kw):
    convs, problems = load_conversations(data / "train.json", image_folder=data / "images")
    assert not problems
    return SupervisedDataset(convs, processor, "vicuna_v1", **kw), json.loads((data / "train.json").read_text())


def _spans(labels):
    """Runs of supervised positions as lists of token ids."""
    out, run = [], []
    for t in labels.tolist() + [-100]:
        if t != -100:
            run.append(t)
        elif run:
            out, run = out + [run], []
    return out


@pytest.mark.parametrize("policy", TILED)
@pytest.mark.parametrize("collator", ["pad", "pack"])
def test_batches_supervise_exactly_the_answers_and_the_model_makes_every_placeholders_feature(built, data, policy,
                                                                                             collator):
    model, processor = built[policy]
    ds, rows = _dataset(data, processor)
    tok = processor.tokenizer
    coll = PadCollator(tok.pad_token_id) if collator == "pad" else PackingCollator()
    for start in range(0, len(ds), 4):
        idx = list(range(start, start + 4))
        items = [ds[i] for i in idx]
        batch = coll(items)
        assert batch["batch_num_images"].tolist() == [len(_images_of(rows[i])) for i in idx]
        # the lengths the sampler groups by and the packer packs are the real ones, image placeholders included
        assert [ds.lengths[i] for i in idx] == [len(it["input_ids"]) for it in items]
        ids, labels = batch["input_ids"], batch["labels"]
        if collator == "pack":  # back to samples
            lens = [len(it["input_ids"]) for it in items]
            ids, labels = ids[0].split(lens), labels[0].split(lens)
        for i, row_ids, row_labels in zip(idx, ids, labels):
            paths = [str(data / "images" / p) for p in _images_of(rows[i])]
            placeholders = row_ids == processor.image_token_id
            assert int(placeholders.sum()) == sum(processor.image_token_counts([Image.open(p) for p in paths]))
            assert (row_labels[placeholders] == -100).all()
            answers = [tok.decode(s, skip_special_tokens=True).strip() for s in _spans(row_labels)]
            assert answers == _answers(rows[i])
        # the model's features are exactly the placeholders, image by image (the guarded splice runs too)
        with torch.no_grad():
            feats = model.select_image_features(model.get_image_features(batch["pixel_values"]),
                                                batch["image_sizes"], batch["batch_num_images"])
            expected = [n for it in items if it["num_images"] for n in processor.image_token_counts(
                [tuple(s) for s in it["image_sizes"].tolist()])]
            assert [f.shape[0] for f in feats] == expected
            assert int((batch["input_ids"] == processor.image_token_id).sum()) == sum(expected)
            kwargs = {k: v for k, v in batch.items() if k != "use_cache"}
            assert torch.isfinite(model(**kwargs).loss)


def test_multi_image_anyres_max_needs_batch_num_images(built, data):
    """Without batch_num_images the model would tile the images of a two-image sample: features != tokens."""
    model, processor = built["anyres_max"]
    ds, _ = _dataset(data, processor)
    batch = PadCollator(processor.tokenizer.pad_token_id)([ds[1], ds[0]])  # two images, then one
    assert batch["batch_num_images"].tolist() == [2, 1]
    with torch.no_grad():
        model.embed(batch["input_ids"], batch["pixel_values"], image_sizes=batch["image_sizes"],
                    batch_num_images=batch["batch_num_images"])
        with pytest.raises(ValueError, match="tiles"):
            model.embed(batch["input_ids"], batch["pixel_values"], image_sizes=batch["image_sizes"])


def test_anyres_max_image_left_alone_by_truncation_gets_its_tiled_count(built, tmp_path):
    """Two images in two rounds; max_length keeps the first round only: its image is now alone, so it is tiled, and
    its placeholders are the single-image count the model produces for a sample of one image."""
    from llavakit.data.conversation import Conversation, Turn

    model, processor = built["anyres_max"]
    paths = []
    for k, s in enumerate([(120, 20), (61, 46)]):
        paths.append(str(tmp_path / f"{k}.png"))
        _image(s, k).save(paths[-1])
    first = [Turn("user", "<image>\nWhat?"), Turn("assistant", "first")]
    conv = Conversation(first + [Turn("user", "<image>\nAnd what is the second picture, in a few words?"),
                                 Turn("assistant", "second")], images=paths, index=0)
    full = SupervisedDataset([conv], processor, "vicuna_v1")[0]
    alone = processor.image_token_counts([(120, 20)])[0]
    assert alone > 17 and int((full["input_ids"] == processor.image_token_id).sum()) == 2 * 17  # base + newline
    one_round = SupervisedDataset([Conversation(first, images=paths[:1], index=0)], processor, "vicuna_v1")
    fits = len(one_round[0]["input_ids"])
    assert len(full["input_ids"]) > fits  # so max_length=fits cuts the second round
    cut = SupervisedDataset([conv], processor, "vicuna_v1", max_length=fits)
    item = cut[0]
    assert cut.report.truncated == 1 and item["num_images"] == 1
    assert int((item["input_ids"] == processor.image_token_id).sum()) == alone
    batch = PackingCollator()([item])
    with torch.no_grad():
        model.embed(batch["input_ids"], batch["pixel_values"], image_sizes=batch["image_sizes"],
                    batch_num_images=batch["batch_num_images"])


def test_startup_cache_keys_on_policy_pinpoints_and_max_tiles(built, data, tmp_path):
    from llavakit.data.templates import get_template
    from llavakit.data.token_cache import prepare

    _, processor = built["anyres_max"]
    template = get_template("vicuna_v1", processor.tokenizer)

    def run():
        notes = []
        got = prepare(str(data / "train.json"), processor, template, image_folder=str(data / "images"),
                      cache_dir=tmp_path, say=notes.append)
        return got.dataset.lengths, " ".join(notes)

    first, note = run()
    assert "wrote" in note
    again, note = run()
    assert "hit" in note and again == first
    saved = processor.anyres_max_tiles, processor.image_grid_pinpoints
    try:
        processor.anyres_max_tiles = 1  # grids shrink more: other counts, so the cache must miss
        fewer, note = run()
        assert "hit" not in note and sum(fewer) < sum(first)
        processor.anyres_max_tiles, processor.image_grid_pinpoints = saved[0], [[32, 32]]
        one_tile, note = run()
        assert "hit" not in note and one_tile != first
    finally:
        processor.anyres_max_tiles, processor.image_grid_pinpoints = saved


def test_data_stats_and_check_count_the_tiles(built, data, tmp_path, capsys):
    from llavakit.cli import main

    model, processor = built["anyres"]
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    ds, _ = _dataset(data, processor)
    png = tmp_path / "hist.png"
    assert main(["data", "stats", str(data / "train.json"), "--image-folder", str(data / "images"), "--model",
                 str(tmp_path / "model"), "--histogram", str(png)]) == 0
    out = capsys.readouterr().out
    stats = dict(line.split() for line in out.split("length in tokens:")[1].splitlines()[1:6])
    assert "could not be tokenized" not in out
    assert int(stats["max"]) == max(ds.lengths) and int(stats["min"]) == min(ds.lengths)
    assert max(ds.lengths) > 2 * 17 + 40  # far more than two base tiles: the tiles are counted
    assert png.is_file()
    limit = sorted(ds.lengths)[-3]  # the two longest samples are over it, judged with the tiled counts
    main(["data", "check", str(data / "train.json"), "--image-folder", str(data / "images"), "--model",
          str(tmp_path / "model"), "--max-length", str(limit), "--images", "header"])
    over = [line for line in capsys.readouterr().out.splitlines() if line.startswith("#") and "too long" in line]
    assert len(over) == sum(n > limit for n in ds.lengths) == 2


# --- training ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", TILED)
@pytest.mark.parametrize("packing", [False, True])
def test_training_steps_with_tiles(tiny_dirs, data, tmp_path, policy, packing):
    run = run_training(load_config(base=_tree(tiny_dirs, data, tmp_path / "run", policy, packing)))
    losses = [r["loss"] for r in read_losses(run / "losses.jsonl")]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    model, processor = llavakit.load(run / "model")
    assert model.config.image_tokens == processor.image_tokens == policy
    assert model.config.image_grid_pinpoints == processor.image_grid_pinpoints == PINS


def test_resumed_anyres_max_run_ends_with_the_weights_of_an_uninterrupted_one(tiny_dirs, data, tmp_path):
    tree = _tree(tiny_dirs, data, tmp_path / "run", "anyres_max", packing=True, max_steps=4, save_every=2,
                 batch_size=3)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tree))
    run = run_training(path)
    ref_weights = load_file(str(run / "model" / "model.safetensors"))
    ref_losses = read_losses(run / "losses.jsonl")
    assert [p.name for p in run.glob("checkpoint-*")] == ["checkpoint-2"]
    # stopped after step 2's checkpoint: the final model and the record of finishing are gone
    shutil.rmtree(run / "model")
    (run / "finished.json").unlink()
    run_training(path, resume=True)
    losses = read_losses(run / "losses.jsonl")
    assert [r["step"] for r in losses] == [1, 2, 3, 4]
    assert [r["loss"] for r in losses] == pytest.approx([r["loss"] for r in ref_losses], rel=1e-6, abs=1e-7)
    weights = load_file(str(run / "model" / "model.safetensors"))
    worst = max((weights[k] - ref_weights[k]).abs().max().item() for k in ref_weights)
    assert worst < 1e-6, worst


def test_lora_run_with_tiles_merges_into_a_model_with_its_policy_and_saved_newline(tiny_dirs, data, tmp_path):
    from llavakit.train.merge import merge_lora

    tree = _tree(tiny_dirs, data, tmp_path / "lora", "anyres_max", packing=True, stage="lora")
    tree["train"]["lora"] = {"r": 4, "alpha": 8, "dropout": 0.0}
    run = run_training(load_config(base=tree))
    assert all(torch.isfinite(torch.tensor([r["loss"] for r in read_losses(run / "losses.jsonl")])))
    saved = load_file(str(run / "projector.safetensors"))
    model, processor = merge_lora(run)
    assert model.config.image_tokens == processor.image_tokens == "anyres_max"
    assert model.config.image_grid_pinpoints == processor.image_grid_pinpoints == PINS
    assert model.config.anyres_max_tiles == processor.anyres_max_tiles == 2
    assert torch.equal(model.multi_modal_projector.image_newline.weight, saved["image_newline.weight"])
    assert (run / "adapter" / "adapter_config.json").is_file()


# --- generation ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", TILED)
def test_batched_generation_equals_one_prompt_at_a_time(built, policy):
    from llavakit.data.conversation import Turn
    from llavakit.infer.generate import GenerationSettings, Generator

    model, processor = built[policy]
    gen = Generator(model, processor, template="vicuna_v1")
    prompts = [([Turn("user", "<image>\nWhat is it?")], [_image((61, 46), 0)]),
               ([Turn("user", "<image>\nDescribe the picture.")], [_image((29, 86), 1)]),
               ([Turn("user", "<image>\n<image>\nCompare them.")], [_image((120, 20), 2), _image((90, 64), 3)])]
    convs, images = [p[0] for p in prompts], [p[1] for p in prompts]
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    inputs = gen.encode(convs, images)
    assert inputs["batch_num_images"].tolist() == [1, 1, 2]
    with torch.no_grad():
        batched = model.generate(**inputs, **kwargs)[:, inputs["input_ids"].shape[1]:]
        for k in range(3):
            one = gen.encode(convs[k:k + 1], images[k:k + 1])
            alone = model.generate(**one, **kwargs)[:, one["input_ids"].shape[1]:]
            assert batched[k].tolist() == alone[0].tolist(), k
    settings = GenerationSettings(max_new_tokens=5)
    assert gen.generate(convs, images, settings) == [gen.generate([c], [i], settings)[0] for c, i in prompts]


def test_eval_of_an_anyres_max_model_batches_images_of_several_sizes(built, data, tmp_path):
    from llavakit.eval.metrics import get_metric
    from llavakit.eval.runner import PREDICTIONS, evaluate, read_samples
    from llavakit.infer.generate import GenerationSettings, Generator

    model, processor = built["anyres_max"]
    rows = [{"id": "a", "question": "What is it?", "image": "images/0.png", "answer": "x"},
            {"id": "b", "question": "Which?", "images": ["images/1.png", "images/3.png"], "answer": "y"},
            {"id": "c", "question": "And this?", "image": "images/3.png", "answer": "z"}]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shutil.copytree(data / "images", tmp_path / "images")
    samples = read_samples(tmp_path / "q.jsonl", metric=get_metric("exact"))
    gen, settings = Generator(model, processor, template="vicuna_v1"), GenerationSettings(max_new_tokens=4)
    def predictions(batch_size):
        out = tmp_path / f"bs{batch_size}"
        evaluate(gen, samples, out, "exact", batch_size=batch_size, settings=settings, progress=False)
        return {r["id"]: r["prediction"] for r in map(json.loads, (out / PREDICTIONS).read_text().splitlines())}

    one = predictions(1)
    assert set(one) == {"a", "b", "c"} and predictions(3) == one


# --- shipped recipes -----------------------------------------------------------------------------------------
def test_shipped_tiled_recipes_chain_and_fit_their_images():
    """configs/qwen25_05b_siglip_anyres: stage 1 base, stage 2 anyres, OneVision-style stages with anyres_max; the
    token budget holds the largest image count the policy can give a SigLIP-384 (27 x 27 features per tile)."""
    from llavakit.model.anyres import anyres_token_count, default_grid_pinpoints
    from llavakit.model.onevision import anyres_max_token_count, onevision_grid_pinpoints

    folder = CONFIGS / "qwen25_05b_siglip_anyres"
    s1 = load_config(folder / "stage1.yaml")
    s2 = load_config(folder / "stage2.yaml")
    si = load_config(folder / "stage2_onevision_si.yaml")
    ov = load_config(folder / "stage3_onevision_ov.yaml")
    assert (s1.model.image_tokens, s1.train.stage, s1.model.vision, s1.model.llm) == \
        ("base", "pretrain", "google/siglip-so400m-patch14-384", "Qwen/Qwen2.5-0.5B-Instruct")
    assert s2.model.init_from == si.model.init_from == s1.train.output_dir
    assert ov.model.init_from == str(Path(si.train.output_dir) / "model")
    assert (s2.model.image_tokens, si.model.image_tokens, si.model.anyres_max_tiles) == ("anyres", "anyres_max", 9)
    sizes = [(w, h) for w in range(64, 4000, 97) for h in range(64, 4000, 89)]
    most_next = max(anyres_token_count(w, h, default_grid_pinpoints(384), 384, 27) for w, h in sizes)
    most_ov = max(anyres_max_token_count(w, h, onevision_grid_pinpoints(384), 384, 27, 9) for w, h in sizes)
    assert s2.data.max_length >= most_next + 256
    assert si.data.max_length >= most_ov + 256 and ov.data.max_length >= most_ov + 256


@pytest.mark.parametrize("stage", ["stage2.yaml", "stage2_onevision_si.yaml", "stage3_onevision_ov.yaml"])
def test_shipped_tiled_recipes_build_at_full_size_on_meta(stage):
    """Each tiled stage's policy, pinpoints and N fit the published SigLIP-384 + Qwen2.5-0.5B shapes: the model
    builds on the meta device (no weights) with its row newline in the projector."""
    from transformers import Qwen2Config, SiglipVisionConfig

    from llavakit.model.config import LlavakitConfig
    from llavakit.model.modeling import LlavakitForConditionalGeneration

    m = load_config(CONFIGS / "qwen25_05b_siglip_anyres" / stage).model
    vision = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                                image_size=384, patch_size=14)
    llm = Qwen2Config(vocab_size=151936 + 1, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                      num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)
    config = LlavakitConfig(vision_config=vision, text_config=llm, image_tokens=m.image_tokens,
                            image_grid_pinpoints=m.image_grid_pinpoints, anyres_max_tiles=m.anyres_max_tiles or 9,
                            image_token_id=151936)
    with torch.device("meta"):
        model = LlavakitForConditionalGeneration(config)
    assert model.multi_modal_projector.image_newline.weight.shape == (896,)
    assert round(sum(p.numel() for p in model.language_model.parameters()) / 1e9, 2) == 0.49
    assert config.image_seq_length == 729 and len(config.image_grid_pinpoints) == (5 if m.image_tokens == "anyres"
                                                                                    else 36)
