"""Shared fixtures: tiny components written as HF model folders once per test session.

Everything is loaded back *by path* through the same Auto-class code a hub id takes.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """Paths of tiny saved components: {"clip", "siglip", "llama", "mistral", "qwen2"}."""
    from llavakit.demo.tiny import save_tiny_llm, save_tiny_vision

    root = tmp_path_factory.mktemp("tiny")
    dirs = {kind: save_tiny_vision(root / kind, kind) for kind in ("clip", "siglip")}
    for fam in ("llama", "mistral", "qwen2"):
        dirs[fam] = save_tiny_llm(root / fam, fam)
    return dirs


@pytest.fixture(scope="session")
def tiny_built(tiny_dirs):
    """A (model, processor) pair: tiny CLIP + tiny Llama, mlp2x_gelu, in eval mode."""
    import llavakit

    torch.manual_seed(0)
    model, processor = llavakit.build(tiny_dirs["clip"], tiny_dirs["llama"], projector="mlp2x_gelu")
    return model.eval(), processor
