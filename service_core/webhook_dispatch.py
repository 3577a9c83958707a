"""The webhook dispatcher: a thread in every worker process that sends the due deliveries
of the outbox (service_core.webhook_events) and records each attempt.

- A claim takes due rows (on PostgreSQL ``FOR UPDATE SKIP LOCKED``: several workers never
  take the same row; SQLite has one writer), counts the attempt and moves the row's
  ``next_attempt_at`` past the request's timeout: a process that dies mid-request leaves the
  row to be sent again then (at least once; receivers deduplicate on ``webhook-id``).
- A 2xx is ``delivered``; anything else (another status, a timeout, a refused connection, an
  address the SSRF guard refuses) is retried after ``backoff`` until
  ``DAS_WEBHOOK_MAX_ATTEMPTS``, then ``failed``. Redirects are never followed.
- The deliveries of one endpoint go one after the other, in the order of their events, by
  one sender thread; up to ``DAS_WEBHOOK_CONCURRENCY`` endpoints are served at once, so a
  slow or dead endpoint delays only its own deliveries.
"""

from __future__ import annotations

import logging
import random
import re
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
# deliveries of one endpoint taken by one claim (sent one after the other)
PER_ENDPOINT = 10
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
    session: Session,
    settings: Settings,
    *,
    max_endpoints: int,
    per_endpoint: int = PER_ENDPOINT,
    busy: frozenset[int] = frozenset(),
    now: datetime | None = None,
) -> list[list[Claimed]]:
    """Take due deliveries (in the caller's transaction): those of at most ``max_endpoints``
    endpoints not in ``busy`` (served by this process now), at most ``per_endpoint`` each,
    grouped by endpoint in the order of their events. The n-th of a group stays claimed for
    n timeouts plus a margin: it is sent after the ones before it."""
    now = now or utcnow()
    stmt = select(WebhookDelivery).where(
        WebhookDelivery.status == DELIVERY_PENDING, WebhookDelivery.next_attempt_at <= now
    )
    if busy:
        stmt = stmt.where(WebhookDelivery.endpoint_id.not_in(busy))
    rows = session.scalars(
        stmt.order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id)
        .limit(max_endpoints * per_endpoint)
        .with_for_update(skip_locked=True)
    ).all()
    groups: dict[int, list[WebhookDelivery]] = {}
    for row in rows:  # rows of more endpoints are left as they are (their locks end now)
        group = groups.get(row.endpoint_id)
        if group is None and len(groups) < max_endpoints:
            group = groups[row.endpoint_id] = []
        if group is not None and len(group) < per_endpoint:
            group.append(row)
    if not groups:
        return []
    endpoints = {
        e.id: e
        for e in session.scalars(select(WebhookEndpoint).where(WebhookEndpoint.id.in_(groups)))
    }
    claimed: list[list[Claimed]] = []
    for endpoint_id, group in groups.items():
        endpoint = endpoints[endpoint_id]
        batch = []
        for row in sorted(group, key=lambda r: r.id):
            if endpoint.deleted_at is not None:
                row.status = DELIVERY_CANCELLED
                row.next_attempt_at = None
                continue
            wait = (len(batch) + 1) * settings.webhook_timeout_seconds + CLAIM_MARGIN_S
            row.attempts = (row.attempts or 0) + 1
            row.last_attempt_at = now
            row.next_attempt_at = now + timedelta(seconds=wait)
            batch.append(
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
        if batch:
            claimed.append(batch)
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
    except Exception as exc:  # noqa: BLE001 - any other failure is a failed attempt too
        return Outcome(error=_snake(type(exc).__name__))


def _snake(name: str) -> str:
    """``RemoteProtocolError`` -> ``remote_protocol_error``, ``HTTPError`` -> ``http_error``."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()[:64]


def make_client(settings: Settings) -> httpx.Client:
    return httpx.Client(
        timeout=settings.webhook_timeout_seconds,
        follow_redirects=False,
        trust_env=False,  # no proxy from the environment: the guard checks the real target
    )


class WebhookDispatcher(threading.Thread):
    """Delivers due webhook events every ``webhook_poll_seconds`` until stopped. Each
    endpoint is served by one sender thread at a time, and at most
    ``webhook_concurrency`` endpoints at once: a slow or dead endpoint (each attempt waits
    for the timeout) holds up its own deliveries only, not those of other endpoints."""

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
        self._busy: set[int] = set()  # endpoints whose deliveries a sender thread has
        self._idle = threading.Condition()

    def stop(self) -> None:
        self.stopped.set()

    def run(self) -> None:
        log.info("webhook dispatcher started")
        purged_at = 0.0
        try:
            while not self.stopped.wait(self.settings.webhook_poll_seconds):
                try:
                    self.deliver_due()
                    if time.monotonic() - purged_at > PURGE_EVERY_S:
                        purged_at = time.monotonic()
                        with self.factory() as session, session.begin():
                            purge_finished(session, self.settings)
                except Exception:  # noqa: BLE001 - the next round tries again
                    log.warning("webhook delivery round failed", exc_info=True)
        finally:
            self.close()

    def close(self) -> None:
        """Stop the sender threads (a group not started stays claimed until its claim runs
        out, then is sent again)."""
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

    def deliver_due(self) -> int:
        """Claim what free sender threads can take and start sending it (without waiting);
        how many deliveries were claimed."""
        with self._idle:
            busy = frozenset(self._busy)
        free = self.settings.webhook_concurrency - len(busy)
        if free <= 0 or not self.any_due():
            return 0
        with self.factory() as session, session.begin():
            groups = claim_due(session, self.settings, max_endpoints=free, busy=busy)
        for group in groups:
            with self._idle:
                self._busy.add(group[0].endpoint_id)
            self.pool.submit(self._send_all, group)
        return sum(len(g) for g in groups)

    def wait_idle(self, timeout: float) -> bool:
        """Until no delivery is being sent (tests); False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._busy, timeout)

    def _send_all(self, deliveries: list[Claimed]) -> None:
        try:
            for claimed in deliveries:
                if self.stopped.is_set():
                    return  # claimed, not sent: due again when its claim runs out
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
        except Exception:  # noqa: BLE001 - the rows are due again when their claims run out
            log.warning(
                "webhook deliveries to endpoint %s failed", deliveries[0].endpoint_id, exc_info=True
            )
        finally:
            with self._idle:
                self._busy.discard(deliveries[0].endpoint_id)
                self._idle.notify_all()
