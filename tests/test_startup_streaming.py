"""The streaming cold build (llavakit.data.startup_build): read, validated and tokenized a chunk of rows at a
time, it gives exactly what reading everything at once gives — the same samples, problems, report, mixture
table and cache file, whatever the chunk size, with invalid rows and duplicate ids on chunk boundaries — and
it holds one chunk of conversations at a time, not all of them."""

from __future__ import annotations

import gc
import json
import tracemalloc
from pathlib import Path

import pytest
import torch
from PIL import Image

import llavakit
from llavakit.data import dataset as dataset_module
from llavakit.data import idset, startup_build, token_store
from llavakit.data.conversation import Conversation
from llavakit.data.images import ImageLimits
from llavakit.data.templates import get_template
from llavakit.data.token_cache import prepare
from llavakit.data.video import VideoLimits
from llavakit.train.batches import prepare_data
from llavakit.train.config import ConfigError, DataConfig, RunConfig, TrainConfig

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
MAX_LENGTH = 200


def _row(i: int) -> dict:
    a = list(COLOURS)[i % 3]
    if i % 4 == 0:
        return {"id": f"t{i}", "conversations": [{"from": "human", "value": f"Say {a}."}, {"from": "gpt", "value": a}]}
    return {"id": f"s{i}", "image": f"{a}.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is this?"}, {"from": "gpt", "value": a},
        {"from": "human", "value": "Are you sure? " * (i % 3 + 1)}, {"from": "gpt", "value": f"Yes, {a}."}]}


def _lines() -> list[str]:
    """JSONL lines: good rows, and bad ones next to each other so that chunks of 1, 2, 3, 5 rows cut between
    them: unreadable lines, rows with errors, duplicate ids (within and across chunks), a blank line."""
    rows: list = [_row(i) for i in range(34)]
    rows[2]["conversations"] = []  # no turns
    rows[3]["image"] = "missing.png"  # image missing
    rows[5]["id"] = rows[6]["id"] = rows[9]["id"] = "dup-a"  # duplicates across boundaries
    rows[11]["image"] = rows[12]["image"] = "broken.png"  # corrupt image, twice
    rows[11]["id"] = rows[12]["id"] = "dup-b"  # errors and a duplicate at once
    rows[14]["conversations"] = [{"from": "human", "value": "Word " * 200}, {"from": "gpt", "value": "ok"}]  # dropped
    rows[15]["conversations"] += [{"from": "human", "value": "Tell me more. " * 30},
                                  {"from": "gpt", "value": "It is red. " * 20}]  # truncated
    rows[17] = [1, 2]  # not an object
    rows[18]["id"] = 7  # an integer id, the same text as the next one's
    rows[19]["id"] = "7"
    rows[22]["conversations"] = [{"from": "human", "value": "only a question"}]  # nothing to answer
    rows[30]["id"] = "dup-a"  # far from the first one
    lines = [json.dumps(r) for r in rows]
    lines[8] = '{"id": "bad8", "conversations": [{"from": "human"'  # unreadable, id salvaged
    lines[9:9] = ["{not json at all"]
    lines[20:20] = [""]  # a blank line: an index with no row
    return lines


@pytest.fixture()
def data(tmp_path):
    (tmp_path / "images").mkdir()
    for n, rgb in COLOURS.items():
        Image.new("RGB", (32, 32), rgb).save(tmp_path / "images" / f"{n}.png")
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    lines = _lines()
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    rows = [json.loads(x) for x in lines if x.startswith('{"id"') and x.endswith("}")]
    (tmp_path / "more.json").write_text(json.dumps(rows[:12]))
    (tmp_path / "mix.yaml").write_text(
        "datasets:\n"
        f"  - json_path: {tmp_path / 'train.jsonl'}\n    sampling_strategy: random:60%\n"
        f"  - json_path: {tmp_path / 'more.json'}\n    sampling_strategy: repeat:2\n"
        f"  - json_path: {tmp_path / 'train.jsonl'}\n    sampling_strategy: end:9\n"
        f"  - json_path: {tmp_path / 'more.json'}\n    sampling_strategy: first:40%\n"
        f"  - json_path: {tmp_path / 'train.jsonl'}\n")
    return tmp_path


@pytest.fixture(scope="module")
def processor(tiny_dirs):
    _, proc = llavakit.build(tiny_dirs["clip"], tiny_dirs["llama"])
    return proc


@pytest.fixture()
def chunked(monkeypatch):
    """Set the streaming chunk (rows), and make every other unit small too (store parts, id folds)."""
    monkeypatch.setattr(token_store.StoreBuilder, "SEAL_EVERY", 4)
    monkeypatch.setattr(idset.SeenIds, "FOLD", 3)

    def set_rows(n: int) -> None:
        monkeypatch.setattr(startup_build, "STREAM_ROWS", n)
    return set_rows


def _prepare(data: Path, name: str, processor, cache_dir=None, workers: int = 1, notes=None):
    return prepare(str(data / name), processor, get_template("vicuna_v1", processor.tokenizer),
                   image_folder=str(data / "images"), max_length=MAX_LENGTH, cache_dir=cache_dir, workers=workers,
                   say=(notes if notes is not None else []).append)


def _whole(data: Path, name: str, processor):
    """The reference: every row read into one list, validated, then tokenized."""
    return startup_build.build_whole(
        str(data / name), processor, get_template("vicuna_v1", processor.tokenizer), image_folder=str(data / "images"),
        format="auto", seed=0, max_length=MAX_LENGTH, overflow="truncate", limits=ImageLimits(), check_images=True,
        workers=1, video_limits=VideoLimits())


def _snapshot(prepared) -> dict:
    ds = prepared.dataset
    samples = []
    for i in range(len(ds)):
        ids, labels = ds.tokens(i)
        conv = ds.conversation(i)
        samples.append((ids.tolist(), labels.tolist(), conv.id, conv.index, conv.source, ds.num_images(i),
                        conv.images))
    return {"samples": samples, "lengths": list(ds.lengths), "has_image": list(ds.has_image),
            "report": ds.report.as_dict(), "skipped": ds.report.skipped_indices,
            "problems": [p.as_dict() | {"source": p.source} for p in prepared.problems],
            "table": prepared.mixture_table}


@pytest.mark.parametrize("name", ["train.jsonl", "mix.yaml"])
def test_any_chunk_size_gives_what_reading_everything_gives(data, processor, chunked, tmp_path, name):
    reference = _snapshot(_whole(data, name, processor))
    problems = reference["problems"]
    assert {"no turns", "image missing", "unreadable json", "wrong type", "duplicate id"} <= \
        {p["reason"].split(":")[0] for p in problems}
    assert reference["report"]["dropped"] and reference["report"]["truncated"]
    if name == "mix.yaml":
        assert reference["table"] is not None and reference["samples"][-1][4].endswith("train.jsonl row 35")
    files = []
    for rows in (1, 2, 3, 5, 10**6):
        chunked(rows)
        assert _snapshot(_prepare(data, name, processor)) == reference, rows  # data.cache: false
        notes = []
        cold = _prepare(data, name, processor, tmp_path / f"cache-{rows}", notes=notes)
        assert any(n.startswith("start-up cache: wrote") for n in notes), notes
        assert _snapshot(cold) == reference, rows
        (path,) = (tmp_path / f"cache-{rows}").glob("startup-*.llkt")
        files.append(path.read_bytes())
        warm = _prepare(data, name, processor, tmp_path / f"cache-{rows}", notes=notes)
        assert any(n.startswith("start-up cache: hit") for n in notes)
        assert _snapshot(warm) == reference
    assert all(f == files[0] for f in files)  # the same cache file, byte for byte


def test_chunks_tokenized_in_worker_processes_give_the_same(data, processor, chunked, monkeypatch):
    reference = _snapshot(_whole(data, "mix.yaml", processor))
    monkeypatch.setattr(dataset_module, "CHUNK", 2)
    monkeypatch.setattr(dataset_module, "PARALLEL_FROM", 4)
    chunked(7)
    got = _prepare(data, "mix.yaml", processor, workers=2)
    assert _snapshot(got) == reference
    whole = _whole(data, "mix.yaml", processor).dataset
    for i in range(len(whole)):  # the items a dataloader gets, images included
        a, b = whole[i], got.dataset[i]
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
        assert (a["pixel_values"] is None) == (b["pixel_values"] is None)
        if a["pixel_values"] is not None:
            assert torch.equal(a["pixel_values"], b["pixel_values"])


def _cfg(data: Path, out: Path, **d) -> RunConfig:
    return RunConfig(data=DataConfig(train=str(data / "train.jsonl"), image_folder=str(data / "images"),
                                     max_length=MAX_LENGTH, **d), train=TrainConfig(output_dir=str(out)))


def test_bad_rows_are_refused_or_skipped_the_same_whatever_the_chunk(data, processor, chunked, tmp_path):
    seen = []
    for rows, cache in ((10**6, False), (3, False), (3, True), (3, True)):  # the last one reads the cache
        chunked(rows)
        said = []
        with pytest.raises(ConfigError) as e:
            prepare_data(_cfg(data, tmp_path / "run", cache=cache), processor, say=said.append)
        seen.append((str(e.value), [s for s in said if not s.startswith("start-up cache")]))
        kept = prepare_data(_cfg(data, tmp_path / "run", cache=cache, skip_invalid=True), processor,
                            say=lambda *a: None)
        seen[-1] += (len(kept), [kept.tokens(i)[0].tolist() for i in range(len(kept))])
    assert all(s == seen[0] for s in seen)
    text = "\n".join(seen[0][1])
    assert "sample #3 (id='s3')" in text and "missing.png" in text and "sample #8 (id='bad8')" in text
    assert "sample(s)" in seen[0][0] and "data.skip_invalid=true" in seen[0][0]


def _many_rows(path: Path, n: int) -> None:
    path.write_text("\n".join(json.dumps(_row(i) | {"id": f"r{i}"}) for i in range(n)) + "\n")


def test_the_build_holds_one_chunk_of_conversations_not_all(data, processor, chunked, monkeypatch):
    """Live `Conversation` objects, counted at each chunk's checks and tokenization: bounded by the chunk."""
    n, rows = 600, 50
    _many_rows(data / "many.jsonl", n)
    live = []
    validate, encode_into = startup_build.validate, startup_build.encode_into

    def count():
        gc.collect()
        live.append(sum(1 for o in gc.get_objects() if type(o) is Conversation))

    def counting_validate(*a, **k):
        count()
        return validate(*a, **k)

    def counting_encode_into(*a, **k):
        count()
        return encode_into(*a, **k)

    monkeypatch.setattr(startup_build, "validate", counting_validate)
    monkeypatch.setattr(startup_build, "encode_into", counting_encode_into)
    chunked(rows)
    got = _prepare(data, "many.jsonl", processor)
    assert len(got.dataset) == n and len(live) == 2 * (n // rows)
    assert max(live) <= rows + 2, max(live)  # one chunk (plus what the reader holds), not the n rows
    live.clear()
    _whole(data, "many.jsonl", processor)  # the measure sees it when everything is held
    assert max(live) >= n


def test_python_allocations_grow_far_less_per_row_than_reading_everything(data, processor, chunked, monkeypatch):
    """tracemalloc's peak over a build, at n and 3n rows: the streaming build's grows by its compact arrays
    (a few hundred bytes a row), the whole-list build's by a conversation a row as well."""
    chunked(100)
    monkeypatch.setattr(token_store.StoreBuilder, "SEAL_EVERY", 256)  # as at scale: few parts, ids folded
    monkeypatch.setattr(idset.SeenIds, "FOLD", 64)
    for n in (600, 1800):
        _many_rows(data / f"many-{n}.jsonl", n)
    _prepare(data, "many-600.jsonl", processor)  # imports and caches warmed up first

    def peak(build) -> int:
        gc.collect()
        tracemalloc.start()
        try:
            build()
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    streaming = [peak(lambda: _prepare(data, f"many-{n}.jsonl", processor)) for n in (600, 1800)]
    whole = [peak(lambda: _whole(data, f"many-{n}.jsonl", processor)) for n in (600, 1800)]
    assert streaming[1] - streaming[0] < 0.4 * (whole[1] - whole[0]), (streaming, whole)


def test_a_chunk_of_mostly_bad_rows_still_goes_to_the_worker_processes(data, processor, chunked, monkeypatch):
    """Parallel or not is decided for the build (rows read), not by a chunk's valid samples; a chunk is
    `STREAM_ROWS` x workers rows, split so that every worker gets several tasks. The pools are observed."""
    import multiprocessing

    rows = [_row(i) | {"id": f"r{i}"} for i in range(60)]
    for i in range(2, 40):
        rows[i]["conversations"] = []  # invalid: the first chunk (40 rows) holds 2 valid samples
    (data / "bad.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    monkeypatch.setattr(dataset_module, "PARALLEL_FROM", 30)  # the build's 60 rows: parallel, as at scale
    chunked(20)
    reference = _snapshot(_prepare(data, "bad.jsonl", processor, workers=1))
    pools, tasks = [], []
    real = multiprocessing.get_context

    class Spy:
        def __init__(self, ctx):
            self.ctx = ctx

        def Pool(self, n):
            pools.append(n)
            pool = self.ctx.Pool(n)
            imap = pool.imap

            def counted(fn, ranges):
                tasks.append(len(ranges))
                return imap(fn, ranges)
            pool.imap = counted
            return pool

    monkeypatch.setattr(multiprocessing, "get_context", lambda method=None: Spy(real(method)))
    assert startup_build.chunk_rows(2) == 40
    got = _prepare(data, "bad.jsonl", processor, workers=2)
    assert _snapshot(got) == reference and len(got.dataset) == 22
    assert pools == [2, 2], pools  # both chunks, the one with 38 bad rows of 40 included
    assert tasks == [2, 7], tasks  # 2 valid samples: a task each; 20: tasks of 3, about 4 per worker


def test_a_mixture_store_keeps_a_name_per_source_and_a_row_column(data, processor, chunked, tmp_path, monkeypatch):
    """A mixture's "<file> row N" sources: the store keeps each file's name once and N in an int64 column; the
    strings read back (built or from the cache) are those the mixture gave."""
    from llavakit.data.mixture import load_mixture

    mixture = load_mixture(str(data / "mix.yaml"), str(data / "images"), "auto", seed=0)
    given = {c.index: c.source for c in mixture.conversations}
    assert len(set(given.values())) > 20
    chunked(5)
    for run in (0, 1):  # built, then read from the cache
        ds = _prepare(data, "mix.yaml", processor, tmp_path / "cache").dataset
        got = [ds.conversation(i) for i in range(len(ds))]
        assert len(got) > 20 and all(c.source == given[c.index] for c in got)
        assert len(token_store.Strings.of(ds.store.arrays, "source_names")) == 2  # the 2 files' names
        assert ds.store.arrays["source_row"].dtype == "int64"
    held = []
    finish = token_store.StoreBuilder.finish

    def spy(self):
        held.append(len(self._source_names))
        return finish(self)
    monkeypatch.setattr(token_store.StoreBuilder, "finish", spy)
    _prepare(data, "mix.yaml", processor)
    assert held == [2], held  # a name per source file (train.jsonl and more.json), not one per row
    plain = _prepare(data, "train.jsonl", processor).dataset  # not a mixture: the reader's source, no row
    assert len({plain.conversation(i).source for i in range(len(plain))}) == 1
    assert (plain.store.arrays["source_row"] == -1).all()


def test_an_error_mid_build_closes_the_reader(data, processor, chunked, monkeypatch):
    """An exception between chunks closes the row generators at once (the reader's file is not left open)."""
    closed = []
    rows = startup_build.MixtureStream.rows

    def watched(self):
        try:
            yield from rows(self)
        finally:
            closed.append(True)

    def failing(*a, **k):
        raise RuntimeError("checks failed")

    monkeypatch.setattr(startup_build.MixtureStream, "rows", watched)
    monkeypatch.setattr(startup_build, "validate", failing)
    chunked(3)
    try:
        startup_build.build_streaming(
            str(data / "train.jsonl"), processor, get_template("vicuna_v1", processor.tokenizer),
            image_folder=str(data / "images"), format="auto", seed=0, max_length=MAX_LENGTH, overflow="truncate",
            limits=ImageLimits(), check_images=True, workers=1, video_limits=VideoLimits())
    except RuntimeError as e:  # its traceback holds the build's frame: only closing closes the generators
        assert str(e) == "checks failed" and e.__traceback__ is not None
        assert closed == [True]
    else:
        pytest.fail("no error")
