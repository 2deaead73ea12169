"""Sharded training on CPU: two processes (gloo) whose batches differ in modality in the same step.

The failure users report most with multi-GPU LLaVA training (FSDP, DeepSpeed ZeRO-3) is a hang when one
rank's batch has images and another's has none: sharded modules gather their weights collectively in
forward, so a rank that skips the vision tower leaves the others waiting. accelerate 1.15 runs FSDP only
on accelerators (on CPU, `accelerate launch` with the FSDP config falls back to plain DDP or to
independent processes), so this test shards the model with torch's own FSDP2 (`fully_shard`, what the
shipped `configs/accelerate/fsdp.yaml` selects) the way that config does — every module class in the
model's `_no_split_modules`, then the root, `reshard_after_forward` from the file — and checks that a
step where rank 0 has a text-only batch and rank 1 one or two images finishes, and that the losses are
those of one process computing the same global batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent('''
    import json, os, sys
    import torch, torch.distributed as dist
    from PIL import Image
    import llavakit

    clip, llama, out, reshard = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "true"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    torch.manual_seed(0)
    model, proc = llavakit.build(clip, llama)
    model.train()
    red, blue = Image.new("RGB", (32, 32), (220, 20, 20)), Image.new("RGB", (32, 32), (20, 20, 220))
    # step -> one batch per rank: the modalities differ between ranks in every step
    SAMPLES = [
        [("USER: say hi ASSISTANT: hi", []), ("USER: <image> colour? ASSISTANT: red", [red])],
        [("USER: <image> <image> second? ASSISTANT: blue", [red, blue]), ("USER: count to two ASSISTANT: one two", [])],
        [("USER: what is this? <image> ASSISTANT: blue", [blue]), ("USER: bye ASSISTANT: bye", [])],
    ]

    def loss_of(text, images):
        b = proc(text=text, images=images or None, return_tensors="pt")
        return model(**b, labels=b["input_ids"]).loss

    params = [p for p in model.parameters() if p.requires_grad]
    if world > 1:
        from torch.distributed.fsdp import fully_shard
        dist.init_process_group("gloo")
        for m in model.modules():
            if type(m).__name__ in model._no_split_modules:
                fully_shard(m, reshard_after_forward=reshard)
        fully_shard(model, reshard_after_forward=reshard)
        params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    losses = []
    for step in SAMPLES:
        if world > 1:  # FSDP averages gradients over ranks: the mean of the per-rank losses
            loss = loss_of(*step[rank])
            loss.backward()
            losses.append(loss.item())
        else:  # one process, the same global batch: the mean of the two samples' losses
            per = [loss_of(*s) for s in step]
            (sum(per) / len(per)).backward()
            losses.append([x.item() for x in per])
        opt.step()
        opt.zero_grad()
    with open(f"{out}.{rank}.json", "w") as f:
        json.dump(losses, f)
    if world > 1:
        dist.destroy_process_group()
''')


@pytest.mark.slow
def test_fsdp_ranks_with_and_without_images_in_one_step_match_one_process(tiny_dirs, tmp_path):
    fsdp = yaml.safe_load((ROOT / "configs" / "accelerate" / "fsdp.yaml").read_text())
    assert fsdp["distributed_type"] == "FSDP" and fsdp["fsdp_config"]["fsdp_version"] == 2
    assert fsdp["fsdp_config"]["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    reshard = str(fsdp["fsdp_config"]["fsdp_reshard_after_forward"]).lower()
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    args = [str(script), str(tiny_dirs["clip"]), str(tiny_dirs["llama"])]

    single = subprocess.run([sys.executable, *args, str(tmp_path / "one"), reshard], env=env,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
              str(29400 + os.getpid() % 500), *args, str(tmp_path / "two"), reshard]
    try:
        sharded = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the two FSDP ranks hung (no result in {e.timeout} s)")
    assert sharded.returncode == 0, sharded.stderr[-3000:]

    reference = json.loads((tmp_path / "one.0.json").read_text())  # [step][rank] losses
    for rank in (0, 1):
        got = json.loads((tmp_path / f"two.{rank}.json").read_text())
        want = [step[rank] for step in reference]
        assert got == pytest.approx(want, rel=1e-4, abs=1e-5), (rank, got, want)


@pytest.mark.slow
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the refusal is for machines without GPUs")
def test_fsdp_config_without_gpus_is_refused_not_run_as_separate_processes(tiny_dirs, tmp_path):
    """On CPU, accelerate turns the FSDP config into N independent single-process runs; llavakit refuses
    instead of letting them train separately into one folder."""
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"id": "t", "conversations": [{"from": "human", "value": "hi"},
                                                              {"from": "gpt", "value": "hello"}]}]))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": {"vision": str(tiny_dirs["clip"]), "llm": str(tiny_dirs["llama"])},
        "data": {"train": str(data), "template": "vicuna_v1"},
        "train": {"stage": "finetune", "output_dir": str(tmp_path / "run"), "max_steps": 1, "report_to": "none"}}))
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(ROOT / "configs" / "accelerate" / "fsdp.yaml"), "--num_processes", "2", "--mixed_precision", "no",
              "--main_process_port", str(29900 + os.getpid() % 90), "-m", "llavakit.cli", "train", str(cfg)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("ACCELERATE_USE_CPU", None)
    r = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "accelerate runs FSDP only on GPUs" in r.stdout + r.stderr
    assert not (tmp_path / "run" / "losses.jsonl").exists()
