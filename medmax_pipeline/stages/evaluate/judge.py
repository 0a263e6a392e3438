"""An LLM judge through the `openai` client: any OpenAI-compatible endpoint, cached raw replies.

What is asked and how replies are read is protocol data (judge_protocols.py). Here:

* requests go through `openai.OpenAI(base_url=...)`, as the public code's did, so its base_url
  reaches any compatible server (OpenAI, proxies, vLLM, llama.cpp, a test server on 127.0.0.1);
* a request carries `model` and `messages` only, plus `temperature` when the config sets one
  (the public code sent none);
* the API key is read from the environment variable the config names (never from a file, never
  written anywhere, never printed); a rejected key, an unknown model or an unreachable endpoint
  is one JudgeError;
* faults are retried here, not by the client (its retries cannot see a 200 with a broken body):
  HTTP 408/409/429/5xx, timeouts, refused connections and 200 replies that are not a chat
  completion (not JSON, an HTML page, no `choices`, null or empty content), up to `max_retries`
  times with exponential backoff (at most `max_retry_wait_s`), honouring Retry-After; a
  Retry-After longer than `max_retry_wait_s` gives the request up at once. A body is read up to
  `max_reply_bytes` and refused beyond it. Each try waits at most `timeout_s`, and nothing is
  asked after `max_total_minutes`;
* only answers are cached: every reply is appended to a jsonl cache keyed by a hash of the
  request body, so a rerun asks nothing again; a non-answer is never cached (a later run may
  succeed), and old cache lines holding one are ignored;
* a request that failed for good leaves its item unjudged with the reason; when more than
  `max_unjudged_fraction` of the requests failed, the job stops (JudgeError naming the endpoint
  and the counts) as soon as that is certain, keeping what it cached;
* a thread pool bounds the requests in flight; progress lines go to stderr.

Config file (JSON or YAML), or the same keys from the workflow's `evaluate.judge`:
    {"base_url": "https://api.openai.com/v1", "model": "gpt-4o-mini", "api_key_env": "OPENAI_API_KEY",
     "cache_path": "results/evaluate/judge_cache_trained.jsonl", "concurrency": 4,
     "temperature": null, "timeout_s": 60, "max_retries": 5, "max_retry_wait_s": 60,
     "max_reply_bytes": 1000000, "max_total_minutes": 240, "max_unjudged_fraction": 0.0,
     "allow_credentialed": false}
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import math
import os
import random
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence
from urllib.parse import urlsplit, urlunsplit

from medmax_pipeline.core.progress import PROGRESS_INTERVAL_S, Progress, eta_text

Messages = Sequence[dict[str, str]]

# Placeholder key for endpoints that need none (api_key_env null): the client insists on a value.
NO_KEY = "no-key"
# First backoff between tries; doubles per try up to max_retry_wait_s (minus up to 25 % jitter).
INITIAL_BACKOFF_S = 1.0
RETRYABLE_STATUS = frozenset({408, 409, 429})  # and every 5xx
FATAL_STATUS = frozenset({401, 403, 404})  # every later request would fail the same way


class JudgeError(RuntimeError):
    """The judge is misconfigured or unreachable, or a request failed in a way retrying cannot fix."""


@dataclass(frozen=True)
class JudgeConfig:
    base_url: str
    model: str
    api_key_env: str | None = "OPENAI_API_KEY"
    cache_path: str | None = None
    concurrency: int = 4
    temperature: float | None = None
    timeout_s: float = 60.0  # per try
    max_retries: int = 5
    max_retry_wait_s: float = 60.0  # longest wait between tries; a longer Retry-After gives the request up
    max_reply_bytes: int = 1_000_000  # a judge reply is a few hundred bytes; larger bodies are refused
    max_total_minutes: float = 240.0  # nothing is asked after this; the rest is unjudged
    # Unjudged (failed for good) requests tolerated before the job fails. 0: any failure fails the
    # job, so a judged accuracy never silently comes from a subset; the cache keeps the rest.
    max_unjudged_fraction: float = 0.0
    allow_credentialed: bool = False  # send predictions marked credentialed to this endpoint

    def __post_init__(self) -> None:
        if not self.base_url or not self.model:
            raise JudgeError("judge config needs base_url and model")
        if self.concurrency < 1 or self.max_retries < 0 or self.timeout_s <= 0:
            raise JudgeError("judge config: concurrency >= 1, max_retries >= 0 and timeout_s > 0 are required")
        if self.max_retry_wait_s < 0 or self.max_reply_bytes < 1 or not self.max_total_minutes > 0:
            raise JudgeError("judge config: max_retry_wait_s >= 0, max_reply_bytes >= 1 and max_total_minutes > 0 are required")
        if not 0.0 <= self.max_unjudged_fraction <= 1.0:
            raise JudgeError("judge config: max_unjudged_fraction must be between 0 and 1")
        if not isinstance(self.allow_credentialed, bool):
            raise JudgeError("judge config: allow_credentialed must be true or false")


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
    return judge_config_from_mapping(data, str(path))


def judge_config_from_mapping(data: dict[str, Any], where: str = "judge settings") -> JudgeConfig:
    known = set(JudgeConfig.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise JudgeError(f"{where}: unknown keys {unknown}; known keys are {sorted(known)}")
    try:
        return JudgeConfig(**data)
    except TypeError as exc:
        raise JudgeError(f"{where}: {exc}") from exc


def endpoint_label(base_url: str) -> str:
    """The endpoint as messages name it: without user:password@, query or fragment (they may hold secrets)."""
    try:
        parts = urlsplit(base_url)
    except ValueError:
        return "<unparseable base_url>"
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def request_body(config: JudgeConfig, messages: Messages) -> dict[str, Any]:
    """The fields of one chat-completions request: model, messages, and temperature only if set."""
    body: dict[str, Any] = {"model": config.model, "messages": [dict(m) for m in messages]}
    if config.temperature is not None:
        body["temperature"] = config.temperature
    return body


def cache_key(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class JudgeReply:
    reply: str | None  # the judge's raw reply; None when the request failed for good
    failure: str | None = None  # why there is no reply
    cached: bool = False
    failure_kind: str | None = None  # short class of the failure (counted in the error line)


# ----------------------------------------------------------------------------------------------
# One try: an answer, or a failure that says whether retrying may help
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Failure:
    kind: str  # e.g. "HTTP 500", "timeout", "not JSON"
    detail: str
    retryable: bool
    retry_after_s: float | None = None


def is_answer(reply: Any) -> bool:
    """A reply worth keeping: a non-blank string (an empty or null content is no answer)."""
    return isinstance(reply, str) and bool(reply.strip())


def completion_content(body: bytes, content_type: str) -> str | Failure:
    """The first choice's message content of a chat-completion body, or why there is none."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        head = body[:60].decode("utf-8", "replace").replace("\n", " ")
        return Failure("not JSON", f"the reply is not JSON (content-type {content_type or 'none'}; starts {head!r})",
                       retryable=True)
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices:
        error = data.get("error") if isinstance(data, dict) else None
        why = f" (error: {str(error)[:200]})" if error else ""
        return Failure("no choices", f"the reply has no choices{why}", retryable=True)
    message = choices[0].get("message") if isinstance(choices[0], dict) else None
    content = message.get("content") if isinstance(message, dict) else None
    if not is_answer(content):
        return Failure("empty content", f"the reply's content is {content!r}", retryable=True)
    return content


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """Retry-After-Ms / Retry-After (seconds or an HTTP date) as seconds; None when absent or unreadable."""
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) / divisor
        except ValueError:
            if name == "retry-after-ms":
                continue
            try:
                seconds = email.utils.mktime_tz(email.utils.parsedate_tz(value)) - time.time()  # type: ignore[arg-type]
            except (TypeError, ValueError, OverflowError):
                return None
        return max(0.0, seconds) if math.isfinite(seconds) else math.inf
    return None


def status_failure(status: int, headers: Mapping[str, str], message: str) -> Failure:
    retryable = status in RETRYABLE_STATUS or status >= 500
    return Failure(f"HTTP {status}", f"HTTP {status}: {message[:200]}", retryable,
                   retry_after_seconds(headers) if retryable else None)


def read_bounded(chunks: Iterable[bytes], limit: int) -> bytes | None:
    """The body, or None as soon as it passes `limit` bytes (the rest is never read)."""
    parts, size = [], 0
    for chunk in chunks:
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
    return b"".join(parts)


# ----------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------


class JudgeCache:
    """Append-only jsonl of {key, model, reply}; a torn last line (killed run) is skipped, and so is
    a line whose reply is no answer or is larger than `max_reply_bytes` (written by older versions)."""

    def __init__(self, path: str | Path | None, max_reply_bytes: int | None = None) -> None:
        self.path = Path(path) if path else None
        self._lock = threading.Lock()
        self._data: dict[str, str] = {}
        if self.path is not None and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                    key, reply = entry["key"], entry["reply"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue
                if is_answer(reply) and (max_reply_bytes is None or len(reply.encode()) <= max_reply_bytes):
                    self._data[key] = reply

    def get(self, key: str) -> str | None:
        with self._lock:
            return self._data.get(key)

    def put(self, key: str, model: str, reply: str) -> None:
        if not is_answer(reply):
            raise ValueError("a non-answer is never cached")
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


def api_key(config: JudgeConfig) -> str:
    """The key from the named environment variable; a clear error when it is not set."""
    if not config.api_key_env:
        return NO_KEY
    key = os.environ.get(config.api_key_env)
    if not key:
        raise JudgeError(f"the judge's API key variable {config.api_key_env} is not set "
                         f"(evaluate.judge.api_key_env; set api_key_env: null for an endpoint without a key)")
    return key


def make_client(config: JudgeConfig, timeout_s: float | None = None) -> Any:
    """An openai client without its own retries: LLMJudge retries (the client's cannot see a broken 200)."""
    import openai

    return openai.OpenAI(base_url=config.base_url, api_key=api_key(config),
                         timeout=config.timeout_s if timeout_s is None else timeout_s, max_retries=0)


def check_endpoint(config: JudgeConfig, timeout_s: float = 10.0) -> None:
    """Raise JudgeError (one line) when the key is missing, rejected, or the endpoint is unreachable.

    Asks GET {base_url}/models once, without retries and without a completion (nothing is
    judged, nothing is billed). Any HTTP answer but 401/403 means the endpoint is there: many
    compatible servers do not implement /models.
    """
    import openai

    client = make_client(config, timeout_s=timeout_s)
    endpoint = endpoint_label(config.base_url)
    try:
        client.models.list()
    except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
        raise JudgeError(f"the judge endpoint {endpoint} rejected the key in {config.api_key_env} "
                         f"(HTTP {exc.status_code})") from None
    except openai.APIConnectionError as exc:  # includes timeouts
        # The client's message is only "Connection error."; the cause says refused / unknown host / timeout.
        cause = f" ({exc.__cause__})" if exc.__cause__ is not None and str(exc.__cause__) else ""
        raise JudgeError(f"the judge endpoint {endpoint} is unreachable: {exc}{cause}") from None
    except (openai.APIStatusError, openai.APIResponseValidationError):
        pass


def allowed_failures(max_unjudged_fraction: float, total: int) -> int:
    """How many of `total` requests may fail for good (the epsilon keeps 0.02 * 50 at 1)."""
    return math.floor(max_unjudged_fraction * total + 1e-9)


def judge_progress_line(done: int, total: int, failed: int, asked: int, elapsed_s: float) -> str:
    """One progress line: requests done/total (cached ones included), failures, this run's rate, ETA."""
    rate = asked / elapsed_s if elapsed_s > 0 else 0.0
    pct = 100.0 * done / total if total else 100.0
    return (f"judge: requests {done}/{total} ({pct:.1f}%), {failed} failed, {rate:.2f} requests/s, "
            f"ETA {eta_text(done, total, asked, elapsed_s)}")


class LLMJudge:
    def __init__(self, config: JudgeConfig, client: Any = None, progress_stream: Any = None,
                 progress_interval_s: float = PROGRESS_INTERVAL_S) -> None:
        self.config = config
        self.endpoint = endpoint_label(config.base_url)
        self.cache = JudgeCache(config.cache_path, config.max_reply_bytes)
        self.client = client if client is not None else make_client(config)
        self.stats = JudgeStats()
        self.progress_stream, self.progress_interval_s = progress_stream, progress_interval_s
        self._deadline = math.inf
        self._allowed_failures = math.inf
        self._stop = threading.Event()  # set when the job fails anyway: nothing more is asked

    def _try_once(self, body: dict[str, Any], timeout_s: float) -> str | Failure:
        """One HTTP request; its body is read up to max_reply_bytes."""
        import httpx2  # the openai client's transport (requirements.lock); it raises while a body streams in
        import openai

        self.stats.add(requests=1)
        limit = self.config.max_reply_bytes
        try:
            with self.client.chat.completions.with_streaming_response.create(**body, timeout=timeout_s) as response:
                length = response.headers.get("content-length")
                raw = None if length and length.isdigit() and int(length) > limit else read_bounded(response.iter_bytes(), limit)
                content_type = response.headers.get("content-type", "")
        except openai.APIStatusError as exc:
            if exc.status_code in FATAL_STATUS:
                raise JudgeError(f"the judge endpoint {self.endpoint} answered HTTP {exc.status_code} "
                                 f"for model {self.config.model!r}: {exc.message}") from None
            return status_failure(exc.status_code, exc.response.headers, exc.message)
        except openai.APITimeoutError:
            return Failure("timeout", f"no answer within {timeout_s:.3g} s", retryable=True)
        except openai.APIConnectionError as exc:
            cause = f" ({exc.__cause__})" if exc.__cause__ is not None and str(exc.__cause__) else ""
            return Failure("connection error", f"connection error{cause}", retryable=True)
        except httpx2.TimeoutException:
            return Failure("timeout", f"the reply stalled for {timeout_s:.3g} s", retryable=True)
        except httpx2.RequestError as exc:
            return Failure("connection error", f"the reply broke off: {type(exc).__name__}: {exc}", retryable=True)
        if raw is None:
            # A judge reply is a few hundred bytes: a larger body is not a reply, and the same request gives it again.
            return Failure("reply over max_reply_bytes", f"the reply is larger than max_reply_bytes ({limit})", retryable=False)
        return completion_content(raw, content_type)

    def _ask_endpoint(self, body: dict[str, Any]) -> str | Failure:
        """Tries until an answer, a failure retrying cannot fix, max_retries, the deadline or a stop."""
        config = self.config
        last: Failure | None = None
        for attempt in range(config.max_retries + 1):
            if self._stop.is_set() or time.monotonic() >= self._deadline:
                why = ("the job stops (too many requests failed)" if self._stop.is_set()
                       else f"max_total_minutes ({config.max_total_minutes:g}) reached")
                if last is not None:
                    return Failure(last.kind, f"{last.detail}; not retried: {why}", retryable=False)
                return Failure("not asked", f"not asked: {why}", retryable=False)
            outcome = self._try_once(body, min(config.timeout_s, self._deadline - time.monotonic()))
            if isinstance(outcome, str) or not outcome.retryable or attempt == config.max_retries:
                return outcome
            if outcome.retry_after_s is not None and outcome.retry_after_s > config.max_retry_wait_s:
                return Failure(outcome.kind, f"{outcome.detail}; Retry-After {outcome.retry_after_s:g} s is longer "
                                             f"than max_retry_wait_s ({config.max_retry_wait_s:g})", retryable=False)
            wait = outcome.retry_after_s
            if wait is None:
                wait = min(INITIAL_BACKOFF_S * 2.0 ** attempt, config.max_retry_wait_s) * random.uniform(0.75, 1.0)
            last = outcome
            self.stats.add(retries=1)
            self._stop.wait(max(0.0, min(wait, self._deadline - time.monotonic())))  # a stop ends the wait
        raise AssertionError("unreachable: the last try returns")

    def ask(self, messages: Messages) -> JudgeReply:
        """One request (or its cached reply); a request that failed for good is unjudged with the reason."""
        body = request_body(self.config, messages)
        key = cache_key(body)
        cached = self.cache.get(key)
        if cached is not None:
            self.stats.add(cache_hits=1)
            return JudgeReply(cached, cached=True)
        outcome = self._ask_endpoint(body)
        if isinstance(outcome, Failure):
            if self.stats.add(failures=1)["failures"] > self._allowed_failures:
                self._stop.set()  # set here, before this worker takes another request
            return JudgeReply(None, f"unjudged: {outcome.detail}", failure_kind=outcome.kind)
        self.cache.put(key, self.config.model, outcome)
        return JudgeReply(outcome)

    def ask_many(self, requests: Sequence[Messages]) -> list[JudgeReply]:
        """Replies in order; identical requests are asked once. Raises JudgeError when more than
        max_unjudged_fraction of the distinct requests failed for good (stopping once that is certain)."""
        keys = [cache_key(request_body(self.config, m)) for m in requests]
        first_of: dict[str, int] = {}
        for i, k in enumerate(keys):
            first_of.setdefault(k, i)
        unique = sorted(first_of.values())
        self._allowed_failures = self.stats.failures + allowed_failures(self.config.max_unjudged_fraction, len(unique))
        cached = sum(self.cache.get(keys[i]) is not None for i in unique)
        self._deadline = time.monotonic() + 60.0 * self.config.max_total_minutes
        self._stop.clear()
        failures: Counter[str] = Counter()
        real_example: list[str] = []  # the first reason other than "not asked", for the error line
        progress = Progress(len(unique), done=cached, interval_s=self.progress_interval_s, stream=self.progress_stream,
                            label="judge", items="requests", unit="requests",
                            describe=lambda p, elapsed: judge_progress_line(p.done, p.total, sum(failures.values()),
                                                                            p.done - p.start_done, elapsed))
        replies: dict[int, JudgeReply] = {}
        with ThreadPoolExecutor(max_workers=self.config.concurrency) as pool:
            futures = {pool.submit(self.ask, requests[i]): i for i in unique}
            try:
                for future in as_completed(futures):
                    reply = replies[futures[future]] = future.result()
                    if reply.failure_kind is not None:
                        failures[reply.failure_kind] += 1
                        if reply.failure_kind != "not asked" and not real_example:
                            real_example.append(reply.failure or reply.failure_kind)
                    if not reply.cached:
                        progress.update(1)
            except BaseException:
                # A fatal answer (JudgeError) or an interrupt: the workers stop asking before the pool is left.
                self._stop.set()
                pool.shutdown(cancel_futures=True)
                raise
            finally:
                progress.close()
        example = real_example[0] if real_example else "not asked"
        if sum(failures.values()) > allowed_failures(self.config.max_unjudged_fraction, len(unique)):
            raise JudgeError(self._failure_summary(failures, len(unique), example))
        if failures:
            print(f"warning: {self._failure_summary(failures, len(unique), example)}", file=sys.stderr)
        out = []
        for i, k in enumerate(keys):
            r = replies[first_of[k]]
            out.append(r if first_of[k] == i else JudgeReply(r.reply, r.failure, r.reply is not None, r.failure_kind))
        return out

    def _failure_summary(self, failures: Counter[str], total: int, example: str) -> str:
        """One line: endpoint, counts by kind, the first reason, the limit, where the judged replies are kept."""
        failed = sum(failures.values())
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(failures.items(), key=lambda kv: (-kv[1], kv[0])))
        limit = self.config.max_unjudged_fraction
        kept = f"; {len(self.cache)} replies are cached in {self.config.cache_path} for a rerun" if self.config.cache_path else ""
        return (f"the judge endpoint {self.endpoint} left {failed} of {total} requests unjudged ({kinds}; first: "
                f"{example.removeprefix('unjudged: ')}); max_unjudged_fraction {limit:g} allows "
                f"{allowed_failures(limit, total)}{kept}")


@dataclass
class JudgeStats:
    requests: int = 0  # HTTP requests sent (tries)
    cache_hits: int = 0
    failures: int = 0  # distinct requests that failed for good
    retries: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> dict[str, int]:
        """Add the counts; their new totals."""
        with self.lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)
            return {name: getattr(self, name) for name in counts}

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in ("requests", "cache_hits", "failures", "retries")}
