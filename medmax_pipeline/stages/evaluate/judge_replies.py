"""Stage 6, once per model: ask the LLM judge about every open VQA answer and keep its raw replies.

    medmax judge --predictions results/evaluate/predictions_trained.parquet \
        --output results/evaluate/judge_trained.parquet \
        (--judge-config judge.json | --base-url URL --judge-model NAME [--api-key-env VAR]
         [--cache-path FILE] [--concurrency N] [--max-retries N] [--timeout-s S])

The medmax rule set judges open questions with an LLM (judge.py: client, retries, cache). This
job asks once per model; `medmax score --judge-replies` reads the verdicts from the replies, so
the score job itself makes no request. The artifact `judge_replies` has one row per open question:

    row             index of the item in the predictions file
    task_name, question_type
    judge_reply     the judge's raw reply; null when the request failed for good
    cached          the reply came from the judge's cache (or from a duplicate item)
    failure         why there is no reply (null when there is one)

The verdict is read from the reply by judge.parse_verdict when scoring. Footer params carry the
judge model, the request statistics and `predictions_fingerprint` (score pairs each artifact
with its predictions file by it). The API key is read from the named environment variable and
is never written anywhere.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any, Mapping, Sequence

import pyarrow as pa

from medmax_pipeline.core.artifacts import ArtifactError, read_artifact, read_meta, write_artifact
from medmax_pipeline.stages.evaluate.judge import JudgeConfig, JudgeError, JudgeVerdict, LLMJudge, load_judge_config, parse_verdict
from medmax_pipeline.stages.evaluate.predictions import ScoreError, is_judged, predictions_fingerprint, read_predictions

ARTIFACT = "judge_replies"
JUDGE_REPLIES_SCHEMA = pa.schema([
    ("row", pa.int64()), ("task_name", pa.string()), ("question_type", pa.string()), ("judge_reply", pa.string()),
    ("cached", pa.bool_()), ("failure", pa.string()),
])


def judged_items(rows: Sequence[Mapping[str, Any]]) -> list[int]:
    """Indices of the rows the judge is asked about (open VQA questions)."""
    return [i for i, r in enumerate(rows) if is_judged(r)]


def judge_questions(rows: Sequence[Mapping[str, Any]], items: Sequence[int]) -> list[tuple[str, str, str]]:
    """(question, reference, prediction) for each judged row, as the judge prompt takes them."""
    return [(rows[i]["prompt"] or "", rows[i]["answer"], rows[i]["prediction"] or "") for i in items]


def reply_record(row: int, source_row: Mapping[str, Any], verdict: JudgeVerdict) -> dict[str, Any]:
    """One JUDGE_REPLIES_SCHEMA row from a verdict: the raw reply, or why there is none."""
    return {"row": row, "task_name": source_row["task_name"], "question_type": source_row["question_type"],
            "judge_reply": verdict.reply, "cached": verdict.cached, "failure": verdict.note if verdict.reply is None else None}


def verdict_from_record(record: Mapping[str, Any]) -> JudgeVerdict:
    """The verdict a stored reply stands for: what LLMJudge returned when it got (or failed to get) it."""
    reply = record["judge_reply"]
    if reply is None:
        return JudgeVerdict(None, None, record["failure"] or "unjudged: no reply", cached=bool(record["cached"]))
    correct, note = parse_verdict(reply)
    return JudgeVerdict(correct, reply, note, cached=bool(record["cached"]))


def judge_rows(rows: Sequence[Mapping[str, Any]], judge: Any) -> dict[int, JudgeVerdict]:
    """Verdicts of a live judge (anything with judge_many) for the judged rows, by row index."""
    items = judged_items(rows)
    if not items:
        return {}
    return dict(zip(items, judge.judge_many(judge_questions(rows, items))))


def write_judge_replies(predictions: str | Path, output: str | Path, config: JudgeConfig) -> Path:
    """Judge one predictions file's open questions; write the judge_replies artifact."""
    rows = read_predictions(predictions).to_pylist()
    judge = LLMJudge(config)
    verdicts = judge_rows(rows, judge)
    table = pa.Table.from_pylist([reply_record(i, rows[i], v) for i, v in verdicts.items()], schema=JUDGE_REPLIES_SCHEMA)
    params = {"predictions_fingerprint": predictions_fingerprint(predictions), "predictions_rows": len(rows),
              "judge_model": config.model, "judge_stats": judge.stats.as_dict()}
    write_artifact(table, output, artifact=ARTIFACT, inputs=[predictions], params=params)
    return Path(output)


def read_judge_replies(path: str | Path) -> tuple[dict[int, JudgeVerdict], dict[str, Any]]:
    """The verdicts of a judge_replies artifact by predictions row index, and its lineage params."""
    try:
        table = read_artifact(path, artifact=ARTIFACT)
        params = read_meta(path).lineage.get("params", {})
    except ArtifactError as exc:
        raise ScoreError(str(exc)) from exc
    return {r["row"]: verdict_from_record(r) for r in table.to_pylist()}, params


def check_judge_replies(verdicts: Mapping[int, JudgeVerdict], rows: Sequence[Mapping[str, Any]], artifact: str | Path,
                        predictions: str | Path) -> None:
    """The artifact must cover exactly the open questions of its predictions file."""
    for i in sorted(set(verdicts) ^ set(judged_items(rows))):
        why = "is not an open question" if i in verdicts else "has no reply"
        raise ScoreError(f"{artifact}: row {i} of {predictions} {why}; rerun medmax judge on it")


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


# The judge settings `medmax judge` takes as options (JudgeConfig fields; judge_model is its `model`).
SETTING_OPTIONS = ("base_url", "judge_model", "api_key_env", "cache_path", "concurrency", "max_retries", "timeout_s")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--predictions", required=True, help="one model's predictions file (artifact, parquet, jsonl, csv)")
    parser.add_argument("--output", required=True, help="the judge_replies artifact to write (.parquet)")
    parser.add_argument("--judge-config", help="JSON/YAML judge config (judge.py); or give the settings below")
    parser.add_argument("--base-url", help="OpenAI-compatible endpoint, e.g. https://api.openai.com/v1")
    parser.add_argument("--judge-model", help="judge model name, e.g. gpt-4o-mini")
    parser.add_argument("--api-key-env", help="environment variable holding the API key")
    parser.add_argument("--cache-path", help="jsonl cache of replies (a rerun asks nothing again)")
    parser.add_argument("--concurrency", type=int, help="requests in flight (default 4)")
    parser.add_argument("--max-retries", type=int, help="retries of 429 / 5xx / timeouts (default 5)")
    parser.add_argument("--timeout-s", type=float, help="seconds per request (default 60)")


def judge_command_options(settings: Mapping[str, Any], cache_path: str | None = None) -> str:
    """`medmax judge` options from judge settings (config evaluate.judge: base_url, model, ...).

    The workflow builds the judge config from its config values with this; the API key stays in
    the environment variable the settings name.
    """
    settings = {**settings, **({"cache_path": cache_path} if cache_path else {})}
    options = {("judge_model" if name == "model" else name): value for name, value in settings.items() if value is not None}
    unknown = sorted(set(options) - set(SETTING_OPTIONS))
    if unknown:
        raise JudgeError(f"judge settings: {unknown} are not options of medmax judge ({sorted(SETTING_OPTIONS)})")
    return " ".join(f"--{name.replace('_', '-')} {shlex.quote(str(value))}" for name, value in sorted(options.items()))


def judge_config_from_args(args: argparse.Namespace) -> JudgeConfig:
    """A JudgeConfig from --judge-config, or from the individual settings (not both)."""
    given = {name: getattr(args, name) for name in SETTING_OPTIONS if getattr(args, name) is not None}
    if args.judge_config:
        if given:
            raise JudgeError(f"give either --judge-config or the settings {sorted(given)}, not both")
        return load_judge_config(args.judge_config)
    if "base_url" not in given or "judge_model" not in given:
        raise JudgeError("the judge needs --judge-config, or --base-url and --judge-model")
    given["model"] = given.pop("judge_model")
    return JudgeConfig(**given)


def run(args: argparse.Namespace) -> int:
    try:
        path = write_judge_replies(args.predictions, args.output, judge_config_from_args(args))
    except (ScoreError, JudgeError) as exc:
        print(f"error: {exc}")
        return 1
    print(f"wrote {path}")
    return 0
