"""Lifecycle routes through the API on SQLite, without training (jobs are moved by hand):
deleting corpora and lineages, the job list, step checkpoints and the per-step series read
from stored events, API keys, HEAD on artifacts, fork refusals."""

from __future__ import annotations

import fcntl
import json
import time
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from service_core.models import Corpus, Job, JobEvent, Lineage, utcnow
from service_core.purge import purge_deleted_lineages
from service_core.storage import remove_lineage_tree, resolve_stored
from tests.service.conftest import (
    assert_problem,
    by_public,
    corpus_text,
    create_lineage,
    lineage_path,
    new_owner,
    row_id,
    upload,
)


def _lineage(client, owner, **body) -> int:  # noqa: ANN001
    r = create_lineage(client, owner, **body)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _corpus(client, owner, domain="news") -> int:  # noqa: ANN001
    r = upload(client, owner, f"{domain}.txt", corpus_text(domain))
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _domain(client, owner, lineage_id, corpus_id, name) -> dict:  # noqa: ANN001
    r = client.post(
        f"/v1/lineages/{lineage_id}/domains",
        headers=owner.headers,
        json={"corpus_id": corpus_id, "name": name},
    )
    assert r.status_code == 202, r.text
    return r.json()


def _set_status(api, job_id: int, status: str) -> None:  # noqa: ANN001
    with api.state.session_factory() as session, session.begin():
        job = by_public(session, Job, job_id)
        job.status = status
        if status == "running" and job.started_at is None:
            job.started_at = utcnow()


def _fake_lineage_files(settings, lineage_id: int) -> None:  # noqa: ANN001
    root = lineage_path(settings, lineage_id)
    (root / "stages" / "001-news" / "model").mkdir(parents=True, exist_ok=True)
    (root / "stages" / "001-news" / "model" / "model.safetensors").write_bytes(b"x" * 64)
    (root / "importance").mkdir(exist_ok=True)
    (root / "importance" / "general.safetensors").write_bytes(b"y" * 64)
    (root / "lineage.json").write_text("{}")


# -- DELETE /v1/corpora/{id} ---------------------------------------------------------------------


def test_delete_a_corpus_removes_its_file(api, client, alice, bob, settings):
    corpus = _corpus(client, alice)
    with api.state.session_factory() as session:
        path = resolve_stored(settings, by_public(session, Corpus, corpus).storage_path)
    assert path.is_file()
    assert_problem(client.delete(f"/v1/corpora/{corpus}", headers=bob.headers), 404)
    r = client.delete(f"/v1/corpora/{corpus}", headers=alice.headers)
    assert r.status_code == 204 and r.content == b""
    assert not path.exists() and not path.parent.exists()
    assert_problem(client.get(f"/v1/corpora/{corpus}", headers=alice.headers), 404)
    ids = [c["id"] for c in client.get("/v1/corpora", headers=alice.headers).json()["data"]]
    assert corpus not in ids
    assert_problem(client.delete(f"/v1/corpora/{corpus}", headers=alice.headers), 404)


def test_a_corpus_in_use_is_409_until_its_stage_finished(api, client, alice):
    lineage = _lineage(client, alice)
    corpus = _corpus(client, alice)
    job = _domain(client, alice, lineage, corpus, "news")["job"]["id"]
    body = assert_problem(
        client.delete(f"/v1/corpora/{corpus}", headers=alice.headers), 409, "corpus_in_use"
    )
    assert str(job) in body["detail"]
    _set_status(api, job, "running")
    assert_problem(client.delete(f"/v1/corpora/{corpus}", headers=alice.headers), 409)
    _set_status(api, job, "succeeded")
    assert client.delete(f"/v1/corpora/{corpus}", headers=alice.headers).status_code == 204
    # the finished stage keeps naming its corpus; the corpus itself answers 404
    stage = client.get(f"/v1/lineages/{lineage}", headers=alice.headers).json()["stages"][0]
    assert stage["corpus_id"] == corpus
    # a deleted corpus cannot be used again
    other = _lineage(client, alice)
    r = client.post(
        f"/v1/lineages/{other}/domains",
        headers=alice.headers,
        json={"corpus_id": corpus, "name": "news"},
    )
    assert_problem(r, 404, "corpus_not_found")


def test_a_general_corpus_is_409_until_the_lineage_trained_a_stage(api, client, alice):
    general = _corpus(client, alice, "bio")
    lineage = _lineage(client, alice, general_corpus_id=general)
    assert_problem(client.delete(f"/v1/corpora/{general}", headers=alice.headers), 409)
    job = _domain(client, alice, lineage, _corpus(client, alice), "news")["job"]["id"]
    _set_status(api, job, "succeeded")
    assert client.delete(f"/v1/corpora/{general}", headers=alice.headers).status_code == 204


# -- DELETE /v1/lineages/{id} --------------------------------------------------------------------


def test_delete_a_lineage_cancels_queued_jobs_and_removes_only_its_files(
    api, client, alice, bob, settings
):
    lineage = _lineage(client, alice)
    neighbour = _lineage(client, alice)
    corpus = _corpus(client, alice)
    jobs = [_domain(client, alice, lineage, corpus, n)["job"]["id"] for n in ("news", "law")]
    _fake_lineage_files(settings, lineage)
    _fake_lineage_files(settings, neighbour)
    assert_problem(client.delete(f"/v1/lineages/{lineage}", headers=bob.headers), 404)
    r = client.delete(f"/v1/lineages/{lineage}", headers=alice.headers)
    assert r.status_code == 204
    assert not lineage_path(settings, lineage).exists()
    assert (lineage_path(settings, neighbour) / "stages" / "001-news" / "model").is_dir()
    assert_problem(client.get(f"/v1/lineages/{lineage}", headers=alice.headers), 404)
    assert_problem(client.get(f"/v1/lineages/{lineage}/metrics", headers=alice.headers), 404)
    for job in jobs:
        assert_problem(client.get(f"/v1/jobs/{job}", headers=alice.headers), 404)
    listed = [x["id"] for x in client.get("/v1/lineages", headers=alice.headers).json()["data"]]
    assert lineage not in listed and neighbour in listed
    with api.state.session_factory() as session:
        assert {by_public(session, Job, j).status for j in jobs} == {"cancelled"}
        assert by_public(session, Lineage, lineage).files_removed_at is not None
    assert_problem(client.delete(f"/v1/lineages/{lineage}", headers=alice.headers), 404)
    # its corpus is free again: no unfinished stage uses it
    assert client.delete(f"/v1/corpora/{corpus}", headers=alice.headers).status_code == 204


def test_a_training_lineage_is_409_unless_forced(api, client, alice, settings):
    lineage = _lineage(client, alice)
    corpus = _corpus(client, alice)
    running = _domain(client, alice, lineage, corpus, "news")["job"]["id"]
    queued = _domain(client, alice, lineage, corpus, "law")["job"]["id"]
    _set_status(api, running, "running")
    _fake_lineage_files(settings, lineage)
    assert_problem(
        client.delete(f"/v1/lineages/{lineage}", headers=alice.headers), 409, "lineage_training"
    )
    assert client.get(f"/v1/lineages/{lineage}", headers=alice.headers).status_code == 200
    r = client.delete(f"/v1/lineages/{lineage}?force=true", headers=alice.headers)
    assert r.status_code == 204
    assert_problem(client.get(f"/v1/lineages/{lineage}", headers=alice.headers), 404)
    with api.state.session_factory() as session:
        assert by_public(session, Job, running).status == "cancelling"
        assert by_public(session, Job, queued).status == "cancelled"
    # the worker has not stopped yet: the files stay, and a sweep leaves them too
    assert lineage_path(settings, lineage).is_dir()
    assert row_id(api, Lineage, lineage) not in purge_deleted_lineages(
        settings, api.state.session_factory
    )
    # the worker records the cancel: the next sweep removes them
    _set_status(api, running, "cancelled")
    assert row_id(api, Lineage, lineage) in purge_deleted_lineages(
        settings, api.state.session_factory
    )
    assert not lineage_path(settings, lineage).exists()


def test_a_folder_locked_by_a_trainer_is_not_removed(tmp_path):
    root = tmp_path / "7"
    root.mkdir()
    (root / "model.bin").write_bytes(b"w")
    with open(root / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert remove_lineage_tree(root) is False and (root / "model.bin").exists()
    assert remove_lineage_tree(root) is True and not root.exists()


# -- GET /v1/jobs --------------------------------------------------------------------------------


def test_list_jobs_filters_and_validates(api, client, alice, bob):
    first, second = _lineage(client, alice), _lineage(client, alice)
    corpus = _corpus(client, alice)
    a = _domain(client, alice, first, corpus, "news")["job"]["id"]
    b = _domain(client, alice, first, corpus, "law")["job"]["id"]
    c = _domain(client, alice, second, corpus, "news")["job"]["id"]
    _set_status(api, b, "running")

    def ids(query: str, owner=alice) -> list[int]:  # noqa: ANN001
        r = client.get(f"/v1/jobs{query}", headers=owner.headers)
        assert r.status_code == 200, r.text
        return [j["id"] for j in r.json()["data"]]

    assert ids("") == [a, b, c]
    assert ids("?status=queued") == [a, c]
    assert ids("?status=running,queued") == [a, b, c]
    assert ids(f"?lineage_id={first}") == [a, b]
    assert ids(f"?lineage_id={second}&status=running") == []
    assert ids("", owner=bob) == []
    body = assert_problem(client.get("/v1/jobs?status=done", headers=alice.headers), 422)
    assert body["errors"][0]["field"] == "status"
    assert_problem(client.get(f"/v1/jobs?lineage_id={first}", headers=bob.headers), 404)
    assert_problem(client.get("/v1/jobs?after=x", headers=alice.headers), 422)
    job = client.get("/v1/jobs?limit=1", headers=alice.headers).json()["data"][0]
    assert job == client.get(f"/v1/jobs/{a}", headers=alice.headers).json()


@pytest.fixture(scope="module")
def five_jobs(api):  # noqa: ANN001, ANN201
    from fastapi.testclient import TestClient

    owner = new_owner(api)
    with TestClient(api) as client:
        lineage = _lineage(client, owner)
        corpus = _corpus(client, owner)
        jobs = [_domain(client, owner, lineage, corpus, f"d{i}")["job"]["id"] for i in range(5)]
    return owner, jobs


@hsettings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(limit=st.integers(min_value=1, max_value=6))
def test_job_pages_concatenate_to_the_whole_list(client, five_jobs, limit):
    owner, jobs = five_jobs
    seen, after, pages = [], "", 0
    while True:
        page = client.get(f"/v1/jobs?limit={limit}&after={after}", headers=owner.headers).json()
        seen += [j["id"] for j in page["data"]]
        pages += 1
        if not page["has_more"]:
            assert page["next_after"] is None
            break
        after = page["next_after"]
    assert seen == jobs and pages == max(1, -(-len(jobs) // limit))


# -- checkpoints and the per-step series -------------------------------------------------------


def test_step_checkpoints_of_a_training_job_are_listed(api, client, alice, bob, settings):
    lineage = _lineage(client, alice)
    job = _domain(client, alice, lineage, _corpus(client, alice), "news")["job"]["id"]
    assert client.get(f"/v1/jobs/{job}/checkpoints", headers=alice.headers).json()["data"] == []
    _set_status(api, job, "running")
    partial = lineage_path(settings, lineage) / "stages" / "001-news.partial"
    for step in (4, 6):
        folder = partial / "checkpoints" / f"step-{step:08d}"
        folder.mkdir(parents=True)
        (folder / "trainer.json").write_text(json.dumps({"step": step, "trained_tokens": 1}))
    (partial / "checkpoints" / "step-00000008").mkdir()  # being written: no trainer.json yet
    (partial / "stage.json").write_text(json.dumps({"name": "news", "position": 1}))
    r = client.get(f"/v1/jobs/{job}/checkpoints", headers=alice.headers)
    assert r.status_code == 200
    data = r.json()["data"]
    assert [(c["step"], c["final"], c["downloadable"]) for c in data] == [
        (4, False, False),
        (6, False, False),
    ]
    assert_problem(client.get(f"/v1/jobs/{job}/checkpoints", headers=bob.headers), 404)


def test_the_step_series_is_read_from_progress_events(api, client, alice, bob):
    lineage = _lineage(client, alice)
    job = _domain(client, alice, lineage, _corpus(client, alice), "news")["job"]["id"]
    start = utcnow() - timedelta(seconds=30)
    with api.state.session_factory() as session, session.begin():
        row = by_public(session, Job, job)
        row.status, row.started_at = "running", start

        def event(seconds: float, type_: str, **data) -> None:  # noqa: ANN003
            session.add(
                JobEvent(
                    job_id=row.id,
                    type=type_,
                    created_at=start + timedelta(seconds=seconds),
                    data=data,
                )
            )

        event(1, "phase", phase="importance", step=1, total=2)
        event(2, "phase", phase="training", step=1, total=20, loss=9.0, tokens_per_s=100.0)
        event(3, "progress", phase="training", step=10, total=20, loss=8.0, tokens_per_s=120.0)
        # a resumed attempt reports step 10 again, then goes on
        event(9, "progress", phase="training", step=10, total=20, loss=7.5, tokens_per_s=90.0)
        event(10, "progress", phase="training", step=20, total=20, loss=7.0, trained_tokens=640)
        event(11, "phase", phase="evaluating", step=0, total=1)
    r = client.get(f"/v1/jobs/{job}/metrics", headers=alice.headers)
    assert r.status_code == 200, r.text
    body = r.json()
    series = [(p["step"], p["train_loss"], p["tokens_per_s"]) for p in body["series"]]
    assert series == [(1, 9.0, 100.0), (10, 7.5, 90.0), (20, 7.0, None)]
    assert [p["elapsed_s"] for p in body["series"]] == pytest.approx([2.0, 9.0, 10.0])
    assert body["series"][-1]["trained_tokens"] == 640
    assert body["eval_loss"] is None and body["eval_losses"] == {}
    assert_problem(client.get(f"/v1/jobs/{job}/metrics", headers=bob.headers), 404)


# -- API keys --------------------------------------------------------------------------------------


def test_api_keys_list_rotate_and_revoke(api, client, bob):
    owner = new_owner(api)
    listed = client.get("/v1/api-keys", headers=owner.headers).json()["data"]
    assert len(listed) == 1 and set(listed[0]) == {"id", "prefix", "created_at", "revoked_at"}
    assert owner.key.startswith(listed[0]["prefix"]) and listed[0]["revoked_at"] is None
    first = listed[0]["id"]
    assert_problem(client.post(f"/v1/api-keys/{first}/rotate", headers=bob.headers), 404)
    assert_problem(client.delete(f"/v1/api-keys/{first}", headers=bob.headers), 404)

    rotated = client.post(f"/v1/api-keys/{first}/rotate", headers=owner.headers)
    assert rotated.status_code == 201, rotated.text
    new_key = rotated.json()["key"]
    assert new_key != owner.key and new_key.startswith(rotated.json()["prefix"])
    old = client.get("/v1/lineages", headers=owner.headers)
    assert_problem(old, 401, "unauthorized")
    new_headers = {"Authorization": f"Bearer {new_key}"}
    keys = client.get("/v1/api-keys", headers=new_headers).json()["data"]
    assert [k["id"] for k in keys] == [first, rotated.json()["id"]]
    assert keys[0]["revoked_at"] is not None and keys[1]["revoked_at"] is None
    assert new_key not in json.dumps(keys)
    assert_problem(client.post(f"/v1/api-keys/{first}/rotate", headers=new_headers), 409)

    extra = client.post("/v1/api-keys", headers=new_headers)
    assert extra.status_code == 201
    extra_headers = {"Authorization": f"Bearer {extra.json()['key']}"}
    assert client.get("/v1/lineages", headers=extra_headers).status_code == 200
    gone = client.delete(f"/v1/api-keys/{extra.json()['id']}", headers=new_headers)
    assert gone.status_code == 204
    assert_problem(client.get("/v1/lineages", headers=extra_headers), 401)
    # revoking again is harmless; the key used for the request still works
    assert (
        client.delete(f"/v1/api-keys/{extra.json()['id']}", headers=new_headers).status_code == 204
    )
    assert client.get("/v1/lineages", headers=new_headers).status_code == 200


# -- HEAD and fork before anything trained ------------------------------------------------------


def test_head_of_an_unfinished_artifact_is_409(client, alice):
    lineage = _lineage(client, alice)
    _domain(client, alice, lineage, _corpus(client, alice), "news")
    r = client.head(f"/v1/lineages/{lineage}/stages/1/checkpoint", headers=alice.headers)
    assert r.status_code == 409
    r = client.head(f"/v1/lineages/{lineage}/stages/5/importance", headers=alice.headers)
    assert r.status_code == 404


def test_fork_refusals(client, alice, bob):
    lineage = _lineage(client, alice)
    _domain(client, alice, lineage, _corpus(client, alice), "news")
    url = f"/v1/lineages/{lineage}/fork"
    plain = client.get(f"/v1/lineages/{lineage}", headers=alice.headers).json()
    assert plain["forked_from_id"] is None and plain["forked_from_position"] is None
    assert_problem(
        client.post(url, headers=alice.headers, json={"name": "b", "from_stage": 1}),
        409,
        "stage_not_ready",
    )
    assert_problem(
        client.post(url, headers=alice.headers, json={"name": "b", "from_stage": 3}),
        404,
        "stage_not_found",
    )
    assert_problem(
        client.post(url, headers=alice.headers, json={"name": "b", "from_stage": "law"}), 404
    )
    assert_problem(client.post(url, headers=bob.headers, json={"name": "b", "from_stage": 1}), 404)
    assert_problem(client.post(url, headers=alice.headers, json={"from_stage": 1}), 422)
    assert_problem(
        client.post(url, headers=alice.headers, json={"name": "b", "from_stage": 1, "x": 1}), 422
    )


# -- the conditional-read fast path (app/conditional_reads.py) ------------------------------------


def _wait_until(predicate, timeout: float = 5.0) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def _watched(api, client, owner, job_id: int) -> dict[str, str]:  # noqa: ANN001
    """Headers of a conditional read of the job that the process's watch answers 304."""
    etag = client.get(f"/v1/jobs/{job_id}", headers=owner.headers).headers["etag"]
    conditional = {**owner.headers, "If-None-Match": etag}
    client.get(f"/v1/jobs/{job_id}", headers=conditional)  # starts the watch
    assert _wait_until(lambda: api.state.job_watcher.cached(job_id) is not None)
    assert client.get(f"/v1/jobs/{job_id}", headers=conditional).status_code == 304
    return conditional


def test_conditional_reads_of_a_deleted_lineage_are_404(api, client):
    owner = new_owner(api)
    corpus = _corpus(client, owner)
    # by this process: at once, although a succeeded job's tag does not change
    lineage = _lineage(client, owner)
    job = _domain(client, owner, lineage, corpus, "news")["job"]["id"]
    _set_status(api, job, "succeeded")
    conditional = _watched(api, client, owner, job)
    assert client.delete(f"/v1/lineages/{lineage}", headers=owner.headers).status_code == 204
    assert_problem(client.get(f"/v1/jobs/{job}", headers=conditional), 404, "job_not_found")
    # by another process (the row marked directly): within a poll of the watch, not only
    # once the key cache expires (made long here, so that only the watch can tell)
    other = _lineage(client, owner)
    job = _domain(client, owner, other, corpus, "news")["job"]["id"]
    _set_status(api, job, "succeeded")
    ttl, api.state.key_cache.ttl = api.state.key_cache.ttl, 600.0
    try:
        conditional = _watched(api, client, owner, job)
        with api.state.session_factory() as session, session.begin():
            by_public(session, Lineage, other).deleted_at = utcnow()
        assert _wait_until(
            lambda: client.get(f"/v1/jobs/{job}", headers=conditional).status_code == 404,
            timeout=30,
        )
    finally:
        api.state.key_cache.ttl = ttl
        api.state.key_cache.clear()


def test_conditional_reads_with_a_revoked_key_are_401(api, client):
    owner = new_owner(api)
    lineage = _lineage(client, owner)
    job = _domain(client, owner, lineage, _corpus(client, owner), "news")["job"]["id"]
    conditional = _watched(api, client, owner, job)
    key_id = client.get("/v1/api-keys", headers=owner.headers).json()["data"][0]["id"]
    assert client.delete(f"/v1/api-keys/{key_id}", headers=owner.headers).status_code == 204
    assert_problem(client.get(f"/v1/jobs/{job}", headers=conditional), 401)
