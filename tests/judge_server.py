"""A fake OpenAI-compatible judge on 127.0.0.1 for workflow tests: canned replies chosen from the prompt.

GET  /v1/models             {"data": []}  (the workflow's start-of-run check asks this)
POST /v1/chat/completions   a reply chosen by `canned_reply` from the last message's text

Every completion request's body and Authorization header are recorded. Bounded: it answers at
most `max_requests` completions (then HTTP 500) and shuts itself down after `lifetime_s`
seconds even if a test never stops it; its thread is a daemon.
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


class FakeJudgeServer:
    """Start with `with FakeJudgeServer() as server:`; server.url is the base_url (…/v1)."""

    def __init__(self, max_requests: int = 500, lifetime_s: float = 3600.0) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.authorizations: list[str | None] = []
        self.max_requests = max_requests
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                if self.path.rstrip("/").endswith("/models"):
                    self._send(200, {"object": "list", "data": []})
                else:
                    self._send(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self) -> None:
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server._lock:
                    if len(server.bodies) >= server.max_requests:
                        return self._send(500, {"error": {"message": "fake judge: request limit reached"}})
                    server.bodies.append(body)
                    server.authorizations.append(self.headers.get("Authorization"))
                reply = canned_reply(body["messages"][-1]["content"])
                self._send(200, {"id": "fake", "object": "chat.completion", "created": 0, "model": body.get("model"),
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": reply}}]})

            def _send(self, code: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()
        self._timer = threading.Timer(lifetime_s, self.stop)
        self._timer.daemon = True
        self._timer.start()

    @property
    def requests(self) -> int:
        with self._lock:
            return len(self.bodies)

    def stop(self) -> None:
        self._timer.cancel()
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> "FakeJudgeServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
