"""Per-API-key token bucket for write endpoints (in memory: one API process per database)."""

from __future__ import annotations

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


def write_access(request: Request, principal: Principal = Depends(authenticate)) -> Principal:
    """Authenticate, then charge one token of the key's write budget (429 when empty)."""
    bucket: TokenBucket | None = request.app.state.rate_limiter
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
