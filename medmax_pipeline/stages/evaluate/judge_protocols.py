"""The judge requests of the public MedMax evaluation, byte for byte, and how its replies are read.

Protocol data, not style: the prompt texts (indentation, blank lines and the f-string's ``\\n``
escapes included), the roles, and the request fields are those of the public code
(github.com/Hritikbansal/medmax, evaluation/eval_utils.py, visual_chat.py, mm_out.py at 20b7055),
so `accuracy_judged` and the relative scores are what the public code prints. Do not tidy them.

* open VQA (eval_utils.compare_messages_gen): one user message; the prediction is lower-cased
  first (vqa.py did); a reply is a verdict only if it contains the literal ``Correctness: 1``
  (checked first) or ``Correctness: 0``; any other reply was dropped (`continue`) by the public
  code: here it is kept and counted as unjudged.
* visual chat (visual_chat.py, the LLaVA-Med protocol): a system message (with its stray leading
  quote) and a user message with caption, context, question, Assistant 1 = the reference
  ``gpt4_answer``, Assistant 2 = the model's answer; the reply is stripped and its first line
  must hold exactly two numbers separated by one space.
* mm_out text (mm_out.py): the same without caption and context.

The request carries `model` and `messages` only (the public classes set temperature 0.0 but never
sent it); a temperature is sent only when the user configures one (judge.py).
"""

from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

# What a judge_replies row was asked: the protocol names stored in the artifact.
OPEN_VQA = "open_vqa"
VISUAL_CHAT = "visual_chat"
MM_OUT = "mm_out"
PROTOCOLS = (OPEN_VQA, VISUAL_CHAT, MM_OUT)

DOMAINS = ("chest_xray", "mri", "histology", "gross", "ct_scan")  # visual_chat.get_domain order


class JudgeInputError(ValueError):
    """A row cannot be put to the judge (e.g. a visual-chat answer that is not the qa50 dict)."""


# ----------------------------------------------------------------------------------------------
# Open VQA: eval_utils.compare_messages_gen
# ----------------------------------------------------------------------------------------------


def open_vqa_messages(question: str, true_answer: str, generated_answer: str) -> list[dict[str, str]]:
    """The public open-question request; pass the prediction as generated (lower-cased here)."""
    generated_answer = generated_answer.lower()
    # Copied verbatim from the public f-string: 8-space indents, 12 before "answer to be
    # determined", the "\n" escapes that add blank lines, and the closing 8-space line.
    prompt = f"""
        Given a question about an medical image, there is a correct answer to the question and an answer to be determined. If the answer to be determined matches the correct answer or is a good enough answer to the question, output 1; otherwise output 0. Evaluate the answer to be determined (1 or 0).

        Question:
        - question about the medical image: {question}\n

        Answers:
        - correct answer(ground truth): {true_answer}\n
            answer to be determined: {generated_answer}\n

        Task:\n
        - Given a question about an medical image, there is a correct answer to the question and an answer to be determined. If the answer to be determined matches the correct answer or is a good enough answer to the question, output 1; otherwise output 0. Evaluate the answer to be determined (1 or 0).

        Output Format:
        Correctness: your answer\n
        """
    return [{"role": "user", "content": prompt}]


def public_verdict(reply: str | None) -> tuple[bool | None, str]:
    """The verdict as vqa.py read it: substring tests, 'Correctness: 1' first; else unjudged."""
    if reply is None:
        return None, "unjudged: no reply"
    if "Correctness: 1" in reply:
        return True, "judge: Correctness: 1"
    if "Correctness: 0" in reply:
        return False, "judge: Correctness: 0"
    return None, "unjudged: no 'Correctness: 1' or 'Correctness: 0' in the reply (the public code drops it)"


_TOLERANT_VERDICT = re.compile(r"correctness\s*\**\s*[:=]\s*\**\s*([01])\b", re.I)


def tolerant_verdict(reply: str | None) -> tuple[bool | None, str]:
    """The public reading, then other spellings ('**Correctness:** 1', 'correctness:0'; last wins)."""
    correct, note = public_verdict(reply)
    if correct is not None or reply is None:
        return correct, note
    found = _TOLERANT_VERDICT.findall(reply)
    if found:
        return found[-1] == "1", f"judge: verdict {found[-1]} in a spelling the public code drops"
    return None, "unjudged: reply has no Correctness verdict"


# ----------------------------------------------------------------------------------------------
# Relative score: visual_chat.py / mm_out.py (LLaVA-Med's GPT review)
# ----------------------------------------------------------------------------------------------

INSTRUCT_PROMPT = """We would like to request your feedback on the performance of two AI assistants in response to the user question displayed above. The user asks the question on observing an image. For your reference, the visual content in the image is represented with caption describing the same image.
  Please rate the helpfulness, relevance, accuracy, level of details of their responses. Each assistant receives an overall score on a scale of 1 to 10, where a higher score indicates better overall performance.
  Please first output a single line containing only two values indicating the scores for Assistant 1 and 2, respectively. The two scores are separated by a space. In the subsequent line, please provide a comprehensive explanation of your evaluation, avoiding any potential bias and ensuring that the order in which the responses were presented does not affect your judgment."""
ROLE = "Assistant"
# The leading single quote is in the public string.
SYSTEM_PROMPT = """'You are a helpful and precise assistant for checking the quality of the answer."""


def _answers_and_instruction(ans1: Any, ans2: Any) -> str:
    return (f"[{ROLE} 1]\n{ans1}\n\n[End of {ROLE} 1]\n\n"
            f"[{ROLE} 2]\n{ans2}\n\n[End of {ROLE} 2]\n\n"
            f"[System]\n{INSTRUCT_PROMPT}\n\n")


def visual_chat_messages(fig_label: Any, fig_caption: Any, fig_context: Any, question: Any, ans1: Any,
                         ans2: Any) -> list[dict[str, str]]:
    """visual_chat.compare_messages_gen: values are formatted as the f-string did (str() of lists too)."""
    user = (f"[Context]\n"
            f"Figure Caption:\n{fig_label}: {fig_caption}\n\n"
            f"Figure Context:\n\t- {fig_context}\n\n"
            f"[Question]\n{question}\n\n" + _answers_and_instruction(ans1, ans2))
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def mm_out_messages(question: Any, ans1: Any, ans2: Any) -> list[dict[str, str]]:
    """mm_out.compare_messages_gen: no caption or context."""
    user = f"[Context]\n[Question]\n{question}\n\n" + _answers_and_instruction(ans1, ans2)
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def parse_visual_chat_answer(answer: str, where: str) -> dict[str, Any]:
    """The row's answer: a Python-literal dict (LLaVA-Med qa50), read with ast.literal_eval as the public code did."""
    try:
        value = ast.literal_eval(answer)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as exc:
        raise JudgeInputError(f"{where}: visual_chat answer is not a Python literal dict: {exc}") from exc
    if not isinstance(value, dict):
        raise JudgeInputError(f"{where}: visual_chat answer is a {type(value).__name__}, not a dict")
    missing = [k for k in ("gpt4_answer", "fig_label", "fig_caption", "in_text_mention") if k not in value]
    if missing:
        raise JudgeInputError(f"{where}: visual_chat answer lacks {missing}")
    return value


def visual_chat_domain(answer: Mapping[str, Any]) -> str | None:
    """visual_chat.get_domain: the first flagged domain, in its order; None when none is (or no dict)."""
    flags = answer.get("domain")
    if not isinstance(flags, Mapping):
        return None
    return next((d for d in DOMAINS if flags.get(d)), None)


@dataclass(frozen=True)
class RelativeScores:
    reference: float | None  # Assistant 1 (the reference answer)
    model: float | None  # Assistant 2 (the model)
    note: str

    @property
    def judged(self) -> bool:
        return self.reference is not None

    @property
    def relative(self) -> float | None:
        """s2 / s1 (visual_chat.py multiplies the mean of these by 100)."""
        return None if self.reference is None else self.model / self.reference


def parse_relative_scores(reply: str | None) -> RelativeScores:
    """The two scores of the reply's first line, as `x.strip().split('\\n')[0].strip().split(' ')`.

    The public code crashed on anything else (unpacking, float(), division by zero); such a reply
    is unjudged here, with the reason.
    """
    if reply is None:
        return RelativeScores(None, None, "unjudged: no reply")
    first = reply.strip().split("\n")[0].strip()
    parts = first.split(" ")
    if len(parts) != 2:
        return RelativeScores(None, None, f"unjudged: first line {first[:60]!r} is not two space-separated scores")
    try:
        s1, s2 = float(parts[0]), float(parts[1])
    except ValueError:
        return RelativeScores(None, None, f"unjudged: first line {first[:60]!r} is not two numbers")
    if not (math.isfinite(s1) and math.isfinite(s2)):
        return RelativeScores(None, None, f"unjudged: first line {first[:60]!r} has a non-finite score")
    if s1 == 0:
        return RelativeScores(None, None, "unjudged: Assistant 1 scored 0 (the relative score divides by it)")
    return RelativeScores(s1, s2, "judge: relative score s2/s1")
