"""The state of one claimed run, in the job's process: throttled progress writes, cancel and
stop checks, and the outcome (succeeded, failed with a code, cancelled, back in the queue).
Every write is guarded by the claim token."""

from __future__ import annotations

import errno
import logging
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from das_engine.jsonsafe import json_safe
from service_core.lifecycle import add_event, finish_job, status_changed
from service_core.models import (
    JOB_CANCELLED,
    JOB_CANCELLING,
    JOB_FAILED,
    JOB_QUEUED,
    JOB_SUCCEEDED,
    Job,
    utcnow,
)
from service_core.redaction import scrub_data, scrub_text
from service_core.settings import Settings
from worker.claims import Claim, LeaseLost, with_db_retry
from worker.end_task_phase import run_end_task_phase
from worker.progress import TRAINING, ProgressTracker
from worker.stage_inputs import load_spec, open_lineage
from worker.stage_results import finished_stage_result, record_success

log = logging.getLogger("das.worker")


class RunContext:
    """The state of one claimed run (in the job's process): throttled progress, cancel and
    stop checks, the outcome. Every write is guarded by the claim token."""

    def __init__(
        self,
        settings: Settings,
        factory: sessionmaker[Session],
        claim: Claim,
        stop_requested: Callable[[], bool] = lambda: False,
        lost: threading.Event | None = None,
    ) -> None:
        self.settings = settings
        self.factory = factory
        self.claim = claim
        self.stop_requested = stop_requested
        self.lost = lost if lost is not None else threading.Event()
        self.interrupted = False
        self.tracker = ProgressTracker(progress=min(1.0, max(0.0, claim.progress)))
        self._seen_progress = False
        self._last_write = 0.0
        self._last_event_step: dict[int, int] = {}
        self._cancel_checked = 0.0
        self._cancel_cached = False
        self.lineage_id = claim.lineage_id
        self.step = 0

    @property
    def phase(self) -> str | None:
        return self.tracker.phase if self._seen_progress else None

    # -- writes guarded by the claim token ---------------------------------------------------
    def _guarded(self, session: Session, **values: Any) -> None:
        result = session.execute(
            update(Job)
            .where(Job.id == self.claim.job_id, Job.claim_token == self.claim.token)
            .values(updated_at=utcnow(), **values)
            .execution_options(synchronize_session=False)
        )
        if result.rowcount != 1:
            self.lost.set()
            raise LeaseLost()

    def _owned_job(self, session: Session) -> Job:
        job = session.get(Job, self.claim.job_id)
        if job is None or job.claim_token != self.claim.token:
            self.lost.set()
            raise LeaseLost()
        return job

    # -- engine callbacks --------------------------------------------------------------------
    def on_progress(self, event: Any) -> None:
        tracker = self.tracker
        changed = tracker.update(event.phase, event.step, event.total) or not self._seen_progress
        self._seen_progress = True
        phase, segment = tracker.phase, tracker.segment
        training_step = segment == TRAINING and event.phase == "training" and event.total
        if training_step:
            self.step = event.step
        now = time.monotonic()
        last_step = self._last_event_step.get(segment)
        event_due = (
            changed
            or bool(event.message)
            or (event.total and event.step >= event.total)
            or last_step is None
            or event.step - last_step >= self.settings.event_every_steps
        )
        write_due = event_due or now - self._last_write >= self.settings.progress_interval_seconds
        if not write_due:
            return
        self._last_write = now
        values: dict[str, Any] = {"phase": phase, "progress": tracker.progress}
        if training_step:  # step, total and ETA count training steps
            values["step"] = event.step
            values["total_steps"] = event.total
            values["eta_seconds"] = event.eta_s
            values["trained_tokens"] = int(event.trained_tokens or 0)
            if event.loss is not None:
                values["loss"] = float(event.loss)
        try:
            with self.factory() as session, session.begin():
                self._guarded(session, **values)
                if event_due:
                    self._last_event_step[segment] = event.step
                    add_event(
                        session,
                        self.claim.job_id,
                        "phase" if changed else "progress",
                        event.message or f"{phase} step {event.step}/{event.total}",
                        data=self._clean(tracker.event_data(event.to_dict())),
                    )
        except LeaseLost:
            pass  # should_cancel() now answers True
        except OperationalError:
            log.warning(
                "job %s: progress not recorded (database)", self.claim.job_id, exc_info=True
            )

    def should_cancel(self) -> bool:
        if self.lost.is_set():
            return True
        if self.stop_requested():  # the worker shuts down: stop here, back to the queue
            self.interrupted = True
            return True
        now = time.monotonic()
        if now - self._cancel_checked < 1.0:
            return self._cancel_cached
        self._cancel_checked = now
        try:
            with self.factory() as session:
                row = session.execute(
                    select(Job.status, Job.claim_token).where(Job.id == self.claim.job_id)
                ).one()
        except OperationalError:
            return self._cancel_cached
        if row.claim_token != self.claim.token:
            self.lost.set()
        self._cancel_cached = row.status == JOB_CANCELLING or self.lost.is_set()
        return self._cancel_cached

    def _clean(self, data: Any) -> Any:
        return scrub_data(json_safe(data), self.settings)

    # -- the job -----------------------------------------------------------------------------
    def execute(self) -> str:
        from das_engine.errors import Cancelled, DasError, DomainExistsError, LineageBusyError

        try:
            spec = with_db_retry(lambda: load_spec(self), f"job {self.claim.job_id}: load")
            self.lineage_id = spec.lineage_id
            lineage = open_lineage(self, spec)
            try:
                result = lineage.add_domain(
                    spec.corpus,
                    spec.name,
                    eval_corpus=spec.eval_corpus,
                    progress=self.on_progress,
                    should_cancel=self.should_cancel,
                )
            except DomainExistsError:
                # The engine finished this stage but the database never heard of it (a crash
                # between the two): adopt the finished stage instead of training it again.
                result = finished_stage_result(lineage, spec.name)
                if result is None:
                    raise
            run_end_task_phase(self, lineage)
            record_success(self, lineage, result)
            return JOB_SUCCEEDED
        except LeaseLost:
            return "lease_lost"
        except Cancelled:
            if self.lost.is_set():
                return "lease_lost"
            if self.interrupted:
                return self.requeue()
            return self._finish(JOB_CANCELLED, None, "cancelled at a step boundary")
        except LineageBusyError:
            # The lineage is locked by a worker that has lost its lease but not yet noticed
            # (it stops at its next step). Write nothing: this claim's lease expires and
            # the sweep sends the job again, to resume once the lock is free.
            log.warning("job %s: lineage busy; leaving it to the sweep", self.claim.job_id)
            return "lineage_busy"
        except DasError as exc:
            return self._fail(exc.code, exc.message)
        except MemoryError:
            return self._fail("out_of_memory", "the job ran out of memory")
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                return self._fail("disk_full", "no space left on the device")
            return self._fail_unexpected(exc)
        except Exception as exc:  # noqa: BLE001 - every failure must end in a state
            if _is_cuda_oom(exc):
                return self._fail("out_of_memory", "the GPU ran out of memory")
            return self._fail_unexpected(exc)

    def _fail(self, code: str, message: str, **extra: Any) -> str:
        # the server's folders and host are nobody's business: name them as the config does
        message = scrub_text(message, self.settings)
        error = {"code": code, "message": message[:2000], "phase": self.phase, **extra}
        return self._finish(JOB_FAILED, error, f"failed: {message[:500]}")

    def _fail_unexpected(self, exc: BaseException) -> str:
        """The traceback goes to the server's log under a correlation id; the user sees the
        id (to quote when asking the operator), never the trace."""
        correlation_id = secrets.token_hex(8)
        log.error(
            "job %s: unexpected error [correlation id %s]",
            self.claim.job_id,
            correlation_id,
            exc_info=exc,
        )
        return self._fail(
            "internal_error",
            f"unexpected {type(exc).__name__} in the worker; the operator can find the details "
            f"in the server log under correlation id {correlation_id}",
            correlation_id=correlation_id,
        )

    def requeue(self) -> str:
        """Back to ``queued`` after a stop for a shutdown: the partial stage and its step
        checkpoints stay, and the next claim resumes from the last one."""

        def record() -> str:
            with self.factory() as session, session.begin():
                job = self._owned_job(session)
                if job.status == JOB_CANCELLING:  # the user's cancel wins
                    finish_job(session, job, JOB_CANCELLED, message="cancelled at a step boundary")
                    return JOB_CANCELLED
                job.status = JOB_QUEUED
                job.claim_token = None
                job.lease_expires_at = None
                job.eta_seconds = None
                job.enqueued_at = None
                job.updated_at = utcnow()
                status_changed(session, job)
                add_event(
                    session,
                    job.id,
                    "interrupted",
                    f"the worker is shutting down: stopped at training step {self.step}; "
                    "back in the queue, the job resumes from its last step checkpoint",
                    level="warning",
                    data={"step": self.step, "phase": self.phase},
                )
                return "requeued"

        try:
            return with_db_retry(record, f"job {self.claim.job_id}: back to the queue")
        except LeaseLost:
            return "lease_lost"

    def _finish(self, status: str, error: dict | None, message: str) -> str:
        def record() -> str:
            with self.factory() as session, session.begin():
                job = self._owned_job(session)
                finish_job(session, job, status, error=error, message=message)
            return status

        try:
            return with_db_retry(record, f"job {self.claim.job_id}: record {status}")
        except LeaseLost:
            return "lease_lost"


def _is_cuda_oom(exc: BaseException) -> bool:
    try:
        import torch

        oom = getattr(torch.cuda, "OutOfMemoryError", None)
        if oom is not None and isinstance(exc, oom):
            return True
    except ImportError:  # pragma: no cover
        pass
    return "out of memory" in str(exc).lower() and type(exc).__name__ in (
        "RuntimeError",
        "OutOfMemoryError",
    )
