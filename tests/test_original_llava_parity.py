"""Real-world parity with the original LLaVA code (haotian-liu/LLaVA) on imported checkpoints.

The checkpoints are written here in LLaVA's own layouts, from a tiny Llama and a tiny CLIP, with a
SentencePiece Llama tokenizer (`sptok`, Vicuna-v1.5 style; legacy=True too):

  finetuned   config.json (architectures ["LlavaLlamaForCausalLM"], model_type "llava_llama", mm_*), the LLM
              and model.mm_projector.* weights in one file, tokenizer.model + tokenizer_config.json
  stage1      what `--tune_mm_mlp_adapter` pretraining leaves: config.json (architectures ["LlamaForCausalLM"],
              model_type "llava_llama", mm_*) + mm_projector.bin; the LLM is the base folder it names

The references are LLaVA's documented algorithms written out below (no llavakit code, no LLaVA code):

  ids      `tokenizer_image_token`: split the prompt on "<image>", `tokenizer(chunk).input_ids` for every
           chunk, bos kept for the first chunk only, IMAGE_TOKEN_INDEX (-200) between chunks. The tokenizer is
           the checkpoint's, loaded by transformers; its chunk ids are also checked against the slow
           sentencepiece LlamaTokenizer LLaVA ran with (`sptok.slow_llama_ids`).
  pixels   expand to a square filled with int(255 * image_mean), then the CLIP image processor.
  forward  CLIP hidden_states[mm_vision_select_layer] without CLS -> mm_projector; the LLM's embeddings of
           the text chunks with each -200 replaced by the image's projected features; transformers'
           LlamaForCausalLM(inputs_embeds=...) on weights read from the checkpoint files directly.

llavakit must give the same ids from `processor(text=...)` and from the chat path (`encode_prompt` with the
vicuna_v1 template), the same logits (1e-4) and the same greedy tokens. "Same ids" = LLaVA's ids with each
-200 replaced by image_seq_length copies of processor.image_token_id.
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoTokenizer, CLIPVisionModel, LlamaConfig, LlamaForCausalLM
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from llavakit.data.conversation import Turn
from llavakit.data.templates import get_template
from llavakit.data.tokenize import encode_prompt
from llavakit.demo.tiny import tiny_llm_config
from llavakit.infer.generate import Generator
from llavakit.interop import checkpoint_format, import_original_llava, open_checkpoint
from llavakit.model.processor import LlavakitProcessor
import sptok
from sptok import make_sp_llama_tokenizer, slow_llama_ids

IMAGE_TOKEN_INDEX = -200  # LLaVA's constant for an image position
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")
SELECT_LAYER = -2

# name -> (llavakit turns, LLaVA-1.5 prompt: conv_vicuna_v1, sep " ", sep2 "</s>", number of images)
PROMPTS = {
    "one_image": ([Turn("user", "<image>\nWhat is shown?")],
                  SYSTEM + " USER: <image>\nWhat is shown? ASSISTANT:", 1),
    "two_images": ([Turn("user", "<image>\n<image>\nWhat differs between the two images?")],
                   SYSTEM + " USER: <image>\n<image>\nWhat differs between the two images? ASSISTANT:", 2),
    "multi_turn": ([Turn("user", "<image>\nWhat is shown?"), Turn("assistant", "A red circle and a blue square."),
                    Turn("user", "And the colour?")],
                   SYSTEM + " USER: <image>\nWhat is shown? ASSISTANT: A red circle and a blue square.</s>"
                            "USER: And the colour? ASSISTANT:", 1),
}

LLAVA_EXTRAS = {
    "mm_vision_tower": None,  # set per checkpoint
    "mm_projector_type": "mlp2x_gelu",
    "mm_vision_select_layer": SELECT_LAYER,
    "mm_vision_select_feature": "patch",
    "mm_hidden_size": 32,
    "mm_use_im_start_end": False,
    "mm_use_im_patch_token": False,
    "mm_patch_merge_type": "flat",
    "image_aspect_ratio": "pad",
    "freeze_mm_mlp_adapter": False,
    "tune_mm_mlp_adapter": False,
    "use_mm_proj": True,
    "tokenizer_model_max_length": 2048,
    "tokenizer_padding_side": "right",
    "model_type": "llava_llama",
}


# --- the references ------------------------------------------------------------------------------------
def tokenizer_image_token(prompt: str, tokenizer) -> list[int]:
    """LLaVA's prompt -> ids: each chunk between <image> markers tokenized on its own, with the tokenizer's
    special tokens; the first chunk keeps its bos, later chunks lose theirs; -200 between chunks."""
    ids: list[int] = []
    for k, chunk in enumerate(prompt.split("<image>")):
        chunk_ids = tokenizer(chunk).input_ids
        if k:
            ids.append(IMAGE_TOKEN_INDEX)
            if chunk_ids and chunk_ids[0] == tokenizer.bos_token_id:
                chunk_ids = chunk_ids[1:]
        ids += chunk_ids
    return ids


def expand(ref_ids: list[int], image_token_id: int, n: int) -> list[int]:
    return [t for x in ref_ids for t in ([image_token_id] * n if x == IMAGE_TOKEN_INDEX else [x])]


def expand2square(image: Image.Image, fill) -> Image.Image:
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    out = Image.new(image.mode, (side, side), fill)
    out.paste(image, ((side - w) // 2, (side - h) // 2))
    return out


def reference_pixels(images, clip_dir) -> torch.Tensor:
    """LLaVA's process_images for image_aspect_ratio "pad" (transformers 4.x's CLIPImageProcessor was PIL based)."""
    proc = CLIPImageProcessorPil.from_pretrained(clip_dir)
    fill = tuple(int(x * 255) for x in proc.image_mean)
    return torch.stack([proc.preprocess(expand2square(im, fill), return_tensors="pt")["pixel_values"][0]
                        for im in images])


class LlavaReference:
    """LLaVA's multimodal forward on weights read straight from the checkpoint files."""

    def __init__(self, llm: LlamaForCausalLM, tower: CLIPVisionModel, projector: nn.Module):
        self.llm, self.tower, self.projector = llm.eval(), tower.eval(), projector.eval()

    @torch.no_grad()
    def embeds(self, ref_ids: list[int], pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.tower(pixel_values, output_hidden_states=True).hidden_states[SELECT_LAYER]
        feats = self.projector(hidden[:, 1:])  # "patch": drop CLS -> [N, P, D]
        table = self.llm.get_input_embeddings()
        rows, img, run = [], 0, []
        for x in ref_ids + [None]:
            if x is not None and x != IMAGE_TOKEN_INDEX:
                run.append(x)
                continue
            if run:
                rows.append(table(torch.tensor(run)))
                run = []
            if x == IMAGE_TOKEN_INDEX:
                rows.append(feats[img])
                img += 1
        assert img == len(pixel_values)
        return torch.cat(rows)[None]  # [1, L, D]

    @torch.no_grad()
    def logits(self, ref_ids, pixel_values) -> torch.Tensor:
        return self.llm(inputs_embeds=self.embeds(ref_ids, pixel_values)).logits

    @torch.no_grad()
    def greedy(self, ref_ids, pixel_values, n: int) -> list[int]:
        emb, out = self.embeds(ref_ids, pixel_values), []
        for _ in range(n):
            nxt = int(self.llm(inputs_embeds=emb).logits[0, -1].argmax())
            out.append(nxt)
            if nxt == self.llm.config.eos_token_id:
                break
            emb = torch.cat([emb, self.llm.get_input_embeddings()(torch.tensor([[nxt]]))], dim=1)
        return out


# --- checkpoints in LLaVA's layouts --------------------------------------------------------------------
def _projector(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64))


def _images(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sizes = ((40, 30), (28, 44), (36, 36))
    return [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy()) for h, w in sizes[:n]]


def _base_llm(out, legacy: bool, seed: int):
    """A "vicuna" folder: tiny Llama + SentencePiece tokenizer (no pad token, as Vicuna-v1.5)."""
    tok = make_sp_llama_tokenizer(out, legacy=legacy)
    cfg = tiny_llm_config("llama", vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    llm = LlamaForCausalLM(cfg).eval()
    llm.save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=["finetuned", "stage1"])
def kind(request):
    return request.param


@pytest.fixture(scope="module", params=[False, True], ids=["legacy_false", "legacy_true"])
def legacy(request):
    return request.param


@pytest.fixture(scope="module")
def checkpoint(kind, legacy, tiny_dirs, tmp_path_factory):
    """(path, tokenizer folder, LlavaReference) for one layout; the reference is built from the files."""
    root = tmp_path_factory.mktemp(f"llava_{kind}_{legacy}")
    clip_dir = tiny_dirs["clip"]
    base = _base_llm(root / "vicuna", legacy, seed=1)
    raw = json.loads((base / "config.json").read_text())
    extras = {**LLAVA_EXTRAS, "mm_vision_tower": str(clip_dir), "_name_or_path": str(base)}
    tower = CLIPVisionModel.from_pretrained(clip_dir)
    if kind == "finetuned":
        ckpt = root / "llava-v1.5-tiny"
        torch.manual_seed(2)  # finetuned LLM weights differ from the base
        llm = LlamaForCausalLM(LlamaConfig.from_pretrained(base)).eval()
        proj = _projector(3)
        sd = {**{k: v.detach().clone() for k, v in llm.state_dict().items()},
              **{"model.mm_projector." + k: v.detach().clone() for k, v in proj.state_dict().items()}}
        ckpt.mkdir()
        save_file(sd, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
        (ckpt / "config.json").write_text(json.dumps({**raw, **extras, "architectures": ["LlavaLlamaForCausalLM"]}))
        # LLaVA's v1 training sets pad = unk and saves the tokenizer with the checkpoint
        make_sp_llama_tokenizer(ckpt, legacy=legacy, pad_token="<unk>")
        # reference weights: read back from the file, as LLaVA would load them
        files = load_file(str(ckpt / "model.safetensors"))
        ref_llm = LlamaForCausalLM(LlamaConfig.from_pretrained(base)).eval()
        ref_llm.load_state_dict({k: v for k, v in files.items() if not k.startswith("model.mm_projector.")},
                                strict=True)
        ref_proj = _projector(0)
        ref_proj.load_state_dict({k[len("model.mm_projector."):]: v for k, v in files.items()
                                  if k.startswith("model.mm_projector.")}, strict=True)
        tok_dir = ckpt
    else:
        ckpt = root / "llava-v1.5-tiny-pretrain"
        ckpt.mkdir()
        proj = _projector(4)
        torch.save({"model.mm_projector." + k: v for k, v in proj.state_dict().items()}, ckpt / "mm_projector.bin")
        (ckpt / "config.json").write_text(json.dumps({**raw, **extras, "architectures": ["LlamaForCausalLM"]}))
        ref_llm = LlamaForCausalLM.from_pretrained(base).eval()
        ref_proj = _projector(0)
        ref_proj.load_state_dict({k[len("model.mm_projector."):]: v for k, v in
                                  torch.load(ckpt / "mm_projector.bin", weights_only=True).items()}, strict=True)
        tok_dir = base
    return ckpt, base, tok_dir, LlavaReference(ref_llm, tower, ref_proj)


@pytest.fixture(scope="module")
def imported(kind, checkpoint):
    path, base = checkpoint[0], checkpoint[1]
    return import_original_llava(path, llm=base if kind == "stage1" else None)


# --- sptok itself -------------------------------------------------------------------------------------
@pytest.mark.parametrize("legacy_mode", [False, True])
def test_sp_tokenizer_behaves_like_vicunas(tmp_path, legacy_mode):
    tok = make_sp_llama_tokenizer(tmp_path, legacy=legacy_mode)
    again = AutoTokenizer.from_pretrained(tmp_path)
    pieces = lambda s: tok.convert_ids_to_tokens(tok(s).input_ids)  # noqa: E731
    assert pieces("A chat")[:2] == ["<s>", "▁A"]
    assert pieces("<s>A chat")[:3] == ["<s>", "<s>", "▁A" if legacy_mode else "A"]
    assert pieces("\nWhat")[:3] == ["<s>", "▁", "<0x0A>"]  # a chunk starting after an image gets its own "▁"
    after_eos = pieces("a</s>USER:")
    assert after_eos[2] == "</s>" and after_eos[3].startswith("▁") == legacy_mode
    assert tok.pad_token is None and tok.bos_token_id == 1 and tok.eos_token_id == 2
    # the chunks LLaVA tokenizes here are tokenized as the slow (sentencepiece) LlamaTokenizer did
    for _, prompt, _ in PROMPTS.values():
        for chunk in prompt.split("<image>"):
            assert tok(chunk).input_ids == again(chunk).input_ids == slow_llama_ids(tmp_path, chunk, legacy_mode)
    first = sptok.train_sp_model()  # deterministic: retraining gives the same model
    sptok._MODELS.clear()
    assert sptok.train_sp_model() == first == (tmp_path / "tokenizer.model").read_bytes()


# --- stage 1 layout, mm_use_im_start_end ---------------------------------------------------------------
def test_stage1_folder_is_recognised_and_needs_the_base_llm(tiny_dirs, tmp_path):
    base = _base_llm(tmp_path / "vicuna", legacy=False, seed=1)
    run = tmp_path / "pretrain"
    run.mkdir()
    raw = json.loads((base / "config.json").read_text())
    cfg = {**raw, **LLAVA_EXTRAS, "mm_vision_tower": str(tiny_dirs["clip"]), "_name_or_path": "lmsys/vicuna-7b-v1.5",
           "architectures": ["LlamaForCausalLM"]}
    (run / "config.json").write_text(json.dumps(cfg))
    torch.save({"model.mm_projector." + k: v for k, v in _projector(4).state_dict().items()}, run / "mm_projector.bin")
    assert checkpoint_format(run) == "original-llava"
    with pytest.raises(FileNotFoundError, match=r"pass llm=.*lmsys/vicuna-7b-v1\.5"):
        open_checkpoint(run)
    model, processor = open_checkpoint(run, llm=base)
    assert model.config.projector == "mlp2x_gelu" and processor.image_aspect == "pad"
    # a plain LLM config is still refused, so is a stage-1 config whose architecture contradicts model_type
    (run / "config.json").write_text(json.dumps({**raw, "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ValueError, match="llava_llama"):
        import_original_llava(run, llm=base)
    (run / "config.json").write_text(json.dumps({**cfg, "architectures": ["MistralForCausalLM"]}))
    with pytest.raises(ValueError, match="do not match"):
        import_original_llava(run, llm=base)


def test_mm_use_im_start_end_is_refused(tiny_dirs, tmp_path):
    base = _base_llm(tmp_path / "vicuna", legacy=False, seed=1)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    raw = json.loads((base / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**raw, **LLAVA_EXTRAS, "mm_vision_tower": str(tiny_dirs["clip"]),
                                                  "architectures": ["LlavaLlamaForCausalLM"],
                                                  "mm_use_im_start_end": True}))
    with pytest.raises(ValueError, match="mm_use_im_start_end=true is not supported"):
        import_original_llava(ckpt, llm=base)


# --- parity --------------------------------------------------------------------------------------------
def test_import_records_llava_tokenization(imported, tmp_path):
    _, processor = imported
    assert processor.tokenization == "llava"
    processor.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "processor_config.json").read_text())["tokenization"] == "llava"
    assert LlavakitProcessor.from_pretrained(tmp_path).tokenization == "llava"


@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_input_ids_match_tokenizer_image_token(checkpoint, legacy, imported, prompt):
    _, _, tok_dir, _ = checkpoint
    model, processor = imported
    turns, text, n_images = PROMPTS[prompt]
    images = _images(n_images)
    ref_tok = AutoTokenizer.from_pretrained(tok_dir)  # the tokenizer as LLaVA loads it (no <image> token)
    ref = tokenizer_image_token(text, ref_tok)
    for chunk in text.split("<image>"):  # the reference is the slow sentencepiece tokenizer LLaVA ran with
        assert ref_tok(chunk).input_ids == slow_llama_ids(tok_dir, chunk, legacy)
    want = expand(ref, processor.image_token_id, processor.image_seq_length)

    got = processor(text=text, images=images, return_tensors="pt")["input_ids"][0].tolist()
    assert got == want, _diff(processor.tokenizer, got, want)

    template = get_template("vicuna_v1", processor.tokenizer)
    assert template.render_prompt(turns).removeprefix(processor.tokenizer.bos_token) == text
    chat = encode_prompt(turns, template, processor.tokenizer, processor.image_token_id, processor.image_seq_length,
                         tokenization=processor.tokenization)
    assert chat == want, _diff(processor.tokenizer, chat, want)
    # what `llavakit chat` / eval feed the model
    batch = Generator(model, processor, template="vicuna_v1").encode([turns], [images])
    assert batch["input_ids"][0].tolist() == want


def test_logits_and_greedy_tokens_match_llava(checkpoint, imported):
    path, _, tok_dir, reference = checkpoint
    model, processor = imported
    _, text, n_images = PROMPTS["two_images"]
    images = _images(n_images)
    pixels = reference_pixels(images, checkpoint_clip(path))
    ref_ids = tokenizer_image_token(text, AutoTokenizer.from_pretrained(tok_dir))
    ref_logits = reference.logits(ref_ids, pixels)
    vocab = ref_logits.shape[-1]

    # the model on LLaVA's own ids (independent of tokenization): same maths
    ids = torch.tensor([expand(ref_ids, processor.image_token_id, processor.image_seq_length)])
    with torch.no_grad():
        got = model(input_ids=ids, pixel_values=pixels).logits[..., :vocab]
    assert (got - ref_logits).abs().max().item() <= 1e-4

    # end to end: llavakit's processor (pixels and ids) -> logits and greedy tokens
    inputs = processor(text=text, images=images, return_tensors="pt")
    torch.testing.assert_close(inputs["pixel_values"], pixels, atol=1e-6, rtol=0)
    with torch.no_grad():
        got = model(**inputs).logits[..., :vocab]
    assert got.shape == ref_logits.shape, f"{got.shape[1]} positions, LLaVA has {ref_logits.shape[1]}"
    assert (got - ref_logits).abs().max().item() <= 1e-4
    n = 6
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False)
    assert out[0, inputs["input_ids"].shape[1]:].tolist() == reference.greedy(ref_ids, pixels, n)


# --- helpers -------------------------------------------------------------------------------------------
def checkpoint_clip(path) -> str:
    return json.loads((path / "config.json").read_text())["mm_vision_tower"]


def _diff(tokenizer, got: list[int], want: list[int]) -> str:
    """Where two id lists first differ, as tokens."""
    k = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    show = lambda ids: tokenizer.convert_ids_to_tokens(ids[max(0, k - 3):k + 4])  # noqa: E731
    return f"{len(got)} ids vs LLaVA's {len(want)}; first difference at {k}: llavakit {show(got)} LLaVA {show(want)}"
