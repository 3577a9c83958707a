"""The cheap read path for status polling, answered straight from the process's job watch,
before routing, with the caller's key checked against a short-lived cache of verified keys:
``GET /v1/jobs/{id}`` gets the watched job and ``GET /v1/jobs/{id}/events?after=&limit=`` a
page of its newest events: ``304`` when ``If-None-Match`` is current, else ``200`` with the
body the route would send (encoded once per change for the job, from the watch's ring of
recent events for a page).

Why: a dashboard polling once a second mostly asks "anything new?". Through the full stack
that costs ~4 ms of CPU (routing, dependencies, a database read, JSON); 200 such pollers
saturate a small machine. Here an answer costs a dictionary lookup and a socket write. The
watch is at most one poll tick (``stream_poll_seconds``) behind the database, and this
process's own writes drop it (read-your-writes). Anything the fast path is not sure of
(unknown key, job not yet watched, another owner's job, a changed events tag, a bad query)
falls through to the normal route, which gives the authoritative answer.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Receive, Scope, Send

from app.job_watch import etag_matches, events_etag, ring_page

JOB_READ = re.compile(r"^/v1/jobs/(job_[A-Za-z0-9]{20})(/events)?$")  # a public job id
EVENTS_DEFAULT_LIMIT = 100  # the events route's default page size
EVENTS_MAX_LIMIT = 500


class KeyCache:
    """API keys verified against the database in the last ``ttl`` seconds, by their hash.
    Revoking a key clears the cache of the process that revoked it; other processes keep
    trusting it for at most ``ttl`` seconds, and only for conditional reads."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._verified: dict[str, tuple[object, float]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _digest(token: str) -> str:
        return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()

    def get(self, token: str) -> object | None:
        if self.ttl <= 0:
            return None
        hit = self._verified.get(self._digest(token))
        if hit is None or hit[1] < time.monotonic():
            return None
        return hit[0]

    def put(self, token: str, principal: object) -> None:
        if self.ttl <= 0:
            return
        with self._lock:
            if len(self._verified) > 10_000:  # bounded: drop everything, re-verify
                self._verified.clear()
            self._verified[self._digest(token)] = (principal, time.monotonic() + self.ttl)

    def clear(self) -> None:
        with self._lock:
            self._verified.clear()


def _bearer(headers: dict[bytes, bytes]) -> str | None:
    raw = headers.get(b"authorization", b"").decode("latin-1")
    scheme, _, token = raw.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _events_page(query: bytes) -> tuple[int, int] | None:
    """(after, limit) of an events request the fast path can answer, else None."""
    params = parse_qs(query.decode("latin-1"), keep_blank_values=True)
    if set(params) - {"after", "limit"} or any(len(v) != 1 for v in params.values()):
        return None  # ?stream=, repeated or unknown parameters: the route decides
    after = params.get("after", [""])[0]
    limit = params.get("limit", [str(EVENTS_DEFAULT_LIMIT)])[0]
    if not (after == "" or (after.isdigit() and len(after) <= 18)) or not limit.isdigit():
        return None
    if not 1 <= int(limit) <= EVENTS_MAX_LIMIT:
        return None
    return int(after or 0), int(limit)


class ConditionalJobReads:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD"):
            match = JOB_READ.match(scope["path"])
            if match and await self._answer(scope, send, match):
                return
        await self.app(scope, receive, send)

    async def _answer(self, scope: Scope, send: Send, match: re.Match) -> bool:
        headers = dict(scope.get("headers") or [])
        if_none_match = headers.get(b"if-none-match")
        token = _bearer(headers)
        state = scope["app"].state if "app" in scope else None
        if token is None or state is None:
            return False
        if not if_none_match and scope["method"] != "GET":
            return False
        principal = state.key_cache.get(token)
        if principal is None:
            return False
        job_id = match.group(1)
        watch = state.job_watcher.peek(job_id)
        if watch is None or watch.owner != principal.owner or watch.etag is None:
            return False
        page = None
        if match.group(2):
            page = _events_page(scope.get("query_string", b""))
            if page is None:
                return False
            etag = events_etag(job_id, watch.last_event_id, *page)
        else:
            etag = watch.etag
        if not etag_matches((if_none_match or b"").decode("latin-1"), etag):
            if scope["method"] != "GET":
                return False
            body = watch.body_json if page is None else ring_page(watch, *page)
            if not body:
                return False
            await _send_body(send, body, etag)
            return True
        await send(
            {
                "type": "http.response.start",
                "status": 304,
                "headers": [(b"etag", etag.encode()), (b"cache-control", b"no-cache")],
            }
        )
        await send({"type": "http.response.body", "body": b""})
        return True


async def _send_body(send: Send, body: bytes, etag: str) -> None:
    """A 200 as the route answers it (same bytes, ``ETag`` and ``Cache-Control``)."""
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"etag", etag.encode()),
                (b"cache-control", b"no-cache"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
