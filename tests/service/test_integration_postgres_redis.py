"""Integration: the real PostgreSQL and Redis, a real Celery worker process, and the real
engine on the tiny base. Skipped (with the reason) when the servers are unreachable, except
under DAS_REQUIRE_SERVICES=1 where that is a failure."""

from __future__ import annotations

import io
import math
import tarfile
import time

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from service_core.models import Job
from tests.service.conftest import (
    TINY_HP,
    WorkerProcess,
    corpus_text,
    lineage_path,
    load_checkpoint_in_subprocess,
    new_owner,
    row_id,
    service_stack,
    upload,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def stack(postgres_url, redis_url, tmp_path_factory):  # noqa: ANN201
    data = tmp_path_factory.mktemp("pg-stack")
    with service_stack(data, postgres_url, redis_url, "das-test") as stack:
        yield stack


def _job(client, owner, job_id):  # noqa: ANN001, ANN202
    return client.get(f"/v1/jobs/{job_id}", headers=owner.headers).json()


def _wait_status(client, owner, job_id, statuses, timeout, worker):  # noqa: ANN001, ANN202
    def done():  # noqa: ANN202
        job = _job(client, owner, job_id)
        return job if job["status"] in statuses else None

    try:
        return wait_for(done, timeout, f"job {job_id} to reach {statuses}")
    except TimeoutError as exc:
        raise AssertionError(f"{_job(client, owner, job_id)}\nworker log:\n{worker.log()}") from exc


def _lineage_with_one_domain(client, owner, domain, hyperparameters):  # noqa: ANN001, ANN202
    lineage = client.post(
        "/v1/lineages",
        headers=owner.headers,
        json={"name": domain, "base_model": "tiny-roberta", "hyperparameters": hyperparameters},
    ).json()["id"]
    corpus = upload(client, owner, f"{domain}.txt", corpus_text(domain)).json()["id"]
    r = client.post(
        f"/v1/lineages/{lineage}/domains",
        headers=owner.headers,
        json={"corpus_id": corpus, "name": domain},
    )
    assert r.status_code == 202, r.text
    return lineage, r.json()["job"]["id"]


def test_readyz_sees_postgres_and_redis(stack):
    _, _, client, _ = stack
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"database": "ok", "broker": "ok"}


def test_walkthrough_two_domains(stack, tmp_path):
    """The README's curl walk-through: lineage -> two domains -> poll -> download -> metrics."""
    settings, app, client, worker = stack
    owner = new_owner(app)
    started = time.monotonic()
    lineage = client.post(
        "/v1/lineages",
        headers=owner.headers,
        json={"name": "walk", "base_model": "tiny-roberta", "hyperparameters": TINY_HP},
    ).json()["id"]
    jobs = []
    for domain in ("news", "law"):
        corpus = upload(client, owner, f"{domain}.txt", corpus_text(domain)).json()["id"]
        r = client.post(
            f"/v1/lineages/{lineage}/domains",
            headers=owner.headers,
            json={"corpus_id": corpus, "name": domain},
        )
        assert r.status_code == 202, r.text
        jobs.append(r.json()["job"]["id"])
    for job_id in jobs:
        job = _wait_status(client, owner, job_id, {"succeeded", "failed", "cancelled"}, 300, worker)
        assert job["status"] == "succeeded", job
    elapsed = time.monotonic() - started
    print(f"\ntwo-domain walk-through on PostgreSQL+Redis: {elapsed:.1f}s")

    first, second = (_job(client, owner, j) for j in jobs)
    assert first["finished_at"] <= second["started_at"]  # strictly in order
    r = client.get(f"/v1/lineages/{lineage}/stages/2/checkpoint", headers=owner.headers)
    assert r.status_code == 200
    tarfile.open(fileobj=io.BytesIO(r.content)).extractall(tmp_path, filter="data")
    loaded = load_checkpoint_in_subprocess(tmp_path / f"lineage-{lineage}-stage-2-law")
    assert loaded["finite"] and loaded["type"] == "roberta"
    imp = client.get(f"/v1/lineages/{lineage}/stages/2/importance", headers=owner.headers)
    assert imp.status_code == 200 and len(imp.content) > 1024

    m = client.get(f"/v1/lineages/{lineage}/metrics", headers=owner.headers).json()
    assert m["domains"] == ["news", "law"]
    assert [len(row) for row in m["loss_matrix"]] == [2, 2]
    assert all(math.isfinite(v) for row in m["loss_matrix"] for v in row)
    assert all(math.isfinite(v) for row in m["perplexity_matrix"] for v in row)
    assert math.isfinite(m["forgetting_rate"])


def test_a_duplicated_message_trains_once(stack):
    settings, app, client, worker = stack
    owner = new_owner(app)
    lineage, job_id = _lineage_with_one_domain(client, owner, "bio", TINY_HP)
    # the same "run job N" message twice more (as a visibility-timeout redelivery would)
    row = row_id(app, Job, job_id)  # messages carry row ids
    assert app.state.enqueue([row, row]) == [row, row]
    job = _wait_status(client, owner, job_id, {"succeeded", "failed"}, 300, worker)
    assert job["status"] == "succeeded"
    time.sleep(3)  # let the worker consume the duplicates
    import redis

    queue_len = redis.Redis.from_url(settings.celery_broker_url).llen(settings.celery_queue)
    assert queue_len == 0
    events = client.get(f"/v1/jobs/{job_id}/events?limit=500", headers=owner.headers).json()
    types = [e["type"] for e in events["data"]]
    assert types.count("claimed") == 1 and types.count("succeeded") == 1
    assert "resumed" not in types
    assert _job(client, owner, job_id)["attempts"] == 1
    stages = lineage_path(settings, lineage) / "stages"
    assert len([p for p in stages.iterdir() if not p.name.endswith(".partial")]) == 1


def test_cancel_mid_training(stack):
    settings, app, client, worker = stack
    owner = new_owner(app)
    hp = {**TINY_HP, "max_steps": 500, "checkpoint_every": 10}
    lineage, job_id = _lineage_with_one_domain(client, owner, "news", hp)

    def training():  # noqa: ANN202
        job = _job(client, owner, job_id)
        return job["phase"] == "training" and (job["step"] or 0) >= 2

    wait_for(training, 300, "training to start")
    r = client.post(f"/v1/jobs/{job_id}/cancel", headers=owner.headers)
    assert r.status_code == 202 and r.json()["status"] == "cancelling"
    job = _wait_status(client, owner, job_id, {"cancelled", "succeeded", "failed"}, 60, worker)
    assert job["status"] == "cancelled" and job["step"] < 500
    stages = lineage_path(settings, lineage) / "stages"
    assert [p.name for p in stages.iterdir() if not p.name.endswith(".partial")] == []


def test_a_killed_worker_is_taken_over_and_resumes(stack, tmp_path):
    """kill -9 of the worker mid-training: the lease expires, the periodic sweep of a new
    worker sends the job again, and the engine resumes from the last step checkpoint."""
    settings, _, _, _ = stack
    own = settings.model_copy(
        update={"celery_queue": "das-kill", "lease_seconds": 4.0, "sweep_interval_seconds": 2.0}
    )
    app = create_app(own)
    first = WorkerProcess(own, tmp_path / "first.log")
    second = None
    try:
        first.wait_ready()
        with TestClient(app, raise_server_exceptions=False) as client:
            owner = new_owner(app)
            hp = {**TINY_HP, "max_steps": 24, "checkpoint_every": 3}
            _, job_id = _lineage_with_one_domain(client, owner, "law", hp)

            def past_a_checkpoint():  # noqa: ANN202
                job = _job(client, owner, job_id)
                return job["phase"] == "training" and (job["step"] or 0) >= 7

            wait_for(past_a_checkpoint, 300, "training past a step checkpoint", interval=0.2)
            first.process.kill()  # SIGKILL: no cleanup, the lease is left to expire
            first.process.wait()
            assert _job(client, owner, job_id)["status"] == "running"
            second = WorkerProcess(own, tmp_path / "second.log")
            second.wait_ready()
            job = _wait_status(client, owner, job_id, {"succeeded", "failed"}, 300, second)
            assert job["status"] == "succeeded" and job["attempts"] == 2
            events = client.get(f"/v1/jobs/{job_id}/events?limit=500", headers=owner.headers)
            data = events.json()["data"]
            assert [e["type"] for e in data].count("resumed") == 1
            result = next(e for e in data if e["type"] == "result")["data"]
            assert result["steps"] == 24 and result["resumed_from_step"] >= 3
    finally:
        first.stop()
        if second is not None:
            second.stop()
        app.state.engine.dispose()
