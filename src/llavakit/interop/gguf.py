"""Export to GGUF for llama.cpp / Ollama / LM Studio: a text model and an "mmproj" file.

    export_gguf(model, processor, out, dtype="f16")   ->  out/model-f16.gguf     the LLM + tokenizer + chat template
                                                          out/mmproj-f16.gguf    vision tower + projector (clip.cpp)
                                                          out/Modelfile          for `ollama create`
                                                          out/README.md          the commands for this export

Everything llama.cpp cannot represent is refused before any file is written (see `check_gguf`).
The LLM part is `gguf_text.py`, the vision part `gguf_mmproj.py`; both use the `gguf` package from
PyPI (``pip install 'llavakit[gguf]'``).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from .gguf_mmproj import check_mmproj, write_mmproj_gguf
from .gguf_text import QTYPES, check_text_model, write_text_gguf
from .gguf_vocab import spm_prompt_warnings, tokenizer_kind

log = logging.getLogger(__name__)

# --dtype spellings accepted for GGUF -> GGUF tensor type
GGUF_DTYPES = {"f32": "f32", "float32": "f32", "f16": "f16", "float16": "f16", "q8_0": "q8_0"}


def gguf_dtype(dtype) -> str:
    if dtype is None:
        return "f16"
    d = str(dtype).removeprefix("torch.")
    if d not in GGUF_DTYPES:
        raise ValueError(f"dtype {dtype!r} cannot be written to GGUF; choose one of {', '.join(QTYPES)}")
    return GGUF_DTYPES[d]


def _require_gguf():
    try:
        import gguf  # noqa: F401
    except ModuleNotFoundError as e:
        raise ValueError("GGUF export needs the `gguf` package: pip install 'llavakit[gguf]' (or pip install gguf)"
                         ) from e


def check_gguf(model, processor) -> list[str]:
    """Raise ValueError naming what is supported if llama.cpp cannot run this model as llavakit does;
    return warnings about known runtime differences."""
    check_text_model(model.language_model)
    kind = tokenizer_kind(processor.tokenizer)
    warnings = check_mmproj(model, processor)
    if kind == "llama":  # SentencePiece: llama.cpp's word-start rule vs the tokenizer's (gguf_vocab)
        warnings += spm_prompt_warnings(processor.tokenizer, getattr(processor, "image_token", None),
                                        getattr(processor, "tokenization", "llm"))
    return warnings


def template_name(processor) -> str | None:
    return getattr(processor, "template", None)


# --- Ollama ----------------------------------------------------------------------------------------
def ollama_template(processor) -> tuple[str, list[str]] | None:
    """(Go TEMPLATE, stop strings) rendering a built-in llavakit template, or None if there is none.

    bos is left to the runtime (llama.cpp adds it when the tokenizer does); eos texts are literal."""
    from llavakit.data.templates import TEMPLATES, get_template

    name = template_name(processor)
    if name not in TEMPLATES:
        return None
    t = get_template(name, processor.tokenizer)
    s = t.spec

    def fill(fmt: str, content: str = "") -> str:
        if "{{" in fmt:
            raise ValueError("template text contains '{{'")
        return fmt.replace("{bos}", "").replace("{eos}", t.eos).replace("{content}", content)

    default = json.dumps(s.default_system if s.default_system is not None else "", ensure_ascii=False)
    parts = ["{{- $system := " + default + " }}",
             "{{- range .Messages }}{{ if eq .Role \"system\" }}{{ $system = .Content }}{{ end }}{{ end }}",
             "{{- $first := true }}"]
    out = "".join(parts) + fill(s.bos)
    if s.system is not None:
        out += "{{ if $system }}" + fill(s.system, "{{ $system }}") + "{{ end }}"
    user = fill(s.user, "{{ .Content }}")
    if s.system_in_user is not None:
        folded = fill(s.user, fill(s.system_in_user, "{{ $system }}") + "{{ .Content }}")
        user = "{{ if and $first $system }}" + folded + "{{ else }}" + user + "{{ end }}"
    out += ("{{ range .Messages }}{{ if eq .Role \"user\" }}" + user + "{{ $first = false }}"
            "{{ else if eq .Role \"assistant\" }}" + fill(s.header) + fill(s.reply, "{{ .Content }}")
            + fill(s.after_reply) + "{{ end }}{{ end }}" + fill(s.header))
    return out, list(t.stop_strings)


def write_modelfile(out: Path, model_file: str, mmproj_file: str, processor) -> Path:
    lines = [f"# Ollama Modelfile written by llavakit: ollama create NAME -f {out / 'Modelfile'}",
             f"FROM ./{model_file}", f"FROM ./{mmproj_file}"]
    tmpl = ollama_template(processor)
    if tmpl is not None:
        text, stops = tmpl
        lines.append('TEMPLATE """' + text + '"""')
        lines += [f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}" for s in stops if s]
    else:
        lines.append("# no llavakit conversation template recorded: Ollama uses the GGUF's chat template")
    lines.append("PARAMETER temperature 0")
    path = out / "Modelfile"
    path.write_text("\n".join(lines) + "\n")
    return path


def _readme(out: Path, model_file: str, mmproj_file: str, prompt_hint: str) -> str:
    return f"""# GGUF export (llavakit)

- `{model_file}`: the language model, tokenizer and chat template
- `{mmproj_file}`: vision tower + projector (llama.cpp mmproj, projector type `mlp`)
- `Modelfile`: Ollama

```bash
llama-mtmd-cli -m {model_file} --mmproj {mmproj_file} --image photo.jpg -p "What is in the image?" --temp 0
llama-server   -m {model_file} --mmproj {mmproj_file} --host 127.0.0.1 --port 8080
ollama create my-llava -f Modelfile && ollama run my-llava "What is in the image? ./photo.jpg"
python -m llama_cpp.server --model {model_file} --clip_model_path {mmproj_file} --chat_format llava-1-5 \\
    --host 127.0.0.1 --port 8000
```

Prompt format the model was trained with: {prompt_hint}
"""


def export_gguf(model, processor, out: str | Path, *, dtype=None, overwrite: bool = False, **_ignored) -> Path:
    """Write model-<dtype>.gguf + mmproj-<dtype>.gguf + Modelfile + README.md to `out`. Returns `out`.

    `dtype`: f32, f16 (default) or q8_0 (float32/float16 also accepted). Checks everything first;
    nothing is written for a model llama.cpp cannot run (the error names what is supported)."""
    qtype = gguf_dtype(dtype)
    _require_gguf()
    for w in check_gguf(model, processor):
        log.warning("GGUF export: %s", w)
    from .hf_llava import chat_template_for

    chat_template = chat_template_for(processor)
    out = Path(out)
    model_file, mmproj_file = f"model-{qtype}.gguf", f"mmproj-{qtype}.gguf"
    if out.exists() and any(out.iterdir()):
        clash = [p.name for p in out.iterdir() if p.name in (model_file, mmproj_file, "Modelfile", "README.md")]
        if clash and not overwrite:
            raise FileExistsError(f"{out} already holds {', '.join(clash)}; pick a new folder or pass overwrite=True "
                                  "(--overwrite)")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    lm = model.language_model
    try:
        write_text_gguf(out / model_file, lm, processor.tokenizer, qtype, chat_template)
        write_mmproj_gguf(out / mmproj_file, model, processor, qtype)
    except BaseException:
        for f in (model_file, mmproj_file):  # no half-written pair left behind
            (out / f).unlink(missing_ok=True)
        raise
    write_modelfile(out, model_file, mmproj_file, processor)
    name = template_name(processor)
    hint = (f"llavakit template `{name}` (also in the GGUF's tokenizer.chat_template and the Modelfile)" if name
            else "the tokenizer's chat template (in the GGUF)")
    (out / "README.md").write_text(_readme(out, model_file, mmproj_file, hint))
    log.info("exported GGUF (%s) to %s in %.1fs", qtype, out, time.perf_counter() - t0)
    return out
