"""The LLM judge against a real local HTTP server that misbehaves on purpose."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from medmax_pipeline.stages.evaluate.judge import (
    JudgeConfig,
    JudgeError,
    LLMJudge,
    build_judge_messages,
    load_judge_config,
    parse_verdict,
    retry_after_seconds,
)


class FakeEndpoint:
    """An OpenAI-compatible /chat/completions whose behaviour is chosen by the prediction text.

    'good-1' / 'good-0': a verdict; 'noverdict': a reply without one; 'garbage': a body that is
    not JSON; 'ratelimit': 429 (Retry-After: 3) once, then a verdict; 'flaky': 500 once, then a
    verdict; 'slow': the first answer takes longer than the client's timeout; 'always500': 500.
    """

    def __init__(self):
        self.requests = []
        self.seen = {}
        self.lock = threading.Lock()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                content = body["messages"][0]["content"]
                with endpoint.lock:
                    endpoint.requests.append((self.path, self.headers.get("Authorization"), body["model"]))
                    kind = next(k for k in ("good-1", "good-0", "noverdict", "garbage", "ratelimit", "flaky", "slow", "always500")
                                if f"determined: {k}" in content)
                    count = endpoint.seen[kind] = endpoint.seen.get(kind, 0) + 1
                if kind == "ratelimit" and count == 1:
                    return self._send(429, b"{}", {"Retry-After": "3"})
                if kind == "flaky" and count == 1:
                    return self._send(500, b"oops")
                if kind == "always500":
                    return self._send(500, b"down")
                if kind == "slow" and count == 1:
                    time.sleep(0.6)
                if kind == "garbage":
                    return self._send(200, b"<html>not json</html>")
                reply = {"good-0": "The answer is wrong.\nCorrectness: 0", "noverdict": "I cannot tell."}.get(
                    kind, "Matches.\nCorrectness: 1")
                self._send(200, json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode())

            def _send(self, code, payload, headers=None):
                try:
                    self.send_response(code)
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def count(self):
        with self.lock:
            return len(self.requests)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoint():
    ep = FakeEndpoint()
    yield ep
    ep.close()


def make_judge(endpoint, tmp_path, sleeps, **overrides):
    config = JudgeConfig(base_url=endpoint.base_url, model="judge-model", cache_path=str(tmp_path / "cache.jsonl"),
                         timeout_s=0.3, max_retries=3, backoff_s=0.01, concurrency=3, **overrides)
    return LLMJudge(config, sleep=sleeps.append)


def test_parse_verdict_rules():
    assert parse_verdict("blah\nCorrectness: 1") == (True, "judge: Correctness: 1")
    assert parse_verdict("Correctness: 0")[0] is False
    # Public precedence: 'Correctness: 1' is checked first even if 0 also appears.
    assert parse_verdict("Correctness: 0 ... Correctness: 1")[0] is True
    assert parse_verdict("**Correctness:** 0")[0] is False
    assert parse_verdict("I think it is right")[0] is None
    assert parse_verdict(None)[0] is None


def test_prompt_asks_for_the_verdict_and_lowercases_prediction():
    content = build_judge_messages("Which organ?", "Lung", "The LUNG")[0]["content"]
    assert "Correctness:" in content and "the lung" in content and "Lung" in content


def test_retry_after_parsing():
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds(None) is None
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past


def test_good_malformed_and_cache(endpoint, tmp_path):
    sleeps = []
    judge = make_judge(endpoint, tmp_path, sleeps)
    items = [("q1", "lung", "good-1"), ("q2", "lung", "good-0"), ("q3", "lung", "noverdict"), ("q4", "lung", "garbage"),
             ("q1", "lung", "good-1")]  # a duplicate is asked once
    verdicts = judge.judge_many(items)
    assert [v.correct for v in verdicts] == [True, False, None, None, True]
    assert "no Correctness verdict" in verdicts[2].note
    assert "malformed" in verdicts[3].note
    assert judge.stats.unjudged == 2
    assert endpoint.count() == 4
    # A rerun asks nothing again for cached replies; the malformed one (not cached) is asked again.
    judge2 = make_judge(endpoint, tmp_path, sleeps)
    verdicts2 = judge2.judge_many(items)
    assert [v.correct for v in verdicts2] == [True, False, None, None, True]
    assert endpoint.count() == 5
    assert judge2.stats.cache_hits == 3
    assert all(v.cached for v in verdicts2[:3])


def test_retries_on_429_500_and_timeout(endpoint, tmp_path):
    sleeps = []
    judge = make_judge(endpoint, tmp_path, sleeps)
    verdicts = judge.judge_many([("q", "a", "ratelimit"), ("q", "a", "flaky"), ("q", "a", "slow")])
    assert [v.correct for v in verdicts] == [True, True, True]
    assert judge.stats.retries == 3
    assert endpoint.seen == {"ratelimit": 2, "flaky": 2, "slow": 2}
    assert 3.0 in sleeps  # Retry-After honoured
    assert all(s < 1.0 for s in sleeps if s != 3.0)  # the others: exponential backoff from 0.01 s


def test_gives_up_and_reports_unjudged(endpoint, tmp_path):
    sleeps = []
    judge = make_judge(endpoint, tmp_path, sleeps)
    v = judge.judge("q", "a", "always500")
    assert v.correct is None and "gave up after 4 attempts" in v.note
    assert endpoint.seen["always500"] == 4
    assert sleeps == sorted(sleeps) and len(sleeps) == 3  # growing waits


def test_api_key_from_named_env_var(endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDMAX_TEST_KEY", "sk-test")
    judge = make_judge(endpoint, tmp_path, [], api_key_env="MEDMAX_TEST_KEY")
    assert judge.judge("q", "a", "good-1").correct is True
    assert endpoint.requests[-1] == ("/v1/chat/completions", "Bearer sk-test", "judge-model")
    monkeypatch.delenv("MEDMAX_TEST_KEY")
    with pytest.raises(JudgeError, match="MEDMAX_TEST_KEY"):
        make_judge(endpoint, tmp_path, [], api_key_env="MEDMAX_TEST_KEY")


def test_load_config_errors(tmp_path):
    with pytest.raises(JudgeError, match="does not exist"):
        load_judge_config(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"base_url": "http://x", "model": "m", "modle": "typo"}))
    with pytest.raises(JudgeError, match="unknown keys"):
        load_judge_config(bad)
    good = tmp_path / "good.yaml"
    good.write_text("base_url: http://x\nmodel: m\nconcurrency: 2\n")
    assert load_judge_config(good).concurrency == 2
