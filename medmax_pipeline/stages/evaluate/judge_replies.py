"""Stage 6, once per model: ask the LLM judge about every judged row and keep its raw replies.

    medmax judge --predictions results/evaluate/predictions_trained.parquet \
        --output results/evaluate/judge_trained.parquet \
        (--judge-config judge.json | --base-url URL --judge-model NAME [--api-key-env VAR]
         [--cache-path FILE] [--concurrency N] [--temperature T] [--max-retries N] [--timeout-s S])
    medmax judge --check --base-url URL --judge-model NAME [--api-key-env VAR]

Judged rows and their requests (judge_protocols.py, the public requests byte for byte): open VQA
questions (the open-question verdict prompt), visual_chat rows and the text of mm_out rows (the
LLaVA-Med relative-score prompt). This job asks once per model; `medmax score --judge-replies`
reads verdicts / scores from the replies, so no score job makes a request. The artifact
`judge_replies` has one row per judged row:

    row             index of the item in the predictions file
    task_name, question_type
    protocol        open_vqa | visual_chat | mm_out
    judge_reply     the judge's raw reply; null when the request failed for good
    cached          the reply came from the judge's cache (or from an identical request)
    failure         why there is no reply (null when there is one)

Footer params carry the judge model, the request fields (temperature only if set), the request
statistics and `predictions_fingerprint` (score pairs each artifact with its predictions file by
it). The API key is read from the named environment variable and is never written anywhere.
`--check` only checks the key and that the endpoint answers (the workflow runs it at start).
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any, Mapping, Sequence

import pyarrow as pa

from medmax_pipeline.core.artifacts import write_artifact
from medmax_pipeline.stages.evaluate.judge import (
    JudgeConfig,
    JudgeError,
    JudgeReply,
    LLMJudge,
    check_endpoint,
    judge_config_from_mapping,
    load_judge_config,
)
from medmax_pipeline.stages.evaluate.judge_protocols import (
    MM_OUT,
    OPEN_VQA,
    VISUAL_CHAT,
    JudgeInputError,
    mm_out_messages,
    open_vqa_messages,
    parse_visual_chat_answer,
    visual_chat_messages,
)
from medmax_pipeline.stages.evaluate.predictions import ScoreError, judge_protocol_of, predictions_fingerprint, read_predictions, read_rows_by_index

ARTIFACT = "judge_replies"
JUDGE_REPLIES_SCHEMA = pa.schema([
    ("row", pa.int64()), ("task_name", pa.string()), ("question_type", pa.string()), ("protocol", pa.string()),
    ("judge_reply", pa.string()), ("cached", pa.bool_()), ("failure", pa.string()),
])


def judged_items(rows: Sequence[Mapping[str, Any]]) -> list[int]:
    """Indices of the rows the judge is asked about."""
    return [i for i, r in enumerate(rows) if judge_protocol_of(r) is not None]


def judge_request(row: Mapping[str, Any], where: str) -> list[dict[str, str]]:
    """The public request for one judged row (judge_protocols.py)."""
    protocol = judge_protocol_of(row)
    prediction = row["prediction"] or ""
    if protocol == OPEN_VQA:
        # vqa.py: the raw prompt as the question; the generated text lower-cased (done inside).
        return open_vqa_messages(row["prompt"] or "", row["answer"], prediction)
    if protocol == VISUAL_CHAT:
        try:
            answer = parse_visual_chat_answer(row["answer"] or "", where)
        except JudgeInputError as exc:
            raise ScoreError(str(exc)) from exc
        # visual_chat.py: the raw prompt (with <image>) as the question, the reference gpt4_answer as
        # Assistant 1 and the stripped generated text as Assistant 2.
        return visual_chat_messages(answer["fig_label"], answer["fig_caption"], answer["in_text_mention"],
                                    row["prompt"] or "", answer["gpt4_answer"], prediction.strip())
    if protocol == MM_OUT:
        # mm_out.py: the question, the reference text as Assistant 1, the generated text as Assistant 2.
        return mm_out_messages(row["prompt"] or "", row["answer"] or "", prediction)
    raise ScoreError(f"{where}: not a judged row ({row['task_name']}/{row['question_type']})")


def reply_record(row: int, source_row: Mapping[str, Any], reply: JudgeReply) -> dict[str, Any]:
    """One JUDGE_REPLIES_SCHEMA row: the raw reply, or why there is none."""
    return {"row": row, "task_name": source_row["task_name"], "question_type": source_row["question_type"],
            "protocol": judge_protocol_of(source_row), "judge_reply": reply.reply, "cached": reply.cached,
            "failure": reply.failure if reply.reply is None else None}


def judge_rows(rows: Sequence[Mapping[str, Any]], judge: Any, source: str = "predictions") -> dict[int, JudgeReply]:
    """Replies of a live judge (anything with ask_many) for the judged rows, by row index."""
    items = judged_items(rows)
    if not items:
        return {}
    requests = [judge_request(rows[i], f"{source} row {i}") for i in items]
    return dict(zip(items, judge.ask_many(requests)))


def request_params(config: JudgeConfig) -> dict[str, Any]:
    """What a reader needs to know about the requests (not the endpoint's address or key)."""
    fields = ["model", "messages"] + (["temperature"] if config.temperature is not None else [])
    return {"judge_model": config.model, "judge_request_fields": fields, "judge_temperature": config.temperature}


def write_judge_replies(predictions: str | Path, output: str | Path, config: JudgeConfig, judge: Any = None) -> Path:
    """Judge one predictions file's judged rows; write the judge_replies artifact."""
    rows = read_predictions(predictions).to_pylist()
    judge = judge if judge is not None else LLMJudge(config)
    replies = judge_rows(rows, judge, str(predictions))
    table = pa.Table.from_pylist([reply_record(i, rows[i], r) for i, r in replies.items()], schema=JUDGE_REPLIES_SCHEMA)
    params = {"predictions_fingerprint": predictions_fingerprint(predictions), "predictions_rows": len(rows),
              **request_params(config), "judge_stats": judge.stats.as_dict()}
    write_artifact(table, output, artifact=ARTIFACT, inputs=[predictions], params=params)
    return Path(output)


def read_judge_replies(path: str | Path) -> tuple[dict[int, dict[str, Any]], dict[str, Any]]:
    """The artifact's rows by predictions row index, and its lineage params."""
    return read_rows_by_index(path, ARTIFACT)


def check_judge_replies(replies: Mapping[int, Mapping[str, Any]], rows: Sequence[Mapping[str, Any]], artifact: str | Path,
                        predictions: str | Path) -> None:
    """The artifact must cover exactly the judged rows of its predictions file, each by its protocol."""
    for i in sorted(set(replies) ^ set(judged_items(rows))):
        why = "is not a judged row" if i in replies else "has no reply"
        raise ScoreError(f"{artifact}: row {i} of {predictions} {why}; rerun medmax judge on it")
    for i, record in replies.items():
        if record["protocol"] != judge_protocol_of(rows[i]):
            raise ScoreError(f"{artifact}: row {i} was judged by protocol {record['protocol']!r}, "
                             f"but {predictions} row {i} needs {judge_protocol_of(rows[i])!r}")


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


NO_KEY_ENV = "none"  # --api-key-env none: the endpoint needs no key
# The judge settings `medmax judge` takes as options (JudgeConfig fields; judge_model is its `model`).
SETTING_OPTIONS = ("base_url", "judge_model", "api_key_env", "cache_path", "concurrency", "temperature", "max_retries",
                   "timeout_s")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--predictions", help="one model's predictions file (artifact, parquet, jsonl, csv)")
    parser.add_argument("--output", help="the judge_replies artifact to write (.parquet)")
    parser.add_argument("--check", action="store_true",
                        help="only check the API key and that the endpoint answers (no completion is asked)")
    parser.add_argument("--judge-config", help="JSON/YAML judge config (judge.py); or give the settings below")
    parser.add_argument("--base-url", help="OpenAI-compatible endpoint, e.g. https://api.openai.com/v1")
    parser.add_argument("--judge-model", help="judge model name, e.g. gpt-4o-mini")
    parser.add_argument("--api-key-env", help="environment variable holding the API key (default OPENAI_API_KEY; "
                        "'none' for an endpoint without a key)")
    parser.add_argument("--temperature", type=float, help="sent only when given (the public requests send none)")
    parser.add_argument("--cache-path", help="jsonl cache of replies (a rerun asks nothing again)")
    parser.add_argument("--concurrency", type=int, help="requests in flight (default 4)")
    parser.add_argument("--max-retries", type=int, help="the openai client's retries of 429 / 5xx / timeouts (default 5)")
    parser.add_argument("--timeout-s", type=float, help="seconds per request (default 60)")


def judge_command_options(settings: Mapping[str, Any], cache_path: str | None = None) -> str:
    """`medmax judge` options from judge settings (config evaluate.judge: base_url, model, ...).

    The workflow builds the judge config from its config values with this; the API key stays in
    the environment variable the settings name.
    """
    settings = {**settings, **({"cache_path": cache_path} if cache_path else {})}
    if "api_key_env" in settings and settings["api_key_env"] is None:
        settings["api_key_env"] = NO_KEY_ENV  # an endpoint without a key
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
    if given.get("api_key_env") == NO_KEY_ENV:
        given["api_key_env"] = None
    return judge_config_from_mapping(given, "medmax judge options")


def run(args: argparse.Namespace) -> int:
    try:
        config = judge_config_from_args(args)
        if args.check:
            check_endpoint(config)
            print(f"judge endpoint {config.base_url} answers")
            return 0
        if not args.predictions or not args.output:
            raise JudgeError("--predictions and --output are required (unless --check)")
        path = write_judge_replies(args.predictions, args.output, config)
    except (ScoreError, JudgeError) as exc:
        print(f"error: {exc}")
        return 1
    print(f"wrote {path}")
    return 0
