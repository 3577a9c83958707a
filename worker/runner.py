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
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import delete, or_, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from service_core.lifecycle import (
    add_event,
    finish_job,
    is_runnable,
    mark_enqueued,
    next_runnable_job,
)
from service_core.models import (
    JOB_CANCELLED,
    JOB_CANCELLING,
    JOB_FAILED,
    JOB_QUEUED,
    JOB_RUNNING,
    JOB_SUCCEEDED,
    JOB_TERMINAL,
    Checkpoint,
    Corpus,
    EvalScore,
    ImportanceSnapshot,
    Job,
    Lineage,
    Stage,
    utcnow,
)
from service_core.redaction import scrub_data, scrub_text
from service_core.settings import Settings
from service_core.storage import resolve_stored, stored_path
from worker.progress import PREPARING, TRAINING, ProgressTracker

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
    def run(self, job_id: int) -> str:
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
        heartbeat = _Heartbeat(self.settings, self.factory, claim)
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


class _Heartbeat:
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
        return scrub_data(_json_safe(data), self.settings)

    # -- the job -----------------------------------------------------------------------------
    def execute(self) -> str:
        from das_engine.errors import Cancelled, DasError, DomainExistsError, LineageBusyError

        try:
            spec = with_db_retry(self._load_spec, f"job {self.claim.job_id}: load")
            self.lineage_id = spec.lineage_id
            lineage = self._open_lineage(spec)
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
                result = _finished_stage_result(lineage, spec.name)
                if result is None:
                    raise
            self._record_success(lineage, result)
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

    # -- inputs --------------------------------------------------------------------------------
    def _load_spec(self) -> _Spec:
        with self.factory() as session:
            job = self._owned_job(session)
            stage = session.get(Stage, job.stage_id)
            lineage = session.get(Lineage, job.lineage_id)
            assert stage is not None and lineage is not None

            def corpus_path(corpus_id: int | None) -> Path | None:
                if corpus_id is None:
                    return None
                corpus = session.get(Corpus, corpus_id)
                assert corpus is not None
                return resolve_stored(self.settings, corpus.storage_path)

            corpus = corpus_path(stage.corpus_id)
            assert corpus is not None
            return _Spec(
                lineage_id=lineage.id,
                stage_id=stage.id,
                name=stage.name,
                corpus=corpus,
                eval_corpus=corpus_path(stage.eval_corpus_id),
                general_corpus=corpus_path(lineage.general_corpus_id),
                base_model=lineage.base_model,
                config={**lineage.hyperparameters, "strategy": lineage.strategy},
            )

    def _open_lineage(self, spec: _Spec) -> Any:
        from das_engine.lineage import Lineage as EngineLineage

        path = self.settings.lineages_dir / str(spec.lineage_id)
        if (path / "lineage.json").exists():
            return EngineLineage.open(path)
        # Not created yet, or a creation that crashed half-way: start it afresh.
        shutil.rmtree(path, ignore_errors=True)
        path.parent.mkdir(parents=True, exist_ok=True)

        def announce() -> None:
            with self.factory() as session, session.begin():
                self._guarded(session, phase=self.tracker.phase)
                add_event(
                    session,
                    self.claim.job_id,
                    "preparing",
                    f"creating the lineage on {spec.base_model}",
                )

        self.tracker.enter(PREPARING)
        self._seen_progress = True
        with_db_retry(announce, f"job {self.claim.job_id}: preparing")
        return EngineLineage.create(
            path,
            spec.base_model,
            spec.config,
            general_corpus=spec.general_corpus,
            models_dir=self.settings.models_dir,
            allow_hub=self.settings.allow_hub,
        )

    # -- results -------------------------------------------------------------------------------
    def _record_success(self, lineage: Any, result: Any) -> None:
        metrics = lineage.metrics()
        snapshots = _importance_files(lineage, result)

        def record() -> None:
            with self.factory() as session, session.begin():
                job = self._owned_job(session)
                stage = session.get(Stage, job.stage_id)
                assert stage is not None
                stage.engine_position = result.position
                stage.steps = result.steps
                stage.trained_tokens = result.trained_tokens
                session.add(
                    Checkpoint(
                        stage_id=stage.id,
                        path=stored_path(self.settings, Path(result.model_dir)),
                        step=result.steps,
                        final=True,
                    )
                )
                for kind, path, stats in snapshots:
                    session.add(
                        ImportanceSnapshot(
                            stage_id=stage.id,
                            kind=kind,
                            path=stored_path(self.settings, path),
                            stats=stats,
                        )
                    )
                _store_eval_scores(session, job.lineage_id, stage, metrics)
                job.progress = 1.0
                job.trained_tokens = result.trained_tokens
                job.step = job.total_steps = result.steps
                finish_job(
                    session,
                    job,
                    JOB_SUCCEEDED,
                    message=f"stage {stage.position} ({stage.name}) trained: "
                    f"{result.steps} steps, {result.trained_tokens} tokens",
                )
                add_event(
                    session,
                    job.id,
                    "result",
                    "stage result",
                    data=self._clean(_result_data(result, job.lineage_id, stage.position)),
                )

        with_db_retry(record, f"job {self.claim.job_id}: record the result")


@dataclass
class _Spec:
    lineage_id: int
    stage_id: int
    name: str
    corpus: Path
    eval_corpus: Path | None
    general_corpus: Path | None
    base_model: str
    config: dict


def _result_data(result: Any, lineage_id: int, position: int) -> dict:
    """The engine's stage result as users see it: where to download the stage, not where
    the server keeps it."""
    data = {k: v for k, v in result.to_dict().items() if k not in ("model_dir", "importance_dir")}
    stage_url = f"/v1/lineages/{lineage_id}/stages/{position}"
    data["checkpoint_url"] = f"{stage_url}/checkpoint"
    data["importance_url"] = f"{stage_url}/importance"
    return data


def _finished_stage_result(lineage: Any, name: str) -> Any:
    from das_engine.lineage import StageResult

    for info in lineage.stages:
        if info.name == name and info is lineage.stages[-1]:
            meta = info.meta
            return StageResult(
                position=info.position,
                name=info.name,
                model_dir=info.model_dir,
                importance_dir=info.importance_dir,
                steps=int(meta.get("steps") or 0),
                trained_tokens=int(meta.get("trained_tokens") or 0),
                eval_losses=meta.get("eval") or {},
                general_loss=meta.get("general_loss"),
            )
    return None


def _importance_files(lineage: Any, result: Any) -> list[tuple[str, Path, dict]]:
    """(kind, path, stats) of the snapshots that belong with this stage: its own domain and
    accumulated importance, and the lineage's general importance they build on."""
    out = []
    general = Path(lineage.path) / "importance" / "general.safetensors"
    if general.is_file():
        out.append(("general", general, {}))
    stats = {}
    for info in lineage.stages:
        if info.position == result.position:
            stats = info.meta.get("importance") or {}
    for path in sorted(Path(result.importance_dir).glob("*.safetensors")):
        kind = path.stem if path.stem in ("domain", "accumulated", "general") else "domain"
        out.append((kind, path, _json_safe(stats.get(kind, {}))))
    return out


def _store_eval_scores(session: Session, lineage_id: int, stage: Stage, metrics: dict) -> None:
    """Replace the lineage's matrix with the engine's (it back-fills earlier cells)."""
    domains: list[str] = metrics.get("domains") or []
    stage_ids = {
        s.active_name: s.id
        for s in session.scalars(select(Stage).where(Stage.lineage_id == lineage_id))
        if s.active_name is not None and (s.id == stage.id or s.job.status == JOB_SUCCEEDED)
    }
    session.execute(delete(EvalScore).where(EvalScore.lineage_id == lineage_id))

    def add(stage_id: int | None, domain: str | None, value: Any) -> None:
        if isinstance(value, int | float) and value == value and abs(value) != float("inf"):
            session.add(
                EvalScore(
                    lineage_id=lineage_id,
                    stage_id=stage_id,
                    domain=domain,
                    metric="loss",
                    value=float(value),
                )
            )

    for row_name, row in zip(domains, metrics.get("loss_matrix") or [], strict=False):
        if row_name in stage_ids:
            for domain, value in zip(domains, row, strict=False):
                add(stage_ids[row_name], domain, value)
    for domain, value in zip(domains, metrics.get("base_losses") or [], strict=False):
        add(None, domain, value)
    general = metrics.get("general") or {}
    if general:
        add(None, None, general.get("base_loss"))
        for row_name, value in zip(domains, general.get("losses") or [], strict=False):
            if row_name in stage_ids:
                add(stage_ids[row_name], None, value)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, str | int | bool):
        return value
    return str(value)


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
