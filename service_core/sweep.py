"""The sweep: send again every job whose message may have been lost (a broker restart, a
crash between commit and send) and every job whose worker died (lease expired). Duplicates
are harmless: the claim in the database lets only one message run a job.

Called when a worker starts, periodically inside the worker, and by ``das-service sweep``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta

from sqlalchemy.orm import Session, sessionmaker

from service_core.db import make_engine, make_session_factory
from service_core.lifecycle import jobs_to_enqueue, mark_enqueued
from service_core.models import utcnow
from service_core.settings import Settings

log = logging.getLogger("das.sweep")


def sweep(
    settings: Settings,
    *,
    stale_before: datetime | None,
    factory: sessionmaker[Session] | None = None,
    enqueue: Callable[[Iterable[int]], list[int]] | None = None,
) -> list[int]:
    """Send the jobs found by :func:`service_core.lifecycle.jobs_to_enqueue`; returns their ids."""
    if factory is None:
        factory = make_session_factory(make_engine(settings))
    if enqueue is None:
        from service_core.queue import Dispatcher

        enqueue = Dispatcher(settings)
    _purge_deleted(settings, factory)
    with factory() as session, session.begin():
        job_ids = jobs_to_enqueue(session, stale_before=stale_before)
    if not job_ids:
        return []
    sent = enqueue(job_ids)
    with factory() as session, session.begin():
        mark_enqueued(session, sent)
    log.info("sweep sent %s job(s): %s", len(sent), sent)
    return sent


def _purge_deleted(settings: Settings, factory: sessionmaker[Session]) -> None:
    """Lifecycle hook (app/purge.py): remove the folders of deleted lineages whose last
    job has stopped (a worker that died while cancelling one leaves them to the sweep)."""
    from service_core.purge import purge_deleted_lineages

    try:
        purge_deleted_lineages(settings, factory)
    except Exception:  # noqa: BLE001 - the next sweep tries again
        log.warning("removing deleted lineages' files failed", exc_info=True)


class PeriodicSweep(threading.Thread):
    """Sweeps every ``settings.sweep_interval_seconds`` (jobs unsent for a while, and
    expired leases) until stopped."""

    def __init__(
        self,
        settings: Settings,
        factory: sessionmaker[Session],
        enqueue: Callable[[Iterable[int]], list[int]],
    ) -> None:
        super().__init__(name="das-sweep", daemon=True)
        self.settings = settings
        self.factory = factory
        self.enqueue = enqueue
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.settings.sweep_interval_seconds):
            stale = utcnow() - timedelta(seconds=self.settings.sweep_stale_seconds)
            try:
                sweep(self.settings, stale_before=stale, factory=self.factory, enqueue=self.enqueue)
            except Exception:  # noqa: BLE001 - the next round tries again
                log.warning("periodic sweep failed", exc_info=True)
