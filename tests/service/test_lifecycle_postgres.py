"""The lifecycle routes on the real PostgreSQL (the worker's runner in-process, the real
engine on the tiny base): migration 0002 matches the models there, and deletion, fork, the
job list and key rotation behave as on SQLite (row locks instead of ``BEGIN IMMEDIATE``)."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from service_core.models import Base, Job
from tests.service.conftest import (
    add_domain,
    assert_problem,
    by_public,
    corpus_text,
    create_lineage,
    in_process_runner,
    lineage_path,
    new_owner,
    upload,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def env(postgres_url, tmp_path_factory):  # noqa: ANN001, ANN201
    with in_process_runner(
        tmp_path_factory.mktemp("pg-lifecycle"), database_url=postgres_url
    ) as env:
        yield env


def test_migrations_match_the_models_on_postgres(env):
    _, app, _, _, _ = env
    with app.state.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []


def test_lifecycle_on_postgres(env):
    settings, app, client, runner, _ = env
    owner, other = new_owner(app), new_owner(app)
    lineage = create_lineage(client, owner).json()["id"]
    corpus = upload(client, owner, "law.txt", corpus_text("law")).json()["id"]
    r = client.post(
        f"/v1/lineages/{lineage}/domains",
        headers=owner.headers,
        json={"corpus_id": corpus, "name": "law"},
    )
    job = r.json()["job"]["id"]
    assert_problem(client.delete(f"/v1/corpora/{corpus}", headers=owner.headers), 409)
    assert [
        j["id"] for j in client.get("/v1/jobs?status=queued", headers=owner.headers).json()["data"]
    ] == [job]
    assert runner.run(job) == "succeeded"
    assert client.get("/v1/jobs?status=queued", headers=owner.headers).json()["data"] == []
    assert client.delete(f"/v1/corpora/{corpus}", headers=owner.headers).status_code == 204

    fork = client.post(
        f"/v1/lineages/{lineage}/fork", headers=owner.headers, json={"name": "b", "from_stage": 1}
    )
    assert fork.status_code == 201, fork.text
    fork_id = fork.json()["id"]
    assert_problem(
        client.post(
            f"/v1/lineages/{lineage}/fork",
            headers=other.headers,
            json={"name": "b", "from_stage": 1},
        ),
        404,
    )
    queued = add_domain(client, owner, fork_id, "bio")
    assert client.delete(f"/v1/lineages/{lineage}", headers=owner.headers).status_code == 204
    assert not lineage_path(settings, lineage).exists()
    assert (
        client.head(
            f"/v1/lineages/{fork_id}/stages/1/checkpoint", headers=owner.headers
        ).status_code
        == 200
    )
    with app.state.session_factory() as session, session.begin():
        by_public(session, Job, queued).status = "running"
    assert_problem(
        client.delete(f"/v1/lineages/{fork_id}", headers=owner.headers), 409, "lineage_training"
    )
    assert (
        client.delete(f"/v1/lineages/{fork_id}?force=true", headers=owner.headers).status_code
        == 204
    )
    assert client.get(f"/v1/jobs/{queued}", headers=owner.headers).status_code == 404
    with app.state.session_factory() as session:
        assert by_public(session, Job, queued).status == "cancelling"

    key_id = client.get("/v1/api-keys", headers=owner.headers).json()["data"][0]["id"]
    rotated = client.post(f"/v1/api-keys/{key_id}/rotate", headers=owner.headers)
    assert rotated.status_code == 201
    assert_problem(client.get("/v1/api-keys", headers=owner.headers), 401)
    fresh = {"Authorization": f"Bearer {rotated.json()['key']}"}
    assert len(client.get("/v1/api-keys", headers=fresh).json()["data"]) == 2


def test_forced_delete_while_training_on_postgres(env):
    import threading

    from tests.service.conftest import wait_for

    settings, app, client, runner, _ = env
    owner = new_owner(app)
    hp = {"max_steps": 400, "batch_size": 4, "block_size": 32, "checkpoint_every": 3}
    hp.update(eval_max_batches=2, importance_max_batches=2)
    lineage = create_lineage(client, owner, hyperparameters=hp).json()["id"]
    job = add_domain(client, owner, lineage, "news")
    outcome: list[str] = []
    thread = threading.Thread(target=lambda: outcome.append(runner.run(job)))
    thread.start()
    try:
        wait_for(
            lambda: (client.get(f"/v1/jobs/{job}", headers=owner.headers).json()["step"] or 0) >= 2,
            120,
            "training",
        )
        assert_problem(client.delete(f"/v1/lineages/{lineage}", headers=owner.headers), 409)
        r = client.delete(f"/v1/lineages/{lineage}?force=true", headers=owner.headers)
        assert r.status_code == 204
    finally:
        thread.join(timeout=120)
    assert outcome == ["cancelled"]
    assert not lineage_path(settings, lineage).exists()
    with app.state.session_factory() as session:
        assert by_public(session, Job, job).status == "cancelled"
