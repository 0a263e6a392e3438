"""score.py: statistics, per-row scoring, artifacts, CLI, and GPT-4o-style external predictions."""

import json
import math

import numpy as np
import pyarrow as pa
import pytest

from medmax_pipeline.core.artifacts import read_artifact, read_meta, write_artifact
from medmax_pipeline.stages.evaluate.clip_scores import image_codes_from_tokens
from medmax_pipeline.stages.evaluate.judge import JudgeReply, JudgeStats
from medmax_pipeline.stages.evaluate.score import (
    AVERAGE_TASK,
    ScoreError,
    bootstrap_average_ci,
    bootstrap_ci,
    mean_and_stderr,
    read_predictions,
    score_predictions,
    score_rows,
    summarize,
)
from medmax_pipeline.stages.evaluate.scoring_rules import VQA_TASKS


def test_mean_and_stderr_known_values():
    mean, se = mean_and_stderr([1, 0, 1, 1])
    assert mean == 0.75
    assert se == pytest.approx(np.std([1, 0, 1, 1], ddof=1) / 2)
    assert math.isnan(mean_and_stderr([1.0])[1])


def test_bootstrap_seeded_contains_mean_and_narrows():
    rng = np.random.default_rng(123)
    small = (rng.random(40) < 0.6).astype(float)
    large = (rng.random(4000) < 0.6).astype(float)
    a = bootstrap_ci(small, 1000, seed=7)
    assert a == bootstrap_ci(small, 1000, seed=7)  # deterministic
    continuous = rng.random(30)  # with 0/1 items, quantiles of means can coincide across seeds
    assert bootstrap_ci(continuous, 1000, seed=7) != bootstrap_ci(continuous, 1000, seed=8)
    assert a[0] <= small.mean() <= a[1]
    b = bootstrap_ci(large, 1000, seed=7)
    assert b[0] <= large.mean() <= b[1]
    assert (b[1] - b[0]) < (a[1] - a[0]) / 3
    lo, hi = bootstrap_average_ci([small, large], 500, seed=1)
    assert lo <= (small.mean() + large.mean()) / 2 <= hi


def _row(task, qtype, answer, prediction, model="m", prompt="Q?", **extra):
    return {"task_name": task, "question_type": qtype, "prompt": prompt, "answer": answer, "image_path": None,
            "model": model, "prediction": prediction, "prediction_first_token": None, "generated_image_tokens": [], **extra}


class StubJudge:
    def __init__(self, verdicts):
        self.verdicts = verdicts
        self.calls = []

    def ask_many(self, requests):
        self.calls.extend(requests)
        replies = []
        for messages in requests:
            determined = messages[-1]["content"].split("answer to be determined: ")[1].split("\n")[0]
            verdict = self.verdicts[determined]
            replies.append(JudgeReply("I cannot tell" if verdict is None else f"Correctness: {int(verdict)}"))
        return replies


def test_unjudged_stay_in_the_denominator():
    rows = [_row("slake", "open", "lung", p) for p in ("right", "wrong", "mumble", "right")]
    judge = StubJudge({"right": True, "wrong": False, "mumble": None})
    scored = score_rows(rows, "medmax", judge=judge)
    assert [s["correct"] for s in scored] == [True, False, None, True]
    assert [s["unjudged"] for s in scored] == [False, False, True, False]
    assert len(judge.calls) == 4
    summary = summarize([{**r, **s} for r, s in zip(rows, scored)], n_bootstrap=200, seed=0)
    task = next(s for s in summary if s["task_name"] == "slake")
    assert task["n"] == 4 and task["unjudged"] == 1
    assert task["accuracy"] == 0.5  # 2 of 4: the unjudged one counts as wrong
    assert task["accuracy_judged"] == pytest.approx(2 / 3)  # what the public code would report
    assert task["metric"] == "judge_accuracy"


def test_no_judge_token_recall_stands_in():
    rows = [_row("slake", "open", "left lung", "the lung")]
    scored = score_rows(rows, "medmax")
    assert scored[0]["score"] == 0.5 and "stand-in" in scored[0]["note"]
    summary = summarize([{**rows[0], **scored[0]}], n_bootstrap=50)
    assert summary[0]["metric"] == "token_recall_stand_in" and summary[0]["stand_in"]


def test_bad_row_names_source_and_row():
    rows = [_row("pmc_vqa", "mcq", "B", "B"), _row("pmc_vqa", "mcq", "Lung", "B")]
    with pytest.raises(ScoreError, match=r"preds.jsonl row 1 \(pmc_vqa/mcq\)"):
        score_rows(rows, "strict", source="preds.jsonl")


def test_other_tasks_flagged_not_dropped():
    answer = repr({"gpt4_answer": "ref", "fig_label": "F", "fig_caption": "c", "in_text_mention": "m", "domain": {"mri": True}})
    rows = [_row("visual_chat", "conversation", answer, "text"), _row("image_captioning", "pmc_oa", "cap", "a caption")]
    scored = score_rows(rows, "medmax")
    assert all(s["unjudged"] for s in scored) and "not scored" in scored[1]["note"]


def test_image_codes_from_tokens():
    codes = list(range(1024))
    tokens = [8197] + [c + 4 for c in codes] + [8196]
    assert image_codes_from_tokens(tokens, "x") == codes
    with pytest.raises(ScoreError, match="need 1024"):
        image_codes_from_tokens(tokens[:100], "row 3")
    with pytest.raises(ScoreError, match="outside"):
        image_codes_from_tokens([9000] * 1024, "row 3")


def _predictions_for(model, accuracy_by_task, rng):
    rows = []
    for task, qtype in VQA_TASKS:
        for k in range(10):
            correct = rng.random() < accuracy_by_task
            if qtype == "closed":
                answer = "yes" if k % 2 else "no"
                pred = answer if correct else ("no" if answer == "yes" else "yes")
                pred = pred.capitalize() + ", it is."
            elif qtype == "mcq":
                answer = "ABCD"[k % 4]
                pred = f"The answer is ({answer if correct else 'ABCD'[(k + 1) % 4]})"
            else:
                answer = "left lung"
                pred = "the left lung" if correct else "heart"
            rows.append(_row(task, qtype, answer, pred, model=model,
                             prompt="Which? (A) aorta (B) lung (C) liver (D) heart" if qtype == "mcq" else "Which organ?"))
    return rows


def test_end_to_end_artifacts_and_cli(tmp_path):
    from medmax_pipeline.cli import main

    rng = np.random.default_rng(0)
    base = tmp_path / "base.parquet"
    trained = tmp_path / "trained.parquet"
    write_artifact(pa.Table.from_pylist(_predictions_for("base", 0.3, rng)), base, artifact="predictions")
    write_artifact(pa.Table.from_pylist(_predictions_for("trained", 0.9, rng)), trained, artifact="predictions")
    out = tmp_path / "scores"
    assert main(["score", "--predictions", str(base), str(trained), "--output", str(out), "--rules", "strict",
                 "--seed", "3", "--n-bootstrap", "200"]) == 0
    scores = read_artifact(out / "scores.parquet", artifact="scores")
    assert scores.num_rows == 240
    assert set(scores.column("rule_set").to_pylist()) == {"strict"}
    summary = read_artifact(out / "score_summary.parquet", artifact="score_summary").to_pylist()
    avg = {r["model"]: r for r in summary if r["task_name"] == AVERAGE_TASK}
    assert avg["base"]["n_tasks"] == 12 and avg["trained"]["n_tasks"] == 12
    assert avg["trained"]["accuracy"] > avg["base"]["accuracy"]
    per_task = [r for r in summary if r["model"] == "trained" and r["task_name"] != AVERAGE_TASK]
    assert avg["trained"]["accuracy"] == pytest.approx(np.mean([r["accuracy"] for r in per_task]))
    for r in summary:
        assert r["ci_low"] <= r["accuracy"] <= r["ci_high"]
    lineage = read_meta(out / "score_summary.parquet").lineage
    assert lineage["params"]["rules"] == "strict"
    # Same seed, same numbers.
    out2 = tmp_path / "scores2"
    score_predictions([base, trained], out2, "strict", seed=3, n_bootstrap=200)
    again = read_artifact(out2 / "score_summary.parquet", artifact="score_summary").to_pylist()
    assert [(r["ci_low"], r["ci_high"]) for r in again] == [(r["ci_low"], r["ci_high"]) for r in summary]


def test_external_jsonl_minimal_columns(tmp_path):
    # A GPT-4o run: only the four required columns; model defaults to the file stem.
    path = tmp_path / "gpt4o.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"task_name": "vqa_rad", "question_type": "closed", "answer": "yes", "prediction": "Yes, there is an effusion."},
        {"task_name": "pmc_vqa", "question_type": "mcq", "answer": "C", "prediction": "C"},
    ]) + "\n")
    table = read_predictions(path)
    assert table.column("model").to_pylist() == ["gpt4o", "gpt4o"]
    scores_path, _ = score_predictions([path], tmp_path / "out", "medmax", n_bootstrap=50)
    scores = read_artifact(scores_path, artifact="scores").to_pylist()
    assert [s["correct"] for s in scores] == [True, True]
    assert "approximated" in scores[0]["note"]


def test_missing_columns_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"task_name": "slake", "prediction": "yes"}) + "\n")
    with pytest.raises(ScoreError, match=r"bad.jsonl: predictions lack the required columns \['question_type', 'answer'\]"):
        read_predictions(path)


def test_report_writes_self_contained_outputs(tmp_path):
    from medmax_pipeline.core.plots import loss_series
    from medmax_pipeline.stages.evaluate.report import make_report

    rng = np.random.default_rng(1)
    preds = tmp_path / "p.parquet"
    write_artifact(pa.Table.from_pylist(_predictions_for("base", 0.4, rng) + _predictions_for("trained", 0.8, rng)),
                   preds, artifact="predictions")
    _, summary = score_predictions([preds], tmp_path / "s", "strict", n_bootstrap=100)
    metrics = tmp_path / "train_metrics.parquet"
    write_artifact(pa.table({"step": [1, 2, 3, 3], "split": ["train", "train", "train", "validation"],
                             "loss": [2.0, 1.5, 1.2, 1.4]}), metrics, artifact="train_metrics")
    written = make_report([summary], tmp_path / "report", train_metrics=metrics, coverage=tmp_path / "absent.parquet")
    names = sorted(p.name for p in written)
    assert names == ["coverage.html", "families.html", "family_scores.png", "gallery.png", "loss_curve.png", "summary.html",
                     "vqa_accuracy.png"]
    assert (tmp_path / "report" / "vqa_accuracy.png").read_bytes()[:4] == b"\x89PNG"
    page = (tmp_path / "report" / "summary.html").read_text()
    assert "vqa_average" in page and "<script" not in page and "http" not in page
    assert "does not exist" in (tmp_path / "report" / "coverage.html").read_text()
    curves = loss_series(read_artifact(metrics).to_pylist())
    assert curves["loss (train)"] == ([1.0, 2.0, 3.0], [2.0, 1.5, 1.2]) and curves["loss (validation)"][1] == [1.4]
