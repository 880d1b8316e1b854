"""A token bucket for requests and tokens per minute, and the spend cap, in one object.

`RateLimiter` is plain Python (tests drive it with a fake clock); `actors.py` runs one copy as a
Ray actor that every Interpreter/Predictor actor asks before each paid call, so the limits and
the cap hold across the whole cluster. A call first `acquire`s (reserving its estimated tokens),
then `settle`s with the real usage the API reported, or `release`s if it failed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple


class Grant(NamedTuple):
    wait_s: float
    """0 when the call may go now; otherwise ask again after this many seconds."""
    stop: str | None = None
    """Set when the run must stop (spend cap, or the API is down): the reason, for the report."""
    kind: str | None = None
    """`spend_cap` or `api_down` when `stop` is set."""


class RateLimiter:
    def __init__(
        self,
        requests_per_minute: float,
        tokens_per_minute: float,
        spend_cap_tokens: int | None = None,
        spend_cap_usd: float | None = None,
        usd_per_mtok_in: float = 3.0,
        usd_per_mtok_out: float = 15.0,
        clock: Callable[[], float] = time.monotonic,
        max_consecutive_failures: int | None = None,
    ):
        if requests_per_minute <= 0 or tokens_per_minute <= 0:
            raise ValueError("requests_per_minute and tokens_per_minute must be positive")
        self.rpm, self.tpm = float(requests_per_minute), float(tokens_per_minute)
        self.cap_tokens, self.cap_usd = spend_cap_tokens, spend_cap_usd
        self.price_in, self.price_out = usd_per_mtok_in / 1e6, usd_per_mtok_out / 1e6
        self.clock = clock
        self.requests, self.tokens = self.rpm, self.tpm  # buckets start full (one minute's burst)
        self.last = clock()
        self.spent_in = self.spent_out = 0
        self.reserved_in = self.reserved_out = 0
        self.calls = 0
        self.stopped: str | None = None
        self.stop_kind: str | None = None
        self.max_failures = max_consecutive_failures
        self.failures_in_row = 0
        self.failures = 0

    def _refill(self) -> None:
        now = self.clock()
        dt = max(0.0, now - self.last)
        self.last = now
        self.requests = min(self.rpm, self.requests + dt * self.rpm / 60)
        self.tokens = min(self.tpm, self.tokens + dt * self.tpm / 60)

    def _usd(self, tok_in: int, tok_out: int) -> float:
        return tok_in * self.price_in + tok_out * self.price_out

    def _over_cap(self, est_in: int, est_out: int) -> str | None:
        tok_in, tok_out = (
            self.spent_in + self.reserved_in + est_in,
            self.spent_out + self.reserved_out + est_out,
        )
        if self.cap_tokens is not None and tok_in + tok_out > self.cap_tokens:
            return (
                f"spend cap of {self.cap_tokens:,} tokens reached ({self.spent_in + self.spent_out:,} spent, "
                f"next call needs up to {est_in + est_out:,})"
            )
        if self.cap_usd is not None and self._usd(tok_in, tok_out) > self.cap_usd:
            return (
                f"spend cap of ${self.cap_usd:.2f} reached (${self._usd(self.spent_in, self.spent_out):.4f} "
                f"spent, next call may cost ${self._usd(est_in, est_out):.4f})"
            )
        return None

    def acquire(self, est_in: int, est_out: int) -> Grant:
        """Ask to send a call of about `est_in` input tokens and at most `est_out` output tokens."""
        if self.stopped is None:
            self.stopped = self._over_cap(est_in, est_out)
            self.stop_kind = "spend_cap" if self.stopped else None
        if self.stopped is not None:
            return Grant(0.0, self.stopped, self.stop_kind)
        self._refill()
        need = min(est_in + est_out, self.tpm)  # a call larger than a minute's budget waits for a full bucket
        if self.requests >= 1 and self.tokens >= need:
            self.requests -= 1
            self.tokens -= need
            self.reserved_in += est_in
            self.reserved_out += est_out
            self.calls += 1
            return Grant(0.0)
        wait = max((1 - self.requests) * 60 / self.rpm, (need - self.tokens) * 60 / self.tpm, 0.001)
        return Grant(wait)

    def settle(self, est_in: int, est_out: int, input_tokens: int, output_tokens: int) -> None:
        """Replace a granted call's reservation by its real usage."""
        self.reserved_in -= est_in
        self.reserved_out -= est_out
        self.spent_in += input_tokens
        self.spent_out += output_tokens
        self.failures_in_row = 0  # the API answered
        self.tokens -= (input_tokens + output_tokens) - min(est_in + est_out, self.tpm)

    def release(self, est_in: int, est_out: int) -> None:
        """A granted call that failed without usage: drop its reservation."""
        self.reserved_in -= est_in
        self.reserved_out -= est_out

    def failure(self, what: str, base_url: str) -> str | None:
        """A call failed with a connection error, a timeout or a 5xx. After `max_consecutive_failures`
        in a row (from every worker: no call answered in between) the run stops: returns the reason
        (also returned by every later `acquire`), else None."""
        self.failures += 1
        self.failures_in_row += 1
        if self.stopped is None and self.max_failures and self.failures_in_row >= self.max_failures:
            self.stopped = (
                f"the Messages API at {base_url} failed {self.failures_in_row} calls in a row (last: {what}); "
                "it looks down or unreachable"
            )
            self.stop_kind = "api_down"
        return self.stopped if self.stop_kind == "api_down" else None

    def stats(self) -> dict[str, float | int | str | None]:
        return {
            "calls": self.calls,
            "input_tokens": self.spent_in,
            "output_tokens": self.spent_out,
            "usd": round(self._usd(self.spent_in, self.spent_out), 6),
            "stopped": self.stopped,
            "stop_kind": self.stop_kind,
            "failures": self.failures,
        }
