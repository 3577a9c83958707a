"""Status without polling storms: ETag / If-None-Match on job reads (304, answered without
the database once the job is watched), and the events route as server-sent events."""

from __future__ import annotations

import json
import threading
import time

import pytest
from sqlalchemy import event, update

from service_core.models import JOB_RUNNING, JOB_SUCCEEDED, Job, JobEvent
from tests.service.conftest import add_domain, assert_problem, by_public, create_lineage


@pytest.fixture
def job_id(client, alice) -> int:  # noqa: ANN001
    lineage = create_lineage(client, alice).json()["id"]
    return add_domain(client, alice, lineage, "news")


def _set_job(api, job_id: int, **values) -> None:  # noqa: ANN001
    with api.state.session_factory() as session, session.begin():
        session.execute(update(Job).where(Job.public_id == job_id).values(**values))


def _add_events(api, job_id: int, n: int, start: int = 0) -> None:  # noqa: ANN001
    with api.state.session_factory() as session, session.begin():
        row = by_public(session, Job, job_id).id
        for i in range(start, start + n):
            session.add(JobEvent(job_id=row, type="progress", message=f"step {i}", data={"i": i}))


def _wait_until(predicate, timeout: float = 5.0) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


class StatementCounter:
    def __init__(self, engine) -> None:  # noqa: ANN001
        self.engine, self.count = engine, 0

    def _on(self, *_args) -> None:  # noqa: ANN002
        self.count += 1

    def __enter__(self) -> StatementCounter:
        event.listen(self.engine, "before_cursor_execute", self._on)
        return self

    def __exit__(self, *_exc) -> None:  # noqa: ANN002
        event.remove(self.engine, "before_cursor_execute", self._on)


def test_job_read_has_etag_and_answers_304_until_it_changes(api, client, alice, job_id) -> None:  # noqa: ANN001
    first = client.get(f"/v1/jobs/{job_id}", headers=alice.headers)
    assert first.status_code == 200
    etag = first.headers["etag"]
    conditional = {**alice.headers, "If-None-Match": etag}
    again = client.get(f"/v1/jobs/{job_id}", headers=conditional)
    assert again.status_code == 304 and again.content == b""
    assert again.headers["etag"] == etag
    assert (
        client.get(f"/v1/jobs/{job_id}", headers={**conditional, "If-None-Match": "*"}).status_code
        == 304
    )
    assert (
        client.get(
            f"/v1/jobs/{job_id}", headers={**alice.headers, "If-None-Match": '"x"'}
        ).status_code
        == 200
    )

    _set_job(api, job_id, status=JOB_RUNNING, phase="training", step=3, progress=0.3)
    # within a poll tick the cached tag is replaced: the poll sees the change
    assert _wait_until(
        lambda: client.get(f"/v1/jobs/{job_id}", headers=conditional).status_code == 200
    )
    changed = client.get(f"/v1/jobs/{job_id}", headers=conditional)
    assert changed.json()["step"] == 3 and changed.headers["etag"] != etag


def test_a_watched_job_is_read_without_the_database(api, client, alice, job_id) -> None:  # noqa: ANN001
    """A watched job answers both a current ``If-None-Match`` (304) and a plain read (200,
    the route's exact bytes and tag) from the watch: no SQL statement at all."""
    first = client.get(f"/v1/jobs/{job_id}", headers=alice.headers)
    etag = first.headers["etag"]
    conditional = {**alice.headers, "If-None-Match": etag}
    client.get(f"/v1/jobs/{job_id}", headers=conditional)  # starts the watch
    assert _wait_until(lambda: api.state.job_watcher.cached(job_id) is not None)
    watcher = api.state.job_watcher
    watcher.poll_seconds = 3600  # the watch's next sleep is long: no background query
    try:
        time.sleep(0.3)
        with StatementCounter(api.state.engine) as fast:
            r = client.get(f"/v1/jobs/{job_id}", headers=conditional)
        with StatementCounter(api.state.engine) as plain_fast:
            plain = client.get(f"/v1/jobs/{job_id}", headers=alice.headers)
        with StatementCounter(api.state.engine) as slow:
            page = client.get(f"/v1/jobs/{job_id}/events?stream=false", headers=alice.headers)
    finally:
        watcher.poll_seconds = api.state.settings.stream_poll_seconds
    assert r.status_code == 304
    assert plain.status_code == 200 and plain.content == first.content
    assert plain.headers["etag"] == etag and plain.headers["content-type"] == "application/json"
    assert page.status_code == 200
    # neither read from the watch ran a statement; the route (a parameter the fast path
    # leaves to it) did: auth, job, events
    assert fast.count == 0 and plain_fast.count == 0 and slow.count >= 2


def test_a_plain_read_sees_a_change_within_a_poll_tick(api, client, alice, job_id) -> None:  # noqa: ANN001
    client.get(f"/v1/jobs/{job_id}", headers=alice.headers)  # starts the watch
    assert _wait_until(lambda: api.state.job_watcher.cached(job_id) is not None)
    _set_job(api, job_id, status=JOB_RUNNING, phase="training", step=5, progress=0.5)
    assert _wait_until(
        lambda: client.get(f"/v1/jobs/{job_id}", headers=alice.headers).json()["step"] == 5
    )


def test_another_owners_tag_is_a_404_never_a_304(api, client, alice, bob, job_id) -> None:  # noqa: ANN001
    etag = client.get(f"/v1/jobs/{job_id}", headers=alice.headers).headers["etag"]
    client.get(f"/v1/jobs/{job_id}", headers={**alice.headers, "If-None-Match": etag})
    assert _wait_until(lambda: api.state.job_watcher.cached(job_id) is not None)
    client.get("/v1/lineages", headers=bob.headers)  # bob's key is verified and cached
    for _ in range(2):
        r = client.get(f"/v1/jobs/{job_id}", headers={**bob.headers, "If-None-Match": etag})
        assert_problem(r, 404, "job_not_found")
        r = client.get(f"/v1/jobs/{job_id}/events", headers={**bob.headers, "If-None-Match": "*"})
        assert_problem(r, 404, "job_not_found")
    bad = {"Authorization": "Bearer das_not-a-key", "If-None-Match": etag}
    assert_problem(client.get(f"/v1/jobs/{job_id}", headers=bad), 401)


def test_events_page_etag_changes_only_with_a_new_event(api, client, alice, job_id) -> None:  # noqa: ANN001
    url = f"/v1/jobs/{job_id}/events?limit=50"
    page = client.get(url, headers=alice.headers)
    etag = page.headers["etag"]
    conditional = {**alice.headers, "If-None-Match": etag}
    assert client.get(url, headers=conditional).status_code == 304
    _set_job(api, job_id, progress=0.5)  # the job changed, its events did not
    time.sleep(0.2)
    assert client.get(url, headers=conditional).status_code == 304
    _add_events(api, job_id, 1)
    assert _wait_until(lambda: client.get(url, headers=conditional).status_code == 200)
    fresh = client.get(url, headers=conditional).json()["data"]
    assert fresh[-1]["message"] == "step 0"
    assert len(fresh) == len(page.json()["data"]) + 1


def _walk_pages(client, job_id: int, headers: dict, limit: int) -> list[bytes]:  # noqa: ANN001
    """Every events page of ``job_id`` in turn, following ``next_after``."""
    bodies, after = [], ""
    while True:
        r = client.get(f"/v1/jobs/{job_id}/events?limit={limit}&after={after}", headers=headers)
        assert r.status_code == 200
        bodies.append(r.content)
        after = r.json()["next_after"]
        if after is None:
            return bodies


def test_events_pages_of_a_watched_job_come_from_its_ring(api, client, alice, job_id) -> None:  # noqa: ANN001
    """Once watched, an events page (any ``after`` the ring covers) is answered from the
    watch: the same bytes as the route, no SQL statement."""
    _add_events(api, job_id, 7)
    from_route = _walk_pages(client, job_id, alice.headers, limit=3)  # starts the watch
    assert len(from_route) >= 3
    assert _wait_until(lambda: api.state.job_watcher.cached(job_id) is not None)
    watcher = api.state.job_watcher
    watcher.poll_seconds = 3600  # no background query while counting
    try:
        time.sleep(0.3)
        with StatementCounter(api.state.engine) as counter:
            from_ring = _walk_pages(client, job_id, alice.headers, limit=3)
    finally:
        watcher.poll_seconds = api.state.settings.stream_poll_seconds
    assert from_ring == from_route
    assert counter.count == 0


def _read_stream(client, url: str, headers: dict, until_end: bool = True) -> list[tuple]:  # noqa: ANN001
    """[(kind, id, data)] of a server-sent-event stream, read until ``event: end``."""
    out: list[tuple] = []
    with client.stream("GET", url, headers=headers) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        kind, ident, data = "message", None, None
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("id: "):
                ident = int(line[4:])
            elif line.startswith("data: "):
                data = json.loads(line[6:])
            elif line == "":
                if data is not None:
                    out.append((kind, ident, data))
                    if kind == "end" and until_end:
                        break
                kind, ident, data = "message", None, None
    return out


def test_stream_sends_every_event_then_the_job_and_ends(api, client, alice, job_id) -> None:  # noqa: ANN001
    _add_events(api, job_id, 3)
    _set_job(api, job_id, status=JOB_SUCCEEDED, progress=1.0)
    got = _read_stream(client, f"/v1/jobs/{job_id}/events?stream=true", alice.headers)
    messages = [d for k, _, d in got if k == "message"]
    assert [m["message"] for m in messages][-3:] == ["step 0", "step 1", "step 2"]
    assert [i for k, i, _ in got if k == "message"] == [m["id"] for m in messages]
    jobs = [d for k, _, d in got if k == "job"]
    assert jobs and jobs[-1]["status"] == "succeeded"
    assert got[-1][0] == "end" and got[-1][2]["status"] == "succeeded"


def test_stream_is_live(api, client, alice, job_id) -> None:  # noqa: ANN001
    _set_job(api, job_id, status=JOB_RUNNING, phase="training")

    def produce() -> None:
        for i in range(5):
            time.sleep(0.15)
            _add_events(api, job_id, 1, start=i)
            _set_job(api, job_id, step=i + 1, progress=(i + 1) / 10)
        time.sleep(0.15)
        _set_job(api, job_id, status=JOB_SUCCEEDED, progress=1.0)

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        got = _read_stream(client, f"/v1/jobs/{job_id}/events?stream=true", alice.headers)
    finally:
        producer.join()
    steps = [d["message"] for k, _, d in got if k == "message" and d["type"] == "progress"]
    assert steps == [f"step {i}" for i in range(5)]
    seen_steps = [d["step"] for k, _, d in got if k == "job" and d["step"] is not None]
    assert seen_steps == sorted(seen_steps) and len(seen_steps) >= 2  # updates as they happen
    assert got[-1][0] == "end" and got[-1][2]["status"] == "succeeded"


def test_stream_resumes_after_last_event_id_and_204_when_done(api, client, alice, job_id) -> None:  # noqa: ANN001
    _add_events(api, job_id, 4)
    _set_job(api, job_id, status=JOB_SUCCEEDED, progress=1.0)
    page = client.get(f"/v1/jobs/{job_id}/events", headers=alice.headers).json()["data"]
    middle = page[-2]["id"]
    url = f"/v1/jobs/{job_id}/events?stream=true"
    got = _read_stream(client, url, {**alice.headers, "Last-Event-ID": str(middle)})
    assert [d["message"] for k, _, d in got if k == "message"] == ["step 3"]
    done = client.get(url, headers={**alice.headers, "Last-Event-ID": str(page[-1]["id"])})
    assert done.status_code == 204  # EventSource stops reconnecting
    assert_problem(client.get(url, headers={**alice.headers, "Last-Event-ID": "abc"}), 422)
    assert_problem(client.get(f"{url}&after=x1", headers=alice.headers), 422)


def test_a_cancel_is_seen_at_once_by_conditional_reads(api, client, alice, job_id) -> None:  # noqa: ANN001
    etag = client.get(f"/v1/jobs/{job_id}", headers=alice.headers).headers["etag"]
    conditional = {**alice.headers, "If-None-Match": etag}
    client.get(f"/v1/jobs/{job_id}", headers=conditional)
    assert _wait_until(lambda: api.state.job_watcher.cached(job_id) is not None)
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=alice.headers).status_code == 202
    r = client.get(f"/v1/jobs/{job_id}", headers=conditional)
    assert r.status_code == 200 and r.json()["status"] in ("cancelling", "cancelled")


def test_a_stream_of_a_running_job_closes_after_the_max_time_without_end(
    api, client, alice, job_id, monkeypatch
) -> None:  # noqa: ANN001
    _set_job(api, job_id, status=JOB_RUNNING, phase="training")
    monkeypatch.setattr(api.state.settings, "stream_max_seconds", 0.5)
    started = time.monotonic()
    got = _read_stream(client, f"/v1/jobs/{job_id}/events?stream=true", alice.headers)
    assert time.monotonic() - started < 10
    assert "end" not in [k for k, _, _ in got]  # not finished: the client reconnects
    assert [d["status"] for k, _, d in got if k == "job"] == ["running"]


def test_open_streams_hold_no_database_connection(api, client, alice, job_id) -> None:  # noqa: ANN001
    """More open streams than the connection pool has connections: reads still answer."""
    _set_job(api, job_id, status=JOB_RUNNING, phase="training")
    pool = api.state.engine.pool
    streams = [
        client.stream("GET", f"/v1/jobs/{job_id}/events?stream=true", headers=alice.headers)
        for _ in range(pool.size() + 5)
    ]
    opened = [s.__enter__() for s in streams]
    try:
        assert all(r.status_code == 200 for r in opened)
        assert client.get(f"/v1/jobs/{job_id}", headers=alice.headers).status_code == 200
        assert pool.checkedout() <= 2
    finally:
        _set_job(api, job_id, status=JOB_SUCCEEDED, progress=1.0)
        for s in streams:
            s.__exit__(None, None, None)
