"""PostgreSQL connections dropped during a job: every backend of the test database is
terminated (``pg_terminate_backend``) again and again while the worker trains, evaluates
and records the result. The worker retries its writes on fresh connections
(``pool_pre_ping`` plus a retry around each database step) and the job ends consistent:
``succeeded`` once, with its checkpoint, metrics and a released lease."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.main import create_app
from app.migrate import upgrade
from service_core.models import Checkpoint, EvalScore, Job
from tests.reliability.helpers import TERMINAL, events, job, new_lineage
from tests.service.conftest import (
    PG_DSN,
    TINY_HP,
    add_domain,
    assert_problem,
    by_public,
    corpus_text,
    new_owner,
    row_id,
    service_stack,
    upload,
    wait_for,
)


def terminate_backends(database: str) -> int:
    """Drop every connection to ``database`` but the one asking; how many were dropped."""
    import psycopg

    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (database,),
        ).fetchall()
    return sum(1 for (ok,) in rows if ok)


def _poll(client, owner, job_id):  # noqa: ANN001, ANN202
    """The job, read through the API; a request cut by the drop answers 503, never a 500."""
    r = client.get(f"/v1/jobs/{job_id}", headers=owner.headers)
    if r.status_code == 503:
        assert r.json()["code"] == "database_unavailable" and r.headers["retry-after"]
        return None
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_connections_dropped_during_a_job(postgres_url, redis_url, tmp_path):
    database = postgres_url.rsplit("/", 1)[1]
    with service_stack(
        tmp_path,
        postgres_url,
        redis_url,
        "das-pg-drop",
        lease_seconds=8,
        # training steps of >= 0.2 s: the drops keep coming for the whole run on any machine
        worker={
            "module": "tests.reliability.throttled_worker",
            "env": {"DAS_TEST_STEP_SECONDS": "0.2"},
        },
    ) as (settings, app, client, worker):
        owner = new_owner(app)
        lineage = new_lineage(
            client, owner, "drop", {**TINY_HP, "max_steps": 24, "checkpoint_every": 6}
        )
        corpus = upload(client, owner, "law.txt", corpus_text("law")).json()["id"]
        r = client.post(
            f"/v1/lineages/{lineage}/domains",
            headers=owner.headers,
            json={"corpus_id": corpus, "name": "law"},
        )
        assert r.status_code == 202, r.text
        job_id = r.json()["job"]["id"]

        def training() -> bool:
            state = _poll(client, owner, job_id)
            return bool(state) and state["phase"] == "training" and (state["step"] or 0) >= 2

        wait_for(training, 300, "training to start", interval=0.2)
        dropped, rounds, phases = 0, 0, set()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            dropped += terminate_backends(database)
            rounds += 1
            time.sleep(0.4)
            state = _poll(client, owner, job_id)
            if state is None:
                continue
            phases.add(state["phase"])
            if state["status"] in TERMINAL:
                break
        assert dropped >= rounds >= 10  # connections were really cut, again and again
        assert {"training", "evaluating"} <= phases  # in both phases

        state = wait_for(lambda: _poll(client, owner, job_id), 30, "the API")
        assert state["status"] == "succeeded", f"{state}\n{worker.log()}"
        types = [e["type"] for e in events(client, owner, job_id)]
        assert types.count("succeeded") == 1 and "failed" not in types, types
        # either the run went through, or its lease expired during a drop and it resumed
        assert state["attempts"] == 1 + types.count("resumed")
        assert state["progress"] == 1.0 and state["step"] == 24
        with app.state.session_factory() as session:
            row = by_public(session, Job, job_id)
            assert row.claim_token is None and row.lease_expires_at is None
            checkpoints = session.scalars(
                select(Checkpoint).where(Checkpoint.stage_id == row.stage_id)
            ).all()
            assert len(checkpoints) == 1 and checkpoints[0].final
            assert session.scalars(
                select(EvalScore).where(EvalScore.lineage_id == row.lineage_id)
            ).all()
        ckpt = client.get(f"/v1/lineages/{lineage}/stages/1/checkpoint", headers=owner.headers)
        assert ckpt.status_code == 200 and len(ckpt.content) > 10_000
        metrics = client.get(f"/v1/lineages/{lineage}/metrics", headers=owner.headers).json()
        assert metrics["domains"] == ["law"] and metrics["loss_matrix"][0][0] is not None


# -- the same fault, deterministic: in-process, every database step of a run fails once --------


class DroppedConnections:
    """Every distinct SQL statement of an engine fails once, the first time it runs, as on a
    connection the server has just dropped (``OperationalError``, before it reaches the
    database); after a failure nothing fails until a transaction has committed, so that the
    retry of the step gets through. Over one run this cuts every kind of database step of
    the worker at least once."""

    def __init__(self, engine) -> None:  # noqa: ANN001
        from sqlalchemy import event

        self.seen: set[str] = set()
        self.quiet = False
        self.failed: list[str] = []
        event.listen(engine, "before_cursor_execute", self._maybe_fail)
        event.listen(engine, "commit", self._committed)

    def _committed(self, _conn) -> None:  # noqa: ANN001
        self.quiet = False

    def _maybe_fail(self, _conn, _cursor, statement: str, *_rest) -> None:  # noqa: ANN001
        import sqlite3

        if self.quiet or statement in self.seen:
            return
        self.seen.add(statement)
        self.quiet = True
        self.failed.append(statement.split()[0])
        raise sqlite3.OperationalError("server closed the connection unexpectedly (test)")


def test_every_database_step_of_the_worker_is_retried(tmp_path, monkeypatch, caplog):
    """The claim, the loading of the job, the progress and event writes, the heartbeat, the
    result and the sending of the next stage all meet failing statements; the job still
    succeeds once, and the next stage is sent."""
    import worker.claims
    from service_core.db import make_engine, make_session_factory
    from tests.service.conftest import EnqueueRecorder, make_settings
    from worker.runner import JobRunner

    monkeypatch.setattr(worker.claims, "DB_BACKOFF_SECONDS", 0.01)
    # training steps of at least 0.3 s: the heartbeat (every 0.5 s) beats during the run
    from das_engine import trainer

    real_micro_batch = trainer.Trainer._micro_batch

    def slow_micro_batch(self, step, micro):  # noqa: ANN001, ANN202
        time.sleep(0.3)
        return real_micro_batch(self, step, micro)

    monkeypatch.setattr(trainer.Trainer, "_micro_batch", slow_micro_batch)
    settings = make_settings(
        tmp_path, event_every_steps=1, progress_interval_seconds=0, lease_seconds=2
    )
    upgrade(settings)
    recorder = EnqueueRecorder()
    app = create_app(settings, enqueue=recorder, broker_ping=lambda: None)
    engine = make_engine(settings)  # the worker's own engine, with the faults
    faults = DroppedConnections(engine)
    # in this process (isolate=False): the faulty engine and the slow steps live here
    runner = JobRunner(
        settings, make_session_factory(engine), recorder, worker_id="flaky", isolate=False
    )
    with TestClient(app, raise_server_exceptions=False) as client:
        owner = new_owner(app)
        # 8 steps of >= 0.3 s (slow_micro_batch above): several heartbeats, on any machine
        lineage = new_lineage(client, owner, "flaky", {**TINY_HP, "max_steps": 8})
        first = add_domain(client, owner, lineage, "news")
        second = add_domain(client, owner, lineage, "law")
        outcome = runner.run(row_id(app, Job, first))  # as a queue message names it
        assert outcome == "succeeded", job(client, owner, first)
        assert {"BEGIN", "SELECT", "UPDATE", "INSERT"} <= set(faults.failed)
        retried = " | ".join(r.getMessage() for r in caplog.records if "retrying" in r.getMessage())
        for step in ("claim", "load", "heartbeat", "record the result", "next stage", "mark sent"):
            assert step in retried, retried
        assert recorder.sent[-1] == row_id(app, Job, second)  # sent despite the faults
        state = job(client, owner, first)
        assert state["status"] == "succeeded" and state["attempts"] == 1
        assert state["progress"] == 1.0 and state["step"] == 8
        types = [e["type"] for e in events(client, owner, first)]
        assert types.count("claimed") == 1 and types.count("succeeded") == 1, types
        r = client.get(f"/v1/lineages/{lineage}/stages/1/checkpoint", headers=owner.headers)
        assert r.status_code == 200
    engine.dispose()
    app.state.engine.dispose()


def test_the_api_answers_503_while_the_database_is_unreachable(client, alice, monkeypatch):
    """A request cut by a dropped connection is a 503 problem with Retry-After (worth a retry),
    not a 500, and says nothing about the database."""
    import sqlite3

    from sqlalchemy.exc import OperationalError

    import app.routes.jobs as jobs

    def dropped(*_a, **_k):  # noqa: ANN202
        raise OperationalError(
            "SELECT secret_column FROM jobs", {"p": "hunter2"}, sqlite3.OperationalError("gone")
        )

    monkeypatch.setattr(jobs, "owned_job", dropped)
    r = client.get(f"/v1/jobs/job_{'A' * 20}", headers=alice.headers)
    body = assert_problem(r, 503, "database_unavailable")
    assert r.headers["retry-after"] == "1" and body["detail"]
    assert "secret_column" not in r.text and "hunter2" not in r.text
