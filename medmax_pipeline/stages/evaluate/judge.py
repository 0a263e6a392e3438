"""An LLM judge for open VQA answers through any OpenAI-compatible chat endpoint.

MedMax judged open answers with GPT-4o-mini, asking it to end with "Correctness: 1" or
"Correctness: 0", and silently dropped replies with neither from the denominator. Here:

* the endpoint is POST {base_url}/chat/completions (urllib from the standard library, so any
  OpenAI-compatible server works: OpenAI, Azure-style proxies, vLLM, llama.cpp, ...);
* the API key is read from the environment variable the config names (never from the config
  file itself, never written anywhere);
* 429, 5xx, timeouts and refused connections are retried with exponential backoff, honouring a
  Retry-After header; other 4xx fail at once (a wrong model name will not get better);
* a thread pool bounds the number of requests in flight;
* every reply is kept in a persistent jsonl cache keyed by a hash of (model, messages,
  temperature), so a rerun asks nothing again;
* a reply without a verdict, or a request that failed for good, is reported unjudged
  (correct = None) and counted; score.py keeps it in the denominator.

Config file (JSON or YAML):
    {"base_url": "https://api.openai.com/v1", "model": "gpt-4o-mini",
     "api_key_env": "OPENAI_API_KEY", "cache_path": "results/judge_cache.jsonl",
     "concurrency": 4, "timeout_s": 60, "max_retries": 5, "backoff_s": 1.0}
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import os
import random
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence


class JudgeError(RuntimeError):
    """The judge is misconfigured, or a request failed in a way retrying cannot fix."""


@dataclass(frozen=True)
class JudgeConfig:
    base_url: str
    model: str
    api_key_env: str | None = None
    cache_path: str | None = None
    concurrency: int = 4
    timeout_s: float = 60.0
    max_retries: int = 5
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    temperature: float = 0.0
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        if not self.base_url or not self.model:
            raise JudgeError("judge config needs base_url and model")
        if self.concurrency < 1 or self.max_retries < 0 or self.timeout_s <= 0:
            raise JudgeError("judge config: concurrency >= 1, max_retries >= 0 and timeout_s > 0 are required")


def load_judge_config(path: str | Path) -> JudgeConfig:
    """Read a JSON or YAML judge config; unknown keys are an error (a typo would be silent)."""
    path = Path(path)
    if not path.is_file():
        raise JudgeError(f"judge config {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:
        raise JudgeError(f"judge config {path} is not valid {path.suffix.lstrip('.') or 'JSON'}: {exc}") from exc
    if not isinstance(data, dict):
        raise JudgeError(f"judge config {path} must hold a mapping")
    known = set(JudgeConfig.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise JudgeError(f"judge config {path}: unknown keys {unknown}; known keys are {sorted(known)}")
    try:
        return JudgeConfig(**data)
    except TypeError as exc:
        raise JudgeError(f"judge config {path}: {exc}") from exc


# ----------------------------------------------------------------------------------------------
# Prompt and verdict
# ----------------------------------------------------------------------------------------------


def build_judge_messages(question: str, reference: str, prediction: str) -> list[dict[str, str]]:
    """The judge prompt: same task and output format as the MedMax judge (one user message).

    The prediction is lower-cased, as the public code did before asking the judge.
    """
    task = (
        "Given a question about a medical image, there is a correct answer to the question and an "
        "answer to be determined. If the answer to be determined matches the correct answer or is a "
        "good enough answer to the question, output 1; otherwise output 0. Evaluate the answer to be "
        "determined (1 or 0)."
    )
    prompt = (
        f"{task}\n\n"
        f"Question:\n- question about the medical image: {question}\n\n"
        f"Answers:\n- correct answer (ground truth): {reference}\n"
        f"- answer to be determined: {prediction.lower()}\n\n"
        f"Task:\n- {task}\n\n"
        "Output Format:\nCorrectness: your answer\n"
    )
    return [{"role": "user", "content": prompt}]


_VERDICT = re.compile(r"correctness\s*\**\s*[:=]\s*\**\s*([01])\b", re.I)


def parse_verdict(reply: str | None) -> tuple[bool | None, str]:
    """True/False/None from a judge reply, with the reason.

    The public code checked the literal 'Correctness: 1' first, then 'Correctness: 0'; that
    order is kept. Other spellings ('correctness:0', '**Correctness:** 1') are read by a
    tolerant pattern (last one wins) and noted, since the public code would have dropped them.
    """
    if reply is None:
        return None, "unjudged: no reply"
    if "Correctness: 1" in reply:
        return True, "judge: Correctness: 1"
    if "Correctness: 0" in reply:
        return False, "judge: Correctness: 0"
    found = _VERDICT.findall(reply)
    if found:
        return found[-1] == "1", f"judge: verdict {found[-1]} in a non-canonical spelling"
    return None, "unjudged: reply has no Correctness verdict"


def cache_key(model: str, messages: Sequence[dict[str, str]], temperature: float) -> str:
    payload = json.dumps({"model": model, "messages": list(messages), "temperature": temperature}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass(frozen=True)
class JudgeVerdict:
    correct: bool | None
    reply: str | None
    note: str
    cached: bool = False


# ----------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------


class JudgeCache:
    """Append-only jsonl of {key, model, reply}; a torn last line (killed run) is skipped."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path else None
        self._lock = threading.Lock()
        self._data: dict[str, str] = {}
        if self.path is not None and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                    self._data[entry["key"]] = entry["reply"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue

    def get(self, key: str) -> str | None:
        with self._lock:
            return self._data.get(key)

    def put(self, key: str, model: str, reply: str) -> None:
        with self._lock:
            self._data[key] = reply
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a") as f:
                    f.write(json.dumps({"key": key, "model": model, "reply": reply}) + "\n")
                    f.flush()

    def __len__(self) -> int:
        return len(self._data)


# ----------------------------------------------------------------------------------------------
# Client
# ----------------------------------------------------------------------------------------------


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header: a number of seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class _Retryable(Exception):
    def __init__(self, reason: str, wait: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.wait = wait


@dataclass
class JudgeStats:
    requests: int = 0
    cache_hits: int = 0
    retries: int = 0
    failures: int = 0
    unjudged: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self.lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in ("requests", "cache_hits", "retries", "failures", "unjudged")}


class LLMJudge:
    def __init__(self, config: JudgeConfig, sleep: Callable[[float], None] = time.sleep) -> None:
        self.config = config
        self.cache = JudgeCache(config.cache_path)
        self.stats = JudgeStats()
        self._sleep = sleep  # injectable so tests can record waits without waiting
        self.api_key: str | None = None
        if config.api_key_env:
            self.api_key = os.environ.get(config.api_key_env)
            if not self.api_key:
                raise JudgeError(f"judge config names api_key_env={config.api_key_env!r}, but that variable is not set")

    # -- one HTTP exchange ------------------------------------------------------------------
    def _post(self, messages: Sequence[dict[str, str]]) -> str:
        body: dict[str, Any] = {"model": self.config.model, "messages": list(messages), "temperature": self.config.temperature}
        if self.config.max_tokens is not None:
            body["max_tokens"] = self.config.max_tokens
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        url = self.config.base_url.rstrip("/") + "/chat/completions"
        request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
        self.stats.add(requests=1)
        try:
            with urllib.request.urlopen(request, timeout=self.config.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            if exc.code == 429 or exc.code >= 500:
                raise _Retryable(f"HTTP {exc.code}", retry_after_seconds(exc.headers.get("Retry-After"))) from exc
            detail = exc.read()[:300].decode(errors="replace")
            raise JudgeError(f"judge endpoint {url} answered HTTP {exc.code}: {detail}") from exc
        except (TimeoutError, socket.timeout) as exc:
            raise _Retryable("timeout") from exc
        except urllib.error.URLError as exc:
            # Refused connections and timeouts during connect arrive wrapped in URLError.
            raise _Retryable(f"connection error: {exc.reason}") from exc
        except (ConnectionError, OSError) as exc:
            raise _Retryable(f"connection error: {exc}") from exc
        try:
            return str(json.loads(raw)["choices"][0]["message"]["content"])
        except (json.JSONDecodeError, KeyError, IndexError, TypeError) as exc:
            raise JudgeError(f"judge endpoint {url} sent a malformed response: {raw[:200]!r}") from exc

    def _ask(self, messages: Sequence[dict[str, str]]) -> str:
        attempt = 0
        while True:
            try:
                return self._post(messages)
            except _Retryable as exc:
                if attempt >= self.config.max_retries:
                    raise JudgeError(f"gave up after {attempt + 1} attempts: {exc.reason}") from exc
                delay = exc.wait if exc.wait is not None else min(
                    self.config.max_backoff_s, self.config.backoff_s * (2**attempt)
                ) * (1 + 0.1 * random.random())
                self.stats.add(retries=1)
                self._sleep(delay)
                attempt += 1

    # -- public API -------------------------------------------------------------------------
    def judge_messages(self, messages: Sequence[dict[str, str]]) -> JudgeVerdict:
        key = cache_key(self.config.model, messages, self.config.temperature)
        cached = self.cache.get(key)
        if cached is not None:
            self.stats.add(cache_hits=1)
            correct, note = parse_verdict(cached)
            verdict = JudgeVerdict(correct, cached, note, cached=True)
        else:
            try:
                reply = self._ask(messages)
            except JudgeError as exc:
                # Not cached: a later run may succeed.
                self.stats.add(failures=1, unjudged=1)
                return JudgeVerdict(None, None, f"unjudged: {exc}")
            self.cache.put(key, self.config.model, reply)
            correct, note = parse_verdict(reply)
            verdict = JudgeVerdict(correct, reply, note)
        if verdict.correct is None:
            self.stats.add(unjudged=1)
        return verdict

    def judge(self, question: str, reference: str, prediction: str) -> JudgeVerdict:
        return self.judge_messages(build_judge_messages(question, reference, prediction))

    def judge_many(self, items: Sequence[tuple[str, str, str]]) -> list[JudgeVerdict]:
        """Judge (question, reference, prediction) triples; order kept, duplicates asked once."""
        messages = [build_judge_messages(*item) for item in items]
        keys = [cache_key(self.config.model, m, self.config.temperature) for m in messages]
        first_of: dict[str, int] = {}
        for i, k in enumerate(keys):
            first_of.setdefault(k, i)
        unique = sorted(first_of.values())
        with ThreadPoolExecutor(max_workers=self.config.concurrency) as pool:
            results = dict(zip(unique, pool.map(lambda i: self.judge_messages(messages[i]), unique)))
        out = []
        for i, k in enumerate(keys):
            j = first_of[k]
            if j == i:
                out.append(results[i])
            else:
                r = results[j]
                if r.correct is None:
                    self.stats.add(unjudged=1)
                out.append(JudgeVerdict(r.correct, r.reply, r.note, cached=True))
        return out
