"""Webhooks: endpoints (owner-scoped, validated, SSRF-guarded), the outbox written with each
job status change, and the dispatcher thread delivering signed events to a real HTTP
receiver on loopback, with retries, back-off and a delivery log. On SQLite here; the
PostgreSQL case (concurrent dispatchers, a real Celery worker) is in
test_webhooks_postgres.py."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from app.main import create_app
from app.migrate import upgrade
from service_core.lifecycle import finish_job
from service_core.models import JOB_FAILED, Job, WebhookDelivery, WebhookEndpoint
from service_core.webhook_dispatch import (
    Claimed,
    WebhookDispatcher,
    backoff,
    make_client,
    purge_finished,
    send,
)
from service_core.webhook_events import EVENT_TYPES, encode_body
from tests.service.conftest import (
    add_domain,
    assert_problem,
    by_public,
    create_lineage,
    in_process_runner,
    make_settings,
    new_owner,
    row_id,
    wait_for,
)
from tests.service.webhook_receiver import closed_port_url, receiver, verify

BACKOFF_S = 0.4
MAX_ATTEMPTS = 3
WEBHOOK_SETTINGS = {
    "webhook_allow_private": True,
    "webhook_backoff_seconds": BACKOFF_S,
    "webhook_poll_seconds": 0.05,
    "webhook_timeout_seconds": 3.0,
    "webhook_max_attempts": MAX_ATTEMPTS,
}


@pytest.fixture(scope="module")
def env(tmp_path_factory):  # noqa: ANN201
    """(settings, app, client, runner): the API and the job runner on SQLite, and the
    dispatcher thread as a worker process runs it."""
    data = tmp_path_factory.mktemp("webhooks")
    with in_process_runner(data, **WEBHOOK_SETTINGS) as (settings, app, client, runner, _):
        dispatcher = WebhookDispatcher(settings, app.state.session_factory)
        dispatcher.start()
        try:
            yield settings, app, client, runner
        finally:
            dispatcher.stop()
            dispatcher.join(timeout=10)
            assert not dispatcher.is_alive()


@pytest.fixture
def hook():  # noqa: ANN201
    with receiver() as r:
        yield r


def _register(client, owner, url, **body):  # noqa: ANN001, ANN202
    r = client.post("/v1/webhooks", headers=owner.headers, json={"url": url, **body})
    assert r.status_code == 201, r.text
    return r.json()


def _log(client, owner, webhook_id, **params):  # noqa: ANN001, ANN202
    r = client.get(f"/v1/webhooks/{webhook_id}/deliveries", headers=owner.headers, params=params)
    assert r.status_code == 200, r.text
    return r.json()["data"]


def _queued_job(client, owner) -> int:  # noqa: ANN001
    lineage = create_lineage(client, owner).json()["id"]
    return add_domain(client, owner, lineage, "news")


def _cancelled_job(client, owner) -> int:  # noqa: ANN001
    job = _queued_job(client, owner)
    assert client.post(f"/v1/jobs/{job}/cancel", headers=owner.headers).status_code == 202
    return job


def _settled(client, owner, webhook_id, count):  # noqa: ANN001, ANN202
    """The log once ``count`` deliveries are no longer pending."""

    def done():  # noqa: ANN202
        rows = _log(client, owner, webhook_id)
        finished = [d for d in rows if d["status"] != "pending"]
        return rows if len(finished) >= count else None

    return wait_for(done, 30, f"{count} settled deliveries", interval=0.05)


# -- the endpoints ------------------------------------------------------------------------------


def test_register_read_list_delete_with_a_unicode_description(env, hook):
    _, app, client, _ = env
    owner = new_owner(app)
    description = "CI 🚀 データ עברית e\u0301"
    created = _register(client, owner, hook.url, description=description)
    assert created["secret"].startswith("whsec_") and len(created["secret"]) > 30
    assert created["events"] == list(EVENT_TYPES) and created["description"] == description
    got = client.get(f"/v1/webhooks/{created['id']}", headers=owner.headers)
    assert got.status_code == 200
    assert got.json() == {k: v for k, v in created.items() if k != "secret"}
    listed = client.get("/v1/webhooks", headers=owner.headers).json()
    assert [w["id"] for w in listed["data"]] == [created["id"]] and "secret" not in listed["data"][
        0
    ]
    some = _register(client, owner, hook.url, events=["job.failed", "job.succeeded", "job.failed"])
    assert some["events"] == ["job.failed", "job.succeeded"]  # duplicates dropped
    page = client.get("/v1/webhooks", headers=owner.headers, params={"limit": 1}).json()
    assert page["has_more"] and page["next_after"]
    rest = client.get(
        "/v1/webhooks", headers=owner.headers, params={"limit": 1, "after": page["next_after"]}
    ).json()
    assert [w["id"] for w in rest["data"]] == [some["id"]] and not rest["has_more"]
    assert client.delete(f"/v1/webhooks/{created['id']}", headers=owner.headers).status_code == 204
    assert_problem(
        client.get(f"/v1/webhooks/{created['id']}", headers=owner.headers), 404, "webhook_not_found"
    )
    listed = client.get("/v1/webhooks", headers=owner.headers).json()
    assert [w["id"] for w in listed["data"]] == [some["id"]]


def test_another_owners_endpoint_is_a_404(env, hook):
    _, app, client, _ = env
    alice, bob = new_owner(app), new_owner(app)
    webhook = _register(client, alice, hook.url)["id"]
    for method, path in (
        ("get", f"/v1/webhooks/{webhook}"),
        ("get", f"/v1/webhooks/{webhook}/deliveries"),
        ("delete", f"/v1/webhooks/{webhook}"),
        ("post", f"/v1/webhooks/{webhook}/rotate-secret"),
    ):
        r = client.request(method, path, headers=bob.headers)
        assert_problem(r, 404, "webhook_not_found")
    assert client.get("/v1/webhooks", headers=bob.headers).json()["data"] == []
    assert client.get(f"/v1/webhooks/{webhook}", headers=alice.headers).status_code == 200


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"url": "ftp://example.com/x"}, "url"),
        ({"url": "https://user:pw@example.com/x"}, "url"),
        ({"url": "https://example.com/x#frag"}, "url"),
        ({"url": "https://example.com:99999/"}, "url"),
        ({"url": "https://exa mple.com/"}, "url"),
        ({"url": "https://example.com/" + "a" * 2100}, "url"),
        ({"url": ""}, "url"),
        ({"url": "https://example.com/", "events": ["job.exploded"]}, "events"),
        ({"url": "https://example.com/", "events": []}, "events"),
        ({"url": "https://example.com/", "description": "x" * 501}, "description"),
        ({"url": "https://example.com/", "description": "a\x00b"}, "description"),
        ({"url": "https://example.com/", "secret": "mine"}, "secret"),
        ({}, "url"),
    ],
)
def test_invalid_registrations_are_422_problems(env, body, field):
    _, app, client, _ = env
    owner = new_owner(app)
    problem = assert_problem(client.post("/v1/webhooks", headers=owner.headers, json=body), 422)
    assert any(field in e.get("field", "") for e in problem["errors"]), problem
    assert client.get("/v1/webhooks", headers=owner.headers).json()["data"] == []


def test_a_lone_surrogate_in_the_description_is_a_422(env):
    _, app, client, _ = env
    owner = new_owner(app)
    raw = b'{"url": "https://example.com/", "description": "x\\udfff"}'
    r = client.post(
        "/v1/webhooks", headers={**owner.headers, "Content-Type": "application/json"}, content=raw
    )
    assert_problem(r, 422)
    assert client.get("/v1/webhooks", headers=owner.headers).json()["data"] == []


def test_private_addresses_are_refused_unless_allowed(tmp_path, env, hook):
    """The default (DAS_WEBHOOK_ALLOW_PRIVATE unset) refuses loopback, private, link-local
    and multicast hosts at registration, and again at delivery."""
    from fastapi.testclient import TestClient

    strict = make_settings(tmp_path)
    assert strict.webhook_allow_private is False
    upgrade(strict)
    app = create_app(strict, enqueue=lambda ids: list(ids), broker_ping=lambda: None)
    owner = new_owner(app)
    with TestClient(app, raise_server_exceptions=False) as client:
        for url in (
            hook.url,  # 127.0.0.1
            hook.url.replace("127.0.0.1", "localhost"),
            "http://[::1]:8080/x",
            "http://[::ffff:127.0.0.1]/x",
            "https://10.1.2.3/x",
            "https://192.168.0.10/x",
            "http://169.254.169.254/latest/meta-data",
            "http://224.0.0.1/x",
            "http://0.0.0.0/x",
        ):
            r = client.post("/v1/webhooks", headers=owner.headers, json={"url": url})
            problem = assert_problem(r, 422, "invalid_webhook_url")
            assert "not public" in problem["detail"], url
        # a public address is accepted (nothing is sent at registration)
        assert (
            client.post(
                "/v1/webhooks", headers=owner.headers, json={"url": "https://93.184.215.14/h"}
            ).status_code
            == 201
        )
    app.state.engine.dispose()
    # at delivery: an endpoint registered while private addresses were allowed
    claimed = Claimed(1, 1, 1, "evt_test", hook.url, "whsec_" + "A" * 32, b"{}")
    with make_client(strict) as http:
        outcome = send(http, strict, claimed)
    assert outcome.error == "unsafe_address" and outcome.status_code is None
    assert hook.received() == []


def test_endpoints_per_owner_are_capped(tmp_path):
    from fastapi.testclient import TestClient

    capped = make_settings(tmp_path, webhook_max_endpoints=2)
    upgrade(capped)
    app = create_app(capped, enqueue=lambda ids: list(ids), broker_ping=lambda: None)
    owner, other = new_owner(app), new_owner(app)
    body = {"url": "https://93.184.215.14/h"}
    with TestClient(app, raise_server_exceptions=False) as client:
        ids = [client.post("/v1/webhooks", headers=owner.headers, json=body).json()["id"]]
        ids.append(client.post("/v1/webhooks", headers=owner.headers, json=body).json()["id"])
        problem = assert_problem(
            client.post("/v1/webhooks", headers=owner.headers, json=body),
            403,
            "webhook_limit_reached",
        )
        assert problem["limit"] == 2 and problem["value"] == 3
        assert client.post("/v1/webhooks", headers=other.headers, json=body).status_code == 201
        client.delete(f"/v1/webhooks/{ids[0]}", headers=owner.headers)  # frees a place
        assert client.post("/v1/webhooks", headers=owner.headers, json=body).status_code == 201
    app.state.engine.dispose()


# -- deliveries ---------------------------------------------------------------------------------


def test_a_job_run_by_the_worker_is_announced_signed_in_order(env, hook):
    settings, app, client, runner = env
    owner = new_owner(app)
    endpoint = _register(client, owner, hook.url)
    job = _queued_job(client, owner)
    assert runner.run(job) == "succeeded"
    wait_for(lambda: len(hook.of_job(job)) >= 3, 30, "three events", interval=0.05)
    got = hook.of_job(job)
    assert [r.json["type"] for r in got] == ["job.queued", "job.running", "job.succeeded"]
    assert [r.json["data"]["job"]["status"] for r in got] == ["queued", "running", "succeeded"]
    final = client.get(f"/v1/jobs/{job}", headers=owner.headers).json()
    assert got[-1].json["data"]["job"] == final  # the same body as GET /v1/jobs/{id}
    now = time.time()
    for r in got:
        assert verify(endpoint["secret"], r), r.headers
        assert r.headers["webhook-id"] == r.json["id"] and r.json["id"].startswith("evt_")
        assert abs(int(r.headers["webhook-timestamp"]) - now) < 120
        assert r.headers["content-type"] == "application/json" and r.path == "/hooks"
        assert datetime.fromisoformat(r.json["created_at"]).tzinfo is not None
    assert len({r.json["id"] for r in got}) == 3
    tampered = got[0]
    tampered.body = tampered.body.replace(b'"queued"', b'"running"', 1)
    assert not verify(endpoint["secret"], tampered)
    log = _settled(client, owner, endpoint["id"], 3)
    assert [(d["event_type"], d["job_id"], d["status"], d["attempts"]) for d in log] == [
        ("job.queued", job, "delivered", 1),
        ("job.running", job, "delivered", 1),
        ("job.succeeded", job, "delivered", 1),
    ]
    for d in log:
        assert d["last_status_code"] == 200 and d["last_error"] is None
        assert d["delivered_at"] >= d["created_at"] and d["next_attempt_at"] is None


def test_only_the_subscribed_events_of_the_owners_jobs_are_sent(env, hook):
    _, app, client, _ = env
    alice, bob = new_owner(app), new_owner(app)
    endpoint = _register(client, alice, hook.url, events=["job.cancelled"])
    mine = _cancelled_job(client, alice)  # queued (not subscribed), then cancelled
    _cancelled_job(client, bob)  # another owner's job: nothing for alice's endpoint
    log = _settled(client, alice, endpoint["id"], 1)
    assert [(d["event_type"], d["job_id"]) for d in log] == [("job.cancelled", mine)]
    assert [r.json["type"] for r in hook.received()] == ["job.cancelled"]


def test_a_failing_receiver_gets_retried_with_growing_delays(env, hook):
    _, app, client, _ = env
    owner = new_owner(app)
    endpoint = _register(client, owner, hook.url, events=["job.cancelled"])
    hook.answer(500, 503)  # then 200
    job = _cancelled_job(client, owner)
    (delivery,) = _settled(client, owner, endpoint["id"], 1)
    assert delivery["status"] == "delivered" and delivery["attempts"] == 3
    assert delivery["last_status_code"] == 200 and delivery["job_id"] == job
    got = hook.received()
    assert len(got) == 3 and len({r.headers["webhook-id"] for r in got}) == 1
    assert all(verify(endpoint["secret"], r) for r in got)
    first_wait, second_wait = got[1].at - got[0].at, got[2].at - got[1].at
    # base, then twice the base (each plus up to 25 % jitter)
    assert first_wait >= BACKOFF_S * 0.95, (first_wait, second_wait)
    assert second_wait >= 2 * BACKOFF_S * 0.95 and second_wait > first_wait, (
        first_wait,
        second_wait,
    )


def test_a_slow_endpoint_does_not_hold_up_another(env):
    _, app, client, _ = env
    owner = new_owner(app)
    with receiver() as slow, receiver() as fast:
        slow.delay = 2.0  # under the 3 s timeout: delivered, one after the other
        hooks = [
            _register(client, owner, r.url, events=["job.cancelled"])["id"] for r in (slow, fast)
        ]
        for _ in range(2):
            _cancelled_job(client, owner)
        _settled(client, owner, hooks[1], 2)
        _settled(client, owner, hooks[0], 2)
        # both events reached the fast endpoint while the slow one still held its first
        assert max(r.at for r in fast.received()) < min(r.at for r in slow.received()) + 2.0
        first, second = slow.received()
        assert second.at - first.at >= 2.0  # one endpoint: one request at a time, in order
        assert [r.json["data"]["job"]["id"] for r in slow.received()] == [
            r.json["data"]["job"]["id"] for r in fast.received()
        ]


def test_a_dead_receiver_ends_failed_after_the_last_attempt(env):
    _, app, client, _ = env
    owner = new_owner(app)
    endpoint = _register(client, owner, closed_port_url(), events=["job.cancelled"])
    _cancelled_job(client, owner)
    (delivery,) = _settled(client, owner, endpoint["id"], 1)
    assert delivery["status"] == "failed" and delivery["attempts"] == MAX_ATTEMPTS
    assert delivery["last_error"] == "connect_error" and delivery["last_status_code"] is None
    assert delivery["next_attempt_at"] is None and delivery["delivered_at"] is None
    assert _log(client, owner, endpoint["id"], status="failed") == [delivery]
    assert _log(client, owner, endpoint["id"], status="delivered") == []


def test_redirects_are_not_followed(env, hook):
    _, app, client, _ = env
    owner = new_owner(app)
    endpoint = _register(client, owner, hook.url, events=["job.cancelled"])
    hook.answer(*([307] * MAX_ATTEMPTS))
    _cancelled_job(client, owner)
    (delivery,) = _settled(client, owner, endpoint["id"], 1)
    assert delivery["status"] == "failed" and delivery["last_status_code"] == 307
    assert [r.path for r in hook.received()] == ["/hooks"] * MAX_ATTEMPTS  # never /moved


def test_a_named_host_is_called_at_its_checked_address_under_its_own_name(env, hook):
    """The delivery resolves the name once, checks the address and connects to it (no
    second resolution to rebind), with the URL's name in ``Host``."""
    _, app, client, _ = env
    owner = new_owner(app)
    named = hook.url.replace("127.0.0.1", "localhost")
    endpoint = _register(client, owner, named, events=["job.cancelled"])
    _cancelled_job(client, owner)
    (delivery,) = _settled(client, owner, endpoint["id"], 1)
    assert delivery["status"] == "delivered"
    (request,) = hook.received()
    assert request.headers["host"] == named.split("/")[2]  # localhost:<port>


def test_a_rotated_secret_signs_the_next_deliveries(env, hook):
    _, app, client, _ = env
    owner = new_owner(app)
    endpoint = _register(client, owner, hook.url, events=["job.cancelled"])
    r = client.post(f"/v1/webhooks/{endpoint['id']}/rotate-secret", headers=owner.headers)
    assert r.status_code == 200, r.text
    rotated = r.json()
    assert rotated["secret"] != endpoint["secret"] and rotated["secret_rotated_at"]
    _cancelled_job(client, owner)
    _settled(client, owner, endpoint["id"], 1)
    (request,) = hook.received()
    assert verify(rotated["secret"], request) and not verify(endpoint["secret"], request)


def _row(app, endpoint: dict) -> int:  # noqa: ANN001
    """The endpoint's row id (outbox rows reference it; users see ``whk_…``)."""
    return row_id(app, WebhookEndpoint, endpoint["id"])


def test_deleting_an_endpoint_cancels_its_pending_deliveries(env):
    _, app, client, _ = env
    owner = new_owner(app)
    endpoint = _register(client, owner, closed_port_url(), events=["job.cancelled"])
    _cancelled_job(client, owner)
    assert client.delete(f"/v1/webhooks/{endpoint['id']}", headers=owner.headers).status_code == 204
    with app.state.session_factory() as session:
        rows = session.scalars(
            select(WebhookDelivery).where(WebhookDelivery.endpoint_id == _row(app, endpoint))
        ).all()
    # (``failed`` only if all its attempts were made before the DELETE)
    assert len(rows) == 1 and rows[0].status in ("cancelled", "failed")
    assert rows[0].next_attempt_at is None


def test_an_event_is_written_only_with_its_status_change(env, hook):
    """The outbox row shares the status change's transaction: a rollback loses both."""
    _, app, client, _ = env
    owner = new_owner(app)
    endpoint = _register(client, owner, hook.url, events=["job.failed"])
    job_id = _queued_job(client, owner)
    endpoint_row = _row(app, endpoint)
    with app.state.session_factory() as session:
        with session.begin():
            job = by_public(session, Job, job_id)
            finish_job(session, job, JOB_FAILED, error={"code": "x", "message": "y"})
            session.flush()
            pending = session.scalars(
                select(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint_row)
            ).all()
            assert [d.event_type for d in pending] == ["job.failed"]
            session.rollback()
    assert _log(client, owner, endpoint["id"]) == []
    assert client.get(f"/v1/jobs/{job_id}", headers=owner.headers).json()["status"] == "queued"


def test_finished_deliveries_leave_the_log_after_the_retention_period(env):
    settings, app, client, _ = env
    owner = new_owner(app)
    endpoint = _register(client, owner, closed_port_url(), events=["job.queued"])
    job = row_id(app, Job, _queued_job(client, owner))
    later = datetime.now(UTC) + timedelta(days=settings.webhook_retention_days + 1)
    endpoint_row = _row(app, endpoint)
    with app.state.session_factory() as session, session.begin():
        (row,) = session.scalars(
            select(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint_row)
        ).all()
        # pending, not due before ``later`` (attempts reset: an attempt in flight now records
        # nothing): kept
        row.status, row.next_attempt_at, row.attempts = "pending", later, 0
        old = WebhookDelivery(
            endpoint_id=row.endpoint_id,
            event_id="evt_old_" + str(row.id),
            event_type="job.queued",
            job_id=job,
            payload={},
            status="delivered",
        )
        session.add(old)
    with app.state.session_factory() as session, session.begin():
        assert purge_finished(session, settings, now=later) >= 1  # (earlier tests' rows too)
    assert [d["status"] for d in _log(client, owner, endpoint["id"])] == ["pending"]


def test_backoff_doubles_with_bounded_jitter_and_a_cap():
    settings = make_settings(
        Path("/nonexistent"),
        webhook_backoff_seconds=30,
        webhook_backoff_max_seconds=600,
    )
    assert [backoff(settings, n, rand=lambda: 0.0) for n in (1, 2, 3, 4)] == [30, 60, 120, 240]
    assert backoff(settings, 2, rand=lambda: 0.999) < 60 * 1.25
    assert backoff(settings, 10, rand=lambda: 0.5) == 600
    assert backoff(settings, 1000, rand=lambda: 0.5) == 600  # no overflow


def test_the_body_is_compact_utf8_json(env):
    body = encode_body({"id": "evt_1", "data": {"job": {"domain": "データ"}}})
    assert body == '{"id":"evt_1","data":{"job":{"domain":"データ"}}}'.encode()
    assert json.loads(body)["data"]["job"]["domain"] == "データ"


def test_openapi_documents_the_webhook_routes(env):
    _, app, _, _ = env
    paths = app.openapi()["paths"]
    assert set(paths["/v1/webhooks"]) == {"get", "post"}
    assert set(paths["/v1/webhooks/{webhook_id}"]) == {"get", "delete"}
    assert set(paths["/v1/webhooks/{webhook_id}/rotate-secret"]) == {"post"}
    assert set(paths["/v1/webhooks/{webhook_id}/deliveries"]) == {"get"}
    created = paths["/v1/webhooks"]["post"]["responses"]["201"]["content"]["application/json"]
    assert created["schema"]["$ref"].endswith("/WebhookCreated")
    schemas = app.openapi()["components"]["schemas"]
    assert schemas["WebhookCreate"]["properties"]["events"]["anyOf"][0]["items"]["enum"] == list(
        EVENT_TYPES
    )
    assert "secret" not in schemas["WebhookOut"]["properties"]
    sent = app.openapi()["webhooks"]["job-status-changed"]["post"]
    body = sent["requestBody"]["content"]["application/json"]["schema"]
    assert body["$ref"].endswith("/WebhookEvent") and set(sent["responses"]) == {"200"}
    event = schemas["WebhookEvent"]["properties"]
    assert event["data"]["$ref"].endswith("/WebhookEventData")
    assert schemas["WebhookEventData"]["properties"]["job"]["$ref"].endswith("/JobOut")
    assert "job-status-changed" not in str(app.openapi()["paths"])  # documented, not served
