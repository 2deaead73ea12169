"""`train.loss_chunk_size` and `train.compile` change how the loss is computed, never its value: the chunked
LM-head cross-entropy gives the unchunked loss and gradients (tied and untied heads, any chunk size, with and
without `num_items_in_batch`), a LoRA-wrapped head falls back to the unchunked path, a short training run
logs the same losses with the switch on and off, and compiled decoder layers give the eager loss."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import yaml
from PIL import Image
from torch import nn

import llavakit
from llavakit.model.loss import chunked_linear_cross_entropy, linear_cross_entropy_sum
from llavakit.train import run_training
from llavakit.train.loop import read_losses


@pytest.fixture(scope="module")
def tied_llm(tmp_path_factory):
    """A tiny Qwen2 whose LM head is its input embedding (tie_word_embeddings, as Qwen2.5-0.5B)."""
    from llavakit.demo.tiny import save_tiny_llm

    return save_tiny_llm(tmp_path_factory.mktemp("qwen2_tied"), "qwen2", seed=3, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def models(tiny_dirs, tied_llm):
    """{"untied": (model, processor), "tied": (model, processor)}, projector and LLM trainable."""
    out = {}
    for name, llm in (("untied", tiny_dirs["llama"]), ("tied", tied_llm)):
        torch.manual_seed(0)
        model, processor = llavakit.build(tiny_dirs["clip"], llm, projector="mlp2x_gelu")
        model.requires_grad_(False)
        model.multi_modal_projector.requires_grad_(True)
        model.language_model.requires_grad_(True)
        out[name] = (model.train(), processor)
    tied = out["tied"][0]
    assert tied.get_output_embeddings().weight is tied.get_input_embeddings().weight
    return out


@pytest.fixture
def chunk_calls(monkeypatch):
    """Counts the calls to the chunked path, so a test knows the switch reached it."""
    import llavakit.model.loss as loss_module

    calls = []
    real = loss_module.chunked_linear_cross_entropy

    def spy(*args, **kwargs):
        calls.append(args[-1] if len(args) == 5 else kwargs.get("chunk_size"))
        return real(*args, **kwargs)

    monkeypatch.setattr(loss_module, "chunked_linear_cross_entropy", spy)
    return calls


def _batch(processor, supervised=4):
    images = [Image.new("RGB", (40, 32), c) for c in ("red", "blue")]
    batch = processor(text=["<image> what colour? red and more words", "<image> say hi: hi there friend"],
                      images=images, return_tensors="pt", padding_side="right")
    labels = batch["input_ids"].clone()
    labels[:, :-supervised] = -100
    labels[batch["attention_mask"] == 0] = -100
    return batch, labels


def _loss_and_grads(model, batch, labels, **kw):
    model.zero_grad(set_to_none=True)
    out = model(**batch, labels=labels, supervised_logits_only=True, **kw)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.loss.detach(), grads


@pytest.mark.parametrize("head", ["untied", "tied"])
@pytest.mark.parametrize("chunk", ["smaller", "equal", "larger"])
@pytest.mark.parametrize("items", [None, 13])
def test_chunked_loss_and_gradients_equal_the_unchunked_ones(models, head, chunk, items, chunk_calls):
    model, processor = models[head]
    batch, labels = _batch(processor)
    n_sup = int((labels[:, 1:] != -100).sum())
    size = {"smaller": 3, "equal": n_sup, "larger": n_sup + 5}[chunk]
    assert size < n_sup or chunk != "smaller"
    extra = {} if items is None else {"num_items_in_batch": torch.tensor(items)}
    ref_loss, ref_grads = _loss_and_grads(model, batch, labels, **extra)
    assert chunk_calls == []
    loss, grads = _loss_and_grads(model, batch, labels, loss_chunk_size=size, **extra)
    assert chunk_calls == [size]
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    assert set(grads) == set(ref_grads)
    assert any(n.startswith("multi_modal_projector.") for n in grads)
    head_name = "language_model.model.embed_tokens.weight" if head == "tied" else "language_model.lm_head.weight"
    assert head_name in grads and grads[head_name].abs().sum() > 0
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def test_no_supervised_rows_give_zero_loss_that_still_backpropagates(models, chunk_calls):
    model, processor = models["tied"]
    batch, labels = _batch(processor)
    labels[:] = -100
    ref_loss, ref_grads = _loss_and_grads(model, batch, labels)
    loss, grads = _loss_and_grads(model, batch, labels, loss_chunk_size=4)
    assert chunk_calls == [4] and loss.item() == ref_loss.item() == 0.0
    for name, g in ref_grads.items():
        assert torch.equal(grads[name], g)


def test_lora_on_the_lm_head_falls_back_to_the_unchunked_loss(tiny_dirs, caplog, chunk_calls):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model, processor = llavakit.build(tiny_dirs["clip"], tiny_dirs["llama"])
    model.language_model = get_peft_model(model.language_model, LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], lora_dropout=0.0, task_type="CAUSAL_LM"))
    for n, p in model.language_model.named_parameters():
        if "lora_B" in n:  # non-zero B so the adapters change the loss
            nn.init.normal_(p, std=0.02)
    model.train()
    batch, labels = _batch(processor)
    ref_loss, ref_grads = _loss_and_grads(model, batch, labels)
    with caplog.at_level(logging.DEBUG, logger="llavakit.model.loss"):
        loss, grads = _loss_and_grads(model, batch, labels, loss_chunk_size=2)
    assert "not a plain nn.Linear" in caplog.text and chunk_calls == []
    assert any("lm_head" in n and "lora" in n for n in grads)
    torch.testing.assert_close(loss, ref_loss)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_function_with_bias_ignored_rows_and_bf16(dtype):
    torch.manual_seed(1)
    head = nn.Linear(16, 50, bias=True).to(dtype)
    hidden = torch.randn(11, 16, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, 50, (11,))
    targets[3] = -100
    ref = nn.functional.cross_entropy(head(hidden).float(), targets, reduction="sum")
    ref.backward()
    ref_grads = [t.grad.clone() for t in (hidden, head.weight, head.bias)]
    hidden.grad = None
    head.zero_grad()
    got = chunked_linear_cross_entropy(hidden, head.weight, head.bias, targets, chunk_size=4)
    (got * 1.0).backward()
    assert got.dtype == torch.float32
    tol = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 4e-3, "rtol": 2e-2}
    torch.testing.assert_close(got, ref, **tol)
    for g, r in zip((hidden.grad, head.weight.grad, head.bias.grad), ref_grads):
        assert g.dtype == dtype
        torch.testing.assert_close(g, r, **tol)
    assert hidden.grad[3].abs().sum() == 0  # an ignored row gets no gradient


def test_under_bf16_autocast_the_loss_is_the_same_and_gradients_agree_to_bf16_rounding():
    """accelerate's bf16 keeps fp32 weights and runs the head's matmul in bf16 under autocast; the chunks
    do too. The weight gradient is summed in fp32 over chunks (the reference rounds it to bf16 once)."""
    torch.manual_seed(0)
    head = nn.Linear(32, 300, bias=False)
    hidden0, targets = torch.randn(37, 32), torch.randint(0, 300, (37,))
    results = []
    for chunk in (0, 8):
        hidden = hidden0.clone().requires_grad_(True)
        head.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = linear_cross_entropy_sum(hidden, head, targets, chunk) / 37
        loss.backward()
        results.append((loss.detach(), hidden.grad, head.weight.grad.clone()))
    (ref, ref_h, ref_w), (got, got_h, got_w) = results
    assert got.dtype == torch.float32 and got_h.dtype == got_w.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got_h, ref_h, atol=2e-4, rtol=1e-2)
    torch.testing.assert_close(got_w, ref_w, atol=2e-3, rtol=1e-2)


def test_frozen_head_gets_no_gradient_and_inference_needs_none():
    head = nn.Linear(8, 20, bias=False).requires_grad_(False)
    hidden = torch.randn(5, 8, requires_grad=True)
    targets = torch.randint(0, 20, (5,))
    loss = linear_cross_entropy_sum(hidden, head, targets, chunk_size=2)
    loss.backward()
    assert head.weight.grad is None and hidden.grad is not None
    with torch.no_grad():
        again = linear_cross_entropy_sum(hidden, head, targets, chunk_size=2)
    torch.testing.assert_close(again, loss.detach())
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        chunked_linear_cross_entropy(hidden, head.weight, None, targets, 0)


# --- through the real training entry point -----------------------------------------------------------
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("chunk_data")
    (root / "images").mkdir()
    rows = []
    for i, colour in enumerate(["red", "green", "blue", "yellow"] * 2):
        Image.new("RGB", (32, 32), colour).save(root / "images" / f"{colour}.png")
        rows.append({"id": f"s{i}", "image": f"{colour}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is this?"}, {"from": "gpt", "value": f"It is {colour}."}]})
    (root / "train.json").write_text(json.dumps(rows))
    return root


def _run(tiny_dirs, data_dir, out, **train):
    tree = {
        "model": {"vision": str(tiny_dirs["clip"]), "llm": str(tiny_dirs["llama"]), "projector": "mlp2x_gelu"},
        "data": {"train": str(data_dir / "train.json"), "image_folder": str(data_dir / "images"),
                 "template": "vicuna_v1", "max_length": 256},
        "train": {"stage": "finetune", "output_dir": str(out), "max_steps": 3, "batch_size": 4, "lr": 1e-3,
                  "warmup_ratio": 0.0, "log_every": 1, "report_to": "none", **train},
    }
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    run = run_training(path)
    return [r["loss"] for r in read_losses(run / "losses.jsonl")]


def test_training_with_chunked_loss_logs_the_same_losses(tiny_dirs, data_dir, tmp_path, chunk_calls):
    off = _run(tiny_dirs, data_dir, tmp_path / "off")
    assert chunk_calls == []
    on = _run(tiny_dirs, data_dir, tmp_path / "on", loss_chunk_size=5)
    assert len(on) == len(off) == 3 and chunk_calls and set(chunk_calls) == {5}
    torch.testing.assert_close(torch.tensor(on), torch.tensor(off), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_compiled_decoder_layers_give_the_eager_loss(tiny_dirs):
    from llavakit.train.recipes import compile_decoder_layers

    torch.manual_seed(0)
    model, processor = llavakit.build(tiny_dirs["clip"], tiny_dirs["llama"])
    model.train()
    batch, labels = _batch(processor)
    eager_loss, eager_grads = _loss_and_grads(model, batch, labels)
    names = list(model.state_dict())
    torch._dynamo.reset()
    assert compile_decoder_layers(model) == len(model.language_model.model.layers)
    try:
        compiled_loss, compiled_grads = _loss_and_grads(model, batch, labels)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # it did compile
        assert list(model.state_dict()) == names  # compiled in place: no `_orig_mod.` in checkpoints
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(compiled_loss, eager_loss, atol=1e-5, rtol=1e-5)
    for name, g in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], g, atol=1e-5, rtol=1e-4)


def test_compile_without_a_cxx_compiler_on_cpu_is_a_clear_error(tiny_built, monkeypatch):
    from llavakit.train.config import ConfigError
    from llavakit.train.recipes import compile_decoder_layers

    monkeypatch.setenv("CXX", "/nonexistent/g++")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"train.compile: true on CPU needs a C\+\+ compiler.*'/nonexistent/g\+\+'"):
        compile_decoder_layers(tiny_built[0])
    assert not any(getattr(m, "_compiled_call_impl", None) for m in tiny_built[0].modules())


def test_a_failed_compilation_says_to_turn_compile_off():
    from llavakit.train.config import TrainConfig, TrainingError
    from llavakit.train.step import forward

    def model(**kwargs):
        raise torch._dynamo.exc.TorchRuntimeError("boom")

    with pytest.raises(TrainingError, match=r"could not compile .*TorchRuntimeError: boom.*set train.compile: false"):
        forward(model, {}, None, TrainConfig(compile=True))
    with pytest.raises(torch._dynamo.exc.TorchRuntimeError):  # not compiling: the error as it is
        forward(model, {}, None, TrainConfig())
