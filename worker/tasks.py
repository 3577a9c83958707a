"""The Celery task "run job N", the sweep when the worker starts, the webhook dispatcher
thread, and the warm shutdown (SIGTERM, Ctrl-C): the running job stops at its next step and
goes back to the queue."""

from __future__ import annotations

import logging
from functools import lru_cache

from celery.signals import worker_ready, worker_shutdown, worker_shutting_down

from service_core.db import make_engine, make_session_factory
from service_core.queue import RUN_JOB, Dispatcher
from service_core.settings import get_settings
from service_core.sweep import PeriodicSweep, sweep
from service_core.webhook_dispatch import WebhookDispatcher
from worker.celery_app import app
from worker.runner import JobRunner

log = logging.getLogger("das.worker")


@lru_cache
def _runner() -> JobRunner:
    settings = get_settings()
    factory = make_session_factory(make_engine(settings))
    return JobRunner(settings, factory, Dispatcher(settings, app))


@app.task(name=RUN_JOB, acks_late=True, ignore_result=True)
def run_job(job_id: int) -> str:
    """Idempotent: the database decides whether this message runs the job."""
    return _runner().run(int(job_id))


_periodic: list[PeriodicSweep | WebhookDispatcher] = []


@worker_ready.connect
def _on_worker_ready(**_: object) -> None:
    runner = _runner()
    try:
        sweep(runner.settings, stale_before=None, factory=runner.factory, enqueue=runner.enqueue)
    except Exception:  # noqa: BLE001 - the periodic sweep will try again
        log.warning("start-up sweep failed", exc_info=True)
    for thread in (
        PeriodicSweep(runner.settings, runner.factory, runner.enqueue),
        WebhookDispatcher(runner.settings, runner.factory),
    ):
        thread.start()
        _periodic.append(thread)


@worker_shutting_down.connect
def _on_worker_shutting_down(**_: object) -> None:
    """Runs inside Celery's signal handler (SIGTERM or the first Ctrl-C): with the solo
    pool the task waits in this same thread, so only a flag is set here; the waiting task
    forwards it to the job's process, which stops at its next step and re-queues the job.
    Celery then ends the task and exits."""
    if _runner.cache_info().currsize:  # no job ever ran: nothing to stop
        _runner().request_stop()


@worker_shutdown.connect
def _on_worker_shutdown(**_: object) -> None:
    for thread in _periodic:
        thread.stopped.set()
