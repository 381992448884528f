"""Judge calls to any OpenAI-compatible chat-completions endpoint (OpenAI, Azure OpenAI, `vllm serve`).

The openai client runs with max_retries=0: we retry ourselves so every HTTP call is counted, the retries of a
whole batch share one budget (a persistent error can never loop forever), and errors come back per request
instead of failing the batch. Successful replies are cached on disk by a hash of the full request.

The API key is read from the environment only; it is never stored in settings, cache files, logs or errors.
"""

from __future__ import annotations

import email.utils
import json
import logging
import math
import os
import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import openai
from tqdm.auto import tqdm

from selftrain.io import DataError, read_json, sha256_json, write_json

log = logging.getLogger(__name__)

LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "0.0.0.0"}
RETRY_STATUSES = {408, 409, 429}  # plus every 5xx; other 4xx are the caller's fault and fail at once
MAX_BACKOFF_S = 30.0


@dataclass
class EndpointSettings:
    model: str = field(metadata={"help": "Model name (the deployment name on Azure)."})
    base_url: str | None = field(
        default=None, metadata={"help": "Endpoint URL, e.g. http://localhost:8000/v1; None for api.openai.com."}
    )
    api_key_env: str = field(
        default="OPENAI_API_KEY", metadata={"help": "Name of the env var holding the API key (the key is not stored)."}
    )
    azure_api_version: str | None = field(
        default=None, metadata={"help": "If set, use Azure OpenAI with base_url as azure_endpoint."}
    )
    concurrency: int = field(default=8, metadata={"help": "Requests in flight at once."})
    timeout_s: float = field(default=60, metadata={"help": "Timeout of one HTTP call, in seconds."})
    max_attempts: int = field(default=4, metadata={"help": "Attempts per request, including the first."})
    retry_budget: int = field(default=200, metadata={"help": "Retries allowed across a whole batch."})
    backoff_s: float = field(default=1.0, metadata={"help": "Base of the exponential backoff (with jitter)."})
    max_retry_after_s: float = field(default=60, metadata={"help": "Cap on a server's Retry-After wait, seconds."})
    temperature: float | None = field(default=0.0, metadata={"help": "Sampling temperature (None: not sent)."})
    max_tokens: int | None = field(default=1024, metadata={"help": "Max generated tokens per reply (None: not sent)."})
    seed: int | None = field(default=None, metadata={"help": "Sampling seed, where the endpoint supports it."})
    top_p: float | None = field(default=None, metadata={"help": "Nucleus sampling mass (None: not sent)."})
    frequency_penalty: float | None = field(default=None, metadata={"help": "Frequency penalty (None: not sent)."})
    presence_penalty: float | None = field(default=None, metadata={"help": "Presence penalty (None: not sent)."})
    reasoning_effort: str | None = field(
        default=None, metadata={"help": "Reasoning effort of reasoning models (None: not sent)."}
    )
    max_tokens_param: str = field(
        default="max_tokens",
        metadata={"help": "Request field that carries max_tokens: max_tokens, or max_completion_tokens (gpt-5)."},
    )
    logprobs: bool = field(default=False, metadata={"help": "Ask for logprobs of the generated tokens."})
    top_logprobs: int = field(default=0, metadata={"help": "Alternatives per token with logprobs (0-20)."})

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.max_attempts < 1 or self.retry_budget < 0:
            raise ValueError("concurrency and max_attempts must be >= 1, retry_budget >= 0")
        if not 0 <= self.top_logprobs <= 20:
            raise ValueError("top_logprobs must be in 0..20")
        if self.max_tokens_param not in ("max_tokens", "max_completion_tokens"):
            raise ValueError("max_tokens_param must be max_tokens or max_completion_tokens")


@dataclass
class JudgeReply:
    text: str | None
    top_logprobs: list[dict[str, float]] | None = None  # per generated token: token -> logprob of top alternatives
    tokens: list[str] | None = None  # the generated tokens themselves, aligned with top_logprobs
    error: str | None = None  # short kind: "HTTP 500", "timeout", "empty choices", "bad response", "refusal: ..."
    refused: bool = False
    attempts: int = 0  # HTTP calls made for this request (0 when cached)
    cached: bool = False
    seconds: float = 0.0
    finish_reason: str | None = None
    completed: bool = False  # the server sent a chat completion (content may still be None: a filtered reply)
    http_status: int | None = None  # HTTP status of the last failed call, when it failed with one

    @property
    def ok(self) -> bool:
        return self.error is None


# Sampling fields sent only when set; they enter the cache key only when set, so older keys stay valid.
OPTIONAL_SAMPLING = ("top_p", "frequency_penalty", "presence_penalty", "reasoning_effort")


def request_key(settings: EndpointSettings, messages: list[dict], extra: Any = None) -> str:
    """Cache key: sha256 of everything that shapes the reply. Never includes the API key."""
    key = {
        "model": settings.model,
        "base_url": settings.base_url,
        "azure_api_version": settings.azure_api_version,
        "messages": messages,
        "temperature": settings.temperature,
        "max_tokens": settings.max_tokens,
        "seed": settings.seed,
        "logprobs": settings.logprobs,
        "top_logprobs": settings.top_logprobs if settings.logprobs else 0,
        "extra": extra,
    }
    more = {k: getattr(settings, k) for k in OPTIONAL_SAMPLING if getattr(settings, k) is not None}
    if settings.max_tokens_param != "max_tokens":
        more["max_tokens_param"] = settings.max_tokens_param
    if more:
        key["sampling"] = more
    return sha256_json(key)


class _Budget:
    """Retries left for one batch, shared by its worker threads."""

    def __init__(self, n: int):
        self.left, self.lock = n, threading.Lock()

    def take(self) -> bool:
        with self.lock:
            if self.left <= 0:
                return False
            self.left -= 1
            return True


class _Failure(Exception):
    """One failed attempt: a short error kind, whether to retry, and the server's requested wait."""

    def __init__(
        self, kind: str, retry: bool, retry_after: float | None = None, refused: bool = False, status: int | None = None
    ):
        super().__init__(kind)
        self.kind, self.retry, self.retry_after, self.refused, self.status = kind, retry, retry_after, refused, status


def _is_local(url: str | None) -> bool:
    return bool(url) and urlparse(url).hostname in LOCAL_HOSTS


def _retry_after(headers: Any) -> float | None:
    """Seconds the server asked us to wait: retry-after-ms (OpenAI), else Retry-After (seconds or HTTP date)."""
    try:
        if (ms := headers.get("retry-after-ms")) is not None:
            wait = float(ms) / 1000
        elif (value := headers.get("retry-after")) is not None:
            try:
                wait = float(value)
            except ValueError:
                wait = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        else:
            return None
    except (ValueError, TypeError):
        return None
    return max(wait, 0.0) if math.isfinite(wait) else None


def _parse_logprobs(choice: dict) -> tuple[list[dict[str, float]] | None, list[str] | None]:
    """Per token: {alternative: logprob} (the chosen token alone when no alternatives were asked for),
    and the chosen tokens, so a caller can find where in the text each distribution applies."""
    try:
        content = (choice.get("logprobs") or {}).get("content")
        if not content:
            return None, None
        out, tokens = [], []
        for tok in content:
            alts = {a["token"]: float(a["logprob"]) for a in tok.get("top_logprobs") or []}
            out.append(alts or {tok["token"]: float(tok["logprob"])})
            tokens.append(str(tok["token"]))
        return out, tokens
    except (AttributeError, KeyError, TypeError, ValueError):
        return None, None  # malformed logprobs: keep the text, the caller sees top_logprobs=None


def _parse_body(body: str) -> JudgeReply:
    """A chat-completions response body -> reply, or _Failure for anything we can't use."""
    try:
        data = json.loads(body)
    except ValueError:
        raise _Failure("bad response", retry=True) from None
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
        raise _Failure("bad response", retry=True)
    if not data["choices"]:
        raise _Failure("empty choices", retry=True)
    choice = data["choices"][0]
    message = choice.get("message") if isinstance(choice, dict) else None
    if not isinstance(message, dict):
        raise _Failure("bad response", retry=True)
    finish = choice.get("finish_reason")
    content = message.get("content")
    if finish == "content_filter" or message.get("refusal"):
        # a policy decision, not a glitch: report it, don't retry it
        reason = message.get("refusal") or "content_filter"
        return JudgeReply(
            text=content if isinstance(content, str) else None,
            error=f"refusal: {str(reason)[:200]}",
            refused=True,
            finish_reason=finish,
            completed=True,
        )
    if not isinstance(content, str):
        raise _Failure("bad response", retry=True)
    top, tokens = _parse_logprobs(choice)
    return JudgeReply(text=content, top_logprobs=top, tokens=tokens, finish_reason=finish, completed=True)


class EndpointJudge:
    def __init__(self, settings: EndpointSettings, cache_dir: Path | None = None):
        self.settings = settings
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        key = os.environ.get(settings.api_key_env)
        if not key:
            if not _is_local(settings.base_url):
                where = settings.base_url or "api.openai.com"
                raise RuntimeError(
                    f"environment variable {settings.api_key_env} is not set; it must hold the API key for {where} "
                    f"(or set api_key_env to the name of the variable that does)"
                )
            key = "EMPTY"  # a local `vllm serve` without --api-key accepts anything
        common: dict[str, Any] = {"api_key": key, "timeout": settings.timeout_s, "max_retries": 0}
        self.client: openai.OpenAI
        if settings.azure_api_version:
            # No base_url: the client reads AZURE_OPENAI_ENDPOINT, as openai's does.
            endpoint: dict[str, Any] = {"azure_endpoint": settings.base_url} if settings.base_url else {}
            self.client = openai.AzureOpenAI(api_version=settings.azure_api_version, **endpoint, **common)
        else:
            self.client = openai.OpenAI(base_url=settings.base_url, **common)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> EndpointJudge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- cache

    def _cache_path(self, key: str) -> Path | None:
        return self.cache_dir / key[:2] / f"{key}.json" if self.cache_dir is not None else None

    def _cache_get(self, key: str) -> JudgeReply | None:
        path = self._cache_path(key)
        if path is None or not path.exists():
            return None
        try:
            rec = read_json(path)
            if rec.get("key") != key or not isinstance(rec.get("text"), str):
                raise DataError("wrong key or text")
        except (DataError, OSError, AttributeError) as e:
            log.warning("ignoring unreadable judge cache file %s (%s)", path, e)
            return None
        return JudgeReply(
            text=rec["text"],
            top_logprobs=rec.get("top_logprobs"),
            tokens=rec.get("tokens"),
            finish_reason=rec.get("finish_reason"),
            cached=True,
            completed=True,
        )

    def _cache_put(self, key: str, messages: list[dict], reply: JudgeReply) -> None:
        path = self._cache_path(key)
        if path is not None:
            rec = {
                "key": key,
                "model": self.settings.model,
                "messages": messages,
                "text": reply.text,
                "top_logprobs": reply.top_logprobs,
                "tokens": reply.tokens,
                "finish_reason": reply.finish_reason,
            }
            try:
                write_json(path, rec)  # atomic: a killed run never leaves a half-written entry
            except OSError as e:  # a full disk shouldn't throw away a paid-for reply
                log.warning("could not write judge cache file %s (%s)", path, e)

    # ---- one request

    def _params(self, messages: list[dict]) -> dict[str, Any]:
        s = self.settings
        params: dict[str, Any] = {"model": s.model, "messages": messages}
        if s.temperature is not None:
            params["temperature"] = s.temperature
        if s.max_tokens is not None:
            params[s.max_tokens_param] = s.max_tokens
        if s.seed is not None:
            params["seed"] = s.seed
        for k in OPTIONAL_SAMPLING:
            if getattr(s, k) is not None:
                params[k] = getattr(s, k)
        if s.logprobs:
            params["logprobs"] = True
            if s.top_logprobs:
                params["top_logprobs"] = s.top_logprobs
        return params

    def _attempt(self, messages: list[dict]) -> JudgeReply:
        """One HTTP call. Error kinds are built from types and status codes only, never exception text."""
        try:
            # raw response: we parse the body ourselves, so garbage or half-valid JSON is caught here
            raw = self.client.chat.completions.with_raw_response.create(**self._params(messages))
            body = raw.http_response.text
        except openai.APITimeoutError:
            raise _Failure("timeout", retry=True) from None
        except openai.APIConnectionError:
            raise _Failure("connection error", retry=True) from None
        except openai.APIStatusError as e:
            status = e.status_code
            if status == 400 and e.code == "content_filter":  # Azure filters the prompt with a 400
                raise _Failure("refusal: content_filter (prompt)", retry=False, refused=True, status=status) from None
            retry = status in RETRY_STATUSES or status >= 500
            raise _Failure(f"HTTP {status}", retry, _retry_after(e.response.headers), status=status) from None
        except openai.OpenAIError as e:
            raise _Failure(type(e).__name__, retry=False) from None
        return _parse_body(body)

    def _wait_s(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.settings.max_retry_after_s)
        base = min(self.settings.backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S)
        return base * (0.5 + random.random() / 2)  # jitter spreads out clients that failed together

    def _request(self, key: str, messages: list[dict], budget: _Budget) -> JudgeReply:
        t0 = time.perf_counter()
        attempt = 0
        while True:
            attempt += 1
            try:
                reply = self._attempt(messages)
                if not reply.refused:
                    self._cache_put(key, messages, reply)
                break
            except _Failure as f:
                reply = JudgeReply(text=None, error=f.kind, refused=f.refused, http_status=f.status)
                if not f.retry or attempt >= self.settings.max_attempts:
                    break
                if not budget.take():
                    log.debug("judge retry budget exhausted; giving up on a request after %s", f.kind)
                    break
                wait = self._wait_s(attempt, f.retry_after)
                log.debug("judge attempt %d failed (%s); retrying in %.2fs", attempt, f.kind, wait)
                time.sleep(wait)
        reply.attempts = attempt
        reply.seconds = time.perf_counter() - t0
        return reply

    # ---- batch

    def complete(
        self, list_of_messages: list[list[dict]], progress: bool = True, extra: Any = None
    ) -> list[JudgeReply]:
        """One reply per conversation, in input order; failures are recorded in the reply, never raised.

        `extra` goes into the cache key only (e.g. a judge-template version).
        """
        keys = [request_key(self.settings, m, extra) for m in list_of_messages]
        replies: list[JudgeReply | None] = [self._cache_get(k) for k in keys]
        todo = [i for i, r in enumerate(replies) if r is None]
        budget = _Budget(self.settings.retry_budget)
        bar = tqdm(total=len(keys), initial=len(keys) - len(todo), desc="judge", disable=not progress)
        if todo:
            with ThreadPoolExecutor(max_workers=min(self.settings.concurrency, len(todo))) as pool:
                futures = {pool.submit(self._request, keys[i], list_of_messages[i], budget): i for i in todo}
                try:
                    for fut in as_completed(futures):
                        replies[futures[fut]] = fut.result()
                        bar.update()
                except BaseException:
                    pool.shutdown(wait=False, cancel_futures=True)  # Ctrl-C: don't start what's queued
                    raise
        bar.close()
        out = [r for r in replies if r is not None]
        assert len(out) == len(keys)
        failed = sum(r.error is not None and not r.refused for r in out)
        if failed:
            log.warning("judge: %d of %d requests failed", failed, len(out))
        return out

    @staticmethod
    def stats(replies: list[JudgeReply]) -> dict[str, Any]:
        api_errors = Counter(r.error for r in replies if r.error is not None and not r.refused)
        return {
            "requests": len(replies),
            "ok": sum(r.error is None for r in replies),
            "http_calls": sum(r.attempts for r in replies),
            "retries": sum(max(r.attempts - 1, 0) for r in replies),
            "cached": sum(r.cached for r in replies),
            "api_errors": dict(api_errors),
            "failed": sum(api_errors.values()),
            "refused": sum(r.refused for r in replies),
        }
