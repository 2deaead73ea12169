"""A scaled-down `llavakit demo`: the trained model must use its images (with-image >> blind)."""

from __future__ import annotations

import json

import pytest

import llavakit


@pytest.mark.slow
def test_small_demo_sees_the_images(tmp_path):
    from llavakit.demo.pipeline import run_demo

    out = tmp_path / "demo"
    metrics = run_demo(out, seed=0, scale="small", say=lambda *a, **k: None)
    assert json.loads((out / "metrics.json").read_text()) == metrics
    types = metrics["types"]
    assert set(types) == {"colour", "shape", "position", "count", "yesno", "two_image"}
    assert metrics["seconds"] > 0
    for name in ("loss_stage1.png", "loss_stage2.png", "sample_conversation.txt", "predictions.jsonl"):
        assert (out / name).is_file(), name
    # the model looks: on some type it is far above what a blind answerer can reach, and on average too
    assert max(t["with_image"] - t["blind"] for t in types.values()) >= 0.4, types
    mean_with = sum(t["with_image"] for t in types.values()) / len(types)
    mean_blind = sum(t["blind"] for t in types.values()) / len(types)
    assert mean_with - mean_blind >= 0.15, types
    for t in types.values():  # blind stays near chance: the questions alone do not give answers away
        assert t["blind"] <= t["chance"] + 0.2, types
    model, processor = llavakit.load(out / "model")
    assert processor.template == "vicuna_v1"
