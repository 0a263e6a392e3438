"""The judge: public requests byte for byte, public verdict reading, relative scores, the openai client."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from medmax_pipeline.stages.evaluate.judge import JudgeConfig, JudgeError, LLMJudge, check_endpoint
from medmax_pipeline.stages.evaluate.judge_protocols import parse_relative_scores, public_verdict, tolerant_verdict
from medmax_pipeline.stages.evaluate.judge_replies import judge_request

PUBLIC = json.loads((Path(__file__).parent / "data" / "public_judge_requests.json").read_text())


class Endpoint:
    """An OpenAI-compatible server on 127.0.0.1 recording every request body."""

    def __init__(self):
        self.bodies, self.attempts = [], {}
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self._send(200 if self.headers.get("Authorization") != "Bearer bad" else 401, {"data": []})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                text = body["messages"][-1]["content"]
                endpoint.attempts[text] = endpoint.attempts.get(text, 0) + 1
                if "ratelimit" in text and endpoint.attempts[text] == 1:
                    return self._send(429, {"error": {"message": "slow down"}}, {"Retry-After": "0"})
                endpoint.bodies.append(body)
                self._send(200, {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": "Correctness: 1"}}]})

            def _send(self, code, payload, headers=None):
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture()
def endpoint():
    e = Endpoint()
    yield e
    e.server.shutdown()


def _row(case):
    task = {"open_vqa": "slake", "visual_chat": "visual_chat", "mm_out": "mm_out"}[case["protocol"]]
    qtype = {"open_vqa": "open", "visual_chat": "conversation", "mm_out": "mm_out"}[case["protocol"]]
    return {"task_name": task, "question_type": qtype, "prompt": case["question"], "answer": case["answer"],
            "prediction": case["prediction"]}


@pytest.mark.parametrize("case", PUBLIC["cases"], ids=lambda c: c["protocol"])
def test_requests_equal_the_public_ones_field_by_field(case):
    # tests/data/public_judge_requests.json was written by running the public builders (see its "source").
    ours = judge_request(_row(case), "fixture")
    assert len(ours) == len(case["messages"])
    for mine, public in zip(ours, case["messages"]):
        assert mine.keys() == public.keys()
        assert mine["role"] == public["role"]
        assert mine["content"] == public["content"]


# Every verdict spelling: vqa.py reads only the literal strings, 'Correctness: 1' first.
@pytest.mark.parametrize("reply, public, tolerant", [
    ("Correctness: 1", True, True),
    ("Correctness: 0", False, False),
    ("The answer matches.\nCorrectness: 1\n", True, True),
    ("Correctness: 0 ... on reflection Correctness: 1", True, True),  # '1' is tested first
    ("**Correctness:** 1", None, True),
    ("Correctness:1", None, True),
    ("correctness: 0", None, False),
    ("CORRECTNESS: 1", None, True),
    ("Correctness = 0", None, False),
    ("Correctness: yes", None, None),
    ("1", None, None),
    ("", None, None),
    (None, None, None),
])
def test_verdicts_public_and_tolerant(reply, public, tolerant):
    assert public_verdict(reply)[0] is public
    assert tolerant_verdict(reply)[0] is tolerant


@pytest.mark.parametrize("reply, scores", [
    ("8 6\nAssistant 1 is more detailed.", (8.0, 6.0)),
    ("  7 7  \n", (7.0, 7.0)),
    ("\n9 4.5\nexplanation", (9.0, 4.5)),  # the reply is stripped first
    ("8, 6\nx", None),  # two parts but '8,' is no number
    ("8  6\nx", None),  # two spaces: three parts
    ("Scores: 8 6", None),
    ("8\n6", None),
    ("0 5", None),  # s2/s1 would divide by zero
    ("nan 5", None),
    (None, None),
])
def test_relative_scores_first_line(reply, scores):
    parsed = parse_relative_scores(reply)
    assert (None if not parsed.judged else (parsed.reference, parsed.model)) == scores
    if scores:
        assert parsed.relative == scores[1] / scores[0]


def test_request_fields_retry_after_and_cache(endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "k")
    config = JudgeConfig(base_url=endpoint.url, model="gpt-4o-mini", api_key_env="JUDGE_KEY",
                         cache_path=str(tmp_path / "cache.jsonl"), max_retries=2)
    requests = [[{"role": "user", "content": "a"}], [{"role": "user", "content": "ratelimit"}],
                [{"role": "user", "content": "a"}]]
    replies = LLMJudge(config).ask_many(requests)
    assert [r.reply for r in replies] == ["Correctness: 1"] * 3
    assert endpoint.attempts == {"a": 1, "ratelimit": 2}  # the client retried the 429; duplicates asked once
    assert all(set(b) == {"model", "messages"} for b in endpoint.bodies)  # no temperature unless set
    again = LLMJudge(config)
    assert all(r.cached for r in again.ask_many(requests)) and again.stats.requests == 0
    hot = LLMJudge(JudgeConfig(base_url=endpoint.url, model="m", api_key_env="JUDGE_KEY", temperature=0.0))
    hot.ask_many([[{"role": "user", "content": "b"}]])
    assert endpoint.bodies[-1]["temperature"] == 0.0


def test_check_endpoint_one_line_errors(endpoint, monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    with pytest.raises(JudgeError, match="NO_SUCH_KEY is not set"):
        check_endpoint(JudgeConfig(base_url=endpoint.url, model="m", api_key_env="NO_SUCH_KEY"))
    monkeypatch.setenv("BAD_KEY", "bad")
    with pytest.raises(JudgeError, match="rejected the key"):
        check_endpoint(JudgeConfig(base_url=endpoint.url, model="m", api_key_env="BAD_KEY"))
    check_endpoint(JudgeConfig(base_url=endpoint.url, model="m", api_key_env=None))
    with pytest.raises(JudgeError, match="unreachable"):
        check_endpoint(JudgeConfig(base_url="http://127.0.0.1:9/v1", model="m", api_key_env=None), timeout_s=2)


# ----------------------------------------------------------------------------------------------
# Faults (issue 20 items 4, 14, 15) and credentialed predictions (item 7), against tests/judge_server.py
# ----------------------------------------------------------------------------------------------

import sys  # noqa: E402

import pyarrow as pa  # noqa: E402

from medmax_pipeline.cli import main  # noqa: E402
from medmax_pipeline.core.artifacts import read_artifact, read_meta, write_artifact  # noqa: E402
from medmax_pipeline.stages.evaluate import judge as judge_module  # noqa: E402
from medmax_pipeline.stages.evaluate.judge import JudgeCache, cache_key, judge_progress_line, request_body  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from judge_server import FAULTS, FakeJudgeServer, canned_reply  # noqa: E402

# Faults a retry may cure; "huge" is refused without a retry (the same request gives the same body).
RETRYABLE = ("500", "429", "hang", "empty_choices", "null_content", "malformed_json", "html")
SECRET = "sk-test-do-not-print"
MESSAGES = PUBLIC["cases"][0]["messages"]  # an open VQA request
ANSWER = canned_reply(MESSAGES[-1]["content"])


@pytest.fixture()
def server(monkeypatch):
    monkeypatch.setattr(judge_module, "INITIAL_BACKOFF_S", 0.01)  # quick retries; the policy is the same
    monkeypatch.setenv("JUDGE_TEST_KEY", SECRET)
    with FakeJudgeServer(huge_bytes=300_000, retry_after="3600", hang_s=30) as s:
        yield s


def _predictions(path, credentialed_input=None):
    """The public cases as a predictions artifact: 5 judged rows (3 open VQA, visual chat, mm_out),
    credentialed when made from a credentialed input (as generate's output with a credentialed adapter)."""
    rows = [{**_row(c), "image_path": None, "model": "trained", "prediction_first_token": None,
             "generated_image_tokens": []} for c in PUBLIC["cases"]]
    write_artifact(pa.Table.from_pylist(rows), path, artifact="predictions",
                   credentialed_inputs=[credentialed_input] if credentialed_input else [])
    return path


def _judge(server, tmp_path, *extra, predictions=None):
    """`medmax judge` in process with short limits; the exit code."""
    predictions = predictions or _predictions(tmp_path / "predictions.parquet")
    return main(["judge", "--predictions", str(predictions), "--output", str(tmp_path / "judge.parquet"),
                 "--base-url", server.url, "--judge-model", "judge-m", "--api-key-env", "JUDGE_TEST_KEY",
                 "--cache-path", str(tmp_path / "cache.jsonl"), "--max-retries", "2", "--timeout-s", "0.5",
                 "--max-reply-bytes", "20000", "--concurrency", "2", *extra])


def _cached(tmp_path):
    path = tmp_path / "cache.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize("fault", RETRYABLE)
def test_a_passing_fault_is_retried_and_only_the_answer_cached(fault, server, tmp_path):
    server.retry_after = "0"
    server.set_fault(fault, times=1)
    config = JudgeConfig(base_url=server.url, model="m", api_key_env=None, cache_path=str(tmp_path / "cache.jsonl"),
                         max_retries=2, timeout_s=0.5)
    [reply] = LLMJudge(config).ask_many([MESSAGES])
    assert reply.reply == ANSWER and reply.failure is None
    assert server.faulted == [fault] and server.requests == 2
    assert server.bodies[0] == server.bodies[1] == request_body(config, MESSAGES)  # the retry is the same request
    assert [e["reply"] for e in _cached(tmp_path)] == [ANSWER]


@pytest.mark.parametrize("fault", FAULTS)
def test_a_lasting_fault_fails_the_job_with_one_error_line(fault, server, tmp_path, capsys):
    server.set_fault(fault)
    assert _judge(server, tmp_path) == 1
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err and "error:" not in out
    assert f"the judge endpoint {server.url} left 5 of 5 requests unjudged" in errors[0]
    assert "max_unjudged_fraction 0 allows 0" in errors[0]
    assert SECRET not in out + err
    assert _cached(tmp_path) == [] and not (tmp_path / "judge.parquet").exists()  # no non-answer kept, no artifact
    # Retryable faults are tried max_retries + 1 times, a long Retry-After and an oversized body once;
    # the job stops as soon as failing is certain: at most the two requests in flight (concurrency 2) were asked.
    tries = 1 if fault in ("429", "huge", "huge_unsized") else 3
    assert len(server.faulted) == server.requests <= 2 * tries
    assert f"{5 - len({json.dumps(b) for b in server.bodies})} not asked" in errors[0]
    assert {"429": "Retry-After 3600 s is longer than max_retry_wait_s", "huge": "larger than max_reply_bytes",
            "html": "content-type text/html", "malformed_json": "not JSON", "empty_choices": "no choices",
            "null_content": "content is None", "hang": "timeout", "500": "HTTP 500",
            "huge_unsized": "larger than max_reply_bytes"}[fault] in errors[0]


def test_a_rerun_asks_only_what_is_not_cached(server, tmp_path, capsys):
    predictions = _predictions(tmp_path / "predictions.parquet")
    server.set_fault("500", only_if="[Assistant 1]")  # visual chat and mm_out fail, open VQA is answered
    # One request at a time, in row order: 3 open VQA answered, visual chat fails 3 times, mm_out is not asked.
    assert _judge(server, tmp_path, "--concurrency", "1", predictions=predictions) == 1
    assert "left 2 of 5 requests unjudged (1 HTTP 500, 1 not asked; first: HTTP 500" in capsys.readouterr().err
    replies = [canned_reply(c["messages"][-1]["content"]) for c in PUBLIC["cases"]]
    assert [e["reply"] for e in _cached(tmp_path)] == replies[:3]
    server.set_fault(None)
    before = server.requests
    assert _judge(server, tmp_path, "--concurrency", "1", predictions=predictions) == 0
    assert [b["messages"] for b in server.bodies[before:]] == [c["messages"] for c in PUBLIC["cases"][3:]]
    rows = read_artifact(tmp_path / "judge.parquet", artifact="judge_replies").to_pylist()
    assert [r["judge_reply"] for r in rows] == replies and [r["cached"] for r in rows] == [True] * 3 + [False] * 2


def test_cached_non_answers_are_asked_again(server, tmp_path):
    config = JudgeConfig(base_url=server.url, model="m", api_key_env=None, cache_path=str(tmp_path / "cache.jsonl"))
    key = cache_key(request_body(config, MESSAGES))
    (tmp_path / "cache.jsonl").write_text(json.dumps({"key": key, "model": "m", "reply": ""}) + "\n"
                                          + json.dumps({"key": "other", "model": "m", "reply": None}) + "\n")
    assert len(JudgeCache(tmp_path / "cache.jsonl")) == 0
    [reply] = LLMJudge(config).ask_many([MESSAGES])
    assert reply.reply == ANSWER and not reply.cached and server.requests == 1
    with pytest.raises(ValueError):
        JudgeCache(None).put("k", "m", "  ")


def test_max_unjudged_fraction_tolerates_some_failures(server, tmp_path, capsys):
    server.set_fault("null_content", only_if="Figure Caption:")  # the visual chat row only
    assert _judge(server, tmp_path, "--max-unjudged-fraction", "0.2") == 0
    err = capsys.readouterr().err
    assert "warning: the judge endpoint" in err and "left 1 of 5 requests unjudged (1 empty content" in err
    rows = read_artifact(tmp_path / "judge.parquet", artifact="judge_replies").to_pylist()
    unjudged = [r for r in rows if r["judge_reply"] is None]
    assert [r["protocol"] for r in unjudged] == ["visual_chat"] and "content is None" in unjudged[0]["failure"]
    assert read_meta(tmp_path / "judge.parquet").lineage["params"]["judge_stats"]["failures"] == 1
    # 0.1 of 5 allows none: the same fault fails the job.
    assert _judge(server, tmp_path, "--max-unjudged-fraction", "0.1") == 1


def test_a_hanging_endpoint_is_bounded_by_max_total_minutes(server, tmp_path, capsys):
    server.set_fault("hang")
    assert _judge(server, tmp_path, "--timeout-s", "30", "--max-retries", "5", "--max-total-minutes", "0.02") == 1
    err = capsys.readouterr().err
    assert "error: the judge endpoint" in err and "max_total_minutes (0.02) reached" in err


def test_the_error_line_never_shows_credentials_in_the_url(server, tmp_path, capsys):
    server.set_fault("500")
    url = server.url.replace("http://", "http://user:hunter2@")
    predictions = _predictions(tmp_path / "predictions.parquet")
    assert main(["judge", "--predictions", str(predictions), "--output", str(tmp_path / "o.parquet"),
                 "--base-url", url, "--judge-model", "m", "--api-key-env", "none", "--max-retries", "0"]) == 1
    err = capsys.readouterr().err
    assert f"the judge endpoint {server.url} left" in err and "hunter2" not in err


def test_progress_lines_name_done_total_failures_rate_and_eta(server, tmp_path, capsys):
    assert judge_progress_line(3, 10, 1, 2, 4.0) == "judge: requests 3/10 (30.0%), 1 failed, 0.50 requests/s, ETA 0h00m14s"
    assert _judge(server, tmp_path) == 0
    out, err = capsys.readouterr()
    assert "judge: requests 5/5 (100.0%), 0 failed," in err and "ETA 0h00m00s" in err
    assert f"wrote {tmp_path / 'judge.parquet'}" in out


def test_credentialed_predictions_need_allow_credentialed(server, tmp_path, capsys):
    (tmp_path / "adapter.bin").write_bytes(b"trained on MIMIC-CXR")
    predictions = _predictions(tmp_path / "predictions.parquet", credentialed_input=tmp_path / "adapter.bin")
    assert read_meta(predictions).credential == "credentialed"
    assert _judge(server, tmp_path, predictions=predictions) == 1
    out, err = capsys.readouterr()
    assert server.requests == 0 and "error:" not in out
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        f"error: {predictions} is credentialed (medmax.credential); sending it to the judge endpoint {server.url} needs "
        "evaluate.judge.allow_credentialed: true (medmax judge --allow-credentialed) and a data use agreement that "
        "allows it; nothing was sent"]
    assert _judge(server, tmp_path, "--allow-credentialed", predictions=predictions) == 0
    err = capsys.readouterr().err
    assert f"judge: sending credentialed predictions {predictions} to the judge endpoint {server.url}" in err
    assert server.requests == 5
    assert read_meta(tmp_path / "judge.parquet").credential == "credentialed"


def test_score_with_a_judge_config_asks_the_same_consent_for_credentialed_predictions(server, tmp_path, capsys):
    (tmp_path / "adapter.bin").write_bytes(b"trained on MIMIC-CXR")
    public = _predictions(tmp_path / "public.parquet")
    credentialed = _predictions(tmp_path / "credentialed.parquet", credentialed_input=tmp_path / "adapter.bin")
    settings = {"base_url": server.url, "model": "judge-m", "api_key_env": None, "max_retries": 2, "timeout_s": 0.5}
    plain, allowed = tmp_path / "judge.json", tmp_path / "judge_allowed.json"
    plain.write_text(json.dumps(settings))
    allowed.write_text(json.dumps({**settings, "allow_credentialed": True}))
    command = ["score", "--predictions", str(public), str(credentialed), "--n-bootstrap", "100"]
    # The public file comes first: nothing of it is sent either, as the check runs before any request.
    assert main([*command, "--output", str(tmp_path / "refused"), "--judge-config", str(plain)]) == 1
    assert server.requests == 0 and not (tmp_path / "refused").exists()
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert line.startswith(f"error: {credentialed} is credentialed (medmax.credential); sending it to the judge endpoint")
    assert main([*command, "--output", str(tmp_path / "scored"), "--judge-config", str(allowed)]) == 0
    assert server.requests == 5  # the two files ask the same five questions: each is asked once
    assert read_meta(tmp_path / "scored" / "scores.parquet").credential == "credentialed"


def test_public_predictions_go_out_without_allow_credentialed(server, tmp_path, capsys):
    assert _judge(server, tmp_path) == 0
    assert "credentialed" not in capsys.readouterr().err and server.requests == 5
    assert [b["messages"] for b in sorted(server.bodies, key=lambda b: json.dumps(b))] == \
        [c["messages"] for c in sorted(PUBLIC["cases"], key=lambda c: json.dumps({"model": "judge-m", "messages": c["messages"]}))]


def test_a_fatal_answer_is_one_error_line(server, tmp_path, capsys):
    predictions = _predictions(tmp_path / "predictions.parquet")
    assert main(["judge", "--predictions", str(predictions), "--output", str(tmp_path / "o.parquet"),
                 "--base-url", server.url + "/wrong", "--judge-model", "m", "--api-key-env", "none"]) == 1
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "error:" not in out
    [line] = [line for line in err.splitlines() if line.startswith("error:")]
    assert f"the judge endpoint {server.url}/wrong answered HTTP 404 for model 'm'" in line


def test_a_judge_config_file_takes_allow_credentialed_from_the_command_line(tmp_path):
    import argparse

    from medmax_pipeline.stages.evaluate.judge_replies import add_arguments, judge_config_from_args

    (tmp_path / "judge.yaml").write_text("base_url: http://127.0.0.1:9/v1\nmodel: m\nmax_unjudged_fraction: 0.02\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    plain = judge_config_from_args(parser.parse_args(["--judge-config", str(tmp_path / "judge.yaml")]))
    allowed = judge_config_from_args(parser.parse_args(["--judge-config", str(tmp_path / "judge.yaml"), "--allow-credentialed"]))
    assert (plain.allow_credentialed, allowed.allow_credentialed, allowed.max_unjudged_fraction) == (False, True, 0.02)
    with pytest.raises(JudgeError, match="max_unjudged_fraction must be between 0 and 1"):
        JudgeConfig(base_url="http://x/v1", model="m", max_unjudged_fraction=1.5)
