"""The llava-hf export, read by *older* transformers releases in a venv of their own.

tests/test_export.py checks the export in the transformers 5 that llavakit runs on. Most readers of an
llava-hf folder (vLLM and lmms-eval installs, notebooks, older training code) still run transformers 4.x,
which knows other field names and fails -- or, worse, silently uses defaults -- where 5.x wrote only its
own names. Seen before the export wrote the 4.x fields (tiny models, transformers 4.57.6 / 4.45.2):

    rope_parameters only   -> 4.x: rope_theta 10000 instead of the LLM's, zero missing keys, no warning,
                              other logits
    extra_special_tokens   -> 4.57: AutoProcessor fails ('list' object has no attribute 'keys')
    (a list)
    TokenizersBackend      -> 4.x: "Tokenizer class TokenizersBackend does not exist"
    image processor nested -> 4.45 (and up to 4.55): LlavaProcessor "got multiple values for argument
    in processor_config.json  'image_processor'"; no preprocessor_config.json: 4.45 cannot find it

Here a tiny llavakit model is exported in 5.x and reference inputs/logits are computed in 5.x; a
subprocess running the old release's python then loads the folder with `LlavaForConditionalGeneration`
and `AutoProcessor` and must report nothing missing or unexpected, the same input_ids and pixel_values as
5.x's processor, and logits within 1e-4. A control copy of the folder without the 4.x RoPE fields must
give *different* logits, so the check can see the failure it is meant to catch.

The old releases live in cached venvs outside the repository
(`$LLAVAKIT_COMPAT_CACHE`, default `~/.cache/llavakit/compat`), one per requirement set, built by pip in
a temporary folder and renamed into place when complete (an interrupted build is never reused). torch is
the exact build the test runs on (`torch==<torch.__version__>`), so no second, different torch is ever
downloaded. A cold build takes about a minute per release; later runs reuse it. The test is skipped only
when pip cannot get the packages from the registry; any other failure fails it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoProcessor, LlavaForConditionalGeneration

import llavakit
from llavakit.demo.tiny import make_tokenizer, save_tiny_llm, save_tiny_vision, tiny_llm_config
from llavakit.interop import export

pytestmark = pytest.mark.slow  # a cold cache builds a venv per release (~1 min each)

PROMPT = "USER: first <image> then the second <image> - which one is brighter? ASSISTANT: the"
# more strings for the tokenizer alone (after special tokens, leading space, newlines, non-ASCII), and a
# conversation for the chat template: the old release must give the same ids, decoded text and prompt
TEXTS = ["USER: <image>\nWhat is shown? ASSISTANT:", " starts with a space", "a</s>USER: b<s>c",
         "two\n\nlines  and  spaces", "<image><image>x", "ünïcödé ✓ 中文"]
MESSAGES = [{"role": "user", "content": "<image>\nWhat is in the image?"},
            {"role": "assistant", "content": "A red circle."},
            {"role": "user", "content": "And the colour?"}]
LOGITS_ATOL = 1e-4

# release -> pip requirements besides torch (pinned to the running build below); pip resolves the rest
# (tokenizers, huggingface-hub, numpy) to what that transformers release declares.
RELEASES = {
    "4.57": ["transformers==4.57.*", "safetensors", "pillow", "sentencepiece", "protobuf"],
    "4.45": ["transformers==4.45.*", "safetensors", "pillow", "sentencepiece", "protobuf"],
}

# Export cases: (vision, llm, build options, oldest release that can read it); "template" is not a build
# option but the llavakit conversation template the export renders to Jinja (else the tokenizer's own). What 4.45 cannot read is a
# limit of 4.45, not of the export: SigLIP needs num_additional_image_tokens (4.47+), the pad aspect
# LlavaImageProcessor (4.49+), several feature layers a list-valued vision_feature_layer (4.49+).
CASES = {
    # tiny byte-level BPE tokenizer (5.x: TokenizersBackend), Llama-3's RoPE base, untied, CLS dropped,
    # llavakit's llama3 template
    "clip-llama": ("clip", "llama", {"template": "llama3"}, "4.45"),
    # tied embeddings (Qwen2.5-0.5B), RoPE base 1e6, CLS kept, chat template shipped
    "clip-qwen2tied-cls_patch": ("clip", "qwen2_tied", {"vision_feature_select": "cls_patch",
                                                        "vision_feature_layer": -1}, "4.45"),
    # SentencePiece LlamaTokenizer with vicuna_v1 (LLaVA-1.5's), linear RoPE scaling, two feature layers,
    # pad-to-square
    "siglip-splama-linear-pad": ("siglip", "sp_llama", {"vision_feature_layer": [-3, -1], "image_aspect": "pad",
                                                        "template": "vicuna_v1"},
                                 "4.57"),
}
CONTROL = "clip-llama"  # its control copy drops the 4.x RoPE fields, as the export wrote them before


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split(".")[:2])


# --- cached venvs ------------------------------------------------------------------------------------
UNREACHABLE = ("Could not find a version that satisfies the requirement", "No matching distribution found",
               "Failed to establish a new connection", "Temporary failure in name resolution",
               "Max retries exceeded", "Network is unreachable")


def compat_cache() -> Path:
    return Path(os.environ.get("LLAVAKIT_COMPAT_CACHE", "~/.cache/llavakit/compat")).expanduser()


def _requirements(release: str) -> list[str]:
    return [f"torch=={torch.__version__}"] + RELEASES[release]


def compat_python(release: str) -> Path:
    """The python of a venv holding transformers `release`, building the venv on first use.

    The folder name carries a hash of the requirement set and the Python version; a complete venv is
    renamed into place only after pip succeeded and transformers imported, so a folder of that name is
    always whole."""
    reqs = _requirements(release)
    key = hashlib.sha256(json.dumps([sys.version_info[:2], reqs]).encode()).hexdigest()[:12]
    root = compat_cache()
    final = root / f"tf-{release}-{key}"
    python = final / "bin" / "python"
    if python.exists():
        return python
    root.mkdir(parents=True, exist_ok=True)
    for old in root.glob(f".tmp-tf-{release}-{key}-*"):  # left by an interrupted build
        if time.time() - old.stat().st_mtime > 3 * 3600:
            shutil.rmtree(old, ignore_errors=True)
    tmp = root / f".tmp-tf-{release}-{key}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(tmp)], check=True, capture_output=True, text=True)
        cmd = [str(tmp / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
               "--prefer-binary", *reqs]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=_clean_env())
        if res.returncode != 0:
            output = res.stdout + res.stderr
            lines = [line for line in output.splitlines() if any(u in line for u in UNREACHABLE)]
            if lines:
                pytest.skip(f"pip cannot get the packages for transformers {release} ({' '.join(reqs)}): "
                            f"{lines[-1].strip()}")
            pytest.fail(f"building the transformers {release} venv failed: {' '.join(cmd)}\n{output}",
                        pytrace=False)
        check = subprocess.run([str(tmp / "bin" / "python"), "-c", "import torch, transformers; "
                                "print(transformers.__version__, torch.__version__)"],
                               capture_output=True, text=True, env=_clean_env())
        if check.returncode != 0 or not check.stdout.startswith(release + "."):
            pytest.fail(f"the transformers {release} venv does not work:\n{check.stdout}{check.stderr}",
                        pytrace=False)
        try:
            tmp.rename(final)
        except OSError:  # another run finished the same venv first
            if not python.exists():
                raise
        return python
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONDONTWRITEBYTECODE="1")
    return env


# --- the reader side (runs in the old release's python) ----------------------------------------------
READER = r'''
import json, sys, traceback
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

torch.set_num_threads(2)
root = Path(sys.argv[1])
report = {"transformers": transformers.__version__, "torch": torch.__version__, "cases": {}}
for case in sys.argv[2:]:
    d = root / case
    r = report["cases"][case] = {}
    try:
        model, info = LlavaForConditionalGeneration.from_pretrained(d / "hf", output_loading_info=True)
        model.eval()
        r["loading_info"] = {k: sorted(map(str, v)) for k, v in info.items() if k != "error_msgs"}
        text = model.config.text_config
        r["rope_theta"] = getattr(text, "rope_theta", None)
        r["rope_scaling"] = getattr(text, "rope_scaling", None)
        ref = {k: torch.from_numpy(np.load(d / f"{k}.npy")) for k in ("input_ids", "attention_mask", "pixel_values")}
        with torch.no_grad():
            np.save(d / "old_logits_on_ref_inputs.npy", model(**ref).logits.numpy())
    except Exception:
        r["model_error"] = traceback.format_exc()
        continue
    if not (d / "prompt.json").exists():
        continue
    try:
        processor = AutoProcessor.from_pretrained(d / "hf")
        r["processor"] = type(processor).__name__
        r["tokenizer"] = type(processor.tokenizer).__name__
        r["image_processor"] = type(processor.image_processor).__name__
        r["chat_template"] = getattr(processor, "chat_template", None)
        r["tokenizer_chat_template"] = getattr(processor.tokenizer, "chat_template", None)
        tok, spec = processor.tokenizer, json.loads((d / "texts.json").read_text())
        r["text_ids"] = [tok(t)["input_ids"] for t in spec["texts"]]
        r["decoded"] = [tok.decode(ids, skip_special_tokens=True) for ids in r["text_ids"]]
        if tok.chat_template:
            r["chat"] = tok.apply_chat_template(spec["messages"], tokenize=False, add_generation_prompt=True)
        prompt = json.loads((d / "prompt.json").read_text())
        images = [Image.open(p).convert("RGB") for p in sorted(d.glob("image*.png"))]
        inputs = processor(text=prompt, images=images, return_tensors="pt")
        for k in ("input_ids", "attention_mask", "pixel_values"):
            np.save(d / f"old_{k}.npy", inputs[k].numpy())
        with torch.no_grad():
            logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                           pixel_values=inputs["pixel_values"]).logits
        np.save(d / "old_logits.npy", logits.numpy())
    except Exception:
        r["processor_error"] = traceback.format_exc()
(root / "report.json").write_text(json.dumps(report, indent=1, default=str))
print(json.dumps({c: {k: v for k, v in r.items() if not k.endswith("error")} for c, r in report["cases"].items()},
                 default=str))
'''


# --- the writer side (5.x, this process) -------------------------------------------------------------
def _images(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy()) for h, w in ((40, 30), (28, 44))]


def _llms(root: Path) -> dict[str, Path]:
    """Tiny LLMs whose RoPE is not the default base 10000 (see the module docstring)."""
    dirs = {"llama": save_tiny_llm(root / "llama", "llama", rope_theta=500000.0)}

    q = root / "qwen2_tied"
    tok = make_tokenizer(family="qwen2")
    cfg = tiny_llm_config("qwen2", vocab_size=len(tok), rope_theta=1e6)
    cfg.tie_word_embeddings, cfg.eos_token_id = True, tok.eos_token_id
    torch.manual_seed(3)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(q)
    tok.save_pretrained(q)
    dirs["qwen2_tied"] = q

    from sptok import make_sp_llama_tokenizer

    sp = root / "sp_llama"
    tok = make_sp_llama_tokenizer(sp)
    cfg = tiny_llm_config("llama", vocab_size=len(tok),
                          rope_parameters={"rope_type": "linear", "rope_theta": 1e6, "factor": 2.0})
    cfg.bos_token_id, cfg.eos_token_id = tok.bos_token_id, tok.eos_token_id
    torch.manual_seed(4)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(sp)
    dirs["sp_llama"] = sp
    return dirs


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Every case exported once, with 5.x's processor outputs and logits (llavakit's and HF Llava's)."""
    root = tmp_path_factory.mktemp("compat")
    parts = tmp_path_factory.mktemp("compat_parts")
    vision = {kind: save_tiny_vision(parts / kind, kind) for kind in ("clip", "siglip")}
    llms = _llms(parts)
    for case, (v, llm, opts, _) in CASES.items():
        d = root / case
        opts = dict(opts)
        template = opts.pop("template", None)
        torch.manual_seed(1)
        model, processor = llavakit.build(vision[v], llms[llm], projector="mlp2x_gelu", **opts)
        model.eval()
        if template:
            processor.template = template
        out = export((model, processor), d / "hf")
        hp = AutoProcessor.from_pretrained(out)
        images = _images()
        for i, image in enumerate(images):
            image.save(d / f"image{i}.png")  # lossless: the reader gets the same pixels
        inputs = hp(text=PROMPT, images=images, return_tensors="pt")
        assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 2 * model.config.image_seq_length
        hf = LlavaForConditionalGeneration.from_pretrained(out)
        with torch.no_grad():
            ref = model(**inputs).logits
            hf_logits = hf(**inputs).logits
        assert (hf_logits - ref).abs().max().item() <= 1e-5  # 5.x itself, as in tests/test_export.py
        for k in ("input_ids", "attention_mask", "pixel_values"):
            np.save(d / f"{k}.npy", inputs[k].numpy())
        np.save(d / "logits.npy", ref.numpy())
        (d / "prompt.json").write_text(json.dumps(PROMPT))
        (d / "chat_template.json").write_text(json.dumps(hp.chat_template))
        tok = hp.tokenizer
        text_ids = [tok(t)["input_ids"] for t in TEXTS]
        assert text_ids == [processor.tokenizer(t)["input_ids"] for t in TEXTS]
        (d / "texts.json").write_text(json.dumps({
            "texts": TEXTS, "messages": MESSAGES, "text_ids": text_ids,
            "decoded": [tok.decode(ids, skip_special_tokens=True) for ids in text_ids],
            "chat": tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
            if tok.chat_template else None}))

    # the control: what the export wrote before it added the 4.x RoPE fields
    control = root / f"{CONTROL}-without-4x-rope"
    shutil.copytree(root / CONTROL, control)
    cfg = json.loads((control / "hf" / "config.json").read_text())
    for key in ("rope_theta", "rope_scaling"):
        cfg["text_config"].pop(key, None)
    (control / "hf" / "config.json").write_text(json.dumps(cfg, indent=2))
    (control / "prompt.json").unlink()  # model only
    return root


def _run_reader(python: Path, root: Path, cases: list[str]) -> dict:
    script = root / "reader.py"
    script.write_text(READER)
    res = subprocess.run([str(python), str(script), str(root), *cases], capture_output=True, text=True,
                         timeout=900, env=_clean_env(), cwd=root)
    output = f"$ {python} {script} {root} {' '.join(cases)}\n--- stdout\n{res.stdout}\n--- stderr\n{res.stderr}"
    if res.returncode != 0 or not (root / "report.json").exists():
        pytest.fail(f"the reader exited with {res.returncode}\n{output}", pytrace=False)
    report = json.loads((root / "report.json").read_text())
    report["output"] = output
    (root / "report.json").unlink()
    return report


@pytest.mark.parametrize("release", list(RELEASES))
def test_old_transformers_loads_export_with_same_inputs_and_logits(exports, release):
    python = compat_python(release)
    cases = [c for c, (*_, oldest) in CASES.items() if _version_tuple(release) >= _version_tuple(oldest)]
    control = f"{CONTROL}-without-4x-rope"
    report = _run_reader(python, exports, cases + [control])
    out = report["output"]
    assert report["transformers"].startswith(release + "."), out
    problems = []
    for case in cases:
        r, d = report["cases"][case], exports / case
        if "model_error" in r:
            problems.append(f"{case}: LlavaForConditionalGeneration.from_pretrained or forward failed\n{r['model_error']}")
            continue
        info = r["loading_info"]
        if any(info.values()):
            problems.append(f"{case}: loading info {info}")
        theta = json.loads((d / "hf" / "config.json").read_text())["text_config"]["rope_parameters"]["rope_theta"]
        if r["rope_theta"] != theta:
            problems.append(f"{case}: the old release reads rope_theta {r['rope_theta']}, the LLM has {theta}")
        ref = np.load(d / "logits.npy")
        names = ["old_logits_on_ref_inputs.npy"]  # the model on 5.x's inputs
        if "processor_error" in r:
            problems.append(f"{case}: AutoProcessor.from_pretrained or its call failed\n{r['processor_error']}")
        else:
            names.append("old_logits.npy")  # the model on its own processor's inputs
            for k in ("input_ids", "attention_mask"):
                old, new = np.load(d / f"old_{k}.npy"), np.load(d / f"{k}.npy")
                if not np.array_equal(old, new):
                    problems.append(f"{case}: {k} differ\n old {old.tolist()}\n 5.x {new.tolist()}")
            old_px, px = np.load(d / "old_pixel_values.npy"), np.load(d / "pixel_values.npy")
            if old_px.shape != px.shape or np.abs(old_px - px).max() > 0:
                diff = np.abs(old_px - px).max() if old_px.shape == px.shape else "-"
                problems.append(f"{case}: pixel_values differ (shapes {old_px.shape} / {px.shape}, max |Δ| {diff})")
            template = json.loads((d / "chat_template.json").read_text())
            texts = json.loads((d / "texts.json").read_text())
            for k in ("text_ids", "decoded", "chat"):
                if r.get(k) != texts[k]:
                    problems.append(f"{case}: tokenizer {k} differ\n old {r.get(k)!r}\n 5.x {texts[k]!r}")
            if r["chat_template"] != template or r["tokenizer_chat_template"] != template:
                problems.append(f"{case}: chat template {r['chat_template']!r} / {r['tokenizer_chat_template']!r}, "
                                f"5.x: {template!r}")
        for name in names:
            got = np.load(d / name)
            diff = float(np.abs(got - ref).max()) if got.shape == ref.shape else float("inf")
            r[f"max_abs_diff_{name[:-4]}"] = diff
            if diff > LOGITS_ATOL:
                problems.append(f"{case}: {name[:-4]}: max |Δ logits| {diff:.3g} > {LOGITS_ATOL}")
    # the control copy must fail the way the export failed before it wrote rope_theta
    c = report["cases"][control]
    if "model_error" in c:
        problems.append(f"control: {c['model_error']}")
    else:
        diff = float(np.abs(np.load(exports / control / "old_logits_on_ref_inputs.npy")
                            - np.load(exports / control / "logits.npy")).max())
        c["max_abs_diff_old_logits_on_ref_inputs"] = diff
        if c["rope_theta"] != 10000 or diff <= 10 * LOGITS_ATOL:
            problems.append(f"control without the 4.x RoPE fields: rope_theta {c['rope_theta']}, max |Δ| {diff:.3g}; "
                            "expected 10000 and logits that differ, or this test cannot see a lost RoPE")
    summary = {case: {k: v for k, v in report["cases"][case].items() if k.startswith(("max_abs", "rope"))}
               for case in cases + [control]}
    print(f"transformers {report['transformers']}: {json.dumps(summary, default=str)}")
    assert not problems, "\n".join(problems) + "\n\n" + out
