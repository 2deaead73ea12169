"""Evaluation metrics against hand-checked examples (every expected value worked out by hand)."""

from __future__ import annotations

import pytest

from llavakit.eval.metrics import (
    METRICS,
    exact_match,
    extract_option_letter,
    get_metric,
    gold_option_letter,
    normalize_vqa_answer,
    parse_yes_no,
    vqa_soft_accuracy,
    yes_no_scores,
)


# --- VQAv2 normalization ------------------------------------------------------------------------

@pytest.mark.parametrize("raw, expected", [
    ("Yes.", "yes"),                      # trailing period removed, lower-cased
    ("The Dog", "dog"),                   # article dropped
    ("an apple a day", "apple day"),      # every article dropped
    ("Two", "2"),                         # number word -> digit
    ("none", "0"),
    ("ten", "10"),
    ("eleven", "eleven"),                 # only zero..ten (and none) are mapped
    ("left/right", "left right"),         # punctuation not touching a space -> a space
    ("left / right", "left right"),       # punctuation touching a space -> deleted
    ("red,white", "red white"),
    ("red, white", "red white"),
    ("1,000", "1000"),                    # digit-comma-digit: punctuation deleted
    ("a,b 1,2", "ab 12"),                 # ... for the whole answer, not only between digits
    ("hot-dog", "hot dog"),
    ("3.5", "3.5"),                       # period followed by a digit is kept
    ("5.", "5"),
    ("e.g", "eg"),                        # period not followed by a digit is dropped
    ("dont", "don't"),                    # contractions restored
    ("isnt it", "isn't it"),
    ("couldn'tve", "couldn't've"),         # keys with apostrophes match too (apostrophes survive step 2)
    ("What's that?", "what's that"),      # apostrophe is not punctuation here
    ("Im", "im"),                         # capitalised keys of the table never match (lower-cased first)
    ("\tTwo  Dogs!\n", "2 dogs"),         # tabs/newlines, repeated spaces
    ("yes: it is", "yes: it is"),         # ':' is not in the official punctuation list
])
def test_vqa_normalization(raw, expected):
    assert normalize_vqa_answer(raw) == expected


def _refs(matching: str, n_match: int, other: str = "cat") -> list[str]:
    return [matching] * n_match + [other] * (10 - n_match)


@pytest.mark.parametrize("n_match, expected", [
    # leave-one-out mean of min(1, matches among the other 9 / 3), worked out by hand:
    (0, 0.0),
    (1, 0.3),    # 1 x 0 + 9 x 1/3 = 3 -> /10
    (2, 0.6),    # 2 x 1/3 + 8 x 2/3 = 6 -> /10
    (3, 0.9),    # 3 x 2/3 + 7 x 1 = 9 -> /10
    (4, 1.0),    # 4 x 1 + 6 x 1
    (10, 1.0),
])
def test_vqa_soft_accuracy_counts(n_match, expected):
    assert vqa_soft_accuracy("Two.", _refs("2", n_match)) == pytest.approx(expected)


def test_vqa_soft_accuracy_normalizes_both_sides():
    refs = ["two", "Two", "2", "two dogs", "2", "cat", "cat", "cat", "cat", "cat"]
    # "2" matches the first three and the two "2"s: 5 matches -> 1.0
    assert vqa_soft_accuracy("The two", refs) == pytest.approx(1.0)
    assert vqa_soft_accuracy("2 dogs", refs) == pytest.approx(0.3)


def test_vqa_soft_accuracy_single_reference_is_normalized_exact_match():
    assert vqa_soft_accuracy("A dog.", ["dog"]) == 1.0
    assert vqa_soft_accuracy("dogs", ["dog"]) == 0.0
    with pytest.raises(ValueError):
        vqa_soft_accuracy("dog", [])


# --- exact match (GQA) -----------------------------------------------------------------------------

@pytest.mark.parametrize("pred, answers, expected", [
    ("Yes.", ["yes"], 1.0),
    ("  Left ", ["left"], 1.0),
    ("left side", ["left"], 0.0),
    ("the table", ["table"], 0.0),        # no article stripping in exact match
    ("blue", ["red", "Blue"], 1.0),       # any reference
])
def test_exact_match(pred, answers, expected):
    assert exact_match(pred, answers) == expected


# --- option letters (ScienceQA / MMBench) ------------------------------------------------------------

CHOICES = ["cat", "dog", "bird"]


@pytest.mark.parametrize("pred, expected", [
    ("B", "B"),
    ("B.", "B"),
    ("(C) bird", "C"),
    ("C: bird", "C"),
    ("B because it barks", "B"),
    ("A cat", "A"),                       # "A" + that option's text
    ("A bird", None),                     # "A" is the article here: not option A, not an option text
    ("The answer is B.", "B"),
    ("Answer: (C)", "C"),
    ("the answer is a bird", None),       # lower-case "a" is not a letter choice
    ("dog", "B"),                         # the text of a choice
    ("Dog.", "B"),
    ("D", None),                          # no option D
    ("I think so", None),
    ("", None),
])
def test_extract_option_letter(pred, expected):
    assert extract_option_letter(pred, CHOICES) == expected


@pytest.mark.parametrize("answer, expected", [
    ("B", "B"), ("(b)", "B"), ("c.", "C"), (1, "B"), ("dog", "B"), ("E", None), (7, None), ("horse", None),
])
def test_gold_option_letter(answer, expected):
    assert gold_option_letter(answer, CHOICES) == expected


def test_option_metric_scores_and_summary():
    m = get_metric("option")
    records = [m.score(p, [a], CHOICES) for p, a in [("B", "B"), ("(A)", "dog"), ("horse", "C"), ("C.", 2)]]
    assert [r["score"] for r in records] == [1.0, 0.0, 0.0, 1.0]
    assert m.summarize(records) == {"accuracy": 0.5, "unparsed": 1, "n": 4}


# --- yes / no (POPE) -------------------------------------------------------------------------------

@pytest.mark.parametrize("pred, expected", [
    ("Yes", "yes"), ("yes, there is a dog.", "yes"), ("No.", "no"), ("NO", "no"),
    ("There is not a cat in the image.", "no"), ("There is a cat. No doubt.", "yes"),  # first sentence only
    ("blue", "yes"),  # POPE convention: anything that does not say no counts as yes
])
def test_parse_yes_no(pred, expected):
    assert parse_yes_no(pred) == expected


def test_pope_scores_by_hand():
    preds = ["Yes", "No", "yes, there is", "There is no cat.", "Yes"]
    gold = ["yes", "no", "no", "yes", "yes"]
    m = get_metric("pope")
    out = m.summarize([m.score(p, [g], None) for p, g in zip(preds, gold)])
    # picked: yes no yes no yes -> TP=2 (0,4), TN=1 (1), FP=1 (2), FN=1 (3)
    assert (out["tp"], out["tn"], out["fp"], out["fn"]) == (2, 1, 1, 1)
    assert out["accuracy"] == pytest.approx(3 / 5)
    assert out["precision"] == pytest.approx(2 / 3)
    assert out["recall"] == pytest.approx(2 / 3)
    assert out["f1"] == pytest.approx(2 / 3)
    assert out["yes_ratio"] == pytest.approx(3 / 5)
    assert out["n"] == 5


def test_yes_no_scores_without_positives():
    out = yes_no_scores(["no", "no"], ["no", "no"])
    assert out["accuracy"] == 1.0 and out["precision"] == 0.0 and out["recall"] == 0.0 and out["f1"] == 0.0


# --- the registry ----------------------------------------------------------------------------------

def test_metric_registry_and_checks():
    assert set(METRICS) == {"vqav2", "exact", "option", "pope"}
    with pytest.raises(ValueError, match="valid: \\['exact', 'option', 'pope', 'vqav2'\\]"):
        get_metric("bleu")
    assert get_metric("vqav2").check([], None) is not None
    assert get_metric("vqav2").check(["2"], None) is None
    assert "choices" in get_metric("option").check(["A"], None)
    assert "neither a letter" in get_metric("option").check(["F"], CHOICES)
    assert get_metric("option").check(["dog"], CHOICES) is None
    assert "yes" in get_metric("pope").check(["maybe"], None)
    assert get_metric("vqav2").summarize([{"score": 1.0}, {"score": 0.3}]) == {"accuracy": pytest.approx(0.65), "n": 2}
