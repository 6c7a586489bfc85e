"""Client-side pacing for API judges: rate limits, backoff with jitter, and the server's Retry-After.

Rate limits are token buckets refilled continuously, with at most one second's worth of burst, so a
run with 64 requests in flight still sends no more than the configured requests and tokens per
minute. A 429 pauses every request of the run (not just the one that got it) for the Retry-After
the server asked for: the limit is per account, so the others would only hit it too.
"""

import asyncio
import email.utils
import random
import time
from typing import Mapping, Optional


class RateLimiter:
    """Requests-per-minute and tokens-per-minute buckets (None = unlimited); `acquire` waits its turn."""

    def __init__(self, requests_per_minute: Optional[float], tokens_per_minute: Optional[float]) -> None:
        self._rates = {"requests": requests_per_minute, "tokens": tokens_per_minute}
        self._level = {k: _burst(r, 1) for k, r in self._rates.items() if r}
        self._stamp = time.monotonic()
        self._paused_until = 0.0
        self._lock = asyncio.Lock()

    def pause(self, seconds: float) -> None:
        """Hold every request for `seconds` from now (a 429 with Retry-After)."""
        self._paused_until = max(self._paused_until, time.monotonic() + seconds)

    async def acquire(self, tokens: int) -> None:
        need = {"requests": 1.0, "tokens": float(tokens)}
        async with self._lock:
            while True:
                now = time.monotonic()
                for k, rate in self._rates.items():
                    if rate:
                        cap = _burst(rate, need[k])
                        self._level[k] = min(cap, self._level[k] + (now - self._stamp) * rate / 60.0)
                self._stamp = now
                wait = max(
                    [self._paused_until - now]
                    + [(need[k] - self._level[k]) * 60.0 / r for k, r in self._rates.items() if r]
                )
                if wait <= 0:
                    for k in self._level:
                        self._level[k] -= need[k]
                    return
                await asyncio.sleep(wait)


def _burst(rate_per_minute: float, need: float) -> float:
    """Bucket size: one second of the rate, but never less than one request's worth."""
    return max(rate_per_minute / 60.0, need)


def backoff_delay(attempt: int, base_s: float, max_s: float, rng: random.Random) -> float:
    """Exponential backoff with "equal jitter": half the delay fixed, half random, so a burst of
    failures does not retry in lockstep but no retry comes back immediately."""
    delay = min(max_s, base_s * 2**attempt)
    return delay / 2 + rng.uniform(0, delay / 2)


def retry_after_seconds(headers: Optional[Mapping[str, str]]) -> Optional[float]:
    """The wait a server asked for: `retry-after-ms` (OpenAI, Anthropic) or `Retry-After` in
    seconds or as an HTTP date; None if absent or unreadable."""
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
