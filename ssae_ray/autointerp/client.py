"""The Claude client: the official `anthropic` SDK with a cache, a shared rate limiter, retries
and a spend cap.

The SDK's own retries are off (`max_retries=0`); `complete` retries 408/409/429/5xx/529 answers,
timeouts and connection errors itself, honouring `retry-after` / `retry-after-ms`, so every retry
also passes the shared rate limiter. The key is read from `ANTHROPIC_API_KEY` only, carried in a
`Secret` whose repr is redacted, and never logged or put in a cache key.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import os
import random
import time
from typing import Any, NamedTuple

import anthropic

from ssae_ray.autointerp.cache import Cached, cache_key
from ssae_ray.autointerp.prompts import Prompt

log = logging.getLogger("ssae_ray")

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504, 529}


class AutoInterpError(RuntimeError):
    """A problem that stops the whole run (no key, a rejected key, a bad model name)."""


class SpendCapReached(RuntimeError):
    """The spend cap forbids another paid call; finished work is kept."""


class ApiUnavailable(RuntimeError):
    """The Messages API failed too many calls in a row (connection errors / 5xx): the run stops
    cleanly; finished work is kept."""


class Secret:
    """An API key that never shows itself in a repr, a log line or a traceback."""

    def __init__(self, value: str):
        self._value = value

    def get(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('…[redacted]')"

    __str__ = __repr__


def api_key_from_env() -> Secret:
    key = os.environ.get("ANTHROPIC_API_KEY", "").strip()
    if not key:
        raise AutoInterpError(
            "autointerp.backend=claude needs an Anthropic API key in the ANTHROPIC_API_KEY environment "
            "variable; set it, or run with autointerp.backend=offline (a keyword baseline, no API calls)"
        )
    return Secret(key)


class Answer(NamedTuple):
    text: str
    input_tokens: int
    output_tokens: int
    cached: bool
    requests: int
    """HTTP requests this answer took (0 when cached, more than 1 after retries)."""


async def call(obj: Any, method: str, *args: Any) -> Any:
    """Call `method` on a local object or a Ray actor handle alike."""
    fn = getattr(obj, method)
    if hasattr(fn, "remote"):
        return await fn.remote(*args)
    return fn(*args)


def retry_after(headers: Any) -> float | None:
    """Seconds the server asked us to wait (`retry-after-ms`, `retry-after` seconds or HTTP date)."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return float(ms) / 1000
        except ValueError:
            pass
    ra = headers.get("retry-after")
    if not ra:
        return None
    try:
        return float(ra)
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(ra) if ra else None
        return max(0.0, parsed.timestamp() - time.time()) if parsed else None


def estimate_tokens(prompt: Prompt) -> int:
    chars = len(prompt.system) + sum(len(text) for _, text in prompt.messages)
    return chars // 3 + 16


class ClaudeClient:
    """`await complete(prompt, attempt)` -> `Answer`. `limiter` and `cache` are local objects or
    Ray actor handles (`RateLimiter`, `ResponseCache`)."""

    def __init__(
        self,
        model: str,
        api_key: Secret,
        limiter: Any,
        cache: Any,
        base_url: str | None = None,
        max_retries: int = 5,
        retry_base_s: float = 1.0,
        max_retry_wait_s: float = 60.0,
        timeout_s: float = 120.0,
    ):
        self.model, self._key, self.base_url = model, api_key, base_url
        self.limiter, self.cache = limiter, cache
        self.max_retries, self.retry_base_s, self.max_retry_wait_s = (
            max_retries,
            retry_base_s,
            max_retry_wait_s,
        )
        self.timeout_s = timeout_s
        self._sdk: anthropic.AsyncAnthropic | None = None

    def _client(self) -> anthropic.AsyncAnthropic:
        if self._sdk is None:  # created lazily, inside the event loop that uses it
            self._sdk = anthropic.AsyncAnthropic(
                api_key=self._key.get(), base_url=self.base_url, max_retries=0, timeout=self.timeout_s
            )
        return self._sdk

    @property
    def url(self) -> str:
        """The Messages API base URL calls go to (for messages; never carries the key)."""
        return str(self._client().base_url).rstrip("/")

    def key_for(self, prompt: Prompt, attempt: int) -> str:
        # A re-ask after a malformed answer gets its own entry: the cached bad answer is not replayed.
        params: dict[str, Any] = {"max_tokens": prompt.max_tokens}
        if attempt:
            params["attempt"] = attempt
        return cache_key(self.model, prompt.system, [list(m) for m in prompt.messages], params)

    async def complete(self, prompt: Prompt, attempt: int = 0) -> Answer:
        key = self.key_for(prompt, attempt)
        hit = await call(self.cache, "get", key)
        if hit is not None:
            return Answer(hit.text, hit.input_tokens, hit.output_tokens, True, 0)
        est_in, est_out = estimate_tokens(prompt), prompt.max_tokens
        requests = 0
        while True:
            await self._acquire(est_in, est_out)
            requests += 1
            try:
                msg = await self._client().messages.create(
                    model=self.model,
                    max_tokens=prompt.max_tokens,
                    messages=[{"role": r, "content": t} for r, t in prompt.messages],
                    **({"system": prompt.system} if prompt.system else {}),
                )
            except (anthropic.APIStatusError, anthropic.APIConnectionError) as e:
                await call(self.limiter, "release", est_in, est_out)
                status = getattr(e, "status_code", None)
                if status in (401, 403):
                    raise AutoInterpError(
                        f"the Messages API rejected the API key (HTTP {status}); check ANTHROPIC_API_KEY"
                    ) from None
                if status == 404:
                    raise AutoInterpError(
                        f"the Messages API does not know model {self.model!r} (HTTP 404); set autointerp.model"
                    ) from None
                retryable = status is None or status in RETRY_STATUS or status >= 500
                what = f"HTTP {status}" if status else type(e).__name__
                if status is None or status >= 500:  # unreachable or failing, not merely busy (429)
                    down = await call(self.limiter, "failure", what, self.url)
                    if down:
                        raise ApiUnavailable(down) from None
                if not retryable or requests > self.max_retries:
                    raise
                headers = getattr(getattr(e, "response", None), "headers", None)
                delay = retry_after(headers)
                if delay is None:
                    delay = self.retry_base_s * 2 ** (requests - 1) * (0.5 + random.random())
                delay = min(delay, self.max_retry_wait_s)
                log.warning("Claude call: %s, retry %d/%d in %.2fs", what, requests, self.max_retries, delay)
                await asyncio.sleep(delay)
                continue
            except BaseException:
                await call(self.limiter, "release", est_in, est_out)
                raise
            break
        text = "".join(b.text for b in msg.content if getattr(b, "type", "") == "text")
        usage = msg.usage
        await call(self.limiter, "settle", est_in, est_out, usage.input_tokens, usage.output_tokens)
        await call(self.cache, "put", key, Cached(text, usage.input_tokens, usage.output_tokens), self.model)
        return Answer(text, usage.input_tokens, usage.output_tokens, False, requests)

    async def _acquire(self, est_in: int, est_out: int) -> None:
        while True:
            grant = await call(self.limiter, "acquire", est_in, est_out)
            if grant.stop:
                raise (ApiUnavailable if grant.kind == "api_down" else SpendCapReached)(grant.stop)
            if grant.wait_s <= 0:
                return
            await asyncio.sleep(grant.wait_s)

    async def close(self) -> None:
        if self._sdk is not None:
            await self._sdk.close()
            self._sdk = None
