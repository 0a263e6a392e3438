"""Stage 6: score predictions with a named rule set; per-item scores and a per-task summary.

    medmax score --predictions base.parquet trained.parquet --output results/scores --rules medmax \
        [--clip-scores clip_base.parquet clip_trained.parquet] [--judge-replies judge_base.parquet ...] \
        [--judge-config judge.json] [--clip CLIP_DIR] [--ckpt CKPT_DIR] [--image-root DIR] [--seed 0]
        [--credentialed-root ROOT ...]

Rule sets (--rules; scoring_rules.py has the details), each a separate output folder so a number
is always reported beside the rule that made it:
    medmax           the public MedMax code: one generated token for closed / mcq; open questions
                     judged with the public request, only the public verdict strings read
    medmax_tolerant  medmax, but verdicts in other spellings ('**Correctness:** 1') are read too
    llava_med        LLaVA-Med's own scorer, quirks included (open: its recall); its mcq rule is
                     the strict letter rule, labelled a stand-in
    strict           normalised exact match of the answer extracted from a sentence, with yes/no
                     synonyms (in the spirit of lmms-eval SLAKE)
Without judge replies, open questions under medmax / medmax_tolerant fall back to token recall
(labelled a stand-in). Captioning and image generation (CLIP cosine) and visual_chat / mm_out
(the judge's relative score; mm_out images by CLIP) are scored the same under every rule set.

Works on predictions from any model (columns: predictions.py). The expensive parts are per-model
jobs whose artifacts this command reads: `medmax clip-scores` (decoded images, CLIP similarities
for captioning, image generation and mm_out images) and `medmax judge` (LLM judge replies for
open questions, visual_chat and mm_out text). The workflow runs them once per model and passes
--clip-scores / --judge-replies, so scoring with each rule set is cheap. Each artifact is paired with the
predictions file it was made from by the predictions' fingerprint, whatever the order.
Standalone, `medmax score` can instead compute them itself (--clip/--ckpt/--image-root,
--judge-config; the same functions, the same numbers); without either, captioning and image
generation are "not scored" and open questions fall back to the rule set's text rule.

Outputs (both through artifacts.py):
    DIR/scores.parquet         one row per item: the prediction columns + rule_set, correct,
                               extracted, unjudged, score, score_ref_image, judge_reply, note
    DIR/score_summary.parquet  per model, task_name, question_type: n, n_judged, unjudged,
                               accuracy (mean item score, unjudged counted as 0: never dropped),
                               accuracy_judged (over judged items only, what the public code
                               reported), stderr = std(ddof=1)/sqrt(n), a seeded percentile
                               bootstrap 95% interval, metric, rule_set; plus one `vqa_average`
                               row per model: the unweighted mean over the 12 VQA tasks.
Values are fractions in [0, 1] (the paper prints percentages).

Both are credentialed when an input is (predictions, clip_scores, judge_replies artifacts) or when
a row's image lies under a --credentialed-root (real paths compared, symlinks followed; relative
paths under --image-root, else the working folder). Images read here are confined as generate
confines them (clip_scores.open_image).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa

from medmax_pipeline.core.artifacts import describe_input, rows_are_credentialed, write_artifact
from medmax_pipeline.core.paths import MissingRootError, resolve_roots
from medmax_pipeline.core.settings import add_setting_arguments, checked_settings, setting, values_from_args, workflow_arguments_for
from medmax_pipeline.stages.evaluate.clip_scores import (
    check_clip_scores,
    clip_score_rows,
    load_models,
    read_clip_scores,
)
from medmax_pipeline.stages.evaluate.judge_protocols import (
    JudgeInputError,
    parse_relative_scores,
    parse_visual_chat_answer,
    public_verdict,
    tolerant_verdict,
    visual_chat_domain,
)
from medmax_pipeline.stages.evaluate.judge_replies import (
    check_credentialed_allowed,
    check_judge_replies,
    judge_rows,
    judged_items,
    read_judge_replies,
    reply_record,
)
from medmax_pipeline.stages.evaluate.predictions import (
    CAPTIONING,
    IMAGE_GENERATION,
    MM_OUT,
    PREDICTION_COLUMNS,
    VISUAL_CHAT,
    VQA,
    ScoreError,
    credentialed_image_rows,
    is_judged,
    marked_input,
    predictions_fingerprint,
    read_predictions,
    scorer_of,
)
from medmax_pipeline.stages.evaluate.scoring_rules import (
    JUDGED_RULE_SETS,
    OPEN,
    RULE_SETS,
    STAND_IN,
    VQA_TASK_SET,
    VQA_TASKS,
    RuleResult,
    ScoringInputError,
    score_vqa_item,
)

SCORE_COLUMNS: dict[str, pa.DataType] = {
    "rule_set": pa.string(),
    "correct": pa.bool_(),
    "extracted": pa.string(),
    "unjudged": pa.bool_(),
    "score": pa.float64(),
    "score_ref_image": pa.float64(),
    "reference_judge_score": pa.float64(),
    "model_judge_score": pa.float64(),
    "judge_reply": pa.string(),
    "note": pa.string(),
}
SUMMARY_SCHEMA = pa.schema([
    ("model", pa.string()), ("task_name", pa.string()), ("question_type", pa.string()), ("rule_set", pa.string()),
    ("metric", pa.string()), ("n", pa.int64()), ("n_judged", pa.int64()), ("unjudged", pa.int64()),
    ("accuracy", pa.float64()), ("accuracy_judged", pa.float64()), ("stderr", pa.float64()),
    ("ci_low", pa.float64()), ("ci_high", pa.float64()), ("n_bootstrap", pa.int64()), ("seed", pa.int64()),
    ("n_tasks", pa.int64()), ("mean_reference_score", pa.float64()), ("mean_model_score", pa.float64()),
    ("stand_in", pa.bool_()), ("note", pa.string()),
])
AVERAGE_TASK = "vqa_average"
# Visual chat summary groups besides the question types (visual_chat.py's table columns).
VISUAL_CHAT_GROUPS = ("conversation", "detailed_description", "chest_xray", "mri", "histology", "gross", "ct_scan", "overall")


# ----------------------------------------------------------------------------------------------
# Statistics: pure functions
# ----------------------------------------------------------------------------------------------


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and std(ddof=1)/sqrt(n), as the public code computed; stderr is NaN below 2 items."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return math.nan, math.nan
    se = float(np.std(arr, ddof=1) / np.sqrt(arr.size)) if arr.size > 1 else math.nan
    return float(arr.mean()), se


def group_seed(seed: int, *key: str) -> int:
    """A per-group seed, so one group's interval does not depend on which other groups exist."""
    digest = hashlib.blake2b(json.dumps([seed, *key]).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def bootstrap_ci(values: Sequence[float], n_resamples: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (resampling items with replacement)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = arr[rng.integers(0, arr.size, size=(n_resamples, arr.size))].mean(axis=1)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def bootstrap_average_ci(groups: Sequence[Sequence[float]], n_resamples: int = 1000, seed: int = 0,
                         level: float = 0.95) -> tuple[float, float]:
    """Interval of the unweighted mean of group means, resampling each group independently."""
    arrays = [np.asarray(g, dtype=np.float64) for g in groups if len(g)]
    if not arrays:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    total = np.zeros(n_resamples)
    for arr in arrays:
        total += arr[rng.integers(0, arr.size, size=(n_resamples, arr.size))].mean(axis=1)
    means = total / len(arrays)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


# ----------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------


def _item(rule_set: str, *, correct: bool | None = None, extracted: str | None = None, unjudged: bool, score: float | None,
          note: str, score_ref_image: float | None = None, reference_judge_score: float | None = None,
          model_judge_score: float | None = None, judge_reply: str | None = None) -> dict[str, Any]:
    return {"rule_set": rule_set, "correct": correct, "extracted": extracted, "unjudged": unjudged, "score": score,
            "score_ref_image": score_ref_image, "reference_judge_score": reference_judge_score,
            "model_judge_score": model_judge_score, "judge_reply": judge_reply, "note": note}


def _verdict_row(result: RuleResult, rule_set: str) -> dict[str, Any]:
    return _item(rule_set, correct=result.correct, extracted=result.extracted, unjudged=result.correct is None,
                 score=result.score, note=result.note)


def _reply_failure(record: Mapping[str, Any]) -> str:
    return record["failure"] or "unjudged: no reply"


def _open_judge_row(record: Mapping[str, Any], rule_set: str) -> dict[str, Any]:
    """An open VQA item from its judge reply: the public verdict strings (medmax) or any spelling (medmax_tolerant)."""
    reply = record["judge_reply"]
    read = public_verdict if rule_set == "medmax" else tolerant_verdict
    correct, note = read(reply) if reply is not None else (None, _reply_failure(record))
    return _item(rule_set, correct=correct, unjudged=correct is None, score=None if correct is None else float(correct),
                 judge_reply=reply, note=note + (" (cached)" if record["cached"] else ""))


def _relative_row(record: Mapping[str, Any] | None, rule_set: str) -> dict[str, Any]:
    """A visual_chat / mm_out text item from its judge reply: s2 / s1 of the reply's first line."""
    if record is None:
        return _item(rule_set, unjudged=True, score=None, note="not scored: the relative score needs the LLM judge (evaluate.judge)")
    reply = record["judge_reply"]
    if reply is None:
        return _item(rule_set, unjudged=True, score=None, note=_reply_failure(record))
    scores = parse_relative_scores(reply)
    return _item(rule_set, unjudged=not scores.judged, score=scores.relative, reference_judge_score=scores.reference,
                 model_judge_score=scores.model, judge_reply=reply, note=scores.note + (" (cached)" if record["cached"] else ""))


def _clip_row(result: Mapping[str, Any], rule_set: str) -> dict[str, Any]:
    return _item(rule_set, unjudged=result["unjudged"], score=result["score"], score_ref_image=result["score_ref_image"],
                 note=result["note"])


def score_rows(rows: list[dict[str, Any]], rule_set: str, *, source: str = "predictions",
               clip_results: Mapping[int, Mapping[str, Any]] | None = None,
               judge_replies: Mapping[int, Mapping[str, Any]] | None = None,
               judge: Any = None, clip: Any = None, vqgan: Any = None,
               image_root: str | Path | None = None) -> list[dict[str, Any]]:
    """Score prediction rows (dicts with PREDICTION_COLUMNS); returns the SCORE_COLUMNS per row.

    clip_results (CLIP_SCORES_SCHEMA rows by row index, from `medmax clip-scores`) and
    judge_replies (JUDGE_REPLIES_SCHEMA rows by row index, from `medmax judge`) are the per-model
    results. When they are not given they are computed here: with the live `clip` / `vqgan`
    models and `judge` when given, else captioning, image generation and the judged families are
    "not scored" and open questions fall back to the rule set's text rule (a stand-in for medmax).
    """
    if rule_set not in RULE_SETS:
        raise ScoreError(f"unknown rule set {rule_set!r}; expected one of {RULE_SETS}")
    if clip_results is None:
        clip_results = {r["row"]: r for r in clip_score_rows(rows, clip, vqgan, image_root, source)}
    if judge_replies is None and judge is not None:
        judge_replies = {i: reply_record(i, rows[i], r) for i, r in judge_rows(rows, judge, source).items()}
    out: list[dict[str, Any]] = []
    for i, row in enumerate(rows):
        task, qtype = row["task_name"], row["question_type"]
        where = f"{source} row {i} ({task}/{qtype})"
        if task is None or qtype is None:
            raise ScoreError(f"{where}: task_name and question_type must not be empty")
        scorer = scorer_of(task, qtype)
        if judge_replies is not None and is_judged(row) and i not in judge_replies:
            raise ScoreError(f"{where}: the judge replies have no entry for this row")
        record = judge_replies.get(i) if judge_replies is not None else None
        if scorer == VQA:
            try:
                result = score_vqa_item(rule_set, qtype, row["prediction"] or "", row["answer"], row["prompt"] or "",
                                        row["prediction_first_token"])
            except ScoringInputError as exc:
                raise ScoreError(f"{where}: {exc}") from exc
            if (task, qtype) not in VQA_TASK_SET:
                result = RuleResult(result.correct, result.extracted, result.note + "; task outside the 12 VQA tasks",
                                    score=result.score)
            if rule_set in JUDGED_RULE_SETS and record is not None:
                out.append(_open_judge_row(record, rule_set))
            else:
                out.append(_verdict_row(result, rule_set))
        elif scorer in (CAPTIONING, IMAGE_GENERATION):
            if i not in clip_results:
                raise ScoreError(f"{where}: the CLIP scores have no entry for this row")
            out.append(_clip_row(clip_results[i], rule_set))
        elif scorer == VISUAL_CHAT:
            try:
                parse_visual_chat_answer(row["answer"] or "", where)  # the domain is read from it when summarising
            except JudgeInputError as exc:
                raise ScoreError(str(exc)) from exc
            out.append(_relative_row(record, rule_set))
        elif scorer == MM_OUT:
            if i not in clip_results:
                raise ScoreError(f"{where}: the CLIP scores have no entry for this row")
            item = _relative_row(record, rule_set)
            image = clip_results[i]
            item["score_ref_image"] = image["score_ref_image"]
            item["note"] = f"text: {item['note']}; image: {image['note']}"
            out.append(item)
        else:
            out.append(_item(rule_set, unjudged=True, score=None, note=f"not scored: no scorer for task {task!r}"))
    return out


# ----------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------


def _metric_name(rule_set: str, task: str, qtype: str) -> str:
    if task in (CAPTIONING, IMAGE_GENERATION):
        return "clip_cosine"
    if qtype == OPEN:
        return "judge_accuracy" if rule_set in JUDGED_RULE_SETS else "llava_recall" if rule_set == "llava_med" else "accuracy"
    return "accuracy"


def _stats(model: str, task: str, qtype: str, rule_set: str, metric: str, values: Sequence[float], *, n: int,
           n_judged: int, unjudged: int, accuracy_judged: float, n_bootstrap: int, seed: int, stand_in: bool = False,
           note: str = "", means: tuple[float, float] = (math.nan, math.nan)) -> dict[str, Any]:
    mean, se = mean_and_stderr(values)
    lo, hi = bootstrap_ci(values, n_bootstrap, group_seed(seed, model, task, qtype, rule_set))
    return {"model": model, "task_name": task, "question_type": qtype, "rule_set": rule_set,
            "metric": metric + ("_stand_in" if stand_in else ""), "n": n, "n_judged": n_judged, "unjudged": unjudged,
            "accuracy": mean, "accuracy_judged": accuracy_judged, "stderr": se, "ci_low": lo, "ci_high": hi,
            "n_bootstrap": n_bootstrap, "seed": seed, "n_tasks": 1, "mean_reference_score": means[0],
            "mean_model_score": means[1], "stand_in": stand_in, "note": note}


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else math.nan


def _relative_summary(model: str, task: str, group: str, rule_set: str, rows: Sequence[Mapping[str, Any]],
                      n_bootstrap: int, seed: int) -> dict[str, Any]:
    """visual_chat.py's table entry: mean of s2/s1 over judged items (x100 in the paper), both mean scores."""
    judged = [r for r in rows if not r["unjudged"]]
    values = [r["score"] for r in judged]
    note = f"{len(rows) - len(judged)} unjudged left out (the public code would have stopped)" if len(judged) < len(rows) else ""
    return _stats(model, task, group, rule_set, "relative_score", values, n=len(rows), n_judged=len(judged),
                  unjudged=len(rows) - len(judged), accuracy_judged=_mean(values), n_bootstrap=n_bootstrap, seed=seed,
                  note=note, means=(_mean([r["reference_judge_score"] for r in judged]),
                                    _mean([r["model_judge_score"] for r in judged])))


def _mm_out_image_summary(model: str, rule_set: str, rows: Sequence[Mapping[str, Any]], n_bootstrap: int,
                          seed: int) -> dict[str, Any]:
    """mm_out.py's image_score: CLIP cosine(generated, reference) averaged over the items that produced an image."""
    values = [r["score_ref_image"] for r in rows if r["score_ref_image"] is not None]
    no_image = sum("image: no" in (r["note"] or "") for r in rows)
    not_scored = len(rows) - len(values) - no_image
    note = f"{no_image} produced no image" + (f"; {not_scored} images not scored (needs clip and ckpt)" if not_scored else "")
    return _stats(model, MM_OUT, "image", rule_set, "clip_image_cosine", values, n=len(rows), n_judged=len(values),
                  unjudged=len(rows) - len(values), accuracy_judged=_mean(values), n_bootstrap=n_bootstrap, seed=seed,
                  note=note)


def _visual_chat_group(row: Mapping[str, Any]) -> str | None:
    answer = parse_visual_chat_answer(row["answer"] or "", "visual_chat row")
    return visual_chat_domain(answer)


def summarize(scores: list[dict[str, Any]], n_bootstrap: int = 1000, seed: int = 0) -> list[dict[str, Any]]:
    """Per (model, task, question type) statistics, plus a 12-task VQA average row per model.

    visual_chat: per question type, per domain and overall (visual_chat.py); mm_out: the text's
    relative score overall and the image's CLIP similarity. A number made by a stand-in for the
    rule set's own rule has `stand_in` true and a metric name ending in `_stand_in`; an average
    containing one says so in its metric name.
    """
    groups: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
    special: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
    for row in scores:
        task = row["task_name"]
        if task == VISUAL_CHAT:
            for group in (row["question_type"], _visual_chat_group(row), "overall"):
                if group is not None:
                    special.setdefault((row["model"], task, group, row["rule_set"]), []).append(row)
        elif task == MM_OUT:
            special.setdefault((row["model"], task, "overall", row["rule_set"]), []).append(row)
        else:
            groups.setdefault((row["model"], task, row["question_type"], row["rule_set"]), []).append(row)
    summary = []
    per_model_tasks: dict[tuple[str, str], dict[tuple[str, str], np.ndarray]] = {}
    stand_in_tasks: dict[tuple[str, str], list[str]] = {}
    for (model, task, qtype, rule_set), rows in sorted(groups.items()):
        stand_in = any(STAND_IN in (r["note"] or "") for r in rows)
        metric = _metric_name(rule_set, task, qtype)
        if metric == "judge_accuracy" and stand_in:
            metric = "token_recall"  # no judge: the recall stands in
        unjudged = sum(bool(r["unjudged"]) for r in rows)
        judged = [r["score"] for r in rows if not r["unjudged"] and r["score"] is not None]
        if metric == "clip_cosine":
            values = judged  # an unscorable image has no similarity; it is counted in `unjudged`
            note = f"{unjudged} rows not scored" if unjudged else ""
        else:
            values = [0.0 if (r["unjudged"] or r["score"] is None) else r["score"] for r in rows]  # never dropped
            note = f"{unjudged} unjudged counted as wrong" if unjudged else ""
        if stand_in:
            reason = next(r["note"] for r in rows if STAND_IN in (r["note"] or ""))
            note = "; ".join(x for x in (note, reason[reason.index(STAND_IN):].split(";")[0]) if x)
        summary.append(_stats(model, task, qtype, rule_set, metric, values, n=len(rows), n_judged=len(judged),
                              unjudged=unjudged, accuracy_judged=_mean(judged), n_bootstrap=n_bootstrap, seed=seed,
                              stand_in=stand_in, note=note))
        if (task, qtype) in VQA_TASK_SET:
            per_model_tasks.setdefault((model, rule_set), {})[(task, qtype)] = np.asarray(values, dtype=np.float64)
            if stand_in:
                stand_in_tasks.setdefault((model, rule_set), []).append(f"{task}/{qtype}")
    for (model, task, group, rule_set), rows in sorted(special.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][3],
                                                                                          _group_order(kv[0][2]))):
        summary.append(_relative_summary(model, task, group, rule_set, rows, n_bootstrap, seed))
        if task == MM_OUT:
            summary.append(_mm_out_image_summary(model, rule_set, rows, n_bootstrap, seed))
    for (model, rule_set), tasks in sorted(per_model_tasks.items()):
        ordered = [tasks[t] for t in VQA_TASKS if t in tasks]
        means = [float(a.mean()) for a in ordered]
        ses = [mean_and_stderr(a)[1] for a in ordered]
        lo, hi = bootstrap_average_ci(ordered, n_bootstrap, group_seed(seed, model, AVERAGE_TASK, rule_set))
        missing = [f"{t}/{q}" for t, q in VQA_TASKS if (t, q) not in tasks]
        stand_ins = stand_in_tasks.get((model, rule_set), [])
        rows_here = [r for r in summary if r["model"] == model and r["rule_set"] == rule_set and (r["task_name"], r["question_type"]) in tasks]
        notes = [("missing tasks: " + ", ".join(missing)) if missing else "all 12 VQA tasks"]
        if stand_ins:
            notes.append("stand-ins in: " + ", ".join(stand_ins))
        summary.append({
            "model": model, "task_name": AVERAGE_TASK, "question_type": "all", "rule_set": rule_set,
            "metric": "mean_of_task_means" + ("_with_stand_ins" if stand_ins else ""), "n": int(sum(a.size for a in ordered)),
            "n_judged": int(sum(r["n_judged"] for r in rows_here)), "unjudged": int(sum(r["unjudged"] for r in rows_here)),
            "accuracy": float(np.mean(means)), "accuracy_judged": math.nan,
            # Tasks are independent samples: the variance of an average of k means is sum(se^2)/k^2.
            "stderr": float(math.sqrt(sum(s * s for s in ses)) / len(ses)) if all(not math.isnan(s) for s in ses) else math.nan,
            "ci_low": lo, "ci_high": hi, "n_bootstrap": n_bootstrap, "seed": seed, "n_tasks": len(ordered),
            "mean_reference_score": math.nan, "mean_model_score": math.nan, "stand_in": bool(stand_ins),
            "note": "; ".join(notes),
        })
    return summary


def _group_order(group: str) -> int:
    return VISUAL_CHAT_GROUPS.index(group) if group in VISUAL_CHAT_GROUPS else len(VISUAL_CHAT_GROUPS)


# ----------------------------------------------------------------------------------------------
# Stage entry points
# ----------------------------------------------------------------------------------------------


def pair_with_predictions(predictions: Sequence[str | Path], artifacts: Sequence[str | Path], read: Any,
                          option: str) -> list[tuple[Path, Any, dict[str, Any]]]:
    """For each predictions file, the per-model artifact made from it: (path, results, params).

    Artifacts are matched by the `predictions_fingerprint` they record, not by position, so a
    list in another order still pairs right and a stale artifact is refused by name.
    """
    by_fingerprint: dict[str, tuple[Path, Any, dict[str, Any]]] = {}
    for artifact in artifacts:
        results, params = read(artifact)
        fingerprint = params.get("predictions_fingerprint")
        if fingerprint is None:
            raise ScoreError(f"{artifact}: its lineage params lack predictions_fingerprint")
        if fingerprint in by_fingerprint:
            raise ScoreError(f"{option}: {by_fingerprint[fingerprint][0]} and {artifact} were made from the same predictions")
        by_fingerprint[fingerprint] = (Path(artifact), results, params)
    paired, used = [], set()
    for path in predictions:
        fingerprint = predictions_fingerprint(path)
        if fingerprint not in by_fingerprint:
            raise ScoreError(f"{path}: none of the {option} artifacts was made from it (predictions fingerprint "
                             f"{fingerprint}); rerun that job on these predictions")
        paired.append(by_fingerprint[fingerprint])
        used.add(fingerprint)
    unused = [str(by_fingerprint[f][0]) for f in by_fingerprint if f not in used]
    if unused:
        raise ScoreError(f"{option}: {unused} match none of the predictions files")
    return paired


def _one_value(params: Sequence[Mapping[str, Any]], key: str, option: str) -> Any:
    """The value of `key` shared by every per-model artifact: models scored differently are not comparable."""
    values = sorted({json.dumps(p.get(key)) for p in params})
    if len(values) > 1:
        raise ScoreError(f"{option}: the artifacts disagree on {key} ({', '.join(values)}); rerun them alike")
    return json.loads(values[0]) if values else None


def score_predictions(
    predictions: Sequence[str | Path],
    output_dir: str | Path,
    rules: str = "medmax",
    judge_config: str | Path | None = None,
    clip_dir: str | Path | None = None,
    ckpt_dir: str | Path | None = None,
    image_root: str | Path | None = None,
    seed: int = 0,
    n_bootstrap: int = 1000,
    device: str = "cpu",
    clip_scores: Sequence[str | Path] = (),
    judge_replies: Sequence[str | Path] = (),
    clip_text_tower: str | Path | None = None,
    credentialed_roots: Sequence[str | Path] = (),
) -> tuple[Path, Path]:
    """Score predictions files; write DIR/scores.parquet and DIR/score_summary.parquet.

    clip_scores / judge_replies: per-model artifacts of `medmax clip-scores` / `medmax judge`
    (one per predictions file); otherwise clip_dir (+ ckpt_dir) and judge_config compute the
    same results in this process. credentialed_roots: a predictions file with a row whose image
    lies under one of them is a credentialed input.
    """
    try:
        roots = resolve_roots(credentialed_roots)
    except MissingRootError as exc:
        raise ScoreError(str(exc)) from None
    if rules not in RULE_SETS:
        raise ScoreError(f"unknown rule set {rules!r}; expected one of {RULE_SETS}")
    if clip_scores and (clip_dir is not None or ckpt_dir is not None):
        raise ScoreError("give either --clip-scores or --clip/--ckpt, not both")
    if clip_text_tower is not None and clip_dir is None:
        raise ScoreError("--clip-text-tower is the text tower of --clip; give --clip too")
    if judge_replies and judge_config is not None:
        raise ScoreError("give either --judge-replies or --judge-config, not both")
    judge = None
    if judge_config is not None:
        from medmax_pipeline.stages.evaluate.judge import LLMJudge, load_judge_config

        judge = LLMJudge(load_judge_config(judge_config))
    # The VQGAN only serves CLIP scoring here (medmax clip-scores also decodes without CLIP).
    clip, vqgan = load_models(clip_dir, ckpt_dir if clip_dir is not None else None, device, clip_text_tower)
    clip_pairs = pair_with_predictions(predictions, clip_scores, read_clip_scores, "--clip-scores") if clip_scores else []
    judge_pairs = pair_with_predictions(predictions, judge_replies, read_judge_replies, "--judge-replies") if judge_replies else []
    # Each file read once: its rows and its lineage entry, credentialed by its footer, its rows'
    # credential or an image under a credentialed root.
    loaded = []
    for path in predictions:
        table = read_predictions(path)
        rows = table.to_pylist()
        credentialed = rows_are_credentialed(table) or bool(credentialed_image_rows([r["image_path"] for r in rows], image_root, roots))
        loaded.append((path, table, rows, marked_input(path, credentialed)))
    if judge is not None:
        # The same consent `medmax judge` asks for, checked for every file before any request leaves.
        for path, _, rows, entry in loaded:
            if entry["credential"] == "credentialed" and judged_items(rows):
                check_credentialed_allowed(path, judge.config)
    tables, prediction_inputs = [], []
    for k, (path, table, rows, entry) in enumerate(loaded):
        prediction_inputs.append(entry)
        clip_results = judge_records = None
        if clip_pairs:
            artifact, clip_results, _ = clip_pairs[k]
            check_clip_scores(clip_results, rows, artifact, path)
        if judge_pairs:
            artifact, judge_records, _ = judge_pairs[k]
            check_judge_replies(judge_records, rows, artifact, path)
        scored = score_rows(rows, rules, source=str(path), clip_results=clip_results, judge_replies=judge_records,
                            judge=judge, clip=clip, vqgan=vqgan, image_root=image_root)
        extra = {name: pa.array([s[name] for s in scored], dtype) for name, dtype in SCORE_COLUMNS.items()}
        tables.append(pa.table({**{n: table.column(n) for n in PREDICTION_COLUMNS}, **extra}))
    scores = pa.concat_tables(tables) if tables else pa.table({n: pa.array([], t) for n, t in {**PREDICTION_COLUMNS, **SCORE_COLUMNS}.items()})
    output_dir = Path(output_dir)
    judge_params = [p for _, _, p in judge_pairs]
    clip_used = str(clip_dir) if clip_dir else _one_value([p for _, _, p in clip_pairs], "clip", "--clip-scores")
    if judge is not None:
        from medmax_pipeline.stages.evaluate.judge_replies import request_params

        judge_request = request_params(judge.config)
    else:
        judge_request = {key: _one_value(judge_params, key, "--judge-replies")
                         for key in ("judge_model", "judge_request_fields", "judge_temperature")}
    params = {"rules": rules, "seed": seed, "n_bootstrap": n_bootstrap, **judge_request, "clip": clip_used}
    if judge is not None:
        params["judge_stats"] = judge.stats.as_dict()
    elif judge_params:
        params["judge_stats"] = {key: sum(p.get("judge_stats", {}).get(key, 0) for p in judge_params)
                                 for key in judge_params[0].get("judge_stats", {})}
    extra_inputs = [p for p in (judge_config, clip_dir, clip_text_tower, ckpt_dir) if p is not None]
    scores_path = output_dir / "scores.parquet"
    inputs = [*prediction_inputs, *(describe_input(p) for p in [*clip_scores, *judge_replies, *extra_inputs])]
    write_artifact(scores, scores_path, artifact="scores", inputs=inputs, params=params)
    summary = summarize(scores.to_pylist(), n_bootstrap=n_bootstrap, seed=seed)
    summary_table = pa.Table.from_pylist(summary, schema=SUMMARY_SCHEMA)
    summary_path = output_dir / "score_summary.parquet"
    write_artifact(summary_table, summary_path, artifact="score_summary", inputs=[scores_path], params=params)
    return scores_path, summary_path


@dataclass(frozen=True)
class ScoreConfig:
    """score's settings, the one source of its command line and of the score rule's options (the
    config.yaml `evaluate:` keys bootstrap_samples and bootstrap_seed; tests/test_stage_settings.py
    checks the schema against it). The rule set is the job's wildcard, the files are its inputs."""

    # At least 100 resamples, as the schema has always asked: fewer give percentile intervals too
    # coarse to report (score_predictions itself takes any count, for quick tests).
    n_bootstrap: int = setting(1000, help="bootstrap resamples (default 1000, at least 100)", key="bootstrap_samples",
                               identity=True, minimum=100)
    seed: int = setting(0, help="bootstrap seed", key="bootstrap_seed", identity=True, minimum=0)
    # Only used with --clip (CLIP similarities computed here); the workflow reads the clip_scores
    # artifacts instead, so the rule has no device to set.
    device: str = setting("cpu", help="torch device of --clip and the VQGAN, e.g. cpu or cuda")


def score_config_from_args(args: argparse.Namespace) -> ScoreConfig:
    return checked_settings(ScoreConfig, values_from_args(ScoreConfig, args), ScoreError)


def workflow_arguments(section: Mapping[str, Any]) -> list[str]:
    """The score options for the config.yaml `evaluate:` SECTION (the score rule passes these)."""
    return workflow_arguments_for(ScoreConfig, section)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--predictions", nargs="+", required=True, help="predictions files (artifact, parquet, jsonl, csv)")
    parser.add_argument("--output", required=True, help="output folder for scores.parquet and score_summary.parquet")
    parser.add_argument("--rules", choices=RULE_SETS, default="medmax", help="scoring rule set (default medmax)")
    parser.add_argument("--clip-scores", nargs="+", default=[],
                        help="clip_scores artifacts of `medmax clip-scores`, one per predictions file (any order)")
    parser.add_argument("--judge-replies", nargs="+", default=[],
                        help="judge_replies artifacts of `medmax judge`, one per predictions file (any order)")
    parser.add_argument("--judge-config", help="JSON/YAML config of an OpenAI-compatible judge for open questions")
    parser.add_argument("--clip", help="local BiomedCLIP folder in hub layout (open_clip_config.json, weights, tokenizer files)")
    parser.add_argument("--clip-text-tower", help="folder with the config.json of the CLIP's HF text tower (BiomedBERT)")
    parser.add_argument("--ckpt", help="checkpoint folder whose VQGAN decodes generated image tokens")
    parser.add_argument("--image-root", help="root that image_path values are relative to (paths may not leave it)")
    parser.add_argument("--credentialed-root", action="append", default=[], metavar="ROOT",
                        help="a credentialed image root (repeatable): a row whose image lies under it (symlinks "
                             "followed) makes the scores credentialed")
    add_setting_arguments(parser, ScoreConfig)


def run(args: argparse.Namespace) -> int:
    settings = score_config_from_args(args)
    scores_path, summary_path = score_predictions(
        args.predictions, args.output, args.rules, args.judge_config, args.clip, args.ckpt, args.image_root,
        settings.seed, settings.n_bootstrap, settings.device, args.clip_scores, args.judge_replies, args.clip_text_tower,
        args.credentialed_root,
    )
    print(f"wrote {scores_path} and {summary_path}")
    return 0
