"""The webhook dispatcher: a thread in every worker process that sends the due deliveries
of the outbox (service_core.webhook_events) and records each attempt.

- A claim takes due rows (on PostgreSQL ``FOR UPDATE SKIP LOCKED``: several workers never
  take the same row; SQLite has one writer), counts the attempt and moves the row's
  ``next_attempt_at`` past the request's timeout: a process that dies mid-request leaves the
  row to be sent again then (at least once; receivers deduplicate on ``webhook-id``).
- A 2xx is ``delivered``; anything else (another status, a timeout, a refused connection, an
  address the SSRF guard refuses) is retried after ``backoff`` until
  ``DAS_WEBHOOK_MAX_ATTEMPTS``, then ``failed``. Redirects are never followed.
- The deliveries of one endpoint in a batch go one after the other, in the order of their
  events; different endpoints are served in parallel (``DAS_WEBHOOK_CONCURRENCY``).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta

import httpx
from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from service_core.db import make_read_session_factory
from service_core.models import (
    DELIVERY_CANCELLED,
    DELIVERY_DELIVERED,
    DELIVERY_FAILED,
    DELIVERY_PENDING,
    WebhookDelivery,
    WebhookEndpoint,
    utcnow,
)
from service_core.settings import Settings
from service_core.webhook_events import encode_body, signature
from service_core.webhook_urls import NameResolutionError, UnsafeAddress, delivery_target

log = logging.getLogger("das.webhooks")

USER_AGENT = "das-service-webhooks/1"
# past the request's timeout, before a claimed row is due again (its sender died)
CLAIM_MARGIN_S = 60.0
PURGE_EVERY_S = 3600.0


def backoff(settings: Settings, attempts: int, rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt: the base doubled each time,
    plus up to 25 % jitter (receivers that failed together do not all come back at once),
    at most ``webhook_backoff_max_seconds``."""
    delay = settings.webhook_backoff_seconds * 2 ** min(attempts - 1, 30)
    return min(delay * (1.0 + 0.25 * rand()), settings.webhook_backoff_max_seconds)


@dataclass(frozen=True)
class Claimed:
    delivery_id: int
    endpoint_id: int
    attempt: int
    event_id: str
    url: str
    secret: str
    body: bytes


@dataclass(frozen=True)
class Outcome:
    status_code: int | None = None
    error: str | None = None  # the class of the failure when there was no HTTP answer

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def claim_due(
    session: Session, settings: Settings, limit: int, now: datetime | None = None
) -> list[Claimed]:
    """Take up to ``limit`` due deliveries (in the caller's transaction)."""
    now = now or utcnow()
    rows = session.scalars(
        select(WebhookDelivery)
        .where(
            WebhookDelivery.status == DELIVERY_PENDING,
            WebhookDelivery.next_attempt_at <= now,
        )
        .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    if not rows:
        return []
    endpoints = {
        e.id: e
        for e in session.scalars(
            select(WebhookEndpoint).where(WebhookEndpoint.id.in_({r.endpoint_id for r in rows}))
        )
    }
    lease = timedelta(seconds=settings.webhook_timeout_seconds + CLAIM_MARGIN_S)
    claimed = []
    for row in rows:
        endpoint = endpoints[row.endpoint_id]
        if endpoint.deleted_at is not None:
            row.status = DELIVERY_CANCELLED
            row.next_attempt_at = None
            continue
        row.attempts = (row.attempts or 0) + 1
        row.last_attempt_at = now
        row.next_attempt_at = now + lease
        claimed.append(
            Claimed(
                row.id,
                endpoint.id,
                row.attempts,
                row.event_id,
                endpoint.url,
                endpoint.secret,
                encode_body(row.payload),
            )
        )
    return claimed


def record_outcome(
    session: Session,
    settings: Settings,
    claimed: Claimed,
    outcome: Outcome,
    now: datetime | None = None,
) -> str | None:
    """Write one attempt's outcome; the delivery's new status (None when the row was no
    longer this attempt's: its endpoint deleted meanwhile)."""
    now = now or utcnow()
    row = session.get(WebhookDelivery, claimed.delivery_id, with_for_update=True)
    if row is None or row.status != DELIVERY_PENDING or row.attempts != claimed.attempt:
        return None
    row.last_status_code = outcome.status_code
    row.last_error = outcome.error
    if outcome.delivered:
        row.status = DELIVERY_DELIVERED
        row.delivered_at = now
        row.next_attempt_at = None
    elif row.attempts >= settings.webhook_max_attempts:
        row.status = DELIVERY_FAILED
        row.next_attempt_at = None
    else:
        row.next_attempt_at = now + timedelta(seconds=backoff(settings, row.attempts))
    return row.status


def purge_finished(session: Session, settings: Settings, now: datetime | None = None) -> int:
    """Remove finished deliveries older than ``webhook_retention_days``; how many."""
    if not settings.webhook_retention_days:
        return 0
    before = (now or utcnow()) - timedelta(days=settings.webhook_retention_days)
    result = session.execute(
        delete(WebhookDelivery).where(
            WebhookDelivery.status != DELIVERY_PENDING, WebhookDelivery.created_at < before
        )
    )
    return int(result.rowcount or 0)


def send(client: httpx.Client, settings: Settings, claimed: Claimed) -> Outcome:
    """One attempt: the SSRF guard, then one POST to the address it checked."""
    try:
        target = delivery_target(claimed.url, allow_private=settings.webhook_allow_private)
    except UnsafeAddress:
        return Outcome(error="unsafe_address")
    except NameResolutionError:
        return Outcome(error="name_resolution")
    except ValueError:
        return Outcome(error="invalid_url")
    timestamp = int(time.time())
    headers = {
        "host": target.host_header,
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "webhook-id": claimed.event_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature(claimed.secret, claimed.event_id, timestamp, claimed.body),
    }
    extensions = {"sni_hostname": target.sni_hostname} if target.sni_hostname else {}
    try:
        # the answer's body is never read: a receiver cannot make the worker download much
        with client.stream(
            "POST", target.url, content=claimed.body, headers=headers, extensions=extensions
        ) as response:
            return Outcome(status_code=response.status_code)
    except httpx.TimeoutException:
        return Outcome(error="timeout")
    except httpx.ConnectError:
        return Outcome(error="connect_error")
    except httpx.HTTPError as exc:
        return Outcome(error=_snake(type(exc).__name__))


def _snake(name: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")[:64]


def make_client(settings: Settings) -> httpx.Client:
    return httpx.Client(
        timeout=settings.webhook_timeout_seconds,
        follow_redirects=False,
        trust_env=False,  # no proxy from the environment: the guard checks the real target
    )


class WebhookDispatcher(threading.Thread):
    """Delivers due webhook events every ``webhook_poll_seconds`` until stopped."""

    def __init__(self, settings: Settings, factory: sessionmaker[Session]) -> None:
        super().__init__(name="das-webhooks", daemon=True)
        self.settings = settings
        self.factory = factory
        self.read_factory = make_read_session_factory(factory.kw["bind"])
        self.stopped = threading.Event()
        self.client = make_client(settings)
        self.pool = ThreadPoolExecutor(
            max_workers=settings.webhook_concurrency, thread_name_prefix="das-webhook-send"
        )

    def stop(self) -> None:
        self.stopped.set()

    def run(self) -> None:
        log.info("webhook dispatcher started")
        purged_at = 0.0
        try:
            while not self.stopped.wait(self.settings.webhook_poll_seconds):
                try:
                    while self.deliver_due() and not self.stopped.is_set():
                        pass  # a full batch: more may be due
                    if time.monotonic() - purged_at > PURGE_EVERY_S:
                        purged_at = time.monotonic()
                        with self.factory() as session, session.begin():
                            purge_finished(session, self.settings)
                except Exception:  # noqa: BLE001 - the next round tries again
                    log.warning("webhook delivery round failed", exc_info=True)
        finally:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.client.close()

    def any_due(self) -> bool:
        """A read without a lock: on SQLite the claim's write lock is taken only when there
        is something to send (not every poll, beside the API's writes)."""
        with self.read_factory() as session:
            return (
                session.scalar(
                    select(WebhookDelivery.id)
                    .where(
                        WebhookDelivery.status == DELIVERY_PENDING,
                        WebhookDelivery.next_attempt_at <= utcnow(),
                    )
                    .limit(1)
                )
                is not None
            )

    def deliver_due(self) -> bool:
        """One batch; True when it was full (more may be due at once)."""
        if not self.any_due():
            return False
        limit = self.settings.webhook_concurrency * 4
        with self.factory() as session, session.begin():
            batch = claim_due(session, self.settings, limit)
        by_endpoint: dict[int, list[Claimed]] = {}
        for claimed in batch:
            by_endpoint.setdefault(claimed.endpoint_id, []).append(claimed)
        for future in [self.pool.submit(self._send_all, c) for c in by_endpoint.values()]:
            future.result()
        return len(batch) >= limit

    def _send_all(self, deliveries: list[Claimed]) -> None:
        for claimed in deliveries:
            if self.stopped.is_set():
                return  # claimed, not sent: due again after the claim's margin
            outcome = send(self.client, self.settings, claimed)
            with self.factory() as session, session.begin():
                status = record_outcome(session, self.settings, claimed, outcome)
            log.info(
                "webhook %s (delivery %s) attempt %s: %s -> %s",
                claimed.event_id,
                claimed.delivery_id,
                claimed.attempt,
                outcome.status_code or outcome.error,
                status,
            )
