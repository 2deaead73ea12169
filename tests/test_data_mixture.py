"""Mixtures (`llavakit.data.mixture`): each sampling rule takes the rows it says, LLaVA-NeXT's data YAML
is read as is (and samples like LLaVA-NeXT's own loader), errors still name file and row, `data
check/stats` report per source, and training reads a mixture the same way in every process."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from PIL import Image

from llavakit.cli import main
from llavakit.data.mixture import load_mixture, read_sources, select_rows
from llavakit.data.sources import DataSourceError
from llavakit.data.validate import validate


def _rows(prefix, n, image=None):
    rows = []
    for i in range(n):
        row = {"id": f"{prefix}{i}", "conversations": [
            {"from": "human", "value": ("<image>\n" if image else "") + f"Question {i}?"},
            {"from": "gpt", "value": f"Answer {i}."}]}
        if image:
            row["image"] = image
        rows.append(row)
    return rows


@pytest.fixture
def files(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "imgs" / "x.png")
    (tmp_path / "a.json").write_text(json.dumps(_rows("a", 10, image="x.png")))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in _rows("b", 6)) + "\n")
    return tmp_path


def _ids(mixture):
    return [c.id for c in mixture.conversations]


@pytest.mark.parametrize("rule, expected", [
    ("all", [f"a{i}" for i in range(10)]),
    ("first:3", ["a0", "a1", "a2"]),
    ("first:25%", ["a0", "a1", "a2"]),  # 2.5 rows rounds up, as LLaVA-NeXT does
    ("end:2", ["a8", "a9"]),
    ("repeat:2", [f"a{i}" for i in range(10)] * 2),
])
def test_each_fixed_rule_takes_the_rows_it_names(files, rule, expected):
    m = load_mixture([{"path": str(files / "a.json"), "image_folder": str(files / "imgs"), "sampling": rule}])
    assert _ids(m) == expected
    assert [c.index for c in m.conversations] == list(range(len(expected)))  # one index space
    assert m.sources[0].rows == 10 and m.sources[0].samples == len(expected)


def test_random_rules_are_seeded_subsets(files):
    src = [{"path": str(files / "a.json"), "sampling": "random:4"}]
    first = _ids(load_mixture(src, seed=1))
    assert first == _ids(load_mixture(src, seed=1))  # every process / resume draws the same rows
    assert len(set(first)) == 4 and set(first) <= {f"a{i}" for i in range(10)}
    draws = {tuple(_ids(load_mixture(src, seed=s))) for s in range(6)}
    assert len(draws) > 1  # the seed decides the draw
    half = _ids(load_mixture([{"path": str(files / "a.json"), "sampling": "random:50%"}], seed=3))
    assert len(half) == 5 and len(set(half)) == 5


def test_asking_for_more_rows_than_a_source_has_takes_all_with_a_note(files):
    m = load_mixture([{"path": str(files / "b.jsonl"), "sampling": "first:20"}])
    assert len(m.conversations) == 6 and "asked for 20 rows, the source has 6" in m.sources[0].note


def test_llava_next_yaml_is_read_as_is_and_samples_like_llava_next(files):
    """The YAML format and the first/end/percent arithmetic of LLaVA-NeXT's
    `LazySupervisedDataset.__init__` (llava/train/train.py), quoted below as the reference."""
    (files / "mix.yaml").write_text(
        "datasets:\n"
        "  - json_path: a.json\n    sampling_strategy: \"first:30%\"\n"
        "  - json_path: b.jsonl\n    sampling_strategy: \"end:4\"\n"
        "  - json_path: b.jsonl\n    sampling_strategy: all\n")

    def llava_next(data, strategy):  # LLaVA-NeXT's code, minus its random branch
        number = None
        if ":" in strategy:
            strategy, number = strategy.split(":")
            if "%" in number:
                number = math.ceil(int(number.split("%")[0]) * len(data) / 100)
            else:
                number = int(number)
        if strategy == "first" and number is not None:
            data = data[:number]
        elif strategy == "end" and number is not None:
            data = data[-number:]
        return data

    a, b = _rows("a", 10, image="x.png"), _rows("b", 6)
    expected = [r["id"] for r in llava_next(a, "first:30%") + llava_next(b, "end:4") + llava_next(b, "all")]
    m = load_mixture(str(files / "mix.yaml"), image_folder=str(files / "imgs"))
    assert _ids(m) == expected
    assert [s.name for s in m.sources] == [str(files / "a.json"), str(files / "b.jsonl"), f"{files / 'b.jsonl'} #2"]
    # the same ids from two sources are not duplicates of one another; within one source they are
    found = validate((m.conversations, m.problems))
    assert not [p for p in found if "duplicate id" in p.reason]


def test_bad_rows_keep_their_file_and_row_and_count_per_source(files):
    rows = _rows("c", 4)
    rows[2]["conversations"] = "not a list"
    (files / "c.json").write_text(json.dumps(rows))
    m = load_mixture([str(files / "b.jsonl"), {"path": str(files / "c.json"), "sampling": "repeat:2"}])
    assert len(m.conversations) + len({p.index for p in m.problems if p.severity == "error"}) == 6 + 8
    bad = [p for p in m.problems if p.severity == "error"]
    assert [p.index for p in bad] == [6 + 2, 6 + 4 + 2]  # both copies of row 2, at their mixture index
    assert all(p.source == f"{files / 'c.json'} row 2" for p in bad)
    table = m.table()
    assert "repeat:2" in table and table.splitlines()[2].split()[-2:] == ["2", "0"]


def test_data_check_and_stats_report_per_source(files, capsys):
    rows = _rows("c", 3)
    rows[1]["conversations"][1]["value"] = " "
    (files / "c.json").write_text(json.dumps(rows))
    (files / "mix.yaml").write_text(yaml.safe_dump({"datasets": [
        {"json_path": "a.json", "sampling_strategy": "first:2"}, {"json_path": "c.json", "sampling_strategy": "all"}]}))
    assert main(["data", "check", str(files / "mix.yaml"), "--image-folder", str(files / "imgs")]) == 1
    out = capsys.readouterr().out
    assert "per source:" in out and "c.json row 1" in out and "empty turn" in out
    lines = {line.split()[0]: line.split() for line in out.split("per source:")[1].splitlines() if ".json" in line}
    assert lines[str(files / "a.json")][1:] == ["first:2", "10", "2", "0", "0"]
    assert lines[str(files / "c.json")][1:] == ["all", "3", "3", "1", "0"]
    assert main(["data", "stats", str(files / "mix.yaml"), "--image-folder", str(files / "imgs"),
                 "--histogram", str(files / "h.png")]) == 0
    out = capsys.readouterr().out
    assert "per source:" in out and "samples read" in out and "5" in out.split("samples read")[1].split("\n")[0]
    counts = {line.split()[0]: line.split()[1:] for line in out.split("turns")[-1].splitlines() if ".json" in line}
    assert counts == {str(files / "a.json"): ["2", "2", "4"], str(files / "c.json"): ["3", "0", "6"]}


@pytest.mark.parametrize("entry, message", [
    ({"path": "a.json", "sampling": "first:ten"}, "is not a sampling rule"),
    ({"path": "a.json", "sampling": "repeat:50%"}, "is not a sampling rule"),
    ({"path": "a.json", "sampling": "first:0%"}, "percentage"),
    ({"path": "a.json", "weight": 2}, "unknown key(s) ['weight']"),
    ({"sampling": "all"}, "has no path"),
])
def test_bad_entries_are_clear_errors(files, entry, message):
    with pytest.raises(DataSourceError, match="data.train\\[0\\]") as e:
        read_sources([entry])
    assert message in str(e.value)


def test_select_rows_counts():
    assert select_rows("first:10%", 95) == (list(range(10)), "")
    assert select_rows("random:3", 3, seed=0)[0] == [0, 1, 2]
    assert len(select_rows("repeat:3", 4)[0]) == 12


def test_config_accepts_a_source_list_and_refuses_a_bad_rule(tmp_path):
    from llavakit.train.config import ConfigError, load_config

    base = {"model": {"vision": "v", "llm": "l"},
            "data": {"train": [{"path": "a.json", "sampling": "first:10%"}, "b.jsonl"], "seed": 3}}
    cfg = load_config(base=base)
    assert cfg.data.train[1] == "b.jsonl" and cfg.data.seed == 3
    base["data"]["train"][0]["sampling"] = "some"
    with pytest.raises(ConfigError, match="is not a sampling rule"):
        load_config(base=base)


def test_a_mixture_trains_and_shards_exactly(tiny_dirs, files, tmp_path):
    """`llavakit train` on a mixture: the per-source table is printed, and the dataset every process
    builds is the same, so the sharded epoch order covers the single-process order exactly."""
    from llavakit.train import load_config, run_training
    from llavakit.train.batches import epoch_order, prepare_data, rank_batches
    from llavakit.train.runlog import data_fingerprint

    tree = {"model": {"vision": str(tiny_dirs["clip"]), "llm": str(tiny_dirs["llama"])},
            "data": {"train": [{"path": str(files / "a.json"), "image_folder": str(files / "imgs"),
                                "sampling": "random:5"}, {"path": str(files / "b.jsonl"), "sampling": "repeat:2"}],
                     "max_length": 128, "seed": 7},
            "train": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "batch_size": 4, "report_to": "none",
                      "log_every": 1}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(tree))
    run = run_training(tmp_path / "cfg.yaml")
    assert (run / "model").is_dir()
    cfg = load_config(tmp_path / "cfg.yaml")
    import llavakit

    _, processor = llavakit.build(tiny_dirs["clip"], tiny_dirs["llama"])
    said = []
    one, two = prepare_data(cfg, processor, say=said.append), prepare_data(cfg, processor, say=lambda s: None)
    assert len(one) == 5 + 12 and data_fingerprint(one) == data_fingerprint(two)
    assert any("random:5" in s and "repeat:2" in s for s in said)
    order = epoch_order(one, cfg, 0, global_batch=4)
    assert order == epoch_order(two, cfg, 0, global_batch=4)
    shards = [rank_batches(order, 2, 2, r) for r in (0, 1)]
    merged = [i for b0, b1 in zip(*shards) for i in b0 + b1]
    assert merged[:len(order)] == order
