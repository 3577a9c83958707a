"""Opaque ids: every id the API shows or accepts is a type prefix and 20 random characters
(``lin_…``, ``job_…``, ``cor_…``, ``key_…``); events are numbered within their job. No
answer reveals how many rows other tenants created; a malformed, integer, unknown or
foreign id is the same 404. Migration 0006 gives rows created before it such ids."""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from app.auth import hash_key
from app.main import create_app
from app.migrate import upgrade
from service_core.lifecycle import add_event
from service_core.models import Job, JobEvent, Lineage, UTCDateTime
from tests.service.conftest import (
    PG_DSN,
    EnqueueRecorder,
    add_domain,
    assert_problem,
    by_public,
    corpus_text,
    create_lineage,
    make_settings,
    new_owner,
    require_services,
    upload,
    wait_for,
)

SHAPE = {
    prefix: re.compile(rf"^{prefix}_[A-Za-z0-9]{{20}}$") for prefix in ("lin", "job", "cor", "key")
}
ID_FIELDS = {
    "id": None,  # the prefix depends on the resource
    "lineage_id": "lin",
    "job_id": "job",
    "corpus_id": "cor",
    "eval_corpus_id": "cor",
    "end_task_corpus_id": "cor",
    "general_corpus_id": "cor",
    "forked_from_id": "lin",
}


def _ids_in(body: Any, found: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """(field, value) of every id field anywhere in a JSON body."""
    if isinstance(body, dict):
        for key, value in body.items():
            if key in ID_FIELDS and not isinstance(value, dict | list):
                found.append((key, value))
            _ids_in(value, found)
    elif isinstance(body, list):
        for item in body:
            _ids_in(item, found)
    return found


def _assert_public(body: Any, id_prefix: str | None = None) -> None:
    for key, value in _ids_in(body, []):
        prefix = ID_FIELDS[key] or id_prefix
        if value is None or prefix is None:
            continue
        assert isinstance(value, str) and SHAPE[prefix].match(value), (key, value)


def test_every_id_shown_is_an_opaque_string_of_its_type(client, alice):
    corpus = upload(client, alice, "news.txt", corpus_text("news")).json()
    _assert_public(corpus, "cor")
    lineage = create_lineage(client, alice, general_corpus_id=corpus["id"]).json()
    _assert_public(lineage, "lin")
    job_id = add_domain(client, alice, lineage["id"], "news")
    assert SHAPE["job"].match(job_id)
    got = client.get(f"/v1/lineages/{lineage['id']}", headers=alice.headers).json()
    _assert_public(got, "lin")
    assert got["general_corpus_id"] == corpus["id"]
    stage = got["stages"][0]
    assert stage["job_id"] == job_id and SHAPE["cor"].match(stage["corpus_id"])
    job = client.get(f"/v1/jobs/{job_id}", headers=alice.headers).json()
    _assert_public(job, "job")
    assert job["lineage_id"] == lineage["id"]
    events = client.get(f"/v1/jobs/{job_id}/events", headers=alice.headers).json()["data"]
    assert [e["id"] for e in events] == [1]  # numbered within the job
    assert events[0]["job_id"] == job_id
    assert events[0]["data"]["corpus_id"] == stage["corpus_id"]  # the queued event, public
    for url in (f"/v1/jobs?lineage_id={lineage['id']}", "/v1/lineages", "/v1/corpora"):
        _assert_public(client.get(url, headers=alice.headers).json())
    keys = client.get("/v1/api-keys", headers=alice.headers).json()["data"]
    assert keys and all(SHAPE["key"].match(k["id"]) for k in keys)
    for path in (f"/v1/jobs/{job_id}/checkpoints", f"/v1/jobs/{job_id}/metrics"):
        _assert_public(client.get(path, headers=alice.headers).json(), "job")


def test_ids_reveal_no_order_or_count_across_owners(client, alice, bob):
    """Bob's rows created between alice's leave no trace in alice's ids, and bob's first
    job numbers its events from 1 however many events alice's jobs have."""
    lineage = create_lineage(client, alice).json()["id"]
    first = add_domain(client, alice, lineage, "news")
    busy = by_public_id_events(client, first)
    for _ in range(3):
        create_lineage(client, bob)
    second = create_lineage(client, alice).json()["id"]
    ids = [lineage, second]
    assert all(SHAPE["lin"].match(i) for i in ids) and len(set(ids)) == 2
    # the random part is not a counter: no shared prefix beyond chance, no digits-only tail
    assert not all(i[4:].isdigit() for i in ids)
    bobs_job = add_domain(client, bob, create_lineage(client, bob).json()["id"], "law")
    events = client.get(f"/v1/jobs/{bobs_job}/events", headers=bob.headers).json()["data"]
    assert busy >= 1 and [e["id"] for e in events] == [1]


def by_public_id_events(client: TestClient, job_id: str) -> int:
    """Add a few events to a job (as a worker would) and return how many it has."""
    with client.app.state.session_factory() as session, session.begin():
        row = by_public(session, Job, job_id).id
        for i in range(5):
            add_event(session, row, "progress", f"step {i}", data={"step": i})
    with client.app.state.session_factory() as session:
        return session.scalar(sa.select(sa.func.count()).where(JobEvent.job_id == row))


@pytest.mark.parametrize(
    "path",
    ["/v1/lineages/{}", "/v1/lineages/{}/metrics", "/v1/corpora/{}", "/v1/jobs/{}"],
)
def test_integer_malformed_and_wrong_type_ids_are_the_same_404(client, alice, path):
    lineage = create_lineage(client, alice).json()["id"]
    resource = path.split("/")[2]
    code = {"lineages": "lineage", "corpora": "corpus", "jobs": "job"}[resource]
    for bad in (
        "1",
        "0",
        "-1",
        str(2**70),
        "abc",
        "lin_short",
        lineage.upper(),
        f"job_{'A' * 20}",
        "lin_" + "A" * 19 + "%00",
        "lin_" + "A" * 21,
        lineage[:-1] + "_",
    ):
        if resource == "lineages" and bad == lineage:
            continue
        r = client.get(path.format(bad), headers=alice.headers)
        body = assert_problem(r, 404, f"{code}_not_found")
        assert "\x00" not in body["detail"]


def test_a_body_reference_by_integer_or_unknown_id_is_a_404(client, alice, bob):
    lineage = create_lineage(client, alice).json()["id"]
    url = f"/v1/lineages/{lineage}/domains"
    bobs = upload(client, bob, "news.txt", corpus_text("news")).json()["id"]
    for corpus in (1, "1", f"cor_{'Q' * 20}", bobs):
        r = client.post(url, headers=alice.headers, json={"corpus_id": corpus, "name": "news"})
        body = assert_problem(r, 404, "corpus_not_found")
        assert bobs not in body["detail"] or corpus == bobs
    r = client.post(
        "/v1/lineages",
        headers=alice.headers,
        json={"name": "x", "base_model": "tiny-roberta", "general_corpus_id": 7},
    )
    assert_problem(r, 404, "corpus_not_found")
    assert_problem(client.get("/v1/jobs?lineage_id=1", headers=alice.headers), 404)


def test_cursors_are_public_ids_and_paginate(client):
    owner = new_owner(client.app)
    made = [create_lineage(client, owner, name=f"l{i}").json()["id"] for i in range(5)]
    seen, after = [], ""
    while True:
        page = client.get(f"/v1/lineages?limit=2&after={after}", headers=owner.headers).json()
        seen += [lin["id"] for lin in page["data"]]
        if not page["has_more"]:
            assert page["next_after"] is None
            break
        after = page["next_after"]
        assert SHAPE["lin"].match(after)
    assert seen == made
    other = new_owner(client.app)  # another owner's cursor is no cursor of yours
    r = client.get(f"/v1/lineages?after={made[1]}", headers=other.headers)
    assert_problem(r, 422, "validation_error")
    for bad in ("12", "lin_x", f"cor_{'A' * 20}"):
        r = client.get(f"/v1/lineages?after={bad}", headers=owner.headers)
        assert_problem(r, 422, "validation_error")


def test_key_revoke_and_rotate_take_public_ids(client):
    owner = new_owner(client.app)
    created = client.post("/v1/api-keys", headers=owner.headers).json()
    assert SHAPE["key"].match(created["id"])
    assert_problem(client.delete("/v1/api-keys/1", headers=owner.headers), 404)
    assert client.delete(f"/v1/api-keys/{created['id']}", headers=owner.headers).status_code == 204
    r = client.post(f"/v1/api-keys/{created['id']}/rotate", headers=owner.headers)
    assert_problem(r, 409, "api_key_revoked")
    assert created["id"] in r.json()["detail"]


# -- migration 0006 on rows created before it ----------------------------------------------

_TYPES = {"report": sa.JSON, "hyperparameters": sa.JSON, "data": sa.JSON}


def _insert(conn: sa.Connection, table: str, **values: Any) -> int:
    """A row as the 0005 schema stores it (no model: its columns are the new schema's)."""
    now = datetime.now(UTC)
    values.setdefault("created_at", now)
    if table == "jobs":
        values.setdefault("updated_at", now)
    columns = [
        sa.column(k, UTCDateTime() if k.endswith("_at") else _TYPES.get(k, sa.types.NullType)())
        for k in values
    ]
    stmt = sa.table(table, sa.column("id"), *columns).insert().values(**values)
    return conn.execute(stmt.returning(sa.column("id"))).scalar_one()


def _seed_old_rows(url: str, key: str) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        _insert(conn, "api_keys", owner="old", prefix=key[:12], key_hash=hash_key(key))
        corpus = _insert(
            conn,
            "corpora",
            owner="old",
            filename="news.txt",
            storage_path="uploads/gone.txt",
            format="txt",
            compressed=False,
            bytes=10,
            sha256="0" * 64,
            documents=1,
            characters=10,
            status="ready",
            report={},
        )
        lineage = _insert(
            conn,
            "lineages",
            owner="old",
            name="before",
            base_model="tiny-roberta",
            architecture="roberta",
            objective="mlm",
            strategy="das",
            hyperparameters={},
        )
        jobs = []
        for position, name in ((1, "news"), (2, "law")):
            stage = _insert(
                conn,
                "stages",
                lineage_id=lineage,
                position=position,
                name=name,
                active_name=name,
                corpus_id=corpus,
            )
            jobs.append(
                _insert(
                    conn,
                    "jobs",
                    stage_id=stage,
                    lineage_id=lineage,
                    owner="old",
                    status="queued",
                    progress=0.0,
                    trained_tokens=0,
                    attempts=0,
                )
            )
        _insert(
            conn,
            "job_events",
            job_id=jobs[0],
            level="info",
            type="queued",
            message="e0",
            data={"corpus_id": corpus, "position": 1},
        )
        for i, job in enumerate([jobs[1], jobs[0], jobs[0], jobs[1]], start=1):  # interleaved
            _insert(
                conn,
                "job_events",
                job_id=job,
                level="info",
                type="t",
                message=f"e{i}",
                data={"i": i},
            )
        url = f"/v1/lineages/{lineage}/stages/2"
        _insert(
            conn,
            "job_events",
            job_id=jobs[1],
            level="info",
            type="result",
            message="e5",
            data={"checkpoint_url": f"{url}/checkpoint", "steps": 3},
        )
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def old_database(request, tmp_path):  # noqa: ANN001, ANN201
    """Settings of an empty database migrated to 0005 (before public ids)."""
    if request.param == "sqlite":
        settings = make_settings(tmp_path / "data")
        upgrade(settings, "0005")
        yield settings
        return
    require_services("postgres")
    import psycopg

    name = f"das_test_{secrets.token_hex(6)}"
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        url = f"postgresql://postgres@127.0.0.1:5432/{name}"
        settings = make_settings(tmp_path / "data", database_url=url)
        upgrade(settings, "0005")
        yield settings
    finally:
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_the_upgrade_gives_existing_rows_public_ids_and_event_numbers(old_database):
    settings = old_database
    key = "das_" + secrets.token_urlsafe(32)
    _seed_old_rows(settings.resolved_database_url, key)
    upgrade(settings)
    app = create_app(settings, enqueue=EnqueueRecorder(), broker_ping=lambda: None)
    headers = {"Authorization": f"Bearer {key}"}
    with TestClient(app, raise_server_exceptions=False) as client:
        lineages = client.get("/v1/lineages", headers=headers).json()["data"]
        assert len(lineages) == 1
        lineage = lineages[0]
        _assert_public(lineage, "lin")
        corpus = lineage["stages"][0]["corpus_id"]
        assert client.get(f"/v1/corpora/{corpus}", headers=headers).status_code == 200
        first, second = (s["job_id"] for s in lineage["stages"])
        assert first != second
        url = "/v1/jobs/{}/events"
        one = client.get(url.format(first), headers=headers).json()["data"]
        two = client.get(url.format(second), headers=headers).json()["data"]
        assert [(e["id"], e["message"]) for e in one] == [(1, "e0"), (2, "e2"), (3, "e3")]
        assert [(e["id"], e["message"]) for e in two] == [(1, "e1"), (2, "e4"), (3, "e5")]
        # ids inside the data of old events are the public ones now, and lead somewhere
        assert one[0]["data"] == {"corpus_id": corpus, "position": 1}
        result = two[-1]["data"]
        assert result == {
            "checkpoint_url": f"/v1/lineages/{lineage['id']}/stages/2/checkpoint",
            "steps": 3,
        }
        keys = client.get("/v1/api-keys", headers=headers).json()["data"]
        assert len(keys) == 1 and SHAPE["key"].match(keys[0]["id"])
        # new events go on from the backfilled numbers
        with app.state.session_factory() as session, session.begin():
            add_event(session, by_public(session, Job, first).id, "t", "after the upgrade")
        # (the page may come from the job's watch: it sees the insert within a poll tick)
        wait_for(
            lambda: len(client.get(url.format(first), headers=headers).json()["data"]) == 4,
            10,
            "the new event",
        )
        one = client.get(url.format(first), headers=headers).json()["data"]
        assert [e["id"] for e in one] == [1, 2, 3, 4]
        # rows made after the upgrade get ids at insert
        new = client.post(
            "/v1/lineages", headers=headers, json={"name": "after", "base_model": "tiny-roberta"}
        )
        assert new.status_code == 201, new.text
        assert SHAPE["lin"].match(new.json()["id"]) and new.json()["id"] != lineage["id"]
    with app.state.session_factory() as session:
        public = session.scalars(sa.select(Lineage.public_id)).all()
        assert len(set(public)) == len(public) == 2
