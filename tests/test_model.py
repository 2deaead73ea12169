"""The composite model: splice, batching, generation, save/load, build checks."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import llavakit
from llavakit.model.build import ComponentWeightsError
from llavakit.model.projectors import PROJECTORS


def _images(n, size=(40, 32)):
    colours = [(230, 20, 20), (20, 230, 20), (20, 20, 230), (200, 200, 20)]
    return [Image.new("RGB", size, colours[i % 4]) for i in range(n)]


def _noise_images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray((torch.rand(36, 36, 3, generator=g) * 255).byte().numpy()) for _ in range(n)]


def test_forward_loss_and_gradients_reach_projector_and_llm_only(tiny_built):
    model, processor = tiny_built
    inputs = processor(text=["<image> What colour is this? red"], images=_images(1), return_tensors="pt")
    labels = inputs["input_ids"].clone()
    labels[labels == processor.image_token_id] = -100
    model.train()
    try:
        out = model(**inputs, labels=labels)
        assert torch.isfinite(out.loss)
        out.loss.backward()
        assert model.multi_modal_projector.linear_1.weight.grad is not None
        assert model.language_model.get_input_embeddings().weight.grad is not None
        assert all(p.grad is None for p in model.vision_tower.parameters())
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def test_swapping_two_images_swaps_where_their_features_land(tiny_built):
    model, processor = tiny_built
    a, b = _noise_images(2)
    text = "first <image> then <image> end"
    ab = processor(text=text, images=[a, b], return_tensors="pt")
    ba = processor(text=text, images=[b, a], return_tensors="pt")
    assert torch.equal(ab["input_ids"], ba["input_ids"])
    with torch.no_grad():
        e_ab = model.embed(ab["input_ids"], ab["pixel_values"])[0]
        e_ba = model.embed(ba["input_ids"], ba["pixel_values"])[0]
    slots = (ab["input_ids"][0] == processor.image_token_id).nonzero().flatten()
    n = model.config.image_seq_length
    first, second = slots[:n], slots[n:]
    torch.testing.assert_close(e_ab[first], e_ba[second], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(e_ab[second], e_ba[first], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(e_ab[first], e_ab[second], atol=1e-3)
    text_pos = (ab["input_ids"][0] != processor.image_token_id).nonzero().flatten()
    assert torch.equal(e_ab[text_pos], e_ba[text_pos])
    # images stay where <image> stands: the text between them is not moved to the front
    ids = ab["input_ids"][0].tolist()
    assert ids.index(processor.image_token_id) > 1 and slots[n] - slots[n - 1] > 1


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_mixing_zero_one_two_images_matches_samples_alone(tiny_built, side):
    model, processor = tiny_built
    texts = ["no image here, just words", "<image> one image", "two: <image> and <image>!"]
    imgs = _noise_images(3, seed=1)
    per_sample = [[], imgs[:1], imgs[1:]]
    batch = processor(text=texts, images=per_sample, return_tensors="pt", padding_side=side)
    assert batch["pixel_values"].shape[0] == 3
    with torch.no_grad():
        logits = model(**batch).logits
        for i, (t, ims) in enumerate(zip(texts, per_sample)):
            alone = processor(text=t, images=ims or None, return_tensors="pt")
            ref = model(**alone).logits[0]
            keep = batch["attention_mask"][i].bool()
            torch.testing.assert_close(logits[i][keep], ref, atol=1e-5, rtol=1e-4)


def test_placeholder_feature_count_mismatch_error_states_both_counts(tiny_built):
    model, processor = tiny_built
    inputs = processor(text="<image> and <image>", images=_images(2), return_tensors="pt")
    n = model.config.image_seq_length
    with pytest.raises(ValueError, match=rf"{2 * n} placeholder.*{n} features"):
        model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"][:1])
    with pytest.raises(ValueError, match=r"no pixel_values"):
        model(input_ids=inputs["input_ids"])
    with pytest.raises(ValueError, match=r"2 <image> marker\(s\) but 1 image"):
        processor(text="<image> and <image>", images=_images(1))


def test_cached_and_uncached_greedy_generation_agree_in_a_mixed_batch(tiny_built):
    model, processor = tiny_built
    texts = ["USER: <image> <image> describe ASSISTANT:", "USER: hello ASSISTANT:", "USER: <image> what? ASSISTANT:"]
    imgs = _noise_images(3, seed=2)
    batch = processor(text=texts, images=[imgs[:2], [], imgs[2:]], return_tensors="pt", padding_side="left")
    kw = dict(max_new_tokens=8, do_sample=False, min_new_tokens=8)
    with torch.no_grad():
        cached = model.generate(**batch, use_cache=True, **kw)
        uncached = model.generate(**batch, use_cache=False, **kw)
    assert cached.shape == (3, batch["input_ids"].shape[1] + 8)
    assert torch.equal(cached, uncached)
    # each row's continuation equals what the row generates on its own
    with torch.no_grad():
        alone = processor(text=texts[1], return_tensors="pt")
        single = model.generate(**alone, **kw)
    assert torch.equal(single[0, -8:], cached[1, -8:])


def test_save_load_round_trip_gives_identical_logits(tiny_built, tiny_dirs, tmp_path):
    model, processor = tiny_built
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert list(tmp_path.glob("*.safetensors")) and not list(tmp_path.glob("*.bin"))
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "llavakit"
    assert cfg["components"] == {"vision": str(tiny_dirs["clip"]), "llm": str(tiny_dirs["llama"])}
    loaded, proc2 = llavakit.load(tmp_path)
    inputs = processor(text="look <image> here <image>", images=_noise_images(2, seed=3), return_tensors="pt")
    inputs2 = proc2(text="look <image> here <image>", images=_noise_images(2, seed=3), return_tensors="pt")
    assert torch.equal(inputs["input_ids"], inputs2["input_ids"])
    assert torch.equal(inputs["pixel_values"], inputs2["pixel_values"])
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded.eval()(**inputs2).logits)
    assert not any(p.requires_grad for p in loaded.vision_tower.parameters())


@pytest.mark.parametrize("projector", sorted(PROJECTORS))
def test_placeholders_per_image_equal_features_for_every_projector(tiny_dirs, projector, tmp_path):
    vision = tiny_dirs["clip"]
    if projector == "identity":  # needs vision width == LLM width (64)
        from llavakit.demo.tiny import save_tiny_vision

        vision = save_tiny_vision(tmp_path / "clip64", "clip", hidden_size=64)
    model, processor = llavakit.build(vision, tiny_dirs["llama"], projector=projector)
    pixel_values = processor.preprocess_images(_images(2))
    with torch.no_grad():
        feats = model.get_image_features(pixel_values)
    assert feats.shape == (2, processor.image_seq_length, model.config.text_config.hidden_size)
    ids = processor(text="a <image> b", images=_images(1))["input_ids"][0]
    assert ids.count(processor.image_token_id) == feats.shape[1]
    grid = model.config.patch_grid
    expected = (grid // 2) ** 2 if projector.startswith(("avgpool", "pixelshuffle")) else grid**2
    assert feats.shape[1] == expected


def test_feature_selection_and_layers(tiny_dirs):
    grid_tokens = (32 // 8) ** 2
    m, p = llavakit.build(tiny_dirs["clip"], tiny_dirs["llama"], vision_feature_select="cls_patch",
                          vision_feature_layer=[-2, -1])
    assert m.config.vision_prefix_tokens == 1  # CLIP's CLS, measured, not guessed
    assert p.image_seq_length == grid_tokens + 1
    assert m.multi_modal_projector.linear_1.in_features == 2 * m.config.vision_config.hidden_size
    m2, p2 = llavakit.build(tiny_dirs["siglip"], tiny_dirs["llama"])
    assert m2.config.vision_prefix_tokens == 0 and p2.image_seq_length == grid_tokens
    with pytest.raises(ValueError, match="needs vision_feature_select='patch'"):
        llavakit.build(tiny_dirs["clip"], tiny_dirs["llama"], projector="avgpool2x2_mlp2x_gelu",
                       vision_feature_select="cls_patch")


def test_unknown_projector_lists_valid_names(tiny_dirs):
    with pytest.raises(ValueError, match=r"unknown projector 'mlp2x_relu'.*mlp2x_gelu.*avgpool2x2_mlp2x_gelu"):
        llavakit.build(tiny_dirs["clip"], tiny_dirs["llama"], projector="mlp2x_relu")


@pytest.mark.parametrize("llm,vision", [("mistral", "siglip"), ("qwen2", "clip")])
def test_other_llm_and_vision_families(tiny_dirs, llm, vision):
    model, processor = llavakit.build(tiny_dirs[vision], tiny_dirs[llm])
    inputs = processor(text=["<image> hi", "text only"], images=[_images(1), []], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 2
    assert processor.tokenizer.pad_token_id is not None


def test_build_adds_tokens_with_mean_initialised_rows(tiny_dirs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"])
    old = base.get_input_embeddings().weight
    model, processor = llavakit.build(tiny_dirs["clip"], tiny_dirs["llama"])
    tok = processor.tokenizer
    assert len(tok) == len(AutoTokenizer.from_pretrained(tiny_dirs["llama"])) + 2  # <image>, <pad>
    new = model.get_input_embeddings().weight
    assert new.shape[0] == len(tok)
    torch.testing.assert_close(new[: old.shape[0]], old)
    for tid in (processor.image_token_id, tok.pad_token_id):
        torch.testing.assert_close(new[tid], old.mean(0))
    out_new = model.get_output_embeddings().weight
    torch.testing.assert_close(out_new[processor.image_token_id], base.get_output_embeddings().weight.mean(0))


def test_build_keeps_pretrained_component_weights(tiny_dirs):
    from transformers import AutoModel

    model, _ = llavakit.build(tiny_dirs["clip"], tiny_dirs["llama"])
    ref = AutoModel.from_pretrained(tiny_dirs["clip"])
    for (k, v), (k2, v2) in zip(model.vision_tower.state_dict().items(), ref.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_build_raises_on_a_vision_checkpoint_with_a_missing_weight(tiny_dirs, tmp_path):
    from safetensors.torch import load_file, save_file
    import shutil

    broken = tmp_path / "broken_clip"
    shutil.copytree(tiny_dirs["clip"], broken)
    state = load_file(broken / "model.safetensors")
    victim = next(k for k in state if "layers.1.mlp.fc1.weight" in k)
    del state[victim]
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ComponentWeightsError, match=r"missing weights \(1\).*layers\.1\.mlp\.fc1\.weight"):
        llavakit.build(broken, tiny_dirs["llama"])


def test_build_from_a_full_dual_encoder_clip_checkpoint(tiny_dirs, tmp_path):
    from transformers import CLIPConfig, CLIPModel

    from llavakit.demo.tiny import tiny_image_processor, tiny_vision_config

    vc = tiny_vision_config("clip")
    cfg = CLIPConfig(text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4), vision_config=vc.to_dict(), projection_dim=16)
    CLIPModel(cfg).save_pretrained(tmp_path / "full_clip")
    tiny_image_processor("clip").save_pretrained(tmp_path / "full_clip")
    model, processor = llavakit.build(tmp_path / "full_clip", tiny_dirs["llama"])
    assert type(model.vision_tower).__name__ == "CLIPVisionModel"
    assert processor.image_seq_length == 16


def test_pad_aspect_fills_with_the_processor_mean_colour(tiny_dirs):
    _, processor = llavakit.build(tiny_dirs["clip"], tiny_dirs["llama"], image_aspect="pad")
    wide = Image.new("RGB", (64, 16), (255, 255, 255))
    px = processor.preprocess_images([wide])[0]  # [3, 32, 32], normalised
    # top row is padding: mean colour normalises to ~0; the middle row is the white image
    assert px[:, 0, :].abs().max() < 0.02
    assert px[:, 16, :].min() > 1.0


@pytest.mark.parametrize("items", [None, 7])
def test_supervised_only_logits_give_the_same_loss_and_gradients(tiny_built, items):
    model, processor = tiny_built
    batch = processor(text=["<image> what colour? red", "say hi: hi there"], images=[_images(1), []],
                      return_tensors="pt", padding_side="right")
    labels = batch["input_ids"].clone()
    labels[:, :-3] = -100  # supervise the last three tokens of each row (pads included in row 2: fine)
    labels[batch["attention_mask"] == 0] = -100
    extra = {} if items is None else {"num_items_in_batch": torch.tensor(items)}
    model.train()
    try:
        full = model(**batch, labels=labels, **extra)
        full.loss.backward()
        g_full = model.multi_modal_projector.linear_1.weight.grad.clone()
        model.zero_grad(set_to_none=True)
        sparse = model(**batch, labels=labels, supervised_logits_only=True, **extra)
        sparse.loss.backward()
        g_sparse = model.multi_modal_projector.linear_1.weight.grad.clone()
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
    assert sparse.logits is None
    torch.testing.assert_close(sparse.loss, full.loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(g_sparse, g_full, atol=1e-6, rtol=1e-4)


def test_cached_vision_features_give_the_same_logits_as_pixels(tiny_built):
    model, processor = tiny_built
    batch = processor(text="a <image> b <image>", images=_noise_images(2, seed=5), return_tensors="pt")
    with torch.no_grad():
        feats = model.vision_features(batch["pixel_values"])  # what a stage-1 cache stores
        ref = model(**batch).logits
        got = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], vision_features=feats).logits
    torch.testing.assert_close(got, ref)


def test_kv_cache_is_accepted_under_both_names_without_warnings(tiny_built):
    """transformers >= 5.24 passes the KV cache as `cache`, older releases as `past_key_values`; both
    give the same next-token logits as a full forward, and no deprecation warning is raised."""
    import warnings

    from transformers import DynamicCache

    model, processor = tiny_built
    ids = processor(text="USER: <image>\nWhat? ASSISTANT:", images=[Image.new("RGB", (40, 30), "red")],
                    return_tensors="pt")
    full_ids = torch.cat([ids["input_ids"], torch.tensor([[5]])], dim=1)
    with torch.no_grad():
        want = model(input_ids=full_ids, pixel_values=ids["pixel_values"]).logits[:, -1]
        for name in ("cache", "past_key_values"):
            kv = DynamicCache(config=model.config.text_config)
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                model(input_ids=ids["input_ids"], pixel_values=ids["pixel_values"], use_cache=True, **{name: kv})
                got = model(input_ids=torch.tensor([[5]]), use_cache=True, **{name: kv}).logits[:, -1]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_generation_never_emits_the_image_placeholder(tiny_built):
    """Even when the image token is the most likely next token (here forced through the LM head), greedy and
    sampled generation skip it instead of crashing on the next step."""
    import copy

    model, processor = tiny_built
    model = copy.deepcopy(model)
    img = model.config.image_token_id
    batch = processor(text="USER: <image> what? ASSISTANT:", images=_noise_images(1), return_tensors="pt")
    head = model.get_output_embeddings()
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states[-1][0, -1]  # what the head reads
        head.weight[img] = hidden / hidden.norm() * head.weight.norm(dim=1).max() * 50
        logits = model(**batch).logits[0, -1]
    assert logits.argmax().item() == img  # without suppression greedy decoding would pick it
    for kw in (dict(do_sample=False), dict(do_sample=True, top_k=2), dict(do_sample=False, suppress_tokens=[0])):
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=6, min_new_tokens=6, **kw)
        new = out[0, batch["input_ids"].shape[1]:]
        assert img not in new.tolist()
        if "suppress_tokens" in kw:
            assert 0 not in new.tolist()  # the caller's own suppressions are kept
