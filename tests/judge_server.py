"""A fake OpenAI-compatible judge on 127.0.0.1 for tests: canned replies chosen from the prompt, and faults.

GET  /v1/models             {"data": []}  (the workflow's start-of-run check asks this)
POST /v1/chat/completions   a reply chosen by `canned_reply` from the last message's text

Every completion request's body and Authorization header are recorded (faulted ones too). Bounded:
it answers at most `max_requests` completions (then HTTP 500) and shuts itself down after
`lifetime_s` seconds even if a test never stops it; its thread is a daemon.

Faults (`set_fault(mode, times=None, only_if=None)`: the next `times` completion requests, or all,
optionally only those whose prompt contains `only_if`), each what a broken endpoint or proxy sends:
    500             HTTP 500 with a JSON error (Retry-After: 0, so retries are quick)
    429             HTTP 429 with Retry-After: `retry_after` (default "3600")
    hang            accepts the request and answers nothing until the server stops (or `hang_s`)
    empty_choices   200 with "choices": []
    null_content    200 with a choice whose message content is null
    malformed_json  200, application/json, a truncated JSON body
    html            200 text/html, a proxy's error page
    huge            200 with a valid reply of `huge_bytes` bytes (Content-Length set)
    huge_unsized    the same without Content-Length (the body ends when the connection closes)
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# Open VQA: the verdict depends on the ground truth, so expected scores follow from the eval set
# whatever the models generated. brain: a spelling only medmax_tolerant reads; colon: no verdict.
OPEN_VQA_REPLIES = {
    "lung": "Correctness: 1", "heart": "Correctness: 1",
    "liver": "Correctness: 0", "kidney": "Correctness: 0",
    "brain": "**Correctness:** 1",
    "colon": "I cannot tell from this answer.",
}
NO_VERDICT_REPLY = OPEN_VQA_REPLIES["colon"]
# Visual chat: a prompt ending with <image> gets two scores, any other a first line that is not two numbers.
VISUAL_CHAT_SCORED = "8 4\nAssistant 1 is more complete."
VISUAL_CHAT_UNSCORED = "Assistant 1: 8, Assistant 2: 4\nAssistant 1 is more complete."
MM_OUT_REPLY = "10 5\nAssistant 2 is vaguer."


def _between(text: str, start: str, end: str) -> str:
    return text.split(start, 1)[1].split(end, 1)[0]


def canned_reply(prompt: str) -> str:
    """The reply for one request, by protocol (judge_protocols.py prompt texts)."""
    if "correct answer(ground truth):" in prompt:
        truth = _between(prompt, "correct answer(ground truth):", "\n").strip()
        return OPEN_VQA_REPLIES.get(truth, NO_VERDICT_REPLY)
    if "[Assistant 1]" in prompt:
        if "Figure Caption:" not in prompt:
            return MM_OUT_REPLY
        question = _between(prompt, "[Question]\n", "\n\n[Assistant 1]")
        return VISUAL_CHAT_SCORED if question.rstrip().endswith("<image>") else VISUAL_CHAT_UNSCORED
    return "I do not know this protocol."


FAULTS = ("500", "429", "hang", "empty_choices", "null_content", "malformed_json", "html", "huge", "huge_unsized")


def completion(model: Any, content: Any) -> dict[str, Any]:
    return {"id": "fake", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}]}


class FakeJudgeServer:
    """Start with `with FakeJudgeServer() as server:`; server.url is the base_url (…/v1)."""

    def __init__(self, max_requests: int = 500, lifetime_s: float = 3600.0, huge_bytes: int = 2_000_000,
                 retry_after: str = "3600", hang_s: float = 120.0) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.authorizations: list[str | None] = []
        self.max_requests = max_requests
        self.huge_bytes, self.retry_after, self.hang_s = huge_bytes, retry_after, hang_s
        self.faulted: list[str] = []  # the fault each faulted request got
        self._fault: tuple[str, int | None, str | None] | None = None
        self._released = threading.Event()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                if self.path.rstrip("/") == "/v1/models":
                    self._send(200, {"object": "list", "data": []})
                else:
                    self._send(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self) -> None:
                if not self.path == "/v1/chat/completions":
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][-1]["content"]
                with server._lock:
                    if len(server.bodies) >= server.max_requests:
                        return self._send(500, {"error": {"message": "fake judge: request limit reached"}})
                    server.bodies.append(body)
                    server.authorizations.append(self.headers.get("Authorization"))
                    fault = server._take_fault(prompt)
                try:
                    if fault is None:
                        self._send(200, completion(body.get("model"), canned_reply(prompt)))
                    else:
                        self._send_fault(fault, body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client stopped reading (a huge body, a timeout): expected

            def _send_fault(self, fault: str, body: dict[str, Any]) -> None:
                if fault == "500":
                    self._send(500, {"error": {"message": "fake judge: internal error"}}, {"Retry-After": "0"})
                elif fault == "429":
                    self._send(429, {"error": {"message": "fake judge: slow down"}}, {"Retry-After": server.retry_after})
                elif fault == "hang":
                    server._released.wait(server.hang_s)
                elif fault == "empty_choices":
                    self._send(200, {**completion(body.get("model"), None), "choices": []})
                elif fault == "null_content":
                    self._send(200, completion(body.get("model"), None))
                elif fault == "malformed_json":
                    self._send_raw(200, json.dumps(completion(body.get("model"), "Correctness: 1")).encode()[:-7],
                                   "application/json")
                elif fault == "html":
                    self._send_raw(200, b"<html><body><h1>502 Bad Gateway</h1></body></html>", "text/html")
                elif fault in ("huge", "huge_unsized"):
                    data = json.dumps(completion(body.get("model"), "Correctness: 1 " + "x" * server.huge_bytes)).encode()
                    self._send_raw(200, data, "application/json", sized=fault == "huge")
                else:
                    raise ValueError(f"unknown fault {fault!r}")

            def _send(self, code: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                self._send_raw(code, json.dumps(payload).encode(), "application/json", headers=headers)

            def _send_raw(self, code: int, data: bytes, content_type: str, sized: bool = True,
                          headers: dict[str, str] | None = None) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                if sized:
                    self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                for start in range(0, len(data), 65536):
                    self.wfile.write(data[start:start + 65536])

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()
        self._timer = threading.Timer(lifetime_s, self.stop)
        self._timer.daemon = True
        self._timer.start()

    def set_fault(self, mode: str | None, times: int | None = None, only_if: str | None = None) -> None:
        """Fault the next `times` completion requests (None: all) whose prompt holds `only_if`; None clears."""
        if mode is not None and mode not in FAULTS:
            raise ValueError(f"unknown fault {mode!r}; one of {FAULTS}")
        with self._lock:
            self._fault = None if mode is None else (mode, times, only_if)

    def _take_fault(self, prompt: str) -> str | None:
        """The fault for this request (called under the lock)."""
        if self._fault is None:
            return None
        mode, times, only_if = self._fault
        if only_if is not None and only_if not in prompt:
            return None
        if times is not None:
            self._fault = (mode, times - 1, only_if) if times > 1 else None
        self.faulted.append(mode)
        return mode

    @property
    def requests(self) -> int:
        with self._lock:
            return len(self.bodies)

    def stop(self) -> None:
        self._released.set()  # hanging handlers return
        self._timer.cancel()
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> "FakeJudgeServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
