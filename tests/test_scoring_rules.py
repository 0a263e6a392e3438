"""Known-answer tests for every scoring rule, including the traps of substring matching."""

import pytest

from medmax_pipeline.stages.evaluate.scoring_rules import (
    VQA_TASKS,
    ScoringInputError,
    approx_first_token,
    extract_choice,
    extract_yes_no,
    llava_closed,
    llava_normalize,
    llava_open,
    llava_recall,
    medmax_closed,
    medmax_mcq,
    parse_options,
    score_vqa_item,
    strict_closed,
    strict_mcq,
    strict_open,
    token_recall,
)

OPTIONS = {"A": "Aorta", "B": "Lung", "C": "Liver", "D": "Heart"}
PROMPT = "Which organ is shown? Options: (A) Aorta (B) Lung (C) Liver (D) Heart"


def test_twelve_tasks():
    assert len(VQA_TASKS) == 12 and len(set(VQA_TASKS)) == 12
    assert sum(q == "closed" for _, q in VQA_TASKS) == 5


@pytest.mark.parametrize("text, expected", [
    ("Yes, the image shows a consolidated lung.", "yes"),
    ("No.", "no"),
    ("no", "no"),
    ("YES!", "yes"),
    ("The answer is no.", "no"),
    ("The correct answer is no", "no"),  # 'correct' is a yes-word, the 'answer is' clause wins
    ("There is no fracture.", "no"),
    ("I don't know", None),  # 'know' contains 'no'
    ("It is not normal", None),  # 'not' contains 'no'
    ("None of the above", None),  # 'none' contains 'no'
    ("It could be yes or no", None),  # both polarities inside the sentence: ambiguous
    ("", None),
    ("y", "yes"),
])
def test_extract_yes_no(text, expected):
    assert extract_yes_no(text)[0] == expected


def test_extract_yes_no_flags_missing_answer():
    extracted, note = extract_yes_no("I don't know")
    assert extracted is None and note.startswith("no answer found")


@pytest.mark.parametrize("text, expected", [
    ("B", "B"),
    ("(c)", "C"),
    ("D.", "D"),
    ("The answer is (B) Lung", "B"),
    ("Answer: D", "D"),
    ("Aorta", "A"),  # option text, not a letter
    ("A lung is shown", "B"),  # 'A' is the article; 'lung' is option B
    ("Liver", "C"),
    ("A. Aorta", "A"),
    ("The aorta appears dilated", "A"),
    ("Options A and B look similar", None),  # two letters: ambiguous
    ("I am not sure", None),
    ("", None),
])
def test_extract_choice(text, expected):
    assert extract_choice(text, OPTIONS)[0] == expected


def test_letter_inside_word_is_not_a_choice():
    # Without options, only standalone letters count: the A of Aorta is not option A.
    assert extract_choice("Aorta and Bronchus")[0] is None


def test_parse_options_formats():
    assert parse_options(PROMPT) == OPTIONS
    assert parse_options("What?\nA: left lung\nB: right lung\nC: heart\nD: liver\nAnswer:") == {
        "A": "left lung", "B": "right lung", "C": "heart", "D": "liver"}
    assert parse_options("Is there a mass in segment B?") == {}


def test_approx_first_token():
    assert approx_first_token("Yes, it is") == "Yes"
    assert approx_first_token("  (B) Lung") == "("
    assert approx_first_token("") == ""


# -- medmax: the public rules, flaws included ---------------------------------------------------

def test_medmax_closed_known_answers():
    assert medmax_closed("Yes", "yes", first_token="Yes").correct is True
    assert medmax_closed("No", "yes", first_token="No").correct is False
    assert medmax_closed("No", "no", first_token="No").correct is True
    # The published flaw: one token 'know' / 'not' passes as 'no'.
    r = medmax_closed("know", "no", first_token="know")
    assert r.correct is True and "flaw" in r.note
    assert medmax_closed("not", "no", first_token="not").correct is True
    # Case of the answer is not normalised in the public code.
    r = medmax_closed("yes", "Yes", first_token="yes")
    assert r.correct is False and "never be correct" in r.note


def test_medmax_closed_reads_first_token_only():
    # 'Yes, but no' : only 'Yes' is the first token, so it is correct for 'yes'.
    r = medmax_closed("Yes, but no effusion", "yes")
    assert r.correct is True and "approximated" in r.note


def test_medmax_mcq_known_answers():
    assert medmax_mcq("b", "B", first_token=" b").correct is True
    assert medmax_mcq("(B) Lung", "B", first_token="(").correct is False
    assert medmax_mcq("B. Lung", "B").correct is True  # approximated first token 'B'
    assert medmax_mcq("Aorta", "A").correct is False  # 'AORTA' != 'A'


# -- llava_med ---------------------------------------------------------------------------------

def test_llava_normalize():
    assert llava_normalize("The Lung, left.") == "lung left"
    assert llava_normalize("two lesions") == "2 lesions"


def test_llava_closed_substring_flaws():
    assert llava_closed("Yes, there is.", "yes").correct is True
    assert llava_closed("No", "yes").correct is False
    # 'I know' contains 'no': the substring test accepts it for 'no' (LLaVA-Med's behaviour).
    assert llava_closed("I know", "no").correct is True
    assert llava_closed("Maybe", "no").correct is False


def test_token_recall_known_values():
    assert token_recall("the left lung", "left lung") == 1.0
    assert token_recall("lung", "left lung") == 0.5
    assert token_recall("heart", "left lung") == 0.0
    r = llava_open("left upper lobe of lung", "left lung")
    assert r.score == 1.0 and r.correct is True
    with pytest.raises(ScoringInputError):
        token_recall("x", "the")


# -- strict ------------------------------------------------------------------------------------

def test_strict_closed():
    assert strict_closed("Yes, the image shows it.", "yes").correct is True
    assert strict_closed("I don't know", "no").correct is False
    assert strict_closed("It is not", "no").correct is False
    assert strict_closed("True", "Yes").correct is True  # synonym, answer case ignored
    # A closed answer that is not yes/no: normalised exact match.
    assert strict_closed("Left.", "left").correct is True
    assert strict_closed("Right", "left").correct is False


def test_strict_mcq_and_open():
    assert strict_mcq("The answer is (B) Lung", "B", PROMPT).correct is True
    assert strict_mcq("Aorta", "A", PROMPT).correct is True
    assert strict_mcq("Aorta", "B", PROMPT).correct is False
    with pytest.raises(ScoringInputError):
        strict_mcq("B", "Lung", PROMPT)
    assert strict_open("The Left Lung.", "left lung").correct is True
    assert strict_open("The answer is: left lung", "left lung").correct is True
    assert strict_open("left upper lung", "left lung").correct is False


def test_dispatch_and_errors():
    r = score_vqa_item("medmax", "open", "left lung", "left lung")
    assert r.score == 1.0 and "stand-in" in r.note
    assert score_vqa_item("strict", "mcq", "(B)", "B", PROMPT).correct is True
    with pytest.raises(ScoringInputError, match="rule set"):
        score_vqa_item("nope", "closed", "yes", "yes")
    with pytest.raises(ScoringInputError, match="question_type"):
        score_vqa_item("strict", "yesno", "yes", "yes")


def test_same_prediction_differs_by_rule_set():
    # One sentence, three verdicts: why the rule set must be recorded beside a number.
    pred, answer = "Yes, but no effusion is seen", "yes"
    assert score_vqa_item("medmax", "closed", pred, answer).correct is True
    assert score_vqa_item("llava_med", "closed", pred, answer).correct is True
    assert score_vqa_item("strict", "closed", pred, answer).correct is True
    pred2 = "I know it is present"
    assert score_vqa_item("llava_med", "closed", pred2, "no").correct is True
    assert score_vqa_item("strict", "closed", pred2, "no").correct is False


# -- llava_med = LLaVA-Med's run_eval.py, quirks included ---------------------------------------
# Expected values worked out by hand from microsoft/LLaVA-Med v1.0.0 llava/eval/run_eval.py and
# eval_metrics/{glossary,utils,evaluate_metrics}.py, and checked by running those functions
# (20,000 random strings agreed with llava_normalize / llava_recall / llava_closed; see the report).


def test_llava_recall_counts_repeated_prediction_words():
    # calculate_f1score: tp adds the prediction's count of a shared word (3), fn the missing 'lung' (1).
    assert llava_recall("left left left", "left lung") == 0.75
    assert llava_recall("left lung", "left lung") == 1.0
    assert llava_recall("", "lung") == 0.0  # empty candidate
    assert llava_recall("lung", "the") == 0.0  # reference empty after dropping the article
    assert llava_recall("heart", "lung") == 0.0  # tp == 0


def test_llava_period_strip_is_limited_to_32_periods():
    # period_strip.sub("", text, re.UNICODE): re.UNICODE (32) is the count argument.
    assert llava_normalize("a." * 40) == "a" * 32 + "a." * 8
    assert llava_normalize("1.5 mm.") == "1.5 mm"  # a period before a digit stays


def test_llava_closed_rule_quirks():
    # 'no' is a substring test: 'not' and 'know' contain it; then the reference must be a substring.
    assert llava_closed("it is not", "no").correct is True
    assert llava_closed("yes", "no").correct is False
    assert llava_closed("Normal", "no").correct is True  # 'normal' contains 'no'
    assert llava_closed("maybe", "yes").correct is False  # neither yes nor no


def test_medmax_tolerant_shares_medmax_closed_and_mcq():
    assert score_vqa_item("medmax_tolerant", "closed", "Not", "no", first_token="Not").correct is True
    assert score_vqa_item("medmax_tolerant", "mcq", "b", "B", first_token="b").correct is True
    assert "stand-in" in score_vqa_item("llava_med", "mcq", "B", "B", "Options: (A) x (B) y").note
