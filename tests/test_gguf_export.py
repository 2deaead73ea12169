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
from pathlib import Path

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


def cls_last(model):
    """llavakit computing what llama.cpp's LLaVA graph does with a CLIP tower (ggml-org/llama.cpp#25814)."""
    from llavakit.interop.gguf_mmproj import llamacpp_clip_order

    return llamacpp_clip_order(model)


def test_llamacpp_image_embeddings_are_llavakit_features(pairs, tmp_path):
    """The image embeddings mtmd writes into the LLM, compared with llavakit's projected features, image by
    image (issue 14: one answer of a trained CLIP model differed). SigLIP: equal. CLIP: equal to llavakit
    under `llamacpp_clip_order` (llama.cpp's CLS-last graph) and off by about the features' own size without
    it, on every image: the export is exact, the difference is the runtime's, and it is not rounding. When a
    llama.cpp with the fix (#25844) is installed the CLIP assertions flip: update docs/gguf.md then."""
    from llavakit.interop.gguf import check_gguf
    from llavakit.interop.gguf_mmproj import llamacpp_clip_order

    assert any("EVERY image" in w for w in check_gguf(*pairs[("clip", "llama")]))  # the export says so
    assert not any("CLS" in w for w in check_gguf(*pairs[("siglip", "llama")]))
    pytest.importorskip("llama_cpp", reason=LLAMACPP_SKIP)
    from llavakit.interop.gguf_runtime import LlamaCppLlava

    for key in [("siglip", "llama"), ("clip", "llama")]:
        model, processor = pairs[key]
        out = tmp_path / "+".join(key)
        export((model, processor), out, format="gguf", dtype="f32", overwrite=True)
        images = [shape_image(c, p, model.config.vision_config.image_size) for c, p, _ in CASES[::3]]
        pv = processor.image_processor(images, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            plain = model.get_image_features(pv).numpy()  # [8, image_seq_length, D_llm]
            with llamacpp_clip_order(model):
                graph = model.get_image_features(pv).numpy()
        with LlamaCppLlava(out / "model-f32.gguf", out / "mmproj-f32.gguf", n_threads=1) as rt:
            theirs = [rt.image_embeddings(im) for im in images]
        for i, emb in enumerate(theirs):
            scale = float(abs(plain[i]).max())
            assert emb.shape == plain[i].shape
            # ggml's GELU (tanh, an f16 table on CPU) and f32 sums: ~1e-3 of the scale
            assert abs(emb - graph[i]).max() < 1e-2 * scale, (key, i, abs(emb - graph[i]).max(), scale)
            if key[0] == "siglip":
                assert abs(emb - plain[i]).max() < 1e-2 * scale
            else:  # llama.cpp's CLS-last graph: not rounding
                assert abs(emb - plain[i]).max() > 0.1 * scale, (i, abs(emb - plain[i]).max(), scale)


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


# --- SentencePiece (Llama-2 / Vicuna) tokenizers -----------------------------------------------------------
# Texts where llama.cpp must tokenize exactly as the Hugging Face tokenizer (with and without bos): no text
# right after a special token, none starting with a space.
SP_SAME = ["A chat between a curious user and an artificial intelligence assistant.",
           "USER: What is shown? ASSISTANT: A red circle and a blue square.", "", "a", "\n",
           "two  spaces,   three and trailing ", "line one\nline two\n\nthree\r\nfour\ttab",
           "digits 0123456789, 3.14 and 42!", "unicode: é ü ß 日本語 🙂 ∑ \u00a0nbsp",
           "a ▁ literal ▁▁ piece",
           "What is <image>", "a</s>", "<s>", "Describe it. <unk>"]
# Text after a special token: legacy=True tokenizers put '▁' there like llama.cpp, legacy=False ones do not.
SP_AFTER_SPECIAL = ["USER: <image>\nWhat color is the shape? ASSISTANT:", "<image>\n<image>\nCompare.",
                    "yes</s>USER: and the colour?", "<s>A chat", "<pad>x<s>\ny"]
# Text starting with a space: llama.cpp (like the sentencepiece library) gives '▁▁', the fast tokenizer '▁'.
SP_LEADING_SPACE = [" then", "  two leading spaces", "</s> USER: hi"]


def sp_llm_dir(root, legacy: bool):
    """A tiny Llama whose tokenizer is tests/sptok.py's SentencePiece one (tokenizer.model, as Vicuna ships)."""
    from sptok import make_sp_llama_tokenizer
    from transformers import AutoModelForCausalLM

    from llavakit.demo.tiny import tiny_llm_config

    d = root / f"sp_llama_legacy_{legacy}"
    tok = make_sp_llama_tokenizer(d, legacy=legacy)
    cfg = tiny_llm_config("llama", vocab_size=len(tok))
    cfg.bos_token_id, cfg.eos_token_id = tok.bos_token_id, tok.eos_token_id
    torch.manual_seed(2)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def sp_pairs(tiny_dirs, tmp_path_factory):
    """{legacy: (model, processor)}: tiny CLIP/SigLIP + SentencePiece Llama, vicuna_v1. legacy=False
    (Vicuna-v1.5) with original LLaVA's per-chunk tokenization, legacy=True with llavakit's default."""
    root = tmp_path_factory.mktemp("sp")
    out = {}
    for legacy, vision, tokenization in [(False, "clip", "llava"), (True, "siglip", "llm")]:
        model, processor = build({**tiny_dirs, "sp": sp_llm_dir(root, legacy)}, vision, "sp")
        processor.tokenization = tokenization
        out[legacy] = model, processor
    return out


def json_only(tokenizer, path, legacy: bool):
    """The same tokenizer as a trained llavakit checkpoint saves it: tokenizer.json, no tokenizer.model.
    (transformers 5 does not save `legacy`, and reloads a legacy=True Llama tokenizer as legacy=False
    unless told: passed here so that the reloaded tokenizer behaves as the original, which is checked.)"""
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(path)
    assert not (path / "tokenizer.model").exists()
    again = AutoTokenizer.from_pretrained(path, legacy=legacy)
    assert getattr(again, "vocab_file", None) is None
    for text in SP_SAME + SP_AFTER_SPECIAL + SP_LEADING_SPACE:
        assert again(text)["input_ids"] == tokenizer(text)["input_ids"], text
    return again


@pytest.mark.parametrize("legacy", [False, True], ids=["legacy_false", "legacy_true"])
def test_sentencepiece_tokenizer_keys(sp_pairs, tmp_path, legacy):
    from sentencepiece import sentencepiece_model_pb2 as pb

    from llavakit.interop.gguf_vocab import spm_vocab

    model, processor = sp_pairs[legacy]
    tok = processor.tokenizer
    out = export((model, processor), tmp_path / "g", format="gguf", dtype="f32")
    kv, _ = read(out / "model-f32.gguf")
    n_vocab = model.language_model.get_input_embeddings().weight.shape[0]
    assert kv["tokenizer.ggml.model"] == "llama" and kv["tokenizer.ggml.pre"] == "default"
    assert kv["tokenizer.ggml.add_space_prefix"] is True and kv["tokenizer.ggml.add_bos_token"] is True
    assert kv["tokenizer.ggml.add_eos_token"] is False
    assert (kv["tokenizer.ggml.bos_token_id"], kv["tokenizer.ggml.eos_token_id"], kv["tokenizer.ggml.unknown_token_id"],
            kv["tokenizer.ggml.padding_token_id"]) == (1, 2, 0, tok.pad_token_id)
    assert list(kv["tokenizer.ggml.tokens"]) == tok.convert_ids_to_tokens(list(range(n_vocab)))
    types = list(kv["tokenizer.ggml.token_type"])
    proto = pb.ModelProto.FromString(Path(tok.vocab_file).read_bytes())
    assert types[:len(proto.pieces)] == [p.type for p in proto.pieces]  # SentencePiece's own types
    assert types[:4] == [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL, gguf.TokenType.BYTE]
    assert types.count(gguf.TokenType.BYTE) == 256
    for added in ("<image>", "<pad>"):  # llavakit's additions: special -> control
        assert types[tok.convert_tokens_to_ids(added)] == gguf.TokenType.CONTROL
    assert list(kv["tokenizer.ggml.scores"])[:len(proto.pieces)] == [p.score for p in proto.pieces]

    # a checkpoint saved by transformers 5 has no tokenizer.model: the scores derived from the merge list
    # are SentencePiece's own
    from_model = spm_vocab(tok, n_vocab)
    from_json = spm_vocab(json_only(tok, tmp_path / "tok", legacy), n_vocab)
    assert (from_model.source, from_json.source) == ("tokenizer.model", "tokenizer.json")
    assert (from_json.tokens, from_json.types, from_json.scores) == (from_model.tokens, from_model.types,
                                                                     from_model.scores)


def test_sentencepiece_prompt_warnings(sp_pairs):
    from llavakit.interop.gguf import check_gguf

    model, processor = sp_pairs[False]
    tokenizer_warnings = [w for w in check_gguf(model, processor) if "'▁'" in w]
    assert len(tokenizer_warnings) == 1 and "follows a special token" in tokenizer_warnings[0]  # legacy=False
    processor.tokenization = "llm"
    try:
        assert sum("'▁'" in w for w in check_gguf(model, processor)) == 2  # + the text after each image
    finally:
        processor.tokenization = "llava"
    model, processor = sp_pairs[True]
    assert not [w for w in check_gguf(model, processor) if "'▁'" in w]  # legacy=True: as llama.cpp


@pytest.mark.parametrize("change, message", [
    (lambda tj: tj["model"].update(byte_fallback=False), "without byte fallback"),
    (lambda tj: tj["model"].update(merges=tj["model"]["merges"][:3] + tj["model"]["merges"][4:]), "no such merge"),
    (lambda tj: tj["pre_tokenizer"].update(split=True), "split=False"),
    (lambda tj: tj.update(normalizer={"type": "NFKC"}), "does not run"),
])
def test_sentencepiece_tokenizers_llamacpp_cannot_reproduce_are_refused(sp_pairs, change, message):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from llavakit.interop.gguf_vocab import tokenizer_json, tokenizer_kind

    tj = tokenizer_json(sp_pairs[False][1].tokenizer)
    assert tokenizer_kind(sp_pairs[False][1].tokenizer) == "llama"
    change(tj)
    with pytest.raises(ValueError, match=message):
        tokenizer_kind(PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(tj))))


@pytest.mark.parametrize("source", ["tokenizer.model", "tokenizer.json"])
@pytest.mark.parametrize("legacy", [False, True], ids=["legacy_false", "legacy_true"])
def test_llamacpp_tokenizes_sentencepiece_like_hf(sp_pairs, tmp_path, legacy, source):
    """llama.cpp's token ids equal the Hugging Face tokenizer's, with and without bos; where llama.cpp's
    SPM tokenizer has its own rule (text after a special token, a leading space) it does what the legacy
    tokenizer / the sentencepiece library does, as docs/gguf.md says."""
    llama_cpp = pytest.importorskip("llama_cpp", reason=LLAMACPP_SKIP)
    from sptok import make_sp_llama_tokenizer, slow_llama_ids

    from llavakit.interop.gguf_text import write_text_gguf

    model, processor = sp_pairs[legacy]
    tok = processor.tokenizer
    if source == "tokenizer.json":
        tok = json_only(tok, tmp_path / "tok", legacy)
    path = tmp_path / "model.gguf"
    write_text_gguf(path, model.language_model, tok, "f32", None)
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    # what a legacy=True tokenizer with the same pieces and additions gives
    as_legacy = make_sp_llama_tokenizer(tmp_path / "legacy", legacy=True)
    as_legacy.add_special_tokens({"additional_special_tokens": ["<image>", "<pad>"]}, replace_extra_special_tokens=False)
    as_legacy.pad_token = "<pad>"  # as llavakit.build adds them
    assert as_legacy.convert_tokens_to_ids(["<image>", "<pad>"]) == tok.convert_tokens_to_ids(["<image>", "<pad>"])
    try:
        def ours(text, bos):
            return llm.tokenize(text.encode(), add_bos=bos, special=True)

        for text in SP_SAME + SP_AFTER_SPECIAL:
            for bos in (True, False):
                assert ours(text, bos) == as_legacy(text, add_special_tokens=bos)["input_ids"], (text, bos)
                if legacy or text in SP_SAME:
                    assert ours(text, bos) == tok(text, add_special_tokens=bos)["input_ids"], (text, bos)
        for text in SP_AFTER_SPECIAL:
            if not legacy:  # the one difference a legacy=False (Vicuna-v1.5) tokenizer has
                assert ours(text, True) != tok(text)["input_ids"], text
        for text in SP_LEADING_SPACE:
            assert ours(text, True) == slow_llama_ids(tmp_path / "legacy", text, legacy=True), text
            assert ours(text, True) != tok(text)["input_ids"], text
        ids = tok("Describe the picture in detail, please! 日本 🙂")["input_ids"]
        # llama-cpp-python drops the word-start space after a leading bos, as the HF decoder's Strip does
        assert llm.detokenize(ids).decode() == tok.decode(ids, skip_special_tokens=True)
    finally:
        llm.close()


def as_4x_tokenizer_json(tok):
    """The same tokenizer in the form transformers 4 saved Llama tokenizers (the hub's Llama-2 tokenizer.json):
    no pre-tokenizer, a normalizer that prepends '▁' to every piece and turns spaces into '▁'."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from llavakit.interop.gguf_vocab import tokenizer_json

    tj = tokenizer_json(tok)
    tj["pre_tokenizer"] = None
    tj["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"}, {
        "type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(tj)), bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                                   additional_special_tokens=["<image>"])


def test_llamacpp_tokenizes_a_4x_llama_tokenizer_json_like_hf(sp_pairs, tmp_path):
    """A tokenizer.json with transformers 4's Llama normalizer prepends '▁' everywhere llama.cpp does: equal
    ids for every text, leading spaces and text after special tokens included."""
    llama_cpp = pytest.importorskip("llama_cpp", reason=LLAMACPP_SKIP)
    from llavakit.interop.gguf_text import write_text_gguf

    model, processor = sp_pairs[False]
    tok = as_4x_tokenizer_json(processor.tokenizer)
    assert tok.convert_tokens_to_ids(["<image>", "<pad>"]) == [processor.image_token_id, processor.tokenizer.pad_token_id]
    path = tmp_path / "model.gguf"
    write_text_gguf(path, model.language_model, tok, "f32", None)
    kv, _ = read(path)
    assert kv["tokenizer.ggml.model"] == "llama" and kv["tokenizer.ggml.add_space_prefix"] is True
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        for text in SP_SAME + SP_AFTER_SPECIAL + SP_LEADING_SPACE:
            for bos in (True, False):
                assert llm.tokenize(text.encode(), add_bos=bos, special=True) == \
                    tok(text, add_special_tokens=bos)["input_ids"], (text, bos)
    finally:
        llm.close()


@pytest.mark.parametrize("legacy", [False, True], ids=["clip_legacy_false_llava", "siglip_legacy_true_llm"])
def test_llamacpp_sentencepiece_greedy_answers_equal_llavakit(sp_pairs, tmp_path, legacy):
    """Vicuna-style tokenizer end to end, 24 image questions: llama.cpp's prompt ids equal llavakit's and the
    greedy answers' token ids are identical (CLIP against the emulated CLS-last graph, see above). Ids, not
    texts: random weights emit lone byte-fallback tokens, whose invalid UTF-8 the HF decoder and Python's
    replace-decoding spell differently."""
    pytest.importorskip("llama_cpp", reason=LLAMACPP_SKIP)
    from llavakit.infer.generate import GenerationSettings, Generator
    from llavakit.interop.gguf_runtime import LlamaCppLlava

    model, processor = sp_pairs[legacy]
    gen = Generator(model, processor)
    stops = set(gen.eos_token_ids)
    kwargs = {**GenerationSettings(max_new_tokens=12).generate_kwargs(), "eos_token_id": gen.eos_token_ids,
              "pad_token_id": processor.tokenizer.pad_token_id}
    convs = [[Turn("user", "<image>\n" + q)] for _, _, q in CASES]
    images = [[shape_image(c, p, model.config.vision_config.image_size)] for c, p, _ in CASES]
    ours, prompts = [], []
    with cls_last(model) if not legacy else _nothing(), torch.inference_mode():
        for turns, ims in zip(convs, images):  # one at a time: no padding in the reference ids
            inputs = gen.encode([turns], [ims])
            new = model.generate(**inputs, **kwargs)[0, inputs["input_ids"].shape[1]:].tolist()
            ours.append(new[:next((k for k, t in enumerate(new) if t in stops), len(new))])
            prompts.append([t for t in inputs["input_ids"][0].tolist() if t != processor.image_token_id])
    export((model, processor), tmp_path, format="gguf", dtype="f32")
    theirs = []
    with LlamaCppLlava(tmp_path / "model-f32.gguf", tmp_path / "mmproj-f32.gguf") as rt:
        for turns, ims, prompt in zip(convs, images, prompts):
            text = gen.template.render_prompt(turns).removeprefix(processor.tokenizer.bos_token)
            a = rt.answer(text, ims, max_new_tokens=12, stop_ids=gen.eos_token_ids)
            assert a.prompt_text_ids == prompt and a.image_tokens == [processor.image_seq_length], text
            theirs.append(a.ids)
    assert len({tuple(o) for o in ours}) > 3, f"degenerate reference answers: {ours}"
    assert theirs == ours, [(a, b) for a, b in zip(ours, theirs) if a != b]
