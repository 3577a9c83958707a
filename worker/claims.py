"""Claims and leases: who holds a job, keeping the lease alive, and retrying a database step
through a blip. A worker that lost its lease (``LeaseLost``) writes nothing more."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

from sqlalchemy import update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from service_core.models import Job, utcnow
from service_core.settings import Settings

log = logging.getLogger("das.worker")

T = TypeVar("T")


class LeaseLost(Exception):
    """Another worker owns the job now: stop without writing anything."""


@dataclass
class Claim:
    job_id: int
    token: str
    attempt: int
    lineage_id: int = 0
    progress: float = 0.0  # where the job's bar stood (an attempt never moves it back)


def worker_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


DB_ATTEMPTS = 6
DB_BACKOFF_SECONDS = 0.5


def with_db_retry(step: Callable[[], T], what: str, attempts: int = DB_ATTEMPTS) -> T:
    """Run one database step (a whole transaction) again when the database blinked: a
    dropped connection, a server restart, a lock time-out (``OperationalError``). The pool
    pings connections before use (``pool_pre_ping``), so a retry runs on a fresh one.
    Back-off 0.5, 1, 2, 4, 8 s: about 15 s of outage survived; then the error propagates."""
    for attempt in range(attempts):
        try:
            return step()
        except OperationalError:
            if attempt == attempts - 1:
                raise
            log.warning("%s: database error; retrying", what, exc_info=True)
            time.sleep(min(DB_BACKOFF_SECONDS * 2**attempt, 8.0))
    raise AssertionError("unreachable")


class Heartbeat:
    """Extends the claim's lease every quarter lease, in the worker, until stopped; sets
    ``lost`` when another worker owns the job now."""

    def __init__(self, settings: Settings, factory: sessionmaker[Session], claim: Claim) -> None:
        self.settings = settings
        self.factory = factory
        self.claim = claim
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="das-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _beat(self) -> None:
        interval = max(0.5, self.settings.lease_seconds / 4)
        while not self._stop.wait(interval):
            now = utcnow()
            try:
                with self.factory() as session, session.begin():
                    result = session.execute(
                        update(Job)
                        .where(Job.id == self.claim.job_id, Job.claim_token == self.claim.token)
                        .values(
                            updated_at=now,
                            heartbeat_at=now,
                            lease_expires_at=now + timedelta(seconds=self.settings.lease_seconds),
                        )
                        .execution_options(synchronize_session=False)
                    )
                    if result.rowcount != 1:
                        raise LeaseLost()
            except LeaseLost:
                self.lost.set()
                # finished by the job's process a moment ago, or taken over by another worker
                log.info("job %s: no longer held by this claim", self.claim.job_id)
                return
            except OperationalError:  # the database blinked: try again at the next beat
                log.warning("job %s: heartbeat failed; retrying", self.claim.job_id, exc_info=True)
