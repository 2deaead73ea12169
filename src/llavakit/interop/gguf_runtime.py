"""Run an exported GGUF pair in llama.cpp (through llama-cpp-python and its mtmd bindings), prompted
exactly as llavakit prompts: the conversation is rendered with the model's llavakit template, each
``<image>`` becomes mtmd's media marker, and mtmd tokenizes the text around it and writes the image
embeddings in place. Greedy decoding is a plain argmax loop over llama.cpp's logits, so the ids
can be compared one to one with `model.generate(do_sample=False)`.

Needs ``pip install 'llavakit[llamacpp]'`` (llama-cpp-python, built from source by pip).
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass, field

import numpy as np


@dataclass
class LlamaCppAnswer:
    text: str
    ids: list[int]  # generated ids, the stop id not included
    prompt_text_ids: list[int] = field(default_factory=list)  # the text tokens mtmd fed (image chunks left out)
    image_tokens: list[int] = field(default_factory=list)  # embeddings per image chunk
    seconds: float = 0.0


class LlamaCppLlava:
    """A text GGUF + mmproj GGUF loaded in llama.cpp; `answer(prompt, images)` decodes greedily."""

    def __init__(self, model_path, mmproj_path, n_ctx: int = 2048, n_threads: int = 2, verbose: bool = False):
        import llama_cpp
        import llama_cpp.mtmd_cpp as mtmd

        self._llama_cpp, self._mtmd = llama_cpp, mtmd
        self.llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=n_ctx, n_threads=n_threads,
                                   n_threads_batch=n_threads, n_gpu_layers=0, verbose=verbose, seed=0)
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = False
        params.n_threads = n_threads
        params.print_timings = False
        self.ctx = mtmd.mtmd_init_from_file(str(mmproj_path).encode(), self.llm.model, params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not load the mmproj {mmproj_path}")
        self.marker = mtmd.mtmd_default_marker().decode()

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self._mtmd.mtmd_free(self.ctx)
            self.ctx = None
        if getattr(self, "llm", None) is not None:
            self.llm.close()
            self.llm = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _bitmap(self, image):
        rgb = image.convert("RGB")
        data = rgb.tobytes()
        buf = (ctypes.c_uint8 * len(data)).from_buffer(bytearray(data))
        bm = self._mtmd.mtmd_bitmap_init(rgb.width, rgb.height, buf)
        if not bm:
            raise RuntimeError("mtmd_bitmap_init failed")
        return bm

    def image_embeddings(self, image) -> np.ndarray:
        """What mtmd writes into the LLM for one image: [image tokens, n_embd] float32 (its encoder + projector
        output; compare with llavakit's `model.get_image_features`)."""
        mtmd = self._mtmd
        text = self.marker.encode()
        inp = mtmd.mtmd_input_text()
        inp.text, inp.text_len, inp.add_special, inp.parse_special = text, len(text), False, True
        bitmap = self._bitmap(image)
        chunks = mtmd.mtmd_input_chunks_init()
        try:
            arr = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
            if mtmd.mtmd_tokenize(self.ctx, chunks, ctypes.byref(inp), arr, 1) != 0:
                raise RuntimeError("mtmd_tokenize failed")
            for i in range(mtmd.mtmd_input_chunks_size(chunks)):
                chunk = mtmd.mtmd_input_chunks_get(chunks, i)
                if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    continue
                n = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                if mtmd.mtmd_encode_chunk(self.ctx, chunk) != 0:
                    raise RuntimeError("mtmd could not encode the image")
                ptr = mtmd.mtmd_get_output_embd(self.ctx)
                return np.ctypeslib.as_array(ptr, shape=(n * self.llm.n_embd(),)).reshape(n, -1).copy()
            raise RuntimeError("mtmd made no image chunk")
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
            mtmd.mtmd_bitmap_free(bitmap)

    def answer(self, prompt: str, images=(), max_new_tokens: int = 32, stop_ids=(), image_marker: str = "<image>",
               add_special: bool = True) -> LlamaCppAnswer:
        """Greedy continuation of `prompt` (llavakit's rendered prompt; `image_marker` where images go)."""
        mtmd, llama_cpp, llm = self._mtmd, self._llama_cpp, self.llm
        t0 = time.perf_counter()
        if prompt.count(image_marker) != len(images):
            raise ValueError(f"the prompt has {prompt.count(image_marker)} {image_marker} but {len(images)} images")
        text = prompt.replace(image_marker, self.marker).encode()
        inp = mtmd.mtmd_input_text()
        inp.text, inp.text_len, inp.add_special, inp.parse_special = text, len(text), add_special, True
        bitmaps = [self._bitmap(im) for im in images]
        chunks = mtmd.mtmd_input_chunks_init()
        out = LlamaCppAnswer("", [])
        last_is_text = False
        try:
            arr = (mtmd.mtmd_bitmap_p_ctypes * max(1, len(bitmaps)))(*bitmaps)
            rc = mtmd.mtmd_tokenize(self.ctx, chunks, ctypes.byref(inp), arr, len(bitmaps))
            if rc != 0:
                raise RuntimeError(f"mtmd_tokenize failed ({rc})")
            llm.reset()
            llm._ctx.kv_cache_clear()
            for i in range(mtmd.mtmd_input_chunks_size(chunks)):
                chunk = mtmd.mtmd_input_chunks_get(chunks, i)
                if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    n = ctypes.c_size_t()
                    ptr = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                    toks = [ptr[j] for j in range(n.value)]
                    out.prompt_text_ids += toks
                    llm.eval(toks)
                    last_is_text = True
                else:
                    out.image_tokens.append(mtmd.mtmd_input_chunk_get_n_tokens(chunk))
                    new_past = llama_cpp.llama_pos(0)
                    rc = mtmd.mtmd_helper_eval_chunk_single(self.ctx, llm._ctx.ctx, chunk,
                                                            llama_cpp.llama_pos(llm.n_tokens),
                                                            llama_cpp.llama_seq_id(0), llm.n_batch, True,
                                                            ctypes.byref(new_past))
                    if rc != 0:
                        raise RuntimeError(f"mtmd could not evaluate image chunk {i} ({rc})")
                    llm.n_tokens = new_past.value
                    last_is_text = False
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
            for bm in bitmaps:
                mtmd.mtmd_bitmap_free(bm)
        if not last_is_text:
            raise ValueError("the prompt must end with text (the template's assistant header)")
        stops = set(stop_ids) | {llm.token_eos()}
        for _ in range(max_new_tokens):
            ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)  # the last decoded token's logits
            logits = np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))
            tok = int(np.argmax(logits))
            if tok in stops:
                break
            out.ids.append(tok)
            llm.eval([tok])
        out.text = llm.detokenize(out.ids, special=False).decode("utf-8", errors="replace")
        out.seconds = time.perf_counter() - t0
        return out
