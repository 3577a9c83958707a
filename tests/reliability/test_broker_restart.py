"""Redis (the broker) restarted while jobs wait in its queue and one is running: the
restart (``shutdown nosave``) loses every queued and unacknowledged message, yet each job
ends ``succeeded`` exactly once and the stages of a lineage still run in order.

How: the database is the truth, a message only says "run job N". The worker's periodic sweep
sends again every runnable queued job whose last message is older than
``DAS_SWEEP_STALE_SECONDS`` (and every expired lease); duplicates are refused by the claim.
"""

from __future__ import annotations

import pytest

from tests.reliability.helpers import (
    assert_ran_once,
    events,
    job,
    new_lineage,
    redis_stopped,
    wait_job,
)
from tests.service.conftest import (
    TINY_HP,
    corpus_text,
    lineage_path,
    new_owner,
    service_stack,
    upload,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

LONG_STEPS = 60  # at >= 0.1 s each (the throttled worker): >= 6 s of training


def test_redis_restart_with_queued_and_running_jobs(postgres_url, redis_url, tmp_path):
    import redis

    with service_stack(
        tmp_path,
        postgres_url,
        redis_url,
        "das-redis-restart",
        sweep_interval_seconds=2,
        sweep_stale_seconds=3,
        # every training step lasts at least 0.1 s, so the long job (60 steps) is still
        # training when Redis goes down, however fast the machine
        worker={
            "module": "tests.reliability.throttled_worker",
            "env": {"DAS_TEST_STEP_SECONDS": "0.1"},
        },
    ) as (settings, app, client, worker):
        owner = new_owner(app)
        # everything but the domain submissions first, so the outage starts soon after them
        long_hp = {**TINY_HP, "max_steps": LONG_STEPS, "checkpoint_every": 100}
        long_running = new_lineage(client, owner, "long", long_hp)
        ordered = new_lineage(client, owner, "ordered", TINY_HP)
        other = new_lineage(client, owner, "other", TINY_HP)
        late_lineage = new_lineage(client, owner, "late", TINY_HP)
        corpora = {
            d: upload(client, owner, f"{d}.txt", corpus_text(d)).json()["id"]
            for d in ("news", "law", "bio")
        }

        def submit(lineage: int, domain: str) -> int:
            r = client.post(
                f"/v1/lineages/{lineage}/domains",
                headers=owner.headers,
                json={"corpus_id": corpora[domain], "name": domain},
            )
            assert r.status_code == 202, r.text
            return r.json()["job"]["id"]

        running = submit(long_running, "news")

        def training() -> bool:
            state = job(client, owner, running)
            return state["phase"] == "training" and (state["step"] or 0) >= 2

        wait_for(training, 300, "the long job to train", interval=0.2)
        first = submit(ordered, "news")  # its message waits in Redis behind the long job
        second = submit(ordered, "law")  # waits in the database for stage 1
        queued = submit(other, "bio")  # a message in Redis
        broker = redis.Redis.from_url(settings.celery_broker_url)
        assert broker.llen(settings.celery_queue) >= 2

        with redis_stopped():
            assert job(client, owner, running)["status"] == "running"  # down while it trains
            ready = client.get("/readyz")
            assert ready.status_code == 503 and "broker" in ready.json()["checks"]
            # a domain added while the broker is down is accepted; its message is not sent
            late = submit(late_lineage, "law")
            assert job(client, owner, late)["status"] == "queued"
        assert client.get("/readyz").status_code == 200

        jobs = [running, first, second, queued, late]
        for job_id in jobs:
            wait_job(client, owner, job_id, 300, worker.log)
        for job_id in jobs:
            assert_ran_once(client, owner, job_id)
        stage1, stage2 = job(client, owner, first), job(client, owner, second)
        assert stage1["finished_at"] <= stage2["started_at"]  # strictly in order
        stages = client.get(f"/v1/lineages/{ordered}", headers=owner.headers).json()["stages"]
        assert [(s["position"], s["name"], s["status"]) for s in stages] == [
            (1, "news", "succeeded"),
            (2, "law", "succeeded"),
        ]
        stage_dirs = lineage_path(settings, ordered) / "stages"
        on_disk = sorted(p.name for p in stage_dirs.iterdir())
        assert on_disk == ["001-news", "002-law"]
        # the long job's message was unacknowledged at the restart: gone, yet it trained once
        result = next(e for e in events(client, owner, running) if e["type"] == "result")
        assert result["data"]["steps"] == LONG_STEPS and result["data"]["resumed_from_step"] == 0
