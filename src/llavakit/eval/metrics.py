"""Scores for VQA-style evaluation: one function per rule, one registry entry per metric.

* ``vqav2``  – VQAv2 soft accuracy with the official answer normalization.
* ``exact``  – exact match after light normalization (GQA).
* ``option`` – option-letter accuracy for multiple choice (ScienceQA, MMBench).
* ``pope``   – yes/no accuracy, precision, recall, F1 and yes-ratio (POPE).

Every metric scores one prediction at a time (``score``: the fields stored next to the prediction in
``predictions.jsonl``) and then summarises the stored records (``summarize``), so a resumed run
scores old and new predictions the same way.

The VQAv2 rules follow the facts of the official evaluation script (GT-Vision-Lab/VQA,
``PythonEvaluationTools/vqaEvaluation/vqaEval.py``, Python 3 version): the punctuation list, the
"delete or replace by a space" decision, the period rule, number words, articles and contractions.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Callable, Sequence

# --- VQAv2 answer normalization ------------------------------------------------------------------

# Characters the official script treats as punctuation. Periods have their own rule below;
# apostrophes and colons are kept (contractions such as "don't" must survive).
VQA_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
                   ">", "<", "@", "`", ",", "?", "!")
# A period is dropped unless a digit follows it ("3.5" keeps it, "dog." loses it). The official
# pattern also starts with "(?!<=\d)", a malformed look-behind that never rejects anything, and
# passes re.UNICODE where `sub` expects a count (at most 32 periods removed); answers never get there.
_PERIOD = re.compile(r"\.(?!\d)")
# "A digit, a comma, a digit" anywhere in the answer (e.g. "1,000") switches every punctuation
# character to deletion instead of replacement by a space.
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")

VQA_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
VQA_ARTICLES = frozenset({"a", "an", "the"})


# The official contraction table (apostrophe-less spelling -> spelling with apostrophes). Keys with
# capitals ("Im", "Ive", "Id've") never match because answers are lower-cased first; kept as listed.
VQA_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}


def vqa_process_punctuation(text: str) -> str:
    """The official punctuation step.

    Each punctuation character is *deleted* when it touches a space somewhere in the answer
    ("p " or " p") or when the answer contains digit-comma-digit; otherwise it is *replaced by a
    space* ("left/right" -> "left right"). The decision looks at the original answer, per
    character. Then periods not followed by a digit are removed.
    """
    out = text
    has_digit_comma_digit = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in VQA_PUNCTUATION:
        if has_digit_comma_digit or (p + " ") in text or (" " + p) in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out)


def vqa_process_digits_articles(text: str) -> str:
    """Lower-case, number words -> digits, drop articles, restore contractions, single spaces."""
    words = []
    for w in text.lower().split():
        w = VQA_NUMBER_WORDS.get(w, w)
        if w not in VQA_ARTICLES:
            words.append(w)
    return " ".join(VQA_CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(text: str) -> str:
    """A prediction or reference as the VQAv2 evaluation compares it."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return vqa_process_digits_articles(vqa_process_punctuation(text))


def vqa_soft_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2 accuracy: the mean, over leaving out each reference answer in turn, of min(1, matches/3).

    With the usual 10 human answers, a prediction matching 4 or more of them scores 1.0, 3 scores
    0.9, 2 scores 0.6 and 1 scores 0.3. Both the prediction and the references are normalized (the
    official references are already normalized, so this changes nothing for them; it makes
    hand-written references comparable).
    With a single reference the leave-one-out mean is always 0, so it falls back to exact match
    of the normalized strings.
    """
    if not answers:
        raise ValueError("vqa_soft_accuracy needs at least one reference answer")
    pred = normalize_vqa_answer(prediction)
    refs = [normalize_vqa_answer(a) for a in answers]
    if len(refs) == 1:
        return float(pred == refs[0])
    total_matches = sum(r == pred for r in refs)
    scores = []
    for r in refs:
        others = total_matches - (r == pred)  # matches among the other n-1 references
        scores.append(min(1.0, others / 3.0))
    return sum(scores) / len(scores)


# --- exact match (GQA) ----------------------------------------------------------------------------

def normalize_exact(text: str) -> str:
    """Lower-case, trim, drop trailing periods, collapse whitespace (the usual GQA convention)."""
    return " ".join(text.strip().lower().rstrip(".").split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalized prediction equals any normalized reference."""
    pred = normalize_exact(prediction)
    return float(any(pred == normalize_exact(a) for a in answers))


# --- option letters (ScienceQA, MMBench) ----------------------------------------------------------

def option_letters(n: int) -> list[str]:
    if not 1 <= n <= 26:
        raise ValueError(f"multiple choice needs 1 to 26 choices, got {n}")
    return list(string.ascii_uppercase[:n])


def gold_option_letter(answer, choices: Sequence[str]) -> str | None:
    """The reference as a letter: a letter ("B", "(B)", "b."), a 0-based index, or a choice's text."""
    letters = option_letters(len(choices))
    if isinstance(answer, bool):
        return None
    if isinstance(answer, int):
        return letters[answer] if 0 <= answer < len(letters) else None
    text = str(answer).strip()
    bare = text.strip("().: ").upper()
    if len(bare) == 1 and bare in letters:
        return bare
    for letter, choice in zip(letters, choices):
        if normalize_exact(text) == normalize_exact(str(choice)):
            return letter
    return None


# A leading option letter: "B", "B.", "B:", "B)", "(B)", "B cat".
_LEAD_LETTER = re.compile(r"^\(?([A-Z])(\)|[.:]|\s|$)")
# "The answer is C", "Answer: (C)", "option C" (the keyword in any case, the letter a capital).
_ANSWER_IS = re.compile(r"(?i:\b(?:answer|option|choice)(?:\s+is)?\s*:?\s*)\(?([A-Z])\b")


def extract_option_letter(prediction: str, choices: Sequence[str]) -> str | None:
    """The option a free-text answer picks, or None when it names none.

    Tried in order: the answer starts with an option letter followed by ".", ":", ")" or nothing
    ("B", "B.", "(B) cat"); it starts with a letter and a space ("B cat") -- for "A" and "I", which
    are also English words, only when the rest is that option's text; "answer is C" / "option C";
    the answer equals one choice's text. Only letters of existing choices count.
    """
    letters = option_letters(len(choices))
    text = prediction.strip()
    m = _LEAD_LETTER.match(text)
    if m and m.group(1) in letters:
        letter, sep = m.group(1), m.group(2)
        rest = text[m.end():]
        if sep != "" and not sep.isspace():
            return letter
        if not rest.strip():
            return letter
        if letter not in ("A", "I"):
            return letter
        if normalize_exact(rest) == normalize_exact(str(choices[letters.index(letter)])):
            return letter
    m = _ANSWER_IS.search(text)
    if m and m.group(1) in letters:
        return m.group(1)
    for letter, choice in zip(letters, choices):
        if normalize_exact(text) == normalize_exact(str(choice)):
            return letter
    return None


# --- yes / no (POPE) -----------------------------------------------------------------------------

def parse_yes_no(prediction: str) -> str:
    """POPE's convention (as in LLaVA's POPE evaluation): look at the first sentence only; it is
    "no" when it contains the word "no" or "not", otherwise "yes"."""
    first = prediction.strip().split(".")[0]
    words = {w.strip(string.punctuation).lower() for w in first.split()}
    return "no" if words & {"no", "not"} else "yes"


def yes_no_scores(predicted: Sequence[str], gold: Sequence[str]) -> dict:
    """Accuracy, precision, recall and F1 with "yes" as the positive class, plus the yes-ratio."""
    if len(predicted) != len(gold):
        raise ValueError("predicted and gold labels differ in length")
    tp = sum(p == "yes" and g == "yes" for p, g in zip(predicted, gold))
    tn = sum(p == "no" and g == "no" for p, g in zip(predicted, gold))
    fp = sum(p == "yes" and g == "no" for p, g in zip(predicted, gold))
    fn = sum(p == "no" and g == "yes" for p, g in zip(predicted, gold))
    n = len(gold)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": sum(p == "yes" for p in predicted) / n if n else 0.0,
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
    }


def gold_yes_no(answer: str) -> str | None:
    a = str(answer).strip().lower().rstrip(".")
    return a if a in ("yes", "no") else None


# --- the registry ---------------------------------------------------------------------------------

def _mean(records: list[dict], key: str) -> float:
    return sum(r[key] for r in records) / len(records) if records else 0.0


@dataclass(frozen=True)
class Metric:
    name: str
    help: str
    # (prediction, answers, choices) -> fields stored with the prediction
    score: Callable[[str, list, list | None], dict]
    # stored records -> summary numbers
    summarize: Callable[[list[dict]], dict]
    # what a reference must look like; returns an error message or None
    check: Callable[[list, list | None], str | None]
    needs_choices: bool = False
    # appended to the question when the user does not give --prompt-suffix (LLaVA's eval prompts)
    prompt_suffix: str = "\nAnswer the question using a single word or phrase."


def _check_answers(answers, choices):
    return None if answers else "has no reference answer (give `answer` or `answers`)"


def _score_option(pred, answers, choices):
    gold = gold_option_letter(answers[0], choices)
    picked = extract_option_letter(pred, choices)
    return {"picked": picked, "gold": gold, "score": float(picked is not None and picked == gold)}


def _check_option(answers, choices):
    if not choices:
        return "has no `choices`; the option metric needs a list of choices"
    if len(choices) > 26:
        return f"has {len(choices)} choices; at most 26 (A-Z) are supported"
    if not answers:
        return "has no reference answer (give the correct letter, index or choice text as `answer`)"
    if gold_option_letter(answers[0], choices) is None:
        return (f"answer {answers[0]!r} is neither a letter of its {len(choices)} choices, a 0-based index, "
                "nor the text of one of the choices")
    return None


def _summarize_option(records):
    return {"accuracy": _mean(records, "score"), "unparsed": sum(r["picked"] is None for r in records),
            "n": len(records)}


def _score_pope(pred, answers, choices):
    return {"picked": parse_yes_no(pred), "gold": gold_yes_no(answers[0])}


def _check_pope(answers, choices):
    if not answers or gold_yes_no(answers[0]) is None:
        shown = answers[0] if answers else None
        return f"answer {shown!r} is not 'yes' or 'no' (POPE references must be yes/no)"
    return None


def _summarize_pope(records):
    out = yes_no_scores([r["picked"] for r in records], [r["gold"] for r in records])
    out["n"] = len(records)
    return out


METRICS: dict[str, Metric] = {
    "vqav2": Metric(
        "vqav2", "VQAv2 soft accuracy (official normalization; up to 10 reference answers)",
        score=lambda pred, answers, choices: {"score": vqa_soft_accuracy(pred, answers)},
        summarize=lambda records: {"accuracy": _mean(records, "score"), "n": len(records)},
        check=_check_answers,
    ),
    "exact": Metric(
        "exact", "exact match after lower-casing and trimming (GQA)",
        score=lambda pred, answers, choices: {"score": exact_match(pred, answers)},
        summarize=lambda records: {"accuracy": _mean(records, "score"), "n": len(records)},
        check=_check_answers,
    ),
    "option": Metric(
        "option", "option-letter accuracy for multiple choice (ScienceQA, MMBench)",
        score=_score_option, summarize=_summarize_option, check=_check_option, needs_choices=True,
        prompt_suffix="\nAnswer with the option's letter from the given choices directly.",
    ),
    "pope": Metric(
        "pope", "yes/no accuracy, precision, recall, F1 and yes-ratio (POPE)",
        score=_score_pope, summarize=_summarize_pope, check=_check_pope,
        prompt_suffix="\nAnswer the question using a single word or phrase.",
    ),
}


def get_metric(name: str) -> Metric:
    try:
        return METRICS[name]
    except KeyError:
        raise ValueError(f"unknown metric {name!r}; valid: {sorted(METRICS)}") from None
