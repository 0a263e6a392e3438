"""Stage 6: score predictions with a named rule set; per-item scores and a per-task summary.

    medmax score --predictions base.parquet trained.parquet --output results/scores --rules medmax \
        [--judge-config judge.json] [--clip CLIP_DIR] [--ckpt CKPT_DIR] [--image-root DIR] [--seed 0]

Works on predictions from any model. The minimal columns of a predictions file (parquet artifact
from `medmax generate`, or a plain .parquet / .jsonl / .csv from anywhere, e.g. GPT-4o outputs):

    task_name, question_type, answer, prediction
    model          optional; defaults to the file's stem
    prompt         needed for the LLM judge (the question) and to read MCQ option texts
    image_path     needed for captioning CLIP scores (with --image-root)
    prediction_first_token   optional; the medmax rule reads the first generated token, else
                   it approximates that token from the text (noted per row)
    generated_image_tokens   image generation only: 1024 VQGAN codes (+4 vocab offset or not)

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
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from medmax_pipeline.core.artifacts import ArtifactError, is_artifact, read_artifact, write_artifact
from medmax_pipeline.stages.evaluate.scoring_rules import (
    OPEN,
    QUESTION_TYPES,
    RULE_SETS,
    VQA_TASK_SET,
    VQA_TASKS,
    RuleResult,
    ScoringInputError,
    score_vqa_item,
)

REQUIRED_COLUMNS = ("task_name", "question_type", "answer", "prediction")
PREDICTION_COLUMNS: dict[str, pa.DataType] = {
    "task_name": pa.string(),
    "question_type": pa.string(),
    "prompt": pa.string(),
    "answer": pa.string(),
    "image_path": pa.string(),
    "model": pa.string(),
    "prediction": pa.string(),
    "prediction_first_token": pa.string(),
    "generated_image_tokens": pa.list_(pa.int32()),
}
SCORE_COLUMNS: dict[str, pa.DataType] = {
    "rule_set": pa.string(),
    "correct": pa.bool_(),
    "extracted": pa.string(),
    "unjudged": pa.bool_(),
    "score": pa.float64(),
    "score_ref_image": pa.float64(),
    "judge_reply": pa.string(),
    "note": pa.string(),
}
SUMMARY_SCHEMA = pa.schema([
    ("model", pa.string()), ("task_name", pa.string()), ("question_type", pa.string()), ("rule_set", pa.string()),
    ("metric", pa.string()), ("n", pa.int64()), ("n_judged", pa.int64()), ("unjudged", pa.int64()),
    ("accuracy", pa.float64()), ("accuracy_judged", pa.float64()), ("stderr", pa.float64()),
    ("ci_low", pa.float64()), ("ci_high", pa.float64()), ("n_bootstrap", pa.int64()), ("seed", pa.int64()),
    ("n_tasks", pa.int64()), ("note", pa.string()),
])
CAPTIONING = "image_captioning"
IMAGE_GENERATION = "image_generation"
AVERAGE_TASK = "vqa_average"


class ScoreError(ValueError):
    """A predictions file or row cannot be scored; the message names the file and row."""


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
# Reading predictions
# ----------------------------------------------------------------------------------------------


def read_predictions(path: str | Path) -> pa.Table:
    """A predictions artifact, or a plain parquet / jsonl / csv file with at least REQUIRED_COLUMNS."""
    path = Path(path)
    if not path.is_file():
        raise ScoreError(f"predictions file {path} does not exist")
    try:
        if path.suffix == ".parquet":
            table = read_artifact(path, artifact="predictions") if is_artifact(path) else pq.read_table(path)
        elif path.suffix in (".jsonl", ".json"):
            import pyarrow.json as pj

            table = pj.read_json(path)
        elif path.suffix == ".csv":
            import pyarrow.csv as pcsv

            table = pcsv.read_csv(path)
        else:
            raise ScoreError(f"{path}: unsupported predictions format {path.suffix!r} (parquet, jsonl or csv)")
    except ArtifactError as exc:
        raise ScoreError(str(exc)) from exc
    except pa.ArrowInvalid as exc:
        raise ScoreError(f"{path}: unreadable predictions file: {exc}") from exc
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise ScoreError(f"{path}: predictions lack the required columns {missing} (have {table.column_names})")
    columns = {}
    for name, dtype in PREDICTION_COLUMNS.items():
        if name in table.column_names:
            try:
                columns[name] = table.column(name).cast(dtype)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise ScoreError(f"{path}: column {name!r} cannot be read as {dtype}: {exc}") from exc
        elif name == "model":
            columns[name] = pa.array([path.stem] * table.num_rows, pa.string())
        else:
            columns[name] = pa.nulls(table.num_rows, dtype)
    return pa.table(columns)


# ----------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------


def _verdict_row(result: RuleResult, rule_set: str) -> dict[str, Any]:
    return {"rule_set": rule_set, "correct": result.correct, "extracted": result.extracted,
            "unjudged": result.correct is None, "score": result.score, "score_ref_image": None,
            "judge_reply": None, "note": result.note}


def score_rows(rows: list[dict[str, Any]], rule_set: str, *, source: str = "predictions", judge: Any = None,
               clip: Any = None, vqgan: Any = None, image_root: str | Path | None = None) -> list[dict[str, Any]]:
    """Score prediction rows (dicts with PREDICTION_COLUMNS); returns the SCORE_COLUMNS per row."""
    if rule_set not in RULE_SETS:
        raise ScoreError(f"unknown rule set {rule_set!r}; expected one of {RULE_SETS}")
    out: list[dict[str, Any] | None] = [None] * len(rows)
    judge_items: list[int] = []
    caption_items: list[int] = []
    generation_items: list[int] = []
    for i, row in enumerate(rows):
        task, qtype = row["task_name"], row["question_type"]
        where = f"{source} row {i} ({task}/{qtype})"
        if task is None or qtype is None:
            raise ScoreError(f"{where}: task_name and question_type must not be empty")
        if (task, qtype) in VQA_TASK_SET or (qtype in QUESTION_TYPES and task not in (CAPTIONING, IMAGE_GENERATION)):
            try:
                result = score_vqa_item(rule_set, qtype, row["prediction"] or "", row["answer"], row["prompt"] or "",
                                        row["prediction_first_token"])
            except ScoringInputError as exc:
                raise ScoreError(f"{where}: {exc}") from exc
            if (task, qtype) not in VQA_TASK_SET:
                result = RuleResult(result.correct, result.extracted, result.note + "; task outside the 12 VQA tasks",
                                    score=result.score)
            out[i] = _verdict_row(result, rule_set)
            if rule_set == "medmax" and qtype == OPEN and judge is not None:
                judge_items.append(i)
        elif task == CAPTIONING:
            caption_items.append(i)
        elif task == IMAGE_GENERATION:
            generation_items.append(i)
        else:
            out[i] = {"rule_set": rule_set, "correct": None, "extracted": None, "unjudged": True, "score": None,
                      "score_ref_image": None, "judge_reply": None,
                      "note": f"not scored: no scorer for task {task!r} (LLaVA-Med judge protocol not implemented)"}
    if judge_items:
        verdicts = judge.judge_many([(rows[i]["prompt"] or "", rows[i]["answer"], rows[i]["prediction"] or "") for i in judge_items])
        for i, v in zip(judge_items, verdicts):
            out[i] = {"rule_set": rule_set, "correct": v.correct, "extracted": None, "unjudged": v.correct is None,
                      "score": None if v.correct is None else float(v.correct), "score_ref_image": None,
                      "judge_reply": v.reply, "note": v.note + (" (cached)" if v.cached else "")}
    _score_captions(rows, caption_items, out, rule_set, clip, image_root, source)
    _score_generations(rows, generation_items, out, rule_set, clip, vqgan, image_root, source)
    return [r for r in out if r is not None]


def _clip_missing(rule_set: str, why: str) -> dict[str, Any]:
    return {"rule_set": rule_set, "correct": None, "extracted": None, "unjudged": True, "score": None,
            "score_ref_image": None, "judge_reply": None, "note": f"not scored: {why}"}


def _open_image(root: str | Path | None, rel: str | None, where: str):
    from PIL import Image

    if not rel:
        raise ScoreError(f"{where}: image_path is empty")
    path = Path(root or ".") / rel
    if not path.is_file():
        raise ScoreError(f"{where}: image {path} does not exist (check --image-root)")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except OSError as exc:
        raise ScoreError(f"{where}: image {path} is unreadable: {exc}") from exc


def _score_captions(rows, items, out, rule_set, clip, image_root, source) -> None:
    if not items:
        return
    if clip is None:
        for i in items:
            out[i] = _clip_missing(rule_set, "captioning needs --clip")
        return
    images = [_open_image(image_root, rows[i]["image_path"], f"{source} row {i}") for i in items]
    sims = clip.image_text_similarity(images, [rows[i]["prediction"] or "" for i in items])
    for i, s in zip(items, sims):
        out[i] = {"rule_set": rule_set, "correct": None, "extracted": None, "unjudged": False, "score": float(s),
                  "score_ref_image": None, "judge_reply": None, "note": "CLIP cosine(image, generated caption)"}


def image_codes_from_tokens(tokens: Sequence[int], where: str) -> list[int]:
    """1024 VQGAN codes from generated tokens: drop begin/end markers, undo the +4 offset."""
    from medmax_pipeline.core.constants import BEGIN_IMAGE_ID, CODES_PER_IMAGE, END_IMAGE_ID, IMAGE_CODE_OFFSET, NUM_IMAGE_CODES

    body = [t for t in tokens if t not in (BEGIN_IMAGE_ID, END_IMAGE_ID)]
    if len(body) < CODES_PER_IMAGE:
        raise ScoreError(f"{where}: {len(body)} image tokens, need {CODES_PER_IMAGE}")
    body = body[:CODES_PER_IMAGE]
    codes = [t - IMAGE_CODE_OFFSET for t in body]
    if min(codes) < 0 or max(codes) >= NUM_IMAGE_CODES:
        raise ScoreError(f"{where}: image token outside {IMAGE_CODE_OFFSET}..{IMAGE_CODE_OFFSET + NUM_IMAGE_CODES - 1}")
    return codes


def _score_generations(rows, items, out, rule_set, clip, vqgan, image_root, source) -> None:
    if not items:
        return
    if clip is None or vqgan is None:
        for i in items:
            out[i] = _clip_missing(rule_set, "image generation needs --clip and --ckpt (VQGAN decoder)")
        return
    import torch

    from medmax_pipeline.models import vqgan as vqgan_module

    for i in items:
        tokens = rows[i]["generated_image_tokens"] or []
        if not tokens:
            out[i] = {**_clip_missing(rule_set, "no image was generated"), "unjudged": False, "score": 0.0,
                      "note": "no image generated: scored 0"}
            continue
        codes = image_codes_from_tokens(tokens, f"{source} row {i}")
        with torch.no_grad():
            pixels = vqgan.decode_codes(torch.tensor([codes], dtype=torch.long))
        image = vqgan_module.codes_to_pil(pixels)[0]
        sim = float(clip.image_text_similarity([image], [rows[i]["prompt"] or ""])[0])
        ref = None
        note = "CLIP cosine(generated image, prompt)"
        if rows[i]["image_path"]:
            ref_image = _open_image(image_root, rows[i]["image_path"], f"{source} row {i}")
            ref = float(clip.image_image_similarity([image], [ref_image])[0])
            note += "; score_ref_image = CLIP cosine(generated, reference image)"
        out[i] = {"rule_set": rule_set, "correct": None, "extracted": None, "unjudged": False, "score": sim,
                  "score_ref_image": ref, "judge_reply": None, "note": note}


# ----------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------


def _metric_name(rule_set: str, task: str, qtype: str, notes: Iterable[str]) -> str:
    if task in (CAPTIONING, IMAGE_GENERATION):
        return "clip_cosine"
    if qtype == OPEN:
        if rule_set == "llava_med" or any("token recall stands in" in n for n in notes):
            return "token_recall"
        if rule_set == "medmax":
            return "judge_accuracy"
    return "accuracy"


def summarize(scores: list[dict[str, Any]], n_bootstrap: int = 1000, seed: int = 0) -> list[dict[str, Any]]:
    """Per (model, task, question type) statistics, plus a 12-task VQA average row per model."""
    groups: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
    for row in scores:
        groups.setdefault((row["model"], row["task_name"], row["question_type"], row["rule_set"]), []).append(row)
    summary = []
    per_model_tasks: dict[tuple[str, str], dict[tuple[str, str], np.ndarray]] = {}
    for (model, task, qtype, rule_set), rows in sorted(groups.items()):
        notes = [r["note"] or "" for r in rows]
        metric = _metric_name(rule_set, task, qtype, notes)
        unjudged = sum(bool(r["unjudged"]) for r in rows)
        judged = [r["score"] for r in rows if not r["unjudged"] and r["score"] is not None]
        if metric == "clip_cosine":
            values = judged  # an unscorable image has no similarity; it is counted in `unjudged`
        else:
            values = [0.0 if (r["unjudged"] or r["score"] is None) else r["score"] for r in rows]  # never dropped
        mean, se = mean_and_stderr(values)
        lo, hi = bootstrap_ci(values, n_bootstrap, group_seed(seed, model, task, qtype, rule_set))
        note = f"{unjudged} unjudged counted as wrong" if unjudged and metric != "clip_cosine" else ""
        if unjudged and metric == "clip_cosine":
            note = f"{unjudged} rows not scored"
        summary.append({"model": model, "task_name": task, "question_type": qtype, "rule_set": rule_set, "metric": metric,
                        "n": len(rows), "n_judged": len(judged), "unjudged": unjudged, "accuracy": mean,
                        "accuracy_judged": float(np.mean(judged)) if judged else math.nan, "stderr": se,
                        "ci_low": lo, "ci_high": hi, "n_bootstrap": n_bootstrap, "seed": seed, "n_tasks": 1, "note": note})
        if (task, qtype) in VQA_TASK_SET:
            per_model_tasks.setdefault((model, rule_set), {})[(task, qtype)] = np.asarray(values, dtype=np.float64)
    for (model, rule_set), tasks in sorted(per_model_tasks.items()):
        ordered = [tasks[t] for t in VQA_TASKS if t in tasks]
        means = [float(a.mean()) for a in ordered]
        ses = [mean_and_stderr(a)[1] for a in ordered]
        lo, hi = bootstrap_average_ci(ordered, n_bootstrap, group_seed(seed, model, AVERAGE_TASK, rule_set))
        missing = [f"{t}/{q}" for t, q in VQA_TASKS if (t, q) not in tasks]
        rows_here = [r for r in summary if r["model"] == model and r["rule_set"] == rule_set and (r["task_name"], r["question_type"]) in tasks]
        summary.append({
            "model": model, "task_name": AVERAGE_TASK, "question_type": "all", "rule_set": rule_set,
            "metric": "mean_of_task_means", "n": int(sum(a.size for a in ordered)),
            "n_judged": int(sum(r["n_judged"] for r in rows_here)), "unjudged": int(sum(r["unjudged"] for r in rows_here)),
            "accuracy": float(np.mean(means)), "accuracy_judged": math.nan,
            # Tasks are independent samples: the variance of an average of k means is sum(se^2)/k^2.
            "stderr": float(math.sqrt(sum(s * s for s in ses)) / len(ses)) if all(not math.isnan(s) for s in ses) else math.nan,
            "ci_low": lo, "ci_high": hi, "n_bootstrap": n_bootstrap, "seed": seed, "n_tasks": len(ordered),
            "note": ("missing tasks: " + ", ".join(missing)) if missing else "all 12 VQA tasks",
        })
    return summary


# ----------------------------------------------------------------------------------------------
# Stage entry points
# ----------------------------------------------------------------------------------------------


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
) -> tuple[Path, Path]:
    """Score predictions files; write DIR/scores.parquet and DIR/score_summary.parquet."""
    if rules not in RULE_SETS:
        raise ScoreError(f"unknown rule set {rules!r}; expected one of {RULE_SETS}")
    judge = None
    if judge_config is not None:
        from medmax_pipeline.stages.evaluate.judge import LLMJudge, load_judge_config

        judge = LLMJudge(load_judge_config(judge_config))
    clip = None
    if clip_dir is not None:
        from medmax_pipeline.models.clip import load_clip

        clip = load_clip(clip_dir, device=device)
    vqgan = None
    if ckpt_dir is not None and clip is not None:
        from medmax_pipeline.models.vqgan import load_vqgan

        vqgan = load_vqgan(ckpt_dir, device=device)
    tables = []
    for path in predictions:
        table = read_predictions(path)
        rows = table.to_pylist()
        scored = score_rows(rows, rules, source=str(path), judge=judge, clip=clip, vqgan=vqgan, image_root=image_root)
        extra = {name: pa.array([s[name] for s in scored], dtype) for name, dtype in SCORE_COLUMNS.items()}
        tables.append(pa.table({**{n: table.column(n) for n in PREDICTION_COLUMNS}, **extra}))
    scores = pa.concat_tables(tables) if tables else pa.table({n: pa.array([], t) for n, t in {**PREDICTION_COLUMNS, **SCORE_COLUMNS}.items()})
    output_dir = Path(output_dir)
    params = {"rules": rules, "seed": seed, "n_bootstrap": n_bootstrap,
              "judge_model": judge.config.model if judge else None, "clip": str(clip_dir) if clip_dir else None}
    if judge is not None:
        params["judge_stats"] = judge.stats.as_dict()
    extra_inputs = [p for p in (judge_config, clip_dir, ckpt_dir) if p is not None]
    scores_path = output_dir / "scores.parquet"
    write_artifact(scores, scores_path, artifact="scores", inputs=[*predictions, *extra_inputs], params=params)
    summary = summarize(scores.to_pylist(), n_bootstrap=n_bootstrap, seed=seed)
    summary_table = pa.Table.from_pylist(summary, schema=SUMMARY_SCHEMA)
    summary_path = output_dir / "score_summary.parquet"
    write_artifact(summary_table, summary_path, artifact="score_summary", inputs=[scores_path], params=params)
    return scores_path, summary_path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--predictions", nargs="+", required=True, help="predictions files (artifact, parquet, jsonl, csv)")
    parser.add_argument("--output", required=True, help="output folder for scores.parquet and score_summary.parquet")
    parser.add_argument("--rules", choices=RULE_SETS, default="medmax", help="scoring rule set (default medmax)")
    parser.add_argument("--judge-config", help="JSON/YAML config of an OpenAI-compatible judge for open questions")
    parser.add_argument("--clip", help="local open_clip-layout CLIP folder for captioning / image generation")
    parser.add_argument("--ckpt", help="checkpoint folder whose VQGAN decodes generated image tokens")
    parser.add_argument("--image-root", help="root that image_path values are relative to")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--n-bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    parser.add_argument("--device", default="cpu")


def run(args: argparse.Namespace) -> int:
    try:
        scores_path, summary_path = score_predictions(
            args.predictions, args.output, args.rules, args.judge_config, args.clip, args.ckpt, args.image_root,
            args.seed, args.n_bootstrap, args.device,
        )
    except ScoreError as exc:
        print(f"error: {exc}")
        return 1
    print(f"wrote {scores_path} and {summary_path}")
    return 0
