"""Webhooks on the real PostgreSQL (and Redis): two dispatchers sharing the outbox send each
event exactly once (``FOR UPDATE SKIP LOCKED``), and a real Celery worker process runs the
dispatcher thread: a job it trains is announced to a receiver on loopback, and the worker
still stops at SIGTERM. Skipped when the servers are unreachable, except under
DAS_REQUIRE_SERVICES=1 where that is a failure."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest

from service_core.webhook_dispatch import WebhookDispatcher
from tests.service.conftest import (
    add_domain,
    create_lineage,
    in_process_runner,
    new_owner,
    service_stack,
    wait_for,
)
from tests.service.test_webhooks import WEBHOOK_SETTINGS
from tests.service.webhook_receiver import receiver, verify

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def test_two_dispatchers_send_each_event_once(postgres_url, tmp_path):
    with (
        receiver() as hook,
        in_process_runner(tmp_path, database_url=postgres_url, **WEBHOOK_SETTINGS) as env,
    ):
        settings, app, client, _, _ = env
        owner = new_owner(app)
        endpoints = [
            client.post("/v1/webhooks", headers=owner.headers, json={"url": hook.url}).json()
            for _ in range(4)
        ]
        jobs = []
        for _ in range(3):
            lineage = create_lineage(client, owner).json()["id"]
            jobs.append(add_domain(client, owner, lineage, "news"))
            assert client.post(f"/v1/jobs/{jobs[-1]}/cancel", headers=owner.headers).is_success
        expected = len(endpoints) * len(jobs) * 2  # queued and cancelled, to every endpoint
        dispatchers = [WebhookDispatcher(settings, app.state.session_factory) for _ in range(2)]
        barrier = threading.Barrier(len(dispatchers))

        def drain(dispatcher: WebhookDispatcher) -> None:
            barrier.wait()
            deadline = time.monotonic() + 120
            while len(hook.received()) < expected and time.monotonic() < deadline:
                dispatcher.deliver_due()
                time.sleep(0.01)
            assert dispatcher.wait_idle(30)

        threads = [threading.Thread(target=drain, args=(d,)) for d in dispatchers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=180)
        for dispatcher in dispatchers:
            dispatcher.close()
        counts = Counter(r.headers["webhook-id"] for r in hook.received())
        assert len(counts) == expected and set(counts.values()) == {1}, counts
        for endpoint in endpoints:
            log = client.get(
                f"/v1/webhooks/{endpoint['id']}/deliveries", headers=owner.headers
            ).json()["data"]
            assert [(d["status"], d["attempts"]) for d in log] == [("delivered", 1)] * 6
        secrets = {e["secret"] for e in endpoints}
        assert all(any(verify(s, r) for s in secrets) for r in hook.received())


def test_a_celery_worker_delivers_the_events_of_the_job_it_runs(postgres_url, redis_url, tmp_path):
    env = {
        "DAS_WEBHOOK_ALLOW_PRIVATE": "true",
        "DAS_WEBHOOK_POLL_SECONDS": "0.1",
        "DAS_WEBHOOK_BACKOFF_SECONDS": "0.5",
    }
    with (
        receiver() as hook,
        service_stack(
            tmp_path,
            postgres_url,
            redis_url,
            "das-webhooks-test",
            worker={"env": env},
            webhook_allow_private=True,
        ) as (_, app, client, worker),
    ):
        owner = new_owner(app)
        r = client.post(
            "/v1/webhooks",
            headers=owner.headers,
            json={"url": hook.url, "events": ["job.running", "job.succeeded"]},
        )
        assert r.status_code == 201, r.text
        endpoint = r.json()
        lineage = create_lineage(client, owner).json()["id"]
        job = add_domain(client, owner, lineage, "news")
        try:
            wait_for(lambda: len(hook.of_job(job)) >= 2, 240, "two events", interval=0.2)
        except TimeoutError as exc:
            raise AssertionError(worker.log()) from exc
        got = hook.of_job(job)
        assert [r.json["type"] for r in got] == ["job.running", "job.succeeded"]
        assert all(verify(endpoint["secret"], r) for r in got)
        final = client.get(f"/v1/jobs/{job}", headers=owner.headers).json()
        assert got[-1].json["data"]["job"] == final
        worker.process.terminate()  # SIGTERM: the dispatcher thread does not hold it up
        assert worker.process.wait(timeout=60) is not None


def test_an_events_job_body_is_the_row_as_committed(postgres_url, tmp_path):
    """A column another transaction committed after the job was loaded (the worker's
    heartbeat, here by hand) is in the event's body: the body is the job as its own read
    shows it, not the finishing session's older copy (seen once in CI: heartbeat_at)."""
    from datetime import UTC, datetime

    from sqlalchemy import update

    from service_core.lifecycle import JOB_CANCELLED, finish_job
    from service_core.models import Job, WebhookDelivery
    from tests.service.conftest import row_id

    with (
        receiver() as hook,
        in_process_runner(tmp_path, database_url=postgres_url, **WEBHOOK_SETTINGS) as env,
    ):
        _, app, client, _, _ = env
        owner = new_owner(app)
        body = {"url": hook.url, "events": ["job.cancelled"]}
        assert client.post("/v1/webhooks", headers=owner.headers, json=body).status_code == 201
        lineage = create_lineage(client, owner).json()["id"]
        job_id = add_domain(client, owner, lineage, "news")
        row = row_id(app, Job, job_id)
        beat = datetime(2026, 12, 8, 4, 24, 44, 702499, tzinfo=UTC)
        factory = app.state.session_factory
        with factory() as finishing, finishing.begin():
            job = finishing.get(Job, row)  # loaded before the heartbeat below commits
            assert job.heartbeat_at is None
            with factory() as beating, beating.begin():
                beating.execute(update(Job).where(Job.id == row).values(heartbeat_at=beat))
            finish_job(finishing, job, JOB_CANCELLED, message="cancelled")
        with factory() as session:
            [delivery] = session.query(WebhookDelivery).filter_by(job_id=row).all()
            sent = delivery.payload["data"]["job"]
        assert sent["heartbeat_at"] == "2026-12-08T04:24:44.702499Z"

        def shown() -> dict | bool:
            j = client.get(f"/v1/jobs/{job_id}", headers=owner.headers).json()
            return j["status"] == "cancelled" and j

        assert wait_for(shown, 30, "the job read to show it cancelled", interval=0.05) == sent
