"""benchmarks/train_throughput.py runs end to end at a micro shape and writes the rows it prints."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "train_throughput.py"
ROW_KEYS = {"row", "config", "samples_per_s", "real_tokens_per_s", "padding_fraction", "peak_mem_mib",
            "delta_mem_mib", "mfu", "ratio_vs_peer", "samples"}


def _run(tmp_path, *extra) -> tuple[dict, str]:
    out = tmp_path / "bench.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--shape", "micro", "--warmup", "1", "--repeats", "1",
                           "--workdir", str(tmp_path / "work"), "--json", str(out), *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_every_row_of_both_stages_runs_beside_the_peer(tmp_path):
    report, stdout = _run(tmp_path, "--inline")  # one process: fast; memory is not isolated per row
    s2, s1 = report["stage2"], report["stage1"]
    has_trl = importlib.util.find_spec("trl") is not None  # its three rows are left out without it
    has_bnb = importlib.util.find_spec("bitsandbytes") is not None  # and the two 8-bit AdamW rows without bitsandbytes
    assert len(s2) == 13 + 3 * has_trl + 2 * has_bnb and len(s1) == 3
    assert ("bitsandbytes is not installed" in stdout) == (not has_bnb)
    assert ("trl is not installed" in stdout) == (not has_trl)
    for r in s2 + s1:
        assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
        assert r["samples_per_s"] > 0 and r["real_tokens_per_s"] > 0 and 0 <= r["padding_fraction"] < 1
    peer, baseline = s2[0], s2[1]
    assert peer["config"]["system"] == "peer" and peer["ratio_vs_peer"] == pytest.approx(1.0)
    # A full epoch each: both sides train on exactly the same samples and the same real tokens.
    assert peer["samples"] == baseline["samples"] == 16
    per_sample = lambda r: r["real_tokens_per_s"] / r["samples_per_s"]  # noqa: E731
    assert per_sample(peer) == pytest.approx(per_sample(baseline), rel=1e-6)
    assert per_sample(s2[4]) == pytest.approx(per_sample(baseline), rel=1e-6)  # packing: same tokens
    packed = [r for r in s2 if r["config"]["pack"]]
    assert packed and all(r["padding_fraction"] == 0 for r in packed)
    best = max((r for r in s2 if r["config"]["system"] == "llavakit"), key=lambda r: r["real_tokens_per_s"])
    assert report["best"] == best["row"] and report["ratio_vs_peer"] == pytest.approx(best["ratio_vs_peer"])
    assert s1[2]["config"]["cache"] and s1[2]["cache_build_s"] > 0 and report["stage1_cache_speedup"] > 0
    assert "× peer" in stdout and "llavakit best (stage 2)" in stdout
    chunked = [r for r in s2 if r["config"]["chunk"]]
    assert len(chunked) == 5 + 2 * has_bnb and all(r["config"]["sup"] for r in chunked)
    in_bwd = [r for r in s2 if r["config"]["in_bwd"]]  # AdamW inside backward: same samples, same tokens
    assert len(in_bwd) == 2 + 2 * has_bnb and all(per_sample(r) == pytest.approx(per_sample(chunked[0]), rel=1e-6)
                                                  for r in in_bwd)
    assert per_sample(chunked[0]) == pytest.approx(per_sample(baseline), rel=1e-6)  # same samples, same tokens


def test_trl_row_runs_beside_the_peer_and_llavakit(tmp_path):
    """TRL's SFTTrainer at the micro shape (seconds): same samples and real tokens as the peer, its own VLM
    collator, and the JSON's ratios against it."""
    trl = pytest.importorskip("trl", reason="the TRL rows need trl: pip install 'llavakit[bench]'")
    # rows 1 (peer), 10 (llavakit's grouping + sup-only + chunked loss + workers), 12 and 13 (TRL with and without
    # gradient checkpointing); micro samples have one or two images
    report, stdout = _run(tmp_path, "--inline", "--stages", "2", "--rows", "1,10,12,13")
    peer, ours, trl_default, trl_plain = report["stage2"]
    assert [r["config"]["system"] for r in report["stage2"]] == ["peer", "llavakit", "trl", "trl"]
    assert trl_default["config"]["ckpt"] and not trl_plain["config"]["ckpt"]
    assert report["trl_version"] == trl.__version__ and report["trl_row"] == trl_default["row"]
    for r in (trl_default, trl_plain):
        assert r["collator"] == "DataCollatorForVisionLanguageModeling"
        assert r["samples"] == peer["samples"] == 16
        assert r["padding_fraction"] == pytest.approx(peer["padding_fraction"])
        # TRL renders the conversations through the same exported chat template: the same real tokens per sample
        assert r["real_tokens_per_s"] / r["samples_per_s"] == pytest.approx(
            peer["real_tokens_per_s"] / peer["samples_per_s"], rel=1e-6)
    assert report["ratio_vs_trl"] == pytest.approx(ours["real_tokens_per_s"] / trl_default["real_tokens_per_s"])
    assert report["memory_ratio_vs_trl"] == pytest.approx(ours["peak_mem_mib"] / trl_default["peak_mem_mib"])
    assert trl_default["ratio_vs_trl"] == pytest.approx(1.0)
    assert "× TRL" in stdout and "mem × TRL" in stdout and "target >= 2.0" in stdout


@pytest.mark.slow
def test_rows_in_their_own_processes(tmp_path):
    # bf16 autocast on both sides: the code path of the GPU shape.
    report, _ = _run(tmp_path, "--stages", "2", "--rows", "1,8", "--steps", "1", "--precision", "bf16")
    assert report["precision"] == "bf16"
    assert [r["config"]["system"] for r in report["stage2"]] == ["peer", "llavakit"]
    assert all(r["peak_mem_mib"] > 0 for r in report["stage2"]) and report["ratio_vs_peer"] > 0


def test_gguf_round_trip_benchmark_reports_every_dtype(tmp_path, tiny_dirs):
    """benchmarks/gguf_roundtrip.py on a small model: every dtype's export, sizes, speeds and agreement."""
    pytest.importorskip("llama_cpp", reason="needs llama-cpp-python: pip install 'llavakit[llamacpp]'")
    pytest.importorskip("gguf", reason="needs gguf: pip install 'llavakit[gguf]'")
    import torch
    from PIL import Image

    import llavakit

    torch.manual_seed(0)
    model, processor = llavakit.build(tiny_dirs["siglip"], tiny_dirs["llama"])
    processor.template = "vicuna_v1"
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    (tmp_path / "images").mkdir()
    rows = []
    for i, colour in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (32, 32), colour).save(tmp_path / "images" / f"{i}.png")
        rows.append({"id": f"q{i}", "question": "<image>\nWhat colour is it?", "image": f"{i}.png", "answer": colour})
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "gguf.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gguf_roundtrip.py"), "--model",
                           str(tmp_path / "model"), "--questions", str(tmp_path / "q.jsonl"), "--image-folder",
                           str(tmp_path / "images"), "--threads", "1", "--max-new-tokens", "4", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["questions"] == 3 and result["llavakit_tok_s"] > 0
    for dtype in ("f32", "f16", "q8_0"):
        r = result[dtype]
        assert r["text_mib"] > 0 and r["mmproj_mib"] > 0 and r["llamacpp_tok_s"] > 0
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["same_answer"] <= 1
    # SigLIP has no CLS token, so llama.cpp computes llavakit's own graph: f32 answers are identical
    assert result["f32"]["same_answer"] == result["f32"]["same_as_its_graph"] == 1.0
    assert "| f16 |" in proc.stdout
