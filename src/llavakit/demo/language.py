"""Did the LLM keep its language? Text-only checks for a demo whose LLM is a real, pretrained one.

Visual instruction tuning can make a language model forget what it knew (or answer everything in the
new task's one-word style). Two measurements, taken on the base LLM before training and on the
trained model after, both text only:

* **General questions** (``texts/general_questions.json``, shipped with the demo): facts, arithmetic
  and short instructions, each with short key answers ("Paris", "12"/"twelve"). Each is asked as one
  user turn through llavakit's `Generator` (greedy, the model's template, no image). A question is
  *still answered as before* when the base answer contains a key and the trained answer does too, or,
  for a question the base gets wrong, when the trained model gives the same (wrong) answer
  (`same_answer`). The headline number is the fraction of questions still answered as before.
* **Perplexity** of the LLM on held-out general English prose (``texts/held_out_prose.txt``, written
  for this demo, never trained on): plain text, one paragraph per sequence, no template.

Keeping it: like LLaVA-1.5, which mixes text-only conversations into its visual instruction data, the
demo's stage 2 mixes in text-only *replay* conversations: other general prompts
(``texts/replay_prompts.json``, none of them an evaluation question) answered by the base LLM itself
(`replay_conversations`), so stage 2 also rehearses the LLM's own way of answering.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

import torch

QUESTIONS_FILE = "general_questions.json"
PROSE_FILE = "held_out_prose.txt"
REPLAY_FILE = "replay_prompts.json"


def texts_dir() -> Path:
    """The demo's text files (package data: ``llavakit/demo/texts/``)."""
    from importlib.resources import files

    d = Path(str(files("llavakit.demo") / "texts"))
    missing = [f for f in (QUESTIONS_FILE, PROSE_FILE, REPLAY_FILE) if not (d / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{', '.join(missing)} missing from {d}; reinstall llavakit")
    return d


def load_questions(limit: int | None = None) -> list[dict]:
    """The general questions: [{"id", "kind", "question", "keys"}] (the first `limit` when given)."""
    questions = json.loads((texts_dir() / QUESTIONS_FILE).read_text(encoding="utf-8"))
    return questions[:limit] if limit else questions


def load_replay_prompts(limit: int | None = None) -> list[str]:
    """General prompts for text-only replay in stage 2 (disjoint from the evaluation questions)."""
    prompts = json.loads((texts_dir() / REPLAY_FILE).read_text(encoding="utf-8"))
    return prompts[:limit] if limit else prompts


def load_prose() -> list[str]:
    """The held-out prose, one string per paragraph."""
    text = (texts_dir() / PROSE_FILE).read_text(encoding="utf-8")
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


# --- comparing answers -----------------------------------------------------------------------------
def _words(text: str) -> str:
    """Lower case, punctuation (except inside numbers and formulas) as spaces, single-spaced."""
    text = re.sub(r"[^\w\s.+\-]|[.](?!\d)|(?<!\d)[.]", " ", text.lower())
    return " ".join(text.split())


def key_present(answer: str, keys: Sequence[str]) -> bool:
    """Whether any key occurs in `answer` as a whole word or phrase (case-insensitive)."""
    words = f" {_words(answer)} "
    return any(f" {_words(k)} " in words for k in keys)


def short_answer(text: str) -> str:
    """The first sentence of a reply, normalised: lower case, no punctuation, no leading article."""
    first = re.split(r"(?<!\d)[.!?](?!\d)|\n", text.strip(), maxsplit=1)[0]
    return re.sub(r"^(the|a|an) ", "", _words(first))


def same_answer(a: str, b: str) -> bool:
    """Two replies give the same answer: equal first sentences, or the shorter one (at most three
    words, e.g. "6") is a whole phrase inside the other's first sentence ("10 - 3 = 6")."""
    x, y = short_answer(a), short_answer(b)
    if not x or not y:
        return x == y
    if x == y:
        return True
    short, long_ = sorted((x, y), key=len)
    return len(short.split()) <= 3 and f" {short} " in f" {long_} "


def agreement(questions: Sequence[dict], before: Sequence[str], after: Sequence[str]) -> tuple[dict, list[dict]]:
    """(summary, per-question details) for the answers of the base model (`before`) and the trained one.

    summary = {"questions", "agreement" (fraction still answered as before), "base_correct",
    "trained_correct" (fractions whose answer holds a key)}.
    """
    details = []
    for q, b, a in zip(questions, before, after, strict=True):
        b_ok, a_ok = key_present(b, q["keys"]), key_present(a, q["keys"])
        agree = a_ok if b_ok else same_answer(b, a)
        details.append({"id": q["id"], "kind": q.get("kind"), "question": q["question"], "keys": q["keys"],
                        "before": b, "after": a, "before_correct": b_ok, "after_correct": a_ok, "agree": agree})
    n = max(1, len(details))
    summary = {"questions": len(details),
               "agreement": round(sum(d["agree"] for d in details) / n, 4),
               "base_correct": round(sum(d["before_correct"] for d in details) / n, 4),
               "trained_correct": round(sum(d["after_correct"] for d in details) / n, 4)}
    return summary, details


# --- asking and scoring ----------------------------------------------------------------------------
def ask_text_only(generator, questions: Sequence[dict], max_new_tokens: int = 24, batch_size: int = 16) -> list[str]:
    """Greedy replies to each question, asked alone as one user turn with no image."""
    from llavakit.data.conversation import Turn
    from llavakit.infer.generate import GenerationSettings

    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    out: list[str] = []
    for start in range(0, len(questions), batch_size):
        chunk = questions[start:start + batch_size]
        out += generator.generate([[Turn("user", q["question"])] for q in chunk], [[] for _ in chunk], settings)
    return out


def whole_sentences(text: str) -> str:
    """`text` cut after its last complete sentence (a reply stopped by the token limit ends mid-sentence);
    unchanged when it has no sentence end."""
    ends = [m.end() for m in re.finditer(r"[.!?](?=\s|$)", text)]
    return text[:ends[-1]].strip() if ends else text.strip()


def replay_conversations(generator, prompts: Sequence[str], max_new_tokens: int = 48) -> list[dict]:
    """LLaVA-format text-only conversations: each prompt with the model's own greedy reply (cut to whole
    sentences), for mixing into stage 2."""
    replies = ask_text_only(generator, [{"question": p} for p in prompts], max_new_tokens)
    return [{"id": f"replay-{i:03d}", "conversations": [{"from": "human", "value": p},
                                                         {"from": "gpt", "value": whole_sentences(r)}]}
            for i, (p, r) in enumerate(zip(prompts, replies)) if whole_sentences(r)]


@torch.no_grad()
def perplexity(language_model, tokenizer, paragraphs: Sequence[str], max_length: int = 512) -> float:
    """exp(mean next-token loss) of a causal LM over `paragraphs` (each its own sequence, no specials)."""
    nll, count = 0.0, 0
    device = next(language_model.parameters()).device
    for text in paragraphs:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_length]
        if len(ids) < 2:
            continue
        x = torch.tensor([ids], device=device)  # [1, T]
        logits = language_model(input_ids=x).logits[0, :-1].float()  # [T-1, V]
        nll += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
        count += len(ids) - 1
    if count == 0:
        raise ValueError("perplexity needs at least one paragraph of two or more tokens")
    return math.exp(nll / count)


def measure(model, processor, questions: Sequence[dict], paragraphs: Sequence[str], template: str | None = None,
            max_new_tokens: int = 24) -> dict:
    """{"answers": [...], "perplexity": float} for a llavakit model, text only (eval mode, restored after)."""
    from llavakit.infer.generate import Generator

    was_training = model.training
    model.eval()
    try:
        answers = ask_text_only(Generator(model, processor, template=template), questions, max_new_tokens)
        ppl = perplexity(model.language_model, processor.tokenizer, paragraphs)
    finally:
        model.train(was_training)
    return {"answers": answers, "perplexity": ppl}


def language_block(questions: Sequence[dict], before: dict, after: dict, details_file: str) -> tuple[dict, list[dict]]:
    """The `"language"` block of the demo's metrics.json and the per-question details, from two `measure`s."""
    summary, details = agreement(questions, before["answers"], after["answers"])
    block = {**summary, "perplexity_before": round(before["perplexity"], 3),
             "perplexity_after": round(after["perplexity"], 3),
             "perplexity_change": round(after["perplexity"] / before["perplexity"] - 1.0, 4),
             "details": details_file}
    return block, details
