"""Scoring rules for the 12 MedMax VQA tasks, as small pure functions.

Four named rule sets, so that a number is always reported beside the rule that made it:

``medmax``
    The public MedMax evaluation code (evaluation/vqa.py), flaws included, so that numbers are
    comparable with the paper. It looked at ONE generated token: closed questions are correct
    iff (answer == 'yes' and 'yes' in gen and 'no' not in gen) or the mirror for 'no', with
    plain substring tests (so 'know' and 'not' count as 'no'); multiple choice is correct iff
    gen.upper().strip() == answer. Open questions go to the LLM judge with the public request
    (judge_protocols.py); only the verdict strings the public code reads count, any other reply
    is unjudged (the public code dropped it: `accuracy_judged` is its number).
``medmax_tolerant``
    The same, but a verdict in another spelling ('**Correctness:** 1', 'correctness:0') is read.
``llava_med``
    LLaVA-Med's own scorer (llava/eval/run_eval.py + eval_metrics, v1.0.0), quirks included:
    normalize_word (its period pattern, its count=32 slip), closed: the reply must contain 'yes'
    or 'no' and the normalised reference (substrings); open: its recall, where repeated
    prediction words count again. LLaVA-Med has no multiple-choice rule; the strict letter rule
    stands in (labelled a stand-in).
``strict``
    Normalised exact match after extracting the answer from a full sentence, with yes/no
    synonyms (in the spirit of lmms-eval SLAKE): 'Yes, the image shows...' -> 'yes'; 'The answer
    is (B) Lung' -> 'B'; 'I don't know' -> no answer found (flagged, counted wrong).

Every rule returns a RuleResult: correct (bool, or None when the item could not be judged),
the extracted answer (None when none was found), a note saying why, and the per-item score that
summaries average (1.0/0.0 for a verdict, the recall for a recall rule).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Mapping

CLOSED = "closed"
OPEN = "open"
MCQ = "mcq"
QUESTION_TYPES = (CLOSED, OPEN, MCQ)

# The 12 VQA (task_name, question_type) pairs, in the public code's order.
VQA_TASKS: tuple[tuple[str, str], ...] = (
    ("vqa_rad", CLOSED), ("slake", CLOSED), ("pathvqa", CLOSED), ("quilt_vqa", CLOSED),
    ("vqa_rad", OPEN), ("slake", OPEN), ("pathvqa", OPEN), ("quilt_vqa", OPEN),
    ("pmc_vqa", MCQ), ("omnimed_vqa", MCQ), ("path_mmu", MCQ), ("probmed", CLOSED),
)
VQA_TASK_SET = frozenset(VQA_TASKS)

RULE_SETS = ("medmax", "medmax_tolerant", "llava_med", "strict")
# Rule sets whose open questions go to the LLM judge (they differ only in how a verdict is read).
JUDGED_RULE_SETS = ("medmax", "medmax_tolerant")
# Marks a note whose number was made by a stand-in for the rule set's own rule (summaries label it).
STAND_IN = "stand-in"

# Synonyms accepted by the strict rule. 'right' is deliberately absent: it is a laterality answer.
YES_WORDS = frozenset({"yes", "yeah", "yep", "true", "correct", "affirmative"})
NO_WORDS = frozenset({"no", "nope", "false", "incorrect", "negative"})
ARTICLES = frozenset({"a", "an", "the"})

DEFAULT_LETTERS = "ABCD"  # the baseline prompt asks for 'A', 'B', 'C', or 'D'


@dataclass(frozen=True)
class RuleResult:
    correct: bool | None
    extracted: str | None
    note: str
    score: float | None = None

    def __post_init__(self) -> None:
        # A verdict without an explicit score scores 1.0 / 0.0; an unjudged item has no score.
        if self.score is None and self.correct is not None:
            object.__setattr__(self, "score", 1.0 if self.correct else 0.0)


class ScoringInputError(ValueError):
    """A row cannot be scored (unknown question type, empty reference, ...)."""


# ----------------------------------------------------------------------------------------------
# Shared text helpers
# ----------------------------------------------------------------------------------------------

_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u00a0": " "})


def words(text: str) -> list[str]:
    """Lower-cased words; an apostrophe inside a word is kept ("don't" stays one word)."""
    return re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.translate(_QUOTES).lower())


def normalize_strict(text: str) -> str:
    """Lower case, punctuation to spaces, articles dropped, whitespace collapsed."""
    text = text.translate(_QUOTES).lower()
    text = re.sub(r"[^\w\s]", " ", text)
    return " ".join(w for w in text.split() if w not in ARTICLES)


def approx_first_token(text: str) -> str:
    """Stand-in for 'the first generated token' when only text is known.

    Chameleon's BPE splits a leading word from following punctuation ("Yes," -> "Yes" ","), so
    the first run of letters, or of digits, or else the first non-space character, is used.
    """
    m = re.match(r"\s*([A-Za-z]+|\d+|\S)", text)
    return m.group(1) if m else ""


# ----------------------------------------------------------------------------------------------
# Answer extraction from a full sentence
# ----------------------------------------------------------------------------------------------

_ANSWER_IS = re.compile(r"\b(?:answer|option|choice)\s*(?:is|:|would be|=)?\s*[\"'(\[]*\s*([A-Za-z]+)\b", re.I)


def extract_yes_no(text: str) -> tuple[str | None, str]:
    """'yes' / 'no' / None with the reason, reading whole words only (never 'know' or 'not')."""
    ws = words(text)
    if not ws:
        return None, "empty prediction"
    if len(ws) == 1 and ws[0] in ("y", "n"):
        return ("yes" if ws[0] == "y" else "no"), "single letter y/n"
    if ws[0] in YES_WORDS:
        return "yes", f"leading '{ws[0]}'"
    if ws[0] in NO_WORDS:
        return "no", f"leading '{ws[0]}'"
    m = _ANSWER_IS.search(text.translate(_QUOTES))
    if m:
        w = m.group(1).lower()
        if w in YES_WORDS:
            return "yes", f"'answer is {w}'"
        if w in NO_WORDS:
            return "no", f"'answer is {w}'"
    has_yes = any(w in YES_WORDS for w in ws)
    has_no = any(w in NO_WORDS for w in ws)
    if has_yes and has_no:
        return None, "no answer found: both a yes-word and a no-word (ambiguous)"
    if has_yes:
        return "yes", "yes-word inside the sentence"
    if has_no:
        return "no", "no-word inside the sentence"
    return None, "no answer found: no yes/no word"


def parse_options(prompt: str) -> dict[str, str]:
    """Options 'A: text' / '(B) text' / 'C. text' listed in a multiple-choice prompt.

    A marker counts only at a line start or after whitespace, and the letters found must run
    A, B, C, ... without a gap; anything else gives {} (the caller then uses letters only).
    """
    marker = re.compile(r"(?:(?<=\s)|^)\(?([A-H])[\).:]\s+", re.M)
    found = list(marker.finditer(prompt))
    # Keep the last run that starts at 'A' and proceeds A, B, C...
    best: list[re.Match[str]] = []
    run: list[re.Match[str]] = []
    for m in found:
        letter = m.group(1)
        if letter == "A":
            run = [m]
        elif run and ord(letter) == ord(run[-1].group(1)) + 1:
            run.append(m)
        else:
            continue
        if len(run) >= 2:
            best = list(run)
    options: dict[str, str] = {}
    for i, m in enumerate(best):
        end = best[i + 1].start() if i + 1 < len(best) else len(prompt)
        body = prompt[m.end() : end].split("\n")[0].strip()
        body = re.sub(r"\s*(?:answer|question)\s*:.*$", "", body, flags=re.I).strip()
        options[m.group(1)] = body
    return options


def _phrase_in(phrase: str, text: str) -> bool:
    return bool(phrase) and re.search(rf"(?:^| ){re.escape(phrase)}(?: |$)", text) is not None


def extract_choice(text: str, options: Mapping[str, str] | None = None) -> tuple[str | None, str]:
    """The chosen option letter of a multiple-choice answer, or None with the reason.

    Letters count only as standalone tokens, so the 'A' of 'Aorta' is never read; a leading
    'A' followed by a lower-case word is taken for the article ('A lung nodule').
    """
    letters = "".join(sorted(options)) if options else DEFAULT_LETTERS
    cls = f"[{letters}]"
    s = text.translate(_QUOTES).strip()
    if not s:
        return None, "empty prediction"
    m = re.fullmatch(rf"[\(\[]?({cls})[\)\].:]?", s, re.I)
    if m:
        return m.group(1).upper(), "bare letter"
    m = re.match(rf"[\(\[]({cls})[\)\]]", s, re.I) or re.match(rf"({cls})[\).:](?:\s|$)", s)
    if m:
        return m.group(1).upper(), "leading letter with punctuation"
    m = _ANSWER_IS.search(s)
    if m and len(m.group(1)) == 1 and m.group(1).upper() in letters:
        return m.group(1).upper(), f"'answer is {m.group(1)}'"
    norm = normalize_strict(s)
    if options:
        m = re.match(rf"({cls})\s+(.*)", s)
        if m and normalize_strict(m.group(2)).startswith(normalize_strict(options[m.group(1)]) or "\0"):
            return m.group(1), "leading letter followed by its option text"
        exact = [k for k, v in options.items() if normalize_strict(v) and normalize_strict(v) == norm]
        if len(exact) == 1:
            return exact[0], "prediction equals an option's text"
        inside = [k for k, v in options.items() if _phrase_in(normalize_strict(v), norm)]
        # A longer option containing a shorter one ('left lung' vs 'lung'): keep the longest.
        inside = [k for k in inside if not any(k != o and normalize_strict(options[k]) in normalize_strict(options[o]) for o in inside)]
        if len(inside) == 1:
            return inside[0], "an option's text appears in the prediction"
    standalone = []
    for m in re.finditer(rf"(?<![A-Za-z0-9'])({cls})(?![A-Za-z0-9'])", s):
        if m.group(1) == "A" and re.match(r"\s+(?!and\b|or\b)[a-z]", s[m.end() :]):
            continue  # article, not option A
        standalone.append(m.group(1))
    if len(set(standalone)) == 1:
        return standalone[0], "single standalone capital letter"
    if len(set(standalone)) > 1:
        return None, f"no answer found: several letters ({', '.join(sorted(set(standalone)))})"
    return None, "no answer found: no option letter or option text"


# ----------------------------------------------------------------------------------------------
# Rule set `medmax`: the public code, flaws included
# ----------------------------------------------------------------------------------------------


def _first_token(prediction: str, first_token: str | None) -> tuple[str, str]:
    if first_token is not None:
        return first_token, "first generated token"
    return approx_first_token(prediction), f"{STAND_IN}: first token approximated from text"


def medmax_closed(prediction: str, answer: str, first_token: str | None = None) -> RuleResult:
    gen, source = _first_token(prediction, first_token)
    gen = gen.lower()
    # Substring tests, exactly as published: 'know', 'not', 'none' all contain 'no'.
    has_yes, has_no = "yes" in gen, "no" in gen
    correct = (answer == "yes" and has_yes and not has_no) or (answer == "no" and has_no and not has_yes)
    extracted = "yes" if has_yes and not has_no else "no" if has_no and not has_yes else None
    notes = [source]
    if has_no and "no" not in words(gen):
        notes.append("flaw: 'no' matched inside another word")
    if answer not in ("yes", "no"):
        notes.append(f"flaw: answer {answer!r} is not literally 'yes'/'no', so it can never be correct")
    if extracted is None:
        notes.append("no answer found")
    return RuleResult(bool(correct), extracted, "; ".join(notes))


def medmax_mcq(prediction: str, answer: str, first_token: str | None = None) -> RuleResult:
    gen, source = _first_token(prediction, first_token)
    extracted = gen.upper().strip()
    notes = [source]
    if not re.fullmatch(r"[A-Z]", answer):
        notes.append(f"flaw: answer {answer!r} is not one capital letter")
    return RuleResult(extracted == answer, extracted or None, "; ".join(notes))


# ----------------------------------------------------------------------------------------------
# Rule set `llava_med`: LLaVA-Med's llava/eval/run_eval.py and eval_metrics (v1.0.0), quirks included
# ----------------------------------------------------------------------------------------------

# eval_metrics/glossary.py. Its contractions table also has keys with capitals ("Im", "Ive",
# "Id've", "I'dve"); they never match because normalize_word looks words up after lower-casing.
_LLAVA_CONTRACTIONS = {
    'aint': "ain't", 'arent': "aren't", 'cant': "can't", 'couldve': "could've", 'couldnt': "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", 'didnt': "didn't", 'doesnt': "doesn't",
    'dont': "don't", 'hadnt': "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", 'hasnt': "hasn't",
    'havent': "haven't", 'hed': "he'd", "hed've": "he'd've", "he'dve": "he'd've", 'hes': "he's", 'howd': "how'd",
    'howll': "how'll", 'hows': "how's", 'isnt': "isn't", 'itd': "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    'itll': "it'll", "let's": "let's", 'maam': "ma'am", 'mightnt': "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", 'mightve': "might've", 'mustnt': "mustn't", 'mustve': "must've",
    'neednt': "needn't", 'notve': "not've", 'oclock': "o'clock", 'oughtnt': "oughtn't", "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", 'shant': "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", 'shouldve': "should've", 'shouldnt': "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": 'somebodyd', "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", 'somebodyll': "somebody'll", 'somebodys': "somebody's",
    'someoned': "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    'someonell': "someone'll", 'someones': "someone's", 'somethingd': "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", 'somethingll': "something'll",
    'thats': "that's", 'thered': "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    'therere': "there're", 'theres': "there's", 'theyd': "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", 'theyll': "they'll", 'theyre': "they're", 'theyve': "they've", 'twas': "'twas",
    'wasnt': "wasn't", "wed've": "we'd've", "we'dve": "we'd've", 'weve': "we've", 'werent': "weren't",
    'whatll': "what'll", 'whatre': "what're", 'whats': "what's", 'whatve': "what've", 'whens': "when's",
    'whered': "where'd", 'wheres': "where's", 'whereve': "where've", 'whod': "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", 'wholl': "who'll", 'whos': "who's", 'whove': "who've", 'whyll': "why'll",
    'whyre': "why're", 'whys': "why's", 'wont': "won't", 'wouldve': "would've", 'wouldnt': "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", 'yall': "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    'youd': "you'd", "youd've": "you'd've", "you'dve": "you'd've", 'youll': "you'll", 'youre': "you're",
    'youve': "you've",
}
_LLAVA_MANUAL_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                     "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_LLAVA_ARTICLES = ("a", "an", "the")
_LLAVA_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
# The published pattern "(?!<=\d)(\.)(?!\d)" is a typo for a lookbehind: it removes every period
# not followed by a digit. It is called as period_strip.sub("", text, re.UNICODE), so re.UNICODE
# (32) is the `count` argument: at most the first 32 such periods go. Both kept.
_LLAVA_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_LLAVA_PERIOD_COUNT = int(re.UNICODE)
_LLAVA_COMMA = re.compile(r"(\d)(\,)(\d)")


def llava_normalize(text: str) -> str:
    """LLaVA-Med's normalize_word, step by step (its caller lower-cases the text first)."""
    out = text
    for p in _LLAVA_PUNCT:
        # Punctuation beside a space (or any digit,digit in the text) is deleted, else becomes a space.
        if (p + " " in text or " " + p in text) or _LLAVA_COMMA.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    text = _LLAVA_PERIOD.sub("", out, _LLAVA_PERIOD_COUNT)
    kept = [_LLAVA_MANUAL_MAP.get(w, w) for w in text.lower().split()]
    kept = [_LLAVA_CONTRACTIONS.get(w, w) for w in kept if w not in _LLAVA_ARTICLES]
    return " ".join(kept).replace(",", "")


def _llava_word_counts(text: str) -> Counter:
    """eval_metrics.utils.split_sentence(text, 1): lower-cased whitespace words with their counts."""
    return Counter(text.lower().strip().split())


def llava_recall(prediction: str, reference: str) -> float:
    """The recall of eval_metrics.calculate_f1score, as run_eval.py called it.

    run_eval.py normalises both texts, and calculate_f1score normalises them again. True positives
    add the PREDICTION's count of each shared word, false negatives the reference's count of each
    missing word: "left left left" against "left lung" gives 3 / (3 + 1) = 0.75. An empty
    prediction or reference, or no shared word, gives 0.
    """
    pred = llava_normalize(llava_normalize(prediction.lower()))
    ref = llava_normalize(llava_normalize(reference.lower()))
    pred_words, ref_words = _llava_word_counts(pred), _llava_word_counts(ref)
    if not pred_words or not ref_words:
        return 0.0
    tp = sum(n for w, n in pred_words.items() if w in ref_words)
    fn = sum(n for w, n in ref_words.items() if w not in pred_words)
    return tp / (tp + fn) if tp else 0.0


def token_recall(prediction: str, reference: str) -> float:
    """Share of the reference's words (with multiplicity) that the prediction contains.

    The stand-in for open questions when no LLM judge is configured (medmax rule sets); not
    LLaVA-Med's recall (llava_recall).
    """
    ref = Counter(llava_normalize(reference.lower()).split())
    if not ref:
        raise ScoringInputError(f"reference {reference!r} has no words after normalisation")
    pred = Counter(llava_normalize(prediction.lower()).split())
    tp = sum(n for w, n in ref.items() if w in pred)
    return tp / sum(ref.values())


def llava_closed(prediction: str, answer: str) -> RuleResult:
    """run_eval.py: hit iff the prediction contains 'yes' or 'no' (substrings) and the reference."""
    pred, gt = llava_normalize(prediction.lower()), llava_normalize(answer.lower())
    if "yes" in pred or "no" in pred:
        correct = gt in pred
        note = "substring test after normalisation"
        if "no" in pred and "no" not in pred.split() and "yes" not in pred:
            note += "; flaw: 'no' matched inside another word"
    else:
        correct, note = False, "no answer found: neither 'yes' nor 'no' in the prediction"
    return RuleResult(bool(correct), pred or None, note)


def llava_open(prediction: str, answer: str) -> RuleResult:
    recall = llava_recall(prediction, answer)
    note = "LLaVA-Med recall (score); correct = full recall"
    if not llava_normalize(answer.lower()).split():
        note += "; reference empty after normalisation: recall 0"
    return RuleResult(recall >= 1.0, llava_normalize(prediction.lower()) or None, note, score=recall)


def llava_mcq(prediction: str, answer: str, prompt: str = "") -> RuleResult:
    result = strict_mcq(prediction, answer, prompt)
    return RuleResult(result.correct, result.extracted, f"{STAND_IN}: llava_med has no MCQ rule, the strict letter rule "
                      f"stands in: {result.note}")


# ----------------------------------------------------------------------------------------------
# Rule set `strict`
# ----------------------------------------------------------------------------------------------


def _canonical_yes_no(answer: str) -> str | None:
    w = normalize_strict(answer)
    return "yes" if w in YES_WORDS else "no" if w in NO_WORDS else None


def _strip_lead_in(text: str) -> str:
    # "The answer is X." -> "X": the lead-in is not part of the answer.
    m = re.search(r"\banswer\s*(?:is|:)\s*(.+)$", text, re.I | re.S)
    return m.group(1) if m else text


def strict_closed(prediction: str, answer: str) -> RuleResult:
    gold = _canonical_yes_no(answer)
    if gold is None:
        # A closed question whose answer is not yes/no (e.g. SLAKE 'left' / 'right').
        got = normalize_strict(_strip_lead_in(prediction))
        return RuleResult(got == normalize_strict(answer), got or None, "closed answer not yes/no: normalised exact match")
    extracted, note = extract_yes_no(prediction)
    return RuleResult(extracted == gold, extracted, note)


def strict_mcq(prediction: str, answer: str, prompt: str = "") -> RuleResult:
    gold = answer.strip().strip("().").upper()
    if not re.fullmatch(r"[A-Z]", gold):
        raise ScoringInputError(f"multiple-choice answer {answer!r} is not one option letter")
    options = parse_options(prompt) if prompt else {}
    extracted, note = extract_choice(prediction, options or None)
    return RuleResult(extracted == gold, extracted, note)


def strict_open(prediction: str, answer: str) -> RuleResult:
    got = normalize_strict(_strip_lead_in(prediction))
    gold = normalize_strict(answer)
    if not gold:
        raise ScoringInputError(f"reference {answer!r} is empty after normalisation")
    if _canonical_yes_no(answer) is not None:
        extracted, note = extract_yes_no(prediction)
        return RuleResult(extracted == _canonical_yes_no(answer), extracted, note)
    return RuleResult(got == gold, got or None, "normalised exact match" if got else "no answer found: empty prediction")


# ----------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------


def score_vqa_item(
    rule_set: str,
    question_type: str,
    prediction: str,
    answer: str,
    prompt: str = "",
    first_token: str | None = None,
) -> RuleResult:
    """Score one VQA item by a named rule set.

    For `medmax` / `medmax_tolerant` open questions this returns the token-recall stand-in; score.py
    replaces it by the LLM judge's verdict when a judge is configured (the public protocol).
    """
    if prediction is None:
        prediction = ""
    if answer is None:
        raise ScoringInputError("answer is missing")
    if rule_set not in RULE_SETS:
        raise ScoringInputError(f"unknown rule set {rule_set!r}; expected one of {RULE_SETS}")
    if question_type not in QUESTION_TYPES:
        raise ScoringInputError(f"unknown VQA question_type {question_type!r}; expected one of {QUESTION_TYPES}")
    if rule_set in JUDGED_RULE_SETS:
        if question_type == CLOSED:
            return medmax_closed(prediction, answer, first_token)
        if question_type == MCQ:
            return medmax_mcq(prediction, answer, first_token)
        recall = token_recall(prediction, answer)
        return RuleResult(recall >= 1.0, None, f"{STAND_IN}: no LLM judge configured, token recall of the reference",
                          score=recall)
    if rule_set == "llava_med":
        if question_type == CLOSED:
            return llava_closed(prediction, answer)
        if question_type == MCQ:
            return llava_mcq(prediction, answer, prompt)
        return llava_open(prediction, answer)
    if question_type == CLOSED:
        return strict_closed(prediction, answer)
    if question_type == MCQ:
        return strict_mcq(prediction, answer, prompt)
    return strict_open(prediction, answer)


RULE_FUNCTIONS: dict[tuple[str, str], Callable[..., RuleResult]] = {
    ("medmax", CLOSED): medmax_closed, ("medmax", MCQ): medmax_mcq,
    ("medmax_tolerant", CLOSED): medmax_closed, ("medmax_tolerant", MCQ): medmax_mcq,
    ("llava_med", CLOSED): llava_closed, ("llava_med", OPEN): llava_open, ("llava_med", MCQ): llava_mcq,
    ("strict", CLOSED): strict_closed, ("strict", OPEN): strict_open, ("strict", MCQ): strict_mcq,
}
