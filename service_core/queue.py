"""The Celery configuration and the sender of "run job N" messages (the database is the
truth: a message carries nothing else)."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from celery import Celery

from service_core.settings import Settings

log = logging.getLogger("das.queue")

RUN_JOB = "das.run_job"


def make_celery(settings: Settings) -> Celery:
    broker = settings.resolved_broker_url
    celery = Celery("das_service", broker=broker, include=["worker.tasks"])
    options: dict = {}
    if broker.startswith("filesystem://"):
        folder = settings.broker_folder
        for sub in ("queue", "control", "processed"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        options = {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "control_folder": str(folder / "control"),
            "processed_folder": str(folder / "processed"),
            "store_processed": False,
            "polling_interval": 0.5,
        }
    elif broker.startswith(("redis://", "rediss://")):
        # A message of a job still running is redelivered after this; harmless (the claim in
        # the database refuses it), and a dead worker's job is found sooner by the sweep.
        options = {"visibility_timeout": 3600}
    celery.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        task_ignore_result=True,
        task_default_queue=settings.celery_queue,
        broker_transport_options=options,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=5,
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    return celery


class Dispatcher:
    """Sends "run job N" messages. A failure to send is logged, not raised: the job stays
    ``queued`` in the database and the sweep sends it again."""

    def __init__(self, settings: Settings, celery: Celery | None = None) -> None:
        self.settings = settings
        self._celery = celery

    @property
    def celery(self) -> Celery:
        if self._celery is None:
            self._celery = make_celery(self.settings)
        return self._celery

    def __call__(self, job_ids: Iterable[int]) -> list[int]:
        sent = []
        for job_id in job_ids:
            try:
                self.celery.send_task(
                    RUN_JOB,
                    args=[job_id],
                    queue=self.settings.celery_queue,
                    retry=True,
                    retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
                )
                sent.append(job_id)
            except Exception:  # noqa: BLE001 - the broker is down: the sweep will resend
                log.warning(
                    "could not send job %s to the broker; the sweep will retry",
                    job_id,
                    exc_info=True,
                )
        return sent

    def ping(self) -> None:
        """Raise if the broker cannot be reached."""
        with self.celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
