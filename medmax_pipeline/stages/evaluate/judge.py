"""An LLM judge through the `openai` client: any OpenAI-compatible endpoint, cached raw replies.

What is asked and how replies are read is protocol data (judge_protocols.py). Here:

* requests go through `openai.OpenAI(base_url=...)`, as the public code's did, so its base_url
  reaches any compatible server (OpenAI, proxies, vLLM, llama.cpp, a test server on 127.0.0.1);
  the client's own retries (429, 408/409, 5xx, timeouts, refused connections, exponential
  backoff honouring Retry-After) and timeouts are used, not hand-written HTTP code;
* a request carries `model` and `messages` only, plus `temperature` when the config sets one
  (the public code sent none);
* the API key is read from the environment variable the config names (never from a file, never
  written anywhere); a rejected key, an unknown model or an unreachable endpoint is one JudgeError;
* a thread pool bounds the requests in flight;
* every reply is appended to a jsonl cache keyed by a hash of the request body, so a rerun asks
  nothing again; a request that failed for good is not cached (a later run may succeed) and its
  item is reported unjudged with the reason.

Config file (JSON or YAML), or the same keys from the workflow's `evaluate.judge`:
    {"base_url": "https://api.openai.com/v1", "model": "gpt-4o-mini", "api_key_env": "OPENAI_API_KEY",
     "cache_path": "results/evaluate/judge_cache_trained.jsonl", "concurrency": 4,
     "temperature": null, "timeout_s": 60, "max_retries": 5}
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

Messages = Sequence[dict[str, str]]

# Placeholder key for endpoints that need none (api_key_env null): the client insists on a value.
NO_KEY = "no-key"


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
    timeout_s: float = 60.0
    max_retries: int = 5

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


def api_key(config: JudgeConfig) -> str:
    """The key from the named environment variable; a clear error when it is not set."""
    if not config.api_key_env:
        return NO_KEY
    key = os.environ.get(config.api_key_env)
    if not key:
        raise JudgeError(f"the judge's API key variable {config.api_key_env} is not set "
                         f"(evaluate.judge.api_key_env; set api_key_env: null for an endpoint without a key)")
    return key


def make_client(config: JudgeConfig, max_retries: int | None = None, timeout_s: float | None = None) -> Any:
    import openai

    return openai.OpenAI(base_url=config.base_url, api_key=api_key(config),
                         timeout=config.timeout_s if timeout_s is None else timeout_s,
                         max_retries=config.max_retries if max_retries is None else max_retries)


def check_endpoint(config: JudgeConfig, timeout_s: float = 10.0) -> None:
    """Raise JudgeError (one line) when the key is missing, rejected, or the endpoint is unreachable.

    Asks GET {base_url}/models once, without retries and without a completion (nothing is
    judged, nothing is billed). Any HTTP answer but 401/403 means the endpoint is there: many
    compatible servers do not implement /models.
    """
    import openai

    client = make_client(config, max_retries=0, timeout_s=timeout_s)
    try:
        client.models.list()
    except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
        raise JudgeError(f"the judge endpoint {config.base_url} rejected the key in {config.api_key_env} "
                         f"(HTTP {exc.status_code})") from None
    except openai.APIConnectionError as exc:  # includes timeouts
        # The client's message is only "Connection error."; the cause says refused / unknown host / timeout.
        cause = f" ({exc.__cause__})" if exc.__cause__ is not None and str(exc.__cause__) else ""
        raise JudgeError(f"the judge endpoint {config.base_url} is unreachable: {exc}{cause}") from None
    except openai.APIStatusError:
        pass


class LLMJudge:
    def __init__(self, config: JudgeConfig, client: Any = None) -> None:
        self.config = config
        self.cache = JudgeCache(config.cache_path)
        self.client = client if client is not None else make_client(config)
        self.stats = JudgeStats()

    def _request(self, body: dict[str, Any]) -> str:
        import openai

        self.stats.add(requests=1)
        try:
            response = self.client.chat.completions.create(**body)
        except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as exc:
            # Every later request would fail the same way: stop the job with one line.
            raise JudgeError(f"the judge endpoint {self.config.base_url} answered HTTP {exc.status_code} "
                             f"for model {self.config.model!r}: {exc.message}") from None
        content = response.choices[0].message.content if response.choices else None
        return "" if content is None else str(content)

    def ask(self, messages: Messages) -> JudgeReply:
        """One request (or its cached reply); a request that failed after the client's retries is unjudged."""
        import openai

        body = request_body(self.config, messages)
        key = cache_key(body)
        cached = self.cache.get(key)
        if cached is not None:
            self.stats.add(cache_hits=1)
            return JudgeReply(cached, cached=True)
        try:
            reply = self._request(body)
        except openai.APIError as exc:
            self.stats.add(failures=1)
            return JudgeReply(None, f"unjudged: request failed after {self.config.max_retries} retries: "
                                    f"{type(exc).__name__}: {exc}")
        self.cache.put(key, self.config.model, reply)
        return JudgeReply(reply)

    def ask_many(self, requests: Sequence[Messages]) -> list[JudgeReply]:
        """Replies in order; identical requests are asked once."""
        keys = [cache_key(request_body(self.config, m)) for m in requests]
        first_of: dict[str, int] = {}
        for i, k in enumerate(keys):
            first_of.setdefault(k, i)
        unique = sorted(first_of.values())
        with ThreadPoolExecutor(max_workers=self.config.concurrency) as pool:
            replies = dict(zip(unique, pool.map(lambda i: self.ask(requests[i]), unique)))
        out = []
        for i, k in enumerate(keys):
            r = replies[first_of[k]]
            out.append(r if first_of[k] == i else JudgeReply(r.reply, r.failure, cached=r.reply is not None))
        return out


@dataclass
class JudgeStats:
    requests: int = 0
    cache_hits: int = 0
    failures: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self.lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in ("requests", "cache_hits", "failures")}
