"""The start-up cache (llavakit.data.token_cache): a hit gives exactly what reading, checking and tokenizing
the data gives; any input that changes the result misses; a damaged file is rebuilt, never used; bad rows
are refused the same way with a cache present; with two processes the data is prepared once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import llavakit
from llavakit.data import dataset as dataset_module
from llavakit.data.dataset import SupervisedDataset
from llavakit.data.formats import load_conversations
from llavakit.data.images import ImageLimits
from llavakit.data.sampler import LengthGroupedSampler
from llavakit.data.templates import get_template
from llavakit.data.token_cache import prepare
from llavakit.train.batches import prepare_data
from llavakit.train.config import ConfigError, DataConfig, RunConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def _rows() -> list[dict]:
    names = list(COLOURS)
    rows = []
    for i in range(14):
        a, b = names[i % 3], names[(i + 1) % 3]
        if i % 4 == 0:
            rows.append({"id": f"t{i}", "conversations": [{"from": "human", "value": f"Say {a}."},
                                                          {"from": "gpt", "value": a}]})
        elif i % 4 == 1:
            rows.append({"id": f"m{i}", "images": [f"{a}.png", f"{b}.png"], "conversations": [
                {"from": "human", "value": "<image>\n<image>\nWhich colour is the second one?"},
                {"from": "gpt", "value": b}]})
        else:
            rows.append({"id": f"s{i}", "image": f"{a}.png", "conversations": [
                {"from": "human", "value": "<image>\nWhat colour is this?"}, {"from": "gpt", "value": a},
                {"from": "human", "value": "Are you sure? " * (i % 3 + 1)}, {"from": "gpt", "value": f"Yes, {a}."},
                {"from": "human", "value": "Say it again, slowly."}, {"from": "gpt", "value": f"{a}, {a}, {a}."}]})
    # one sample the length policy truncates, one it drops (its first round alone is too long)
    rows.append({"id": "long", "image": "red.png", "conversations": [
        {"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "Tell me more. " * 30}, {"from": "gpt", "value": "It is red. " * 20}]})
    rows.append({"id": "huge", "conversations": [{"from": "human", "value": "Word " * 200},
                                                 {"from": "gpt", "value": "ok"}]})
    return rows


@pytest.fixture()
def data(tmp_path):
    (tmp_path / "images").mkdir()
    for n, rgb in COLOURS.items():
        Image.new("RGB", (32, 32), rgb).save(tmp_path / "images" / f"{n}.png")
    (tmp_path / "train.json").write_text(json.dumps(_rows()))
    return tmp_path


@pytest.fixture(scope="module")
def processor(tiny_dirs):
    _, proc = llavakit.build(tiny_dirs["clip"], tiny_dirs["llama"])
    return proc


def _prepare(data: Path, processor, cache_dir, template="vicuna_v1", max_length=200, notes=None, **kw) -> object:
    said = notes if notes is not None else []
    return prepare(str(data / "train.json"), processor, get_template(template, processor.tokenizer),
                   image_folder=str(data / "images"), max_length=max_length, cache_dir=cache_dir,
                   say=said.append, **kw)


def _snapshot(prepared) -> dict:
    """Everything training takes from the prepared data, as plain Python values."""
    ds = prepared.dataset
    samples = []
    for i in range(len(ds)):
        ids, labels = ds.tokens(i)
        conv = ds.conversation(i)
        samples.append((ids.tolist(), labels.tolist(), conv.id, conv.index, conv.source, ds.num_images(i),
                        conv.images))
    order = list(LengthGroupedSampler(ds.lengths, 4, has_image=ds.has_image, seed=3))
    return {"samples": samples, "lengths": list(ds.lengths), "has_image": list(ds.has_image), "order": order,
            "report": ds.report.as_dict(), "skipped": ds.report.skipped_indices,
            "problems": [p.as_dict() | {"source": p.source} for p in prepared.problems]}


def test_a_hit_gives_exactly_what_an_uncached_build_gives(data, processor, tmp_path):
    reference = _snapshot(_prepare(data, processor, None))
    assert reference["report"]["truncated"] == 1 and reference["report"]["dropped"] == 1  # the policy is exercised
    assert reference["report"]["kept"] == 15
    cold_notes, warm_notes = [], []
    cold = _prepare(data, processor, tmp_path / "cache", notes=cold_notes)
    assert any(n.startswith("start-up cache: wrote") for n in cold_notes)
    assert _snapshot(cold) == reference
    warm = _prepare(data, processor, tmp_path / "cache", notes=warm_notes)
    assert any(n.startswith("start-up cache: hit") for n in warm_notes), warm_notes
    assert isinstance(warm.dataset.store.arrays["ids"], np.memmap)  # read from the file, not rebuilt
    assert _snapshot(warm) == reference
    # the items a dataloader gets, images included
    plain = _prepare(data, processor, None).dataset
    for i in (0, 1, 5):
        a, b = plain[i], warm.dataset[i]
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
        assert (a["pixel_values"] is None) == (b["pixel_values"] is None)
        if a["pixel_values"] is not None:
            assert torch.equal(a["pixel_values"], b["pixel_values"])


def test_tokens_match_the_per_sample_encoder(data, processor):
    """An independent check of the compact store: every sample's ids/labels equal `encode`'s lists."""
    from llavakit.data.tokenize import encode

    convs, _ = load_conversations(data / "train.json", image_folder=data / "images", on_error="collect")
    ds = SupervisedDataset(convs, processor, "vicuna_v1", max_length=200)
    template = get_template("vicuna_v1", processor.tokenizer)
    kept = {c.index: c for c in convs}
    for i in range(len(ds)):
        enc = encode(kept[ds.conversation(i).index], template, processor.tokenizer, processor.image_token_id,
                     processor.num_image_tokens(), max_length=200)
        ids, labels = ds.tokens(i)
        assert ids.tolist() == enc.input_ids and labels.tolist() == enc.labels


def test_worker_processes_give_the_same_dataset(data, processor, monkeypatch):
    convs, _ = load_conversations(data / "train.json", image_folder=data / "images", on_error="collect")
    one = SupervisedDataset(convs, processor, "vicuna_v1", max_length=200, workers=1)
    monkeypatch.setattr(dataset_module, "CHUNK", 3)
    monkeypatch.setattr(dataset_module, "PARALLEL_FROM", 4)
    two = SupervisedDataset(convs, processor, "vicuna_v1", max_length=200, workers=2)
    assert one.lengths == two.lengths and one.report.as_dict() == two.report.as_dict()
    for i in range(len(one)):
        assert all(torch.equal(a, b) for a, b in zip(one.tokens(i), two.tokens(i)))
        assert one.conversation(i) == two.conversation(i)


def _rewrite_same_size(data: Path) -> None:
    path = data / "train.json"
    text = path.read_text()
    new = text.replace("What colour is this?", "What colour is that?")
    assert len(new) == len(text) and new != text
    st = path.stat()
    path.write_text(new)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and same mtime: only the content differs


@pytest.mark.parametrize("change", ["content", "template", "max_length", "tokenizer", "image"])
def test_an_input_that_changes_the_result_misses(data, processor, tiny_dirs, tmp_path, change):
    cache = tmp_path / "cache"
    _prepare(data, processor, cache)
    kw, proc = {}, processor
    if change == "content":
        _rewrite_same_size(data)
    elif change == "template":
        kw["template"] = "chatml"
    elif change == "max_length":
        kw["max_length"] = 160
    elif change == "tokenizer":
        _, proc = llavakit.build(tiny_dirs["clip"], tiny_dirs["llama"])
        proc.tokenizer.add_tokens(["colourful"])  # one more token: other ids
    else:
        Image.new("RGB", (32, 32), (1, 2, 3)).save(data / "images" / "red.png")
    notes = []
    got = _prepare(data, proc, cache, notes=notes, **kw)
    assert not any(n.startswith("start-up cache: hit") for n in notes), notes
    assert _snapshot(got) == _snapshot(_prepare(data, proc, None, **kw))
    if change == "content":
        assert "that?" in proc.tokenizer.decode(got.dataset.tokens(2)[0])


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_a_damaged_cache_file_is_rebuilt_not_used(data, processor, tmp_path, damage):
    cache = tmp_path / "cache"
    reference = _snapshot(_prepare(data, processor, cache))
    (path,) = cache.glob("startup-*.llkt")
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[:len(raw) - 100]
    elif damage == "flip":
        raw[-70] ^= 0xFF  # inside the arrays
    else:
        raw[20:40] = b"x" * 20  # inside the JSON header
    path.write_bytes(bytes(raw))
    notes = []
    got = _prepare(data, processor, cache, notes=notes)
    assert any("is unusable" in n and "rebuilding" in n for n in notes), notes
    assert any(n.startswith("start-up cache: wrote") for n in notes)
    assert _snapshot(got) == reference
    hit = []
    _prepare(data, processor, cache, notes=hit)
    assert any(n.startswith("start-up cache: hit") for n in hit)


def _cfg(data: Path, out: Path, **d) -> RunConfig:
    return RunConfig(data=DataConfig(train=str(data / "train.json"), image_folder=str(data / "images"),
                                     max_length=200, **d), train=TrainConfig(output_dir=str(out)))


def test_bad_rows_are_refused_the_same_way_with_a_cache(data, processor, tmp_path):
    rows = _rows()
    rows[1]["images"][1] = "missing.png"
    rows[0]["conversations"] = [{"from": "human", "value": "only a question"}]
    (data / "train.json").write_text(json.dumps(rows))
    cfg = _cfg(data, tmp_path / "run")
    errors, outputs = [], []
    for _ in range(2):  # the first run writes the cache, the second reads it
        said = []
        with pytest.raises(ConfigError) as e:
            prepare_data(cfg, processor, say=said.append)
        errors.append(str(e.value))
        outputs.append([s for s in said if not s.startswith("start-up cache")])
    assert errors[0] == errors[1] and "2 sample(s)" in errors[0]
    assert outputs[0] == outputs[1]
    text = "\n".join(outputs[0])
    assert "sample #1 (id='m1')" in text and "missing.png" in text and "sample #0 (id='t0')" in text
    assert any(n.startswith("start-up cache: hit") for n in said)
    skipping = _cfg(data, tmp_path / "run", skip_invalid=True)
    assert len(prepare_data(skipping, processor, say=lambda *a: None)) == 13


def test_the_cache_folder_comes_from_the_config(data, processor, tmp_path, monkeypatch):
    from llavakit.train.batches import data_cache_dir

    monkeypatch.delenv("LLAVAKIT_DATA_CACHE", raising=False)
    assert data_cache_dir(_cfg(data, tmp_path / "run")) == tmp_path / "run" / "data_cache"
    monkeypatch.setenv("LLAVAKIT_DATA_CACHE", str(tmp_path / "env"))
    assert data_cache_dir(_cfg(data, tmp_path / "run")) == tmp_path / "env"
    assert data_cache_dir(_cfg(data, tmp_path / "run", cache_dir=str(tmp_path / "mine"))) == tmp_path / "mine"
    assert data_cache_dir(_cfg(data, tmp_path / "run", cache=False)) is None
    prepare_data(_cfg(data, tmp_path / "run", cache_dir=str(tmp_path / "mine")), processor, say=lambda *a: None)
    assert len(list((tmp_path / "mine").glob("startup-*.llkt"))) == 1


def test_data_that_is_not_a_json_file_is_read_every_time(processor, tmp_path):
    import datasets

    Image.new("RGB", (32, 32), (1, 2, 3)).save(tmp_path / "a.png")
    rows = [{"id": "x", "image": str(tmp_path / "a.png"), "conversations": [
        {"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "dark"}]}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    notes = []
    got = prepare(str(tmp_path / "hf"), processor, get_template("vicuna_v1", processor.tokenizer),
                  cache_dir=tmp_path / "c", say=notes.append, limits=ImageLimits())
    assert len(got.dataset) == 1 and any("start-up cache: off" in n for n in notes)
    assert not (tmp_path / "c").exists()


WORKER = r"""
import hashlib, json, os, sys
from accelerate import Accelerator
import llavakit
from llavakit.train.config import DataConfig, RunConfig, TrainConfig
from llavakit.train.loop import prepare_data_once

clip, llama, data, out = sys.argv[1:5]
accelerator = Accelerator(cpu=True)
rank = accelerator.process_index
_, processor = llavakit.build(clip, llama)
cfg = RunConfig(data=DataConfig(train=f"{data}/train.json", image_folder=f"{data}/images", max_length=200),
                train=TrainConfig(output_dir=out))
said = []
try:
    ds = prepare_data_once(cfg, processor, accelerator, said.append, None)
    result = {"n": len(ds), "lengths": hashlib.sha256(json.dumps(ds.lengths).encode()).hexdigest()}
except Exception as e:
    result = {"error": f"{type(e).__name__}: {e}"}
result["cache"] = [s for s in said if s.startswith("start-up cache")]
with open(f"{out}.{rank}.json", "w") as f:
    json.dump(result, f)
"""


def _two_ranks(tiny_dirs, data: Path, out: Path) -> list[dict]:
    script = out.parent / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "ACCELERATE_USE_CPU": "1"}
    env.pop("LLAVAKIT_DATA_CACHE", None)
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
              str(29600 + os.getpid() % 300), str(script), str(tiny_dirs["clip"]), str(tiny_dirs["llama"]),
              str(data), str(out)]
    try:
        r = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the two ranks hung (no result in {e.timeout} s)")
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(Path(f"{out}.{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.slow
def test_two_processes_prepare_the_data_once(tiny_dirs, data, tmp_path):
    zero, one = _two_ranks(tiny_dirs, data, tmp_path / "run")
    assert zero["n"] == one["n"] == 15 and zero["lengths"] == one["lengths"]
    assert [c.split(" /")[0] for c in zero["cache"]] == ["start-up cache: wrote"]  # rank 0 built it
    assert [c.split(" /")[0] for c in one["cache"]] == ["start-up cache: hit"]  # rank 1 only read it
    assert len(list((tmp_path / "run" / "data_cache").glob("startup-*.llkt"))) == 1
    # bad data: rank 0's refusal reaches rank 1 (no rank left waiting)
    rows = _rows()
    rows[1]["images"][1] = "missing.png"
    (data / "train.json").write_text(json.dumps(rows))
    zero, one = _two_ranks(tiny_dirs, data, tmp_path / "bad")
    assert "1 sample(s)" in zero["error"] and zero["error"].split(": ", 1)[1] == one["error"].split(": ", 1)[1]


@pytest.mark.slow  # ~50 s on 2 busy cores: three `llavakit train` processes
def test_startup_benchmark_smoke(tmp_path):
    out = tmp_path / "s.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "startup_scale.py"), "--n", "200", "--json",
                        str(out), "--workdir", str(tmp_path / "wd")], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["n"] == 200 and row["warm"]["cache_hit"] and not row["cold"]["cache_hit"]
    assert row["probe_warm"]["samples"] == 200 and row["cold"]["first_step_s"] > 0
