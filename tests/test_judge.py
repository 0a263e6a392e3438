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
