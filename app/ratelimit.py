"""Per-API-key token bucket for write endpoints.

In memory for the embedded default (one API process); in Redis when the broker is Redis,
so every API process of a deployment draws on one budget per key.
"""

from __future__ import annotations

import logging
import math
import threading
import time

from fastapi import Depends, Request

from app.auth import Principal, authenticate
from app.problems import Problem


class TokenBucket:
    def __init__(self, per_minute: float, burst: int) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(max(burst, 1))
        self._state: dict[int, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, key: int) -> float:
        """Take one token; return 0 on success, else the seconds until one is available."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._state.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._state[key] = (tokens - 1.0, now)
                return 0.0
            self._state[key] = (tokens, now)
            return (1.0 - tokens) / self.rate if self.rate > 0 else 60.0


# KEYS[1] = bucket; ARGV = rate per second, burst. Redis's own clock, so API hosts whose
# clocks disagree still share one bucket. Returns the wait in seconds (0 = token taken).
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local s = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(s[1]) or burst
local last = tonumber(s[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - last) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 60)
return tostring(wait)
"""

log = logging.getLogger(__name__)


class RedisTokenBucket:
    """The same bucket kept in Redis (one atomic script per request).

    Fails open: while Redis is unreachable, writes are not rate-limited (submissions are
    accepted during a broker outage, see docs/reliability.md), and a warning is logged.
    """

    def __init__(self, url: str, per_minute: float, burst: int, prefix: str = "das:rl") -> None:
        import redis

        self.rate = per_minute / 60.0
        self.burst = float(max(burst, 1))
        self.prefix = prefix
        self._client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
        self._script = self._client.register_script(_TAKE)
        self._errors = redis.RedisError
        self._warned = 0.0

    def take(self, key: int) -> float:
        try:
            return float(self._script(keys=[f"{self.prefix}:{key}"], args=[self.rate, self.burst]))
        except self._errors as exc:
            if time.monotonic() - self._warned > 60:
                self._warned = time.monotonic()
                log.warning("rate limiter: Redis unreachable, not limiting: %s", exc)
            return 0.0


def make_rate_limiter(
    per_minute: float, burst: int, broker_url: str | None
) -> TokenBucket | RedisTokenBucket | None:
    if per_minute <= 0:
        return None
    if broker_url and broker_url.startswith(("redis://", "rediss://")):
        return RedisTokenBucket(broker_url, per_minute, burst)
    return TokenBucket(per_minute, burst)


def write_access(request: Request, principal: Principal = Depends(authenticate)) -> Principal:
    """Authenticate, then charge one token of the key's write budget (429 when empty)."""
    bucket: TokenBucket | RedisTokenBucket | None = request.app.state.rate_limiter
    if bucket is not None:
        wait = bucket.take(principal.key_id)
        if wait > 0:
            raise Problem(
                429,
                "rate_limited",
                "too many write requests for this API key; slow down",
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )
    return principal
