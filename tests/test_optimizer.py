"""The optimizer options: torch's fused AdamW by default, AdamW updates inside backward
(train.optimizer_in_backward) and bitsandbytes' 8-bit AdamW (train.optimizer: adamw_8bit)."""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from llavakit.train import load_config, run_training
from llavakit.train.config import ConfigError, TrainingError
from llavakit.train.loop import read_losses
from llavakit.train.optim import attach_in_backward, make_optimizer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("optim_data")
    (root / "images").mkdir()
    colours = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
    for n, rgb in colours.items():
        Image.new("RGB", (32, 32), rgb).save(root / "images" / f"{n}.png")
    rows = [{"id": f"s{i}", "image": f"{n}.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is this?"}, {"from": "gpt", "value": f"It is {n}."}]}
        for i, n in enumerate(list(colours) * 4)]
    (root / "train.json").write_text(json.dumps(rows))
    return root


def _tree(tiny_dirs, data, out, **train):
    return {
        "model": {"vision": str(tiny_dirs["clip"]), "llm": str(tiny_dirs["llama"]), "projector": "mlp2x_gelu"},
        "data": {"train": str(data / "train.json"), "image_folder": str(data / "images"), "max_length": 128},
        "train": {"stage": "finetune", "output_dir": str(out), "max_steps": 4, "batch_size": 4, "lr": 1e-3,
                  "warmup_ratio": 0.0, "log_every": 1, "report_to": "none", "max_grad_norm": 0.0,
                  "weight_decay": 0.01, **train},
    }


def _write(path, tree):
    path.write_text(yaml.safe_dump(tree))
    return path


def test_default_optimizer_is_torchs_fused_adamw_with_the_same_update_as_the_plain_one():
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    ours = copy.deepcopy(ref)
    group = type("G", (), {"name": "llm", "lr": 1e-2, "params": list(ours.parameters())})
    opt = make_optimizer([group], weight_decay=0.1)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"] is True
    decay = [p for p in ref.parameters() if p.ndim >= 2]
    plain = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                               {"params": [p for p in ref.parameters() if p.ndim < 2], "weight_decay": 0.0}],
                              lr=1e-2, foreach=False)
    for step in range(5):
        x = torch.randn(6, 8, generator=torch.Generator().manual_seed(step))
        for model, o in ((ref, plain), (ours, opt)):
            o.zero_grad()
            model(x).pow(2).mean().backward()
            o.step()
    for a, b in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_in_backward_updates_one_weight_at_a_time_and_matches_a_normal_step(tiny_dirs):
    """Each weight is updated while its gradient is the only one alive, and the result is the normal step's."""
    from accelerate import Accelerator

    import llavakit
    from llavakit.train.recipes import apply_stage

    torch.manual_seed(0)
    model, processor = llavakit.build(tiny_dirs["clip"], tiny_dirs["llama"], projector="mlp2x_gelu")
    cfg = load_config(base={"model": {"vision": "x", "llm": "y"}, "data": {"train": "t.json"},
                            "train": {"max_grad_norm": 0, "optimizer_in_backward": True}})
    model, groups = apply_stage(model.train(), cfg)
    twin = copy.deepcopy(model)
    _, twin_groups = apply_stage(twin, cfg)
    opt, plain = make_optimizer(groups, 0.01), make_optimizer(twin_groups, 0.01)
    hooked = attach_in_backward(Accelerator(cpu=True), opt, cfg.train)
    trained = [p for g in opt.param_groups for p in g["params"]]
    alive, real_step = [], opt.step

    def counting_step(*a, **k):  # called from the hook: how many gradients exist right now?
        alive.append(sum(p.grad is not None for p in trained))
        return real_step(*a, **k)

    opt.step = counting_step
    ids = processor.tokenizer("a red square is here", return_tensors="pt").input_ids
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with_grad = 0  # a text-only batch: the projector gets no gradient, so no update
    for _ in range(2):
        model(**batch).loss.backward()
        twin(**batch).loss.backward()
        with_grad += sum(p.grad is not None for g in plain.param_groups for p in g["params"])
        plain_norm = torch.linalg.vector_norm(torch.stack([
            torch.linalg.vector_norm(p.grad) for g in plain.param_groups for p in g["params"] if p.grad is not None]))
        plain.step()
        plain.zero_grad(set_to_none=True)
        torch.testing.assert_close(hooked.take_norm(), plain_norm, rtol=1e-5, atol=1e-7)
    assert alive and max(alive) == 1 and len(alive) == with_grad
    assert all(p.grad is None for p in trained)
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_in_backward_training_matches_normal_training_and_resumes_exactly(tiny_dirs, data, tmp_path):
    normal = run_training(_write(tmp_path / "a.yaml", _tree(tiny_dirs, data, tmp_path / "normal")))
    tree = _tree(tiny_dirs, data, tmp_path / "ib", optimizer_in_backward=True, save_every=2)
    path = _write(tmp_path / "b.yaml", tree)
    ib = run_training(path)
    ref, got = read_losses(normal / "losses.jsonl"), read_losses(ib / "losses.jsonl")
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for a, b in zip(ref, got):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    wa, wb = load_file(str(normal / "model" / "model.safetensors")), load_file(str(ib / "model" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-6, msg=k)

    # crash after checkpoint-2: the optimizer state saved from the hooks resumes to the same losses
    import shutil

    for name in ("checkpoint-4", "model"):
        shutil.rmtree(ib / name, ignore_errors=True)
    lines = (ib / "losses.jsonl").read_text().splitlines()
    (ib / "losses.jsonl").write_text("\n".join(lines[:2]) + "\n")
    run_training(path, resume=True)
    again = read_losses(ib / "losses.jsonl")
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    for a, b in zip(got, again):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("change, says", [
    ({"max_grad_norm": 1.0}, "set train.max_grad_norm: 0"),
    ({"grad_accum": 2}, "grad_accum: 1"),
    ({"on_nonfinite": "skip"}, "on_nonfinite: stop"),
    ({"precision": "fp16"}, "bf16 or fp32"),
])
def test_in_backward_refuses_what_it_cannot_do(change, says):
    train = {"optimizer_in_backward": True, "max_grad_norm": 0, **change}
    with pytest.raises(ConfigError, match=says):
        load_config(base={"model": {"vision": "x", "llm": "y"}, "data": {"train": "t.json"}, "train": train})


def test_unknown_optimizer_is_a_config_error():
    with pytest.raises(ConfigError, match="train.optimizer='sgd' is not one of"):
        load_config(base={"model": {"vision": "x", "llm": "y"}, "data": {"train": "t.json"},
                          "train": {"optimizer": "sgd"}})


def test_adamw_8bit_without_bitsandbytes_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    group = type("G", (), {"name": "llm", "lr": 1e-3, "params": [torch.nn.Parameter(torch.zeros(4, 4))]})
    with pytest.raises(TrainingError, match=r"llavakit\[qlora\]"):
        make_optimizer([group], 0.0, "adamw_8bit")


def test_adamw_8bit_keeps_8_bit_moments_and_trains_like_adamw(tiny_dirs, data, tmp_path):
    pytest.importorskip("bitsandbytes")
    runs = {kind: run_training(_write(tmp_path / f"{kind}.yaml", _tree(
        tiny_dirs, data, tmp_path / kind, optimizer=kind, optimizer_in_backward=True, max_steps=12)))
        for kind in ("adamw", "adamw_8bit")}
    ref, got = ([r["loss"] for r in read_losses(runs[k] / "losses.jsonl")] for k in ("adamw", "adamw_8bit"))
    assert sum(got[-3:]) < 0.9 * sum(got[:3])
    assert sum(got[-3:]) == pytest.approx(sum(ref[-3:]), rel=0.05)
    group = type("G", (), {"name": "llm", "lr": 1e-3, "params": [torch.nn.Parameter(torch.randn(64, 64))]})
    opt = make_optimizer([group], 0.0, "adamw_8bit")
    group.params[0].grad = torch.randn(64, 64)
    opt.step()
    state = opt.state[group.params[0]]
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8



MAPPED = """
import ctypes, sys, torch
from llavakit.train.host_memory import return_freed_memory
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "on":
    assert return_freed_memory()
big = torch.empty(16 << 20, dtype=torch.uint8); big.fill_(1); del big  # glibc's own threshold rises to 16 MiB
before = libc.mallinfo2().hblkhd
keep = [torch.ones(3 << 19, dtype=torch.uint8) for _ in range(20)]  # 20 x 1.5 MiB
print((libc.mallinfo2().hblkhd - before) / 2**20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_return_freed_memory_maps_large_blocks_so_freeing_them_returns_them(tmp_path):
    """train.return_freed_memory: 1.5 MiB tensors are mapped on their own (glibc's mallinfo2: bytes in mapped
    blocks), so freeing one unmaps it; with glibc's defaults, once a 16 MiB block was freed, they come from the
    heap, whose freed holes stay resident."""
    import ctypes
    import subprocess

    try:
        ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        pytest.skip("no glibc >= 2.33 (mallinfo2)")
    script = tmp_path / "mapped.py"
    script.write_text(MAPPED)
    mapped = {m: float(subprocess.run([sys.executable, str(script), m], capture_output=True, text=True,
                                      check=True).stdout) for m in ("off", "on")}
    assert mapped["on"] >= 30 and mapped["off"] < 1, mapped


def test_in_backward_takes_an_unset_max_grad_norm_as_off():
    cfg = load_config(base={"model": {"vision": "x", "llm": "y"}, "data": {"train": "t.json"},
                            "train": {"optimizer_in_backward": True, "max_grad_norm": None}})
    assert cfg.train.optimizer_in_backward and cfg.train.max_grad_norm is None


@pytest.mark.parametrize("kind", ["DEEPSPEED", "FSDP", "MULTI_CPU"])
def test_in_backward_refuses_deepspeed_fsdp_and_ddp_even_in_one_process(kind):
    """DeepSpeed and FSDP own the optimizer step (their flat parameters' hooks would never fire, or fire before
    the reduce-scatter); DDP averages gradients after backward."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    fake = SimpleNamespace(num_processes=1, distributed_type=getattr(DistributedType, kind))
    cfg = load_config(base={"model": {"vision": "x", "llm": "y"}, "data": {"train": "t.json"},
                            "train": {"optimizer_in_backward": True, "max_grad_norm": 0}})
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2, 2))])
    with pytest.raises(ConfigError, match="one plain process"):
        attach_in_backward(fake, opt, cfg.train)
