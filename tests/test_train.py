"""Training: every stage on a tiny model, exact resume after SIGKILL, 2 processes, LoRA merge."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

import llavakit
import llavakit.cli
from llavakit.train import load_config, run_training
from llavakit.train.config import ConfigError
from llavakit.train.loop import read_losses

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """16 LLaVA-JSON samples: one- and two-image questions about colours, and text-only turns."""
    root = tmp_path_factory.mktemp("train_data")
    (root / "images").mkdir()
    names = list(COLOURS)
    for n, rgb in COLOURS.items():
        Image.new("RGB", (32, 32), rgb).save(root / "images" / f"{n}.png")
    rows = []
    for i in range(16):
        a, b = names[i % 4], names[(i + 1) % 4]
        if i % 4 == 3:
            rows.append({"id": f"t{i}", "conversations": [
                {"from": "human", "value": f"Say the word {a}."}, {"from": "gpt", "value": a}]})
        elif i % 4 == 2:
            rows.append({"id": f"m{i}", "images": [f"{a}.png", f"{b}.png"], "conversations": [
                {"from": "human", "value": "<image>\n<image>\nWhat colour is the second image?"},
                {"from": "gpt", "value": b}]})
        else:
            rows.append({"id": f"s{i}", "image": f"{a}.png", "conversations": [
                {"from": "human", "value": "<image>\nWhat colour is this?"}, {"from": "gpt", "value": a},
                {"from": "human", "value": "Are you sure?"}, {"from": "gpt", "value": f"Yes, {a}."}]})
    (root / "train.json").write_text(json.dumps(rows))
    captions = [{"id": f"c{i}", "image": f"{n}.png", "conversations": [
        {"from": "human", "value": "<image>"}, {"from": "gpt", "value": f"a {n} square"}]}
        for i, n in enumerate(names * 2)]
    (root / "captions.json").write_text(json.dumps(captions))
    return root


def _cfg(tiny_dirs, dataset, out, stage="finetune", **train):
    base = {
        "model": {"vision": str(tiny_dirs["clip"]), "llm": str(tiny_dirs["llama"]), "projector": "mlp2x_gelu"},
        "data": {"train": str(dataset / "train.json"), "image_folder": str(dataset / "images"),
                 "template": "vicuna_v1", "max_length": 256},
        "train": {"stage": stage, "output_dir": str(out), "max_steps": 4, "batch_size": 4, "lr": 1e-3,
                  "warmup_ratio": 0.0, "log_every": 1, "report_to": "none", **train},
    }
    return base


def _write(tmp_path, tree) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(tree))
    return p


def _params(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before, module):
    after = module.state_dict()
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_pretrain_trains_only_the_projector_and_saves_only_it(tiny_dirs, dataset, tmp_path):
    tree = _cfg(tiny_dirs, dataset, tmp_path / "s1", stage="pretrain", max_steps=3)
    tree["data"].update(train=str(dataset / "captions.json"), template="plain")
    run = run_training(_write(tmp_path, tree))
    proj = load_file(str(run / "projector.safetensors"))
    assert set(proj) == {"linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"}
    assert not (run / "model").exists()
    assert (run / "loss.png").is_file() and (run / "config.yaml").is_file()
    assert len(read_losses(run / "losses.jsonl")) == 3
    written = yaml.safe_load((run / "config.yaml").read_text())
    assert written["train"]["stage"] == "pretrain" and written["data"]["template"] == "plain"
    assert "lora" in written["train"] and "packing" in written["data"]  # written back in full

    # stage 2 continues from the stage-1 run: its projector, the same components
    model, _ = llavakit.build(tiny_dirs["clip"], tiny_dirs["llama"])
    fresh = _params(model.multi_modal_projector)
    tree2 = _cfg(tiny_dirs, dataset, tmp_path / "s2", max_steps=2)
    tree2["model"] = {"init_from": str(run)}
    from llavakit.train.recipes import assemble

    cfg2 = load_config(_write(tmp_path, tree2))
    m2, _ = assemble(cfg2)
    for k, v in m2.multi_modal_projector.state_dict().items():
        assert torch.equal(v, proj[k]) and not torch.equal(v, fresh[k])


def test_finetune_trains_projector_and_llm_not_vision_and_saves_a_loadable_model(tiny_dirs, dataset, tmp_path):
    run = run_training(_write(tmp_path, _cfg(tiny_dirs, dataset, tmp_path / "ft")))
    model, processor = llavakit.load(run / "model")
    base, _ = llavakit.build(tiny_dirs["clip"], tiny_dirs["llama"])
    assert processor.template == "vicuna_v1"
    for a, b in zip(model.vision_tower.parameters(), base.vision_tower.parameters()):
        assert torch.equal(a, b)
    lm_changed = [not torch.equal(a, b) for a, b in zip(model.language_model.parameters(),
                                                         base.language_model.parameters())]
    assert sum(lm_changed) > len(lm_changed) // 2
    losses = [r["loss"] for r in read_losses(run / "losses.jsonl")]
    assert len(losses) == 4 and all(l == l and l > 0 for l in losses)


def test_loss_goes_down_when_training_longer(tiny_dirs, dataset, tmp_path):
    run = run_training(_write(tmp_path, _cfg(tiny_dirs, dataset, tmp_path / "long", max_steps=24, lr=3e-3)))
    losses = [r["loss"] for r in read_losses(run / "losses.jsonl")]
    assert sum(losses[-4:]) / 4 < 0.6 * sum(losses[:4]) / 4


def test_lora_trains_adapters_and_merge_gives_the_same_logits(tiny_dirs, dataset, tmp_path):
    tree = _cfg(tiny_dirs, dataset, tmp_path / "lora", stage="lora", max_steps=3)
    tree["train"]["lora"] = {"r": 4, "alpha": 8, "dropout": 0.1}  # dropout: the RNG state must resume too
    run = run_training(_write(tmp_path, tree))
    assert (run / "adapter" / "adapter_config.json").is_file() and (run / "projector.safetensors").is_file()
    saved = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert saved and all("lora_" in k for k in saved), [k for k in saved if "lora_" not in k]  # no full embeddings

    # base + adapter, assembled by hand
    from peft import PeftModel

    base, processor = llavakit.build(tiny_dirs["clip"], tiny_dirs["llama"])
    from llavakit.train.recipes import load_projector

    load_projector(base, run / "projector.safetensors")
    base.language_model = PeftModel.from_pretrained(base.language_model, run / "adapter")
    out = tmp_path / "merged"
    assert llavakit.cli.main(["merge-lora", str(run), str(out)]) == 0
    merged, proc2 = llavakit.load(out)
    inputs = processor(text="USER: <image>\nWhat colour? ASSISTANT:", images=[Image.open(dataset / "images/red.png")],
                       return_tensors="pt")
    with torch.no_grad():
        ref = base.eval()(**inputs).logits
        got = merged.eval()(**inputs).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    plain, _ = llavakit.build(tiny_dirs["clip"], tiny_dirs["llama"])
    with torch.no_grad():
        assert not torch.allclose(plain.eval()(**inputs).logits, ref, atol=1e-4)  # the adapter did something


def test_qlora_without_cuda_is_a_clear_error(tiny_dirs, dataset, tmp_path, capsys):
    cfg = _write(tmp_path, _cfg(tiny_dirs, dataset, tmp_path / "q", stage="qlora"))
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the error path is for machines without it")
    assert llavakit.cli.main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and "stage: lora" in err


def test_config_overrides_and_unknown_keys(tiny_dirs, dataset, tmp_path):
    path = _write(tmp_path, _cfg(tiny_dirs, dataset, tmp_path / "x"))
    cfg = load_config(path, ["--train.lr=2e-5", "--data.packing=true", "--train.lora.r=8"])
    assert cfg.train.lr == 2e-5 and cfg.data.packing is True and cfg.train.lora.r == 8
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['lrr'\] in config.train; valid keys: .*'lr'"):
        load_config(path, ["--train.lrr=1"])
    with pytest.raises(ConfigError, match="train.stage='stage3' is not one of"):
        load_config(path, ["--train.stage=stage3"])


def test_loss_chunk_size_and_compile_are_validated(tiny_dirs, dataset, tmp_path):
    path = _write(tmp_path, _cfg(tiny_dirs, dataset, tmp_path / "x"))
    cfg = load_config(path)
    assert cfg.train.loss_chunk_size == 0 and cfg.train.compile is False  # today's behaviour by default
    cfg = load_config(path, ["--train.loss_chunk_size=1024", "--train.compile=true"])
    assert cfg.train.loss_chunk_size == 1024 and cfg.train.compile is True
    with pytest.raises(ConfigError, match=r"train.loss_chunk_size=-1 must be an integer >= 0"):
        load_config(path, ["--train.loss_chunk_size=-1"])
    with pytest.raises(ConfigError, match=r"train.loss_chunk_size='many' is not an integer"):
        load_config(path, ["--train.loss_chunk_size=many"])
    with pytest.raises(ConfigError, match=r"train.loss_chunk_size=8 .* needs train.supervised_logits_only: true"):
        load_config(path, ["--train.loss_chunk_size=8", "--train.supervised_logits_only=false"])
    with pytest.raises(ConfigError, match=r"train.compile='fast' must be true or false"):
        load_config(path, ["--train.compile=fast"])


def test_refuses_to_overwrite_an_existing_run(tiny_dirs, dataset, tmp_path):
    path = _write(tmp_path, _cfg(tiny_dirs, dataset, tmp_path / "once", max_steps=1))
    run = run_training(path)
    before = (run / "model" / "model.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="already holds a training run; pass --resume"):
        run_training(path)
    assert (run / "model" / "model.safetensors").read_bytes() == before


def test_invalid_samples_stop_training_unless_skipped(tiny_dirs, dataset, tmp_path, capsys):
    rows = json.loads((dataset / "train.json").read_text())
    rows[1]["image"] = "missing.png"
    rows[5]["conversations"][1]["value"] = "<image> in an answer"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(rows))
    tree = _cfg(tiny_dirs, dataset, tmp_path / "bad_run", max_steps=1)
    tree["data"]["train"] = str(bad)
    with pytest.raises(ConfigError, match=r"2 sample\(s\) .* have errors"):
        run_training(_write(tmp_path, tree))
    out = capsys.readouterr().out
    assert "'s1'" in out and "'s5'" in out
    tree["data"]["skip_invalid"] = True
    tree["train"]["output_dir"] = str(tmp_path / "skip_run")
    run_training(_write(tmp_path, tree))
    assert "skipping 2 invalid sample(s)" in capsys.readouterr().out


def _train_cmd(cfg_path, *extra):
    return [sys.executable, "-m", "llavakit.cli", "train", str(cfg_path), *extra]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_same_losses_as_an_uninterrupted_run(tiny_dirs, dataset, tmp_path):
    steps = 16
    ref_tree = _cfg(tiny_dirs, dataset, tmp_path / "ref", max_steps=steps, save_every=2, batch_size=2,
                    grad_accum=2)
    ref_tree["model"]["attn_implementation"] = "eager"
    ref = run_training(_write(tmp_path, ref_tree))
    ref_losses = read_losses(ref / "losses.jsonl")

    tree = json.loads(json.dumps(ref_tree))
    tree["train"]["output_dir"] = str(tmp_path / "killed")
    cfg = tmp_path / "killed.yaml"
    cfg.write_text(yaml.safe_dump(tree))
    proc = subprocess.Popen(_train_cmd(cfg), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    run = tmp_path / "killed"
    deadline = time.monotonic() + 300
    while not (run / "checkpoint-4" / "trainer_state.json").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "model").exists(), "the run finished before it could be killed"
    killed_at = len(read_losses(run / "losses.jsonl"))
    assert killed_at < steps

    done = subprocess.run(_train_cmd(cfg, "--resume"), env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout
    losses = read_losses(run / "losses.jsonl")
    assert [r["step"] for r in losses] == list(range(1, steps + 1))
    for a, b in zip(losses, ref_losses):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7), (a, b)
        assert a["lr"] == pytest.approx(b["lr"])
    final_a = load_file(str(run / "model" / "model.safetensors"))
    final_b = load_file(str(ref / "model" / "model.safetensors"))
    worst = max((final_a[k] - final_b[k]).abs().max().item() for k in final_b)
    assert worst < 1e-5, worst
    # at most keep_last (2) complete checkpoints remain, and no partial one
    assert len(list(run.glob("checkpoint-*"))) <= 2 and not list(run.glob("*.tmp"))


@pytest.mark.parametrize("stage", ["finetune", "lora"])
def test_resume_ignores_a_half_written_checkpoint(tiny_dirs, dataset, tmp_path, stage):
    tree = _cfg(tiny_dirs, dataset, tmp_path / "half", stage=stage, max_steps=4, save_every=2, batch_size=2)
    tree["train"]["lora"] = {"r": 4, "alpha": 8, "dropout": 0.1}  # dropout: the RNG state must resume too
    path = _write(tmp_path, tree)
    run = run_training(path)
    ref = read_losses(run / "losses.jsonl")
    # simulate a crash during the save of step 4 after a complete checkpoint-2
    (run / "checkpoint-4.tmp").mkdir()
    (run / "checkpoint-4.tmp" / "model.safetensors").write_bytes(b"partial")
    import shutil

    for final in ("model", "adapter"):
        shutil.rmtree(run / final, ignore_errors=True)
    run_training(path, resume=True)
    assert not (run / "checkpoint-4.tmp").exists()
    got = read_losses(run / "losses.jsonl")
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for a, b in zip(got, ref):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7)


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tiny_dirs, dataset, tmp_path):
    one = _cfg(tiny_dirs, dataset, tmp_path / "one", max_steps=4, batch_size=4)
    one["data"]["group_by_length"] = False
    two = json.loads(json.dumps(one))
    two["train"].update(batch_size=2, output_dir=str(tmp_path / "two"))
    p1, p2 = tmp_path / "one.yaml", tmp_path / "two.yaml"
    p1.write_text(yaml.safe_dump(one))
    p2.write_text(yaml.safe_dump(two))
    r1 = subprocess.run(_train_cmd(p1), env=_env(), capture_output=True, text=True, timeout=600)
    assert r1.returncode == 0, r1.stderr[-3000:]
    # accelerate's documented CPU multi-process path: --multi_gpu launcher + ACCELERATE_USE_CPU (gloo)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
              str(29500 + os.getpid() % 1000), "-m", "llavakit.cli", "train", str(p2)]
    r2 = subprocess.run(launch, env={**_env(), "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True,
                        timeout=600)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "2 process(es)" in r2.stdout
    l1 = read_losses(tmp_path / "one" / "losses.jsonl")
    l2 = read_losses(tmp_path / "two" / "losses.jsonl")
    assert len(l1) == len(l2) == 4
    for a, b in zip(l1, l2):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5), (a, b)


def test_unfrozen_vision_with_its_own_lr_packing_bf16_checkpointing_and_tensorboard(tiny_dirs, dataset, tmp_path,
                                                                                     capsys):
    tree = _cfg(tiny_dirs, dataset, tmp_path / "vis", max_steps=2, train_vision=True, vision_lr=1e-4,
                precision="bf16", gradient_checkpointing=True, grad_accum=2, batch_size=2,
                report_to="tensorboard")
    tree["data"]["packing"] = True
    run = run_training(_write(tmp_path, tree))
    out = capsys.readouterr().out
    vision_row = next(line for line in out.splitlines() if line.startswith("vision tower"))
    assert vision_row.split()[-1] == "0.0001"  # its own learning rate in the table
    model, _ = llavakit.load(run / "model")
    base, _ = llavakit.build(tiny_dirs["clip"], tiny_dirs["llama"])
    assert any(not torch.equal(a, b) for a, b in zip(model.vision_tower.parameters(), base.vision_tower.parameters()))
    assert list(run.rglob("events.out.tfevents.*")), "no TensorBoard event file"
    assert all(r["loss"] == r["loss"] for r in read_losses(run / "losses.jsonl"))


def test_logged_lr_is_the_llms_when_the_projector_has_its_own(tiny_dirs, dataset, tmp_path):
    """`train.lr` is what the user set for the LLM; the progress bar and losses.jsonl show that rate, not
    the projector's own `projector_lr`."""
    tree = _cfg(tiny_dirs, dataset, tmp_path / "lr", max_steps=2, lr=1e-3, projector_lr=5e-2, schedule="constant")
    run = run_training(_write(tmp_path, tree))
    assert [r["lr"] for r in read_losses(run / "losses.jsonl")] == pytest.approx([1e-3, 1e-3])


def test_resume_on_a_finished_run_is_refused_until_asked_to_train_longer(tiny_dirs, dataset, tmp_path, capsys):
    """A finished run resumed again would retrain its last steps and overwrite its model: refused, with
    how to train longer; raising max_steps continues it."""
    tree = _cfg(tiny_dirs, dataset, tmp_path / "done", max_steps=3, save_every=2)
    path = _write(tmp_path, tree)
    run = run_training(path)
    model_file = run / "model" / "model.safetensors"
    before = model_file.stat().st_mtime_ns
    assert llavakit.cli.main(["train", str(path), "--resume"]) == 2
    assert "already finished at step 3" in capsys.readouterr().err
    assert model_file.stat().st_mtime_ns == before and [r["step"] for r in read_losses(run / "losses.jsonl")] == [1, 2, 3]
    assert llavakit.cli.main(["train", str(path), "--resume", "--train.max_steps=5", "--resume-allow", "max_steps"]) == 0
    assert [r["step"] for r in read_losses(run / "losses.jsonl")] == [1, 2, 3, 4, 5]
