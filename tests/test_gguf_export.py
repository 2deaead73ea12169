"""GGUF export (llama.cpp / Ollama): files, keys, refusals, and greedy answers in a real llama.cpp.

The runtime tests load the exported pair with llama-cpp-python (`llavakit.interop.gguf_runtime`, its
mtmd bindings), prompt it with exactly llavakit's rendered template, and compare greedy answers with
llavakit's own `Generator` on 24 image questions. They skip when llama-cpp-python is not installed
(``pip install 'llavakit[llamacpp]'``; pip builds it from source once, then reuses its cached wheel).
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager

import pytest
import torch
from PIL import Image

gguf = pytest.importorskip("gguf", reason="GGUF export needs the gguf package: pip install 'llavakit[gguf]'")

from llavakit.data.conversation import Turn  # noqa: E402
from llavakit.interop import export  # noqa: E402

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
QUESTIONS = ["What color is the shape?", "Is the shape left or right?", "Describe the picture."]
CASES = [(c, p, q) for c in COLORS for p in ("left", "right") for q in QUESTIONS]  # 24 image questions
LLAMACPP_SKIP = "llama-cpp-python is not installed: pip install 'llavakit[llamacpp]' (builds llama.cpp, ~15 min)"


def shape_image(colour: str, side: str, size: int = 32) -> Image.Image:
    """A square image at the tower's resolution: no resize or pad, so both runtimes see the same pixels."""
    im = Image.new("RGB", (size, size), (255, 255, 255))
    x0 = 2 if side == "left" else size // 2 + 2
    for x in range(x0, x0 + size // 2 - 4):
        for y in range(size // 4, 3 * size // 4):
            im.putpixel((x, y), COLORS[colour])
    return im


def build(tiny_dirs, vision: str, llm: str, **kw):
    import llavakit

    torch.manual_seed(0)
    model, processor = llavakit.build(tiny_dirs[vision], tiny_dirs[llm], projector=kw.pop("projector", "mlp2x_gelu"),
                                      **kw)
    processor.template = "chatml" if llm == "qwen2" else "vicuna_v1"
    return model.eval(), processor


@pytest.fixture(scope="module")
def pairs(tiny_dirs):
    return {key: build(tiny_dirs, *key) for key in [("siglip", "llama"), ("siglip", "qwen2"), ("clip", "llama")]}


def read(path):
    r = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in r.fields.items()}, {t.name: t for t in r.tensors}


# --- files and keys (no llama.cpp needed) ---------------------------------------------------------------
def test_export_writes_text_model_mmproj_and_modelfile(pairs, tmp_path):
    model, processor = pairs[("clip", "llama")]
    out = export((model, processor), tmp_path / "g", format="gguf", dtype="f16")
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "README.md", "mmproj-f16.gguf", "model-f16.gguf"]

    kv, tensors = read(out / "model-f16.gguf")
    assert kv["general.architecture"] == "llama" and kv["tokenizer.ggml.model"] == "gpt2"
    assert kv["tokenizer.ggml.pre"] == "gpt-2"
    n_vocab = model.language_model.get_input_embeddings().weight.shape[0]
    assert len(kv["tokenizer.ggml.tokens"]) == n_vocab  # the <image> row stays; nothing refers to it
    assert kv["tokenizer.ggml.tokens"][processor.image_token_id] == "<image>"
    assert kv["tokenizer.ggml.add_bos_token"] is True
    assert "USER: " in kv["tokenizer.chat_template"]
    assert "output.weight" in tensors and tensors["token_embd.weight"].tensor_type.name == "F16"

    kv, tensors = read(out / "mmproj-f16.gguf")
    vc = model.config.vision_config
    assert kv["general.architecture"] == "clip" and kv["clip.projector_type"] == "mlp"
    assert kv["clip.has_vision_encoder"] is True and kv["clip.use_gelu"] is False  # CLIP: quick GELU
    assert kv["clip.vision.image_size"] == vc.image_size and kv["clip.vision.patch_size"] == vc.patch_size
    assert list(kv["clip.vision.feature_layer"]) == [vc.num_hidden_layers - 1]  # -2: the penultimate layer
    assert kv["clip.vision.block_count"] == vc.num_hidden_layers - 1  # deeper layers are never run
    assert kv["clip.vision.projection_dim"] == model.config.text_config.hidden_size
    assert {"v.class_embd", "v.patch_embd.weight", "v.position_embd.weight", "v.pre_ln.weight",
            "mm.0.weight", "mm.0.bias", "mm.2.weight", "mm.2.bias"} <= set(tensors)
    assert not any(n.startswith("v.post_ln") for n in tensors)

    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./model-f16.gguf\nFROM ./mmproj-f16.gguf" in modelfile
    assert 'PARAMETER stop "</s>"' in modelfile and "USER: {{ .Content }} " in modelfile


def test_tied_qwen2_and_q8_0(tiny_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    tied = tmp_path / "qwen2-tied"
    lm = AutoModelForCausalLM.from_pretrained(tiny_dirs["qwen2"])
    lm.config.tie_word_embeddings = True
    lm.tie_weights()
    lm.save_pretrained(tied)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tiny_dirs["qwen2"]).save_pretrained(tied)
    model, processor = build({**tiny_dirs, "tied": tied}, "siglip", "tied")
    out = export((model, processor), tmp_path / "g", format="gguf", dtype="q8_0")
    kv, tensors = read(out / "model-q8_0.gguf")
    assert kv["general.architecture"] == "qwen2" and "output.weight" not in tensors
    assert kv["tokenizer.ggml.add_bos_token"] is False
    assert tensors["blk.0.attn_q.weight"].tensor_type.name == "Q8_0"
    assert tensors["blk.0.attn_q.bias"].tensor_type.name == "F32"
    kv, tensors = read(out / "mmproj-q8_0.gguf")
    assert kv["clip.use_gelu"] is True and "v.class_embd" not in tensors and "v.patch_embd.bias" in tensors


@pytest.mark.parametrize("change, message", [
    (dict(projector="linear"), "Exportable projectors: mlp2x_gelu"),
    (dict(vision_feature_select="cls_patch"), "only 'patch'"),
    (dict(vision_feature_layer=[-1, -2]), "ascending order"),
])
def test_unsupported_is_refused_before_writing(tiny_dirs, tmp_path, change, message):
    model, processor = build(tiny_dirs, "clip", "llama", **change)
    with pytest.raises(ValueError, match=message):
        export((model, processor), tmp_path / "g", format="gguf")
    assert not (tmp_path / "g").exists()


def test_dtype_choices(pairs, tmp_path):
    with pytest.raises(ValueError, match="f32, f16, q8_0"):
        export(pairs[("siglip", "llama")], tmp_path / "g", format="gguf", dtype="bfloat16")


def test_cli_gguf(pairs, tmp_path):
    from llavakit.cli import main

    model, processor = pairs[("siglip", "llama")]
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    assert main(["export", str(tmp_path / "m"), str(tmp_path / "g"), "--format", "gguf", "--dtype", "q8_0"]) == 0
    assert (tmp_path / "g" / "model-q8_0.gguf").is_file() and (tmp_path / "g" / "mmproj-q8_0.gguf").is_file()
    assert main(["export", str(tmp_path / "m"), str(tmp_path / "h"), "--dtype", "q8_0"]) == 2  # hf-llava: no q8_0


# --- a real llama.cpp --------------------------------------------------------------------------------
def llavakit_and_llamacpp(model, processor, out_dir, dtype, emulate_cls_last=False):
    """(llavakit answers, llama.cpp answers, prompt-token agreement) on CASES."""
    pytest.importorskip("llama_cpp", reason=LLAMACPP_SKIP)
    from llavakit.infer.generate import GenerationSettings, Generator, StopTrimmer
    from llavakit.interop.gguf_runtime import LlamaCppLlava

    gen = Generator(model, processor)
    convs = [[Turn("user", "<image>\n" + q)] for _, _, q in CASES]
    images = [[shape_image(c, p, model.config.vision_config.image_size)] for c, p, _ in CASES]
    with cls_last(model) if emulate_cls_last else _nothing():
        ours = gen.generate(convs, images, GenerationSettings(max_new_tokens=12))
    export((model, processor), out_dir, format="gguf", dtype=dtype, overwrite=True)
    theirs, same_prompt = [], []
    bos = processor.tokenizer.bos_token
    with LlamaCppLlava(out_dir / f"model-{dtype}.gguf", out_dir / f"mmproj-{dtype}.gguf") as rt:
        for turns, ims in zip(convs, images):
            prompt = gen.template.render_prompt(turns)
            if bos and prompt.startswith(bos):
                prompt = prompt[len(bos):]  # llama.cpp adds bos itself (tokenizer.ggml.add_bos_token)
            a = rt.answer(prompt, ims, max_new_tokens=12, stop_ids=gen.eos_token_ids)
            theirs.append(StopTrimmer.trim(a.text, gen.stop_strings))
            ids = gen.encode([turns], [ims])["input_ids"][0].tolist()
            same_prompt.append([i for i in ids if i != processor.image_token_id] == a.prompt_text_ids
                               and a.image_tokens == [processor.image_seq_length])
    return ours, theirs, same_prompt


@contextmanager
def _nothing():
    yield


@contextmanager
def cls_last(model):
    """Make llavakit's CLIP embeddings do what llama.cpp's LLaVA graph does (ggml-org/llama.cpp#25814):
    the CLS token after the patches, position rows 0..n in that order."""
    emb = _clip_embeddings(model.vision_tower)
    pos = emb.position_embedding.weight  # [n+1, D]

    def hook(module, args, output):
        plain = output - pos  # [B, n+1, D]: CLS first, then patches, no positions
        return torch.cat([plain[:, 1:], plain[:, :1]], dim=1) + pos

    handle = emb.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _clip_embeddings(tower):
    return getattr(tower, "vision_model", tower).embeddings


@pytest.mark.parametrize("key", [("siglip", "llama"), ("siglip", "qwen2")], ids=lambda k: "+".join(k))
def test_llamacpp_greedy_answers_equal_llavakit(pairs, tmp_path, key):
    model, processor = pairs[key]
    for dtype in ("f32", "f16"):
        ours, theirs, same_prompt = llavakit_and_llamacpp(model, processor, tmp_path / dtype, dtype)
        assert all(same_prompt), "llama.cpp's prompt tokens differ from llavakit's"
        assert len(set(ours)) > 3, f"degenerate reference answers: {set(ours)}"
        assert theirs == ours, [(a, b) for a, b in zip(ours, theirs) if a != b]
    ours, theirs, _ = llavakit_and_llamacpp(model, processor, tmp_path / "q8_0", "q8_0")
    rate = sum(a == b for a, b in zip(ours, theirs)) / len(ours)
    print(f"q8_0 agreement {'+'.join(key)}: {rate:.0%}")  # reported, not required


def test_llamacpp_clip_matches_its_cls_ordering(pairs, tmp_path):
    """The CLIP export is exact for the graph llama.cpp runs today: with llavakit emulating that graph's
    CLS-last ordering the answers are identical. (Without it they differ; see the xfail below.)"""
    model, processor = pairs[("clip", "llama")]
    for dtype in ("f32", "f16"):
        ours, theirs, same_prompt = llavakit_and_llamacpp(model, processor, tmp_path / dtype, dtype,
                                                          emulate_cls_last=True)
        assert all(same_prompt)
        assert theirs == ours, [(a, b) for a, b in zip(ours, theirs) if a != b]


@pytest.mark.xfail(reason="llama.cpp's LLaVA graph puts CLIP's CLS token last (ggml-org/llama.cpp#25814, "
                          "fix proposed in #25844); passes once the runtime has the fix", strict=False)
def test_llamacpp_clip_greedy_answers_equal_llavakit(pairs, tmp_path):
    model, processor = pairs[("clip", "llama")]
    ours, theirs, _ = llavakit_and_llamacpp(model, processor, tmp_path / "f32", "f32")
    assert theirs == ours


# --- llama-cpp-python's OpenAI-compatible server -----------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_llamacpp_server_answers_an_image_request(pairs, tmp_path):
    pytest.importorskip("llama_cpp", reason=LLAMACPP_SKIP)
    pytest.importorskip("uvicorn", reason="the server needs pip install 'llama-cpp-python[server]'")
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Llava15ChatHandler

    model, processor = pairs[("siglip", "llama")]
    out = export((model, processor), tmp_path / "g", format="gguf", dtype="f16")
    text_gguf, mmproj = out / "model-f16.gguf", out / "mmproj-f16.gguf"
    buf = io.BytesIO()
    shape_image("blue", "left").save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "What color is the shape?"}]}]
    request = {"messages": messages, "max_tokens": 8, "temperature": 0.0, "seed": 0}

    # the same request in-process, through the same chat handler the server uses
    llm = Llama(model_path=str(text_gguf), chat_handler=Llava15ChatHandler(clip_model_path=str(mmproj), verbose=False),
                n_ctx=2048, n_threads=2, verbose=False)
    expected = llm.create_chat_completion(**request)["choices"][0]["message"]["content"]
    llm.close()

    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(text_gguf),
                             "--clip_model_path", str(mmproj), "--chat_format", "llava-1-5", "--n_ctx", "2048",
                             "--n_threads", "2", "--host", "127.0.0.1", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        for _ in range(180):  # bounded in count and in time
            if proc.poll() is not None or time.monotonic() > deadline:
                break
            try:
                urllib.request.urlopen(base + "/v1/models", timeout=2).read()
                break
            except OSError:
                time.sleep(0.5)
        assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
        req = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(request).encode(),
                                     headers={"Content-Type": "application/json"})
        reply = json.loads(urllib.request.urlopen(req, timeout=120).read())
        choice = reply["choices"][0]
        assert choice["message"]["role"] == "assistant"
        assert choice["message"]["content"] == expected
        assert reply["usage"]["prompt_tokens"] > 16  # the image's 16 embeddings are in the prompt
    finally:
        proc.terminate()  # by its PID
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()
