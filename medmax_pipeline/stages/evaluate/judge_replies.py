"""Stage 6, once per model: ask the LLM judge about every judged row and keep its raw replies.

    medmax judge --predictions results/evaluate/predictions_trained.parquet \
        --output results/evaluate/judge_trained.parquet \
        (--judge-config judge.json | --base-url URL --judge-model NAME [--api-key-env VAR]
         [--cache-path FILE] [--concurrency N] [--temperature T] [--max-retries N] [--timeout-s S]
         [--max-retry-wait-s S] [--max-reply-bytes N] [--max-total-minutes M] [--max-unjudged-fraction F])
        [--allow-credentialed]
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

Faults (judge.py): retryable ones are retried; the job fails (one `error:` line on stderr naming
the endpoint and the counts, no artifact) when more than max_unjudged_fraction of the requests
failed for good; replies already received stay cached, so a rerun asks only the rest. Progress
lines (requests done/total, failures, rate, ETA) go to stderr.

Credentialed predictions (footer medmax.credential = credentialed, or a credential = yes row) are
sent only with allow_credentialed (evaluate.judge.allow_credentialed, --allow-credentialed):
otherwise the job stops before sending anything; when allowed, the log names the endpoint that
received them, and the artifact is credentialed like its input.

Footer params carry the judge model, the request fields (temperature only if set), the request
statistics and `predictions_fingerprint` (score pairs each artifact with its predictions file by
it). The API key is read from the named environment variable and is never written anywhere.
`--check` only checks the key and that the endpoint answers (the workflow runs it at start).
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import pyarrow as pa

from medmax_pipeline.core.artifacts import describe_input, rows_are_credentialed, write_artifact
from medmax_pipeline.stages.evaluate.judge import (
    JudgeConfig,
    JudgeError,
    JudgeReply,
    LLMJudge,
    check_endpoint,
    endpoint_label,
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


def is_credentialed(predictions: str | Path, table: pa.Table) -> bool:
    """The predictions are credentialed: the artifact's footer says so, or a row has credential = yes."""
    return describe_input(predictions)["credential"] == "credentialed" or rows_are_credentialed(table)


def check_credentialed_allowed(predictions: str | Path, config: JudgeConfig) -> None:
    """Refuse credentialed predictions unless the config allows sending them to this endpoint."""
    if not config.allow_credentialed:
        raise JudgeError(f"{predictions} is credentialed (medmax.credential); sending it to the judge endpoint "
                         f"{endpoint_label(config.base_url)} needs evaluate.judge.allow_credentialed: true "
                         f"(medmax judge --allow-credentialed) and a data use agreement that allows it; nothing was sent")


def write_judge_replies(predictions: str | Path, output: str | Path, config: JudgeConfig, judge: Any = None) -> Path:
    """Judge one predictions file's judged rows; write the judge_replies artifact."""
    table = read_predictions(predictions)
    rows = table.to_pylist()
    if judged_items(rows) and is_credentialed(predictions, table):
        check_credentialed_allowed(predictions, config)
        print(f"judge: sending credentialed predictions {predictions} to the judge endpoint "
              f"{endpoint_label(config.base_url)} (allow_credentialed)", file=sys.stderr, flush=True)
    judge = judge if judge is not None else LLMJudge(config)
    replies = judge_rows(rows, judge, str(predictions))
    records = pa.Table.from_pylist([reply_record(i, rows[i], r) for i, r in replies.items()], schema=JUDGE_REPLIES_SCHEMA)
    params = {"predictions_fingerprint": predictions_fingerprint(predictions), "predictions_rows": len(rows),
              **request_params(config), "judge_stats": judge.stats.as_dict()}
    write_artifact(records, output, artifact=ARTIFACT, inputs=[predictions], params=params)
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
                   "timeout_s", "max_retry_wait_s", "max_reply_bytes", "max_total_minutes", "max_unjudged_fraction",
                   "allow_credentialed")
FLAG_OPTIONS = ("allow_credentialed",)  # given as a bare flag when true


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
    parser.add_argument("--max-retries", type=int, help="retries of 408/409/429/5xx, timeouts, connection errors "
                        "and replies that are no chat completion (default 5)")
    parser.add_argument("--timeout-s", type=float, help="seconds per try (default 60)")
    parser.add_argument("--max-retry-wait-s", type=float, help="longest wait between tries; a longer Retry-After "
                        "gives the request up (default 60)")
    parser.add_argument("--max-reply-bytes", type=int, help="largest reply body read; a larger one is refused and "
                        "not cached (default 1000000)")
    parser.add_argument("--max-total-minutes", type=float, help="nothing is asked after this (default 240)")
    parser.add_argument("--max-unjudged-fraction", type=float, help="share of requests that may fail for good before "
                        "the job fails (default 0: any)")
    parser.add_argument("--allow-credentialed", action="store_true", default=None,
                        help="send credentialed predictions to this endpoint (off by default)")


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
    return " ".join(f"--{name.replace('_', '-')}" + ("" if name in FLAG_OPTIONS else f" {shlex.quote(str(value))}")
                    for name, value in sorted(options.items()) if value is not False)


def judge_config_from_args(args: argparse.Namespace) -> JudgeConfig:
    """A JudgeConfig from --judge-config, or from the individual settings (not both)."""
    given = {name: getattr(args, name) for name in SETTING_OPTIONS if getattr(args, name) is not None}
    if args.judge_config:
        allow = given.pop("allow_credentialed", False)  # a consent, not a setting: it may join a config file
        if given:
            raise JudgeError(f"give either --judge-config or the settings {sorted(given)}, not both")
        config = load_judge_config(args.judge_config)
        return dataclasses.replace(config, allow_credentialed=True) if allow else config
    if "base_url" not in given or "judge_model" not in given:
        raise JudgeError("the judge needs --judge-config, or --base-url and --judge-model")
    given["model"] = given.pop("judge_model")
    if given.get("api_key_env") == NO_KEY_ENV:
        given["api_key_env"] = None
    return judge_config_from_mapping(given, "medmax judge options")


def run(args: argparse.Namespace) -> int:
    config = judge_config_from_args(args)
    if args.check:
        check_endpoint(config)
        print(f"judge endpoint {endpoint_label(config.base_url)} answers")
        return 0
    if not args.predictions or not args.output:
        raise JudgeError("--predictions and --output are required (unless --check)")
    path = write_judge_replies(args.predictions, args.output, config)
    print(f"wrote {path}")
    return 0
