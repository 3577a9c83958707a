"""Run one job: claim it in the database, train the stage with ``das_engine``, record the
results. Everything a client sees (status, progress, events, errors) is written here.

Reliability, in order of the code:
- claim by compare-and-set (``queued``, or ``running`` with an expired lease) with a fresh
  claim token: a redelivered message for a claimed or finished job does nothing;
- a heartbeat thread extends the lease; every later write is conditional on the claim token,
  so a worker that lost its lease can never overwrite the job of the one that took it over;
- a job whose lease expired is claimed again and ``Lineage.add_domain`` resumes the partial
  stage from its last step checkpoint;
- cancellation is cooperative: ``should_cancel`` reads the job's status (``cancelling``);
- each job trains in a fresh child process (``worker.isolation``): the worker claims the job
  and keeps its lease alive, the child writes progress and the outcome (guarded by the same
  claim token); a child that dies without an outcome frees its lease at once, so the job
  is claimed again (and, after ``max_attempts``, fails with ``worker_lost``);
- a warm shutdown of the worker (SIGTERM, Ctrl-C) stops the job at its next step and puts
  it back in the queue; it resumes from its last step checkpoint at the next claim;
- nothing a user reads names the server: no host name, pid, folder or traceback (a
  traceback goes to the server's log under a correlation id that the job's error shows).

The phases live in their own modules: ``worker.claims`` (claim records, lease heartbeat,
database retry), ``worker.run_context`` (one run: progress, cancel, outcome),
``worker.stage_inputs`` (what to train, the engine lineage) and ``worker.stage_results``
(checkpoint, importance snapshots and loss matrix into the database).
"""

from __future__ import annotations

import logging
import secrets
import signal
import threading
from collections.abc import Callable, Iterable
from datetime import timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from service_core.lifecycle import (
    add_event,
    finish_job,
    is_runnable,
    mark_enqueued,
    next_runnable_job,
    status_changed,
)
from service_core.models import (
    JOB_CANCELLED,
    JOB_CANCELLING,
    JOB_FAILED,
    JOB_QUEUED,
    JOB_RUNNING,
    JOB_TERMINAL,
    Job,
    utcnow,
)
from service_core.settings import Settings
from worker.claims import Claim, Heartbeat, LeaseLost, with_db_retry, worker_identity
from worker.run_context import RunContext

__all__ = ["Claim", "JobRunner", "LeaseLost", "RunContext", "with_db_retry"]

log = logging.getLogger("das.worker")


class JobRunner:
    """Claims jobs and runs each one, by default in a fresh child process
    (``isolate=False`` runs it in this process: tests that inject faults by monkeypatching
    the engine use that). ``child_setup``, a function importable by name, runs first in each
    child (tests inject faults there)."""

    def __init__(
        self,
        settings: Settings,
        factory: sessionmaker[Session],
        enqueue: Callable[[Iterable[int]], list[int]],
        worker_id: str | None = None,
        *,
        isolate: bool = True,
        child_setup: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.factory = factory
        self.enqueue = enqueue
        self.worker_id = worker_id or worker_identity()
        self.isolate = isolate
        self.child_setup = child_setup
        self.stopping = threading.Event()

    def request_stop(self) -> None:
        """The worker is shutting down: the running job stops at its next step and goes back
        to the queue (safe to call from a signal handler: it only sets a flag, which the
        waiting worker forwards to the job's process)."""
        self.stopping.set()

    # -- claim ---------------------------------------------------------------------------
    def _row_id(self, public_id: str) -> int | None:
        with self.factory() as session:
            return session.scalar(select(Job.id).where(Job.public_id == public_id))

    def claim(self, job_id: int) -> Claim | str:
        """The claim, or why the message is ignored."""
        return with_db_retry(lambda: self._claim(job_id), f"job {job_id}: claim")

    def _claim(self, job_id: int) -> Claim | str:
        now = utcnow()
        lease = now + timedelta(seconds=self.settings.lease_seconds)
        token = secrets.token_hex(16)
        with self.factory() as session, session.begin():
            job = session.get(Job, job_id)
            if job is None:
                return "not_found"
            expired = job.lease_expires_at is not None and job.lease_expires_at < now
            if job.status == JOB_CANCELLING and expired:  # its worker died while cancelling
                finish_job(session, job, JOB_CANCELLED, message="cancelled (worker gone)")
                return "cancelled"
            if job.status == JOB_QUEUED and not is_runnable(session, job):
                return "blocked"  # sent again when the stage before it finishes
            if (
                job.status == JOB_RUNNING
                and expired
                and (job.attempts or 0) >= self.settings.max_attempts
            ):
                message = (
                    f"the worker running this job stopped without a word {job.attempts} times "
                    "(killed, out of memory, machine lost); not retried again"
                )
                finish_job(
                    session,
                    job,
                    JOB_FAILED,
                    error={"code": "worker_lost", "message": message, "phase": job.phase},
                    message=f"failed: {message}",
                )
                return "failed (worker_lost)"
            result = session.execute(
                update(Job)
                .where(
                    Job.id == job_id,
                    or_(
                        Job.status == JOB_QUEUED,
                        (Job.status == JOB_RUNNING) & (Job.lease_expires_at < now),
                    ),
                )
                .values(
                    status=JOB_RUNNING,
                    claim_token=token,
                    worker_id=self.worker_id,
                    attempts=Job.attempts + 1,
                    lease_expires_at=lease,
                    heartbeat_at=now,
                    started_at=job.started_at or now,
                    updated_at=now,
                )
                .execution_options(synchronize_session=False)
            )
            if result.rowcount != 1:
                return f"not_claimable ({job.status})"
            attempt = (job.attempts or 0) + 1
            if job.status == JOB_QUEUED:  # (a resumed job was and stays `running`)
                session.refresh(job)  # as the update left it
                status_changed(session, job)
            # which worker runs it is the server's business (the log), not the user's
            log.info("job %s: attempt %s on %s", job_id, attempt, self.worker_id)
            add_event(
                session,
                job_id,
                "claimed" if attempt == 1 else "resumed",
                f"attempt {attempt}"
                + (" (resuming from the last step checkpoint)" if attempt > 1 else ""),
                data={"attempt": attempt},
            )
        return Claim(job_id, token, attempt, job.lineage_id, float(job.progress or 0.0))

    # -- the run -------------------------------------------------------------------------
    def run(self, job_id: int | str) -> str:
        """Run one job: its row id (what queue messages carry) or the public id users see
        (``job_…``, for an operator or a test driving the worker by hand)."""
        if isinstance(job_id, str):
            row_id = with_db_retry(lambda: self._row_id(job_id), f"job {job_id}: look up")
            if row_id is None:
                return "not_found"
            job_id = row_id
        if self.stopping.is_set():
            # a message taken during the warm shutdown: leave the job as it is (queued, or
            # its lease); the sweep of the next worker start sends it again
            log.info("job %s: not started, the worker is shutting down", job_id)
            return "worker_stopping"
        claim = self.claim(job_id)
        if isinstance(claim, str):
            log.info("job %s: message ignored: %s", job_id, claim)
            return claim
        log.info("job %s: claimed (attempt %s)", job_id, claim.attempt)
        heartbeat = Heartbeat(self.settings, self.factory, claim)
        heartbeat.start()
        try:
            died = ""
            if self.isolate:
                outcome, died = self._run_in_child(claim)
            else:
                context = RunContext(
                    self.settings, self.factory, claim, self.stopping.is_set, heartbeat.lost
                )
                outcome = context.execute()
        finally:
            heartbeat.stop()
        if outcome == "process_died":
            outcome = self._after_child_death(claim, died)
        log.info("job %s: %s", job_id, outcome)
        # After a success; also after a lost lease, which may hide a success whose commit
        # was acknowledged by a dying connection; after a shutdown (the job is queued again
        # and goes back to the broker). Sends nothing unless the lineage's first unfinished
        # stage is queued.
        self.enqueue_next(claim.lineage_id)
        self._purge_if_deleted(claim.lineage_id)
        return outcome

    def _run_in_child(self, claim: Claim) -> tuple[str, str]:
        """(outcome, how the child died when it gave none)."""
        from worker.isolation import ChildJob

        child = ChildJob(self.settings, claim, self.child_setup)
        log.info("job %s: training in child process %s", claim.job_id, child.pid)
        ended = child.wait(self.stopping)
        if ended.outcome is not None:
            return ended.outcome, ""
        if ended.asked_to_stop and ended.exitcode == -signal.SIGTERM:
            # stopped before it could install its handler (still importing): it never
            # trained, so the job goes back to the queue as after a cooperative stop
            return RunContext(self.settings, self.factory, claim).requeue(), ""
        log.error("job %s: its process, %s, ended without an outcome", claim.job_id, ended.died)
        return "process_died", ended.died

    def _after_child_death(self, claim: Claim, how: str) -> str:
        """The job's process died without a word (killed, the OOM killer, a crash in native
        code): as if its worker had died, the lease is freed at once and the job sent again,
        to resume from its last step checkpoint; the claim counts the attempts and fails the
        job with ``worker_lost`` after ``max_attempts``."""

        def record() -> str:
            with self.factory() as session, session.begin():
                job = session.get(Job, claim.job_id)
                if job is None:
                    return "not_found"
                if job.claim_token != claim.token:  # it had recorded its end, or lost the job
                    return job.status if job.status in JOB_TERMINAL else "lease_lost"
                if job.status == JOB_CANCELLING:
                    finish_job(session, job, JOB_CANCELLED, message="cancelled (its process ended)")
                    return JOB_CANCELLED
                job.lease_expires_at = utcnow() - timedelta(seconds=1)
                job.updated_at = utcnow()
                add_event(
                    session,
                    job.id,
                    "process_died",
                    f"the job's process ended without a result ({how}); "
                    + (
                        "it runs again from its last step checkpoint"
                        if claim.attempt < self.settings.max_attempts
                        else "that was its last attempt"
                    ),
                    level="warning",
                    data={"attempt": claim.attempt, "max_attempts": self.settings.max_attempts},
                )
                return "process_died"

        outcome = with_db_retry(record, f"job {claim.job_id}: record the process's death")
        if outcome == "process_died":
            sent = self.enqueue([claim.job_id])

            def mark() -> None:
                with self.factory() as session, session.begin():
                    mark_enqueued(session, sent)

            with_db_retry(mark, f"job {claim.job_id}: mark sent")
        return outcome

    def _purge_if_deleted(self, lineage_id: int) -> None:
        """Lifecycle hook (app/purge.py): a lineage deleted with ``force`` while this job
        trained loses its folder now that the job has stopped (no-op otherwise)."""
        from service_core.purge import purge_lineage

        try:
            purge_lineage(self.settings, self.factory, lineage_id)
        except Exception:  # noqa: BLE001 - the sweep tries again
            log.warning("lineage %s: files not removed yet", lineage_id, exc_info=True)

    def enqueue_next(self, lineage_id: int) -> None:
        if not lineage_id:
            return

        def next_job() -> int | None:
            with self.factory() as session, session.begin():
                job = next_runnable_job(session, lineage_id)
                return job.id if job is not None else None

        job_id = with_db_retry(next_job, f"lineage {lineage_id}: next stage")
        if job_id is not None:
            sent = self.enqueue([job_id])

            def mark() -> None:
                with self.factory() as session, session.begin():
                    mark_enqueued(session, sent)

            with_db_retry(mark, f"job {job_id}: mark sent")
