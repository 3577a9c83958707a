"""Security checks not covered by ``tests/service``:

- an API key (or the prefix used to look its row up) never reaches a log record, for a wrong
  key, a right one, a request failing inside the database (the bound parameters are hidden)
  or anywhere else in the app;
- error bodies carry no secret: the password of the database or broker URL, a bearer token;
- keys are compared in constant time (``hmac.compare_digest``) on the lookup path;
- every route that takes an id, artifact downloads included (with ``Range``, ``If-Range`` and
  ``If-None-Match`` too), answers 404 to another owner, exactly like an unknown id.
"""

from __future__ import annotations

import io
import logging
import re
import sqlite3

import pytest
from sqlalchemy import event

from app.main import create_app
from tests.service.conftest import (
    add_domain,
    assert_problem,
    create_lineage,
    in_process_runner,
    new_owner,
    upload,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):  # noqa: ANN201
    """An app where alice owns a corpus, a lineage with a trained stage and a queued one, an
    API key and a webhook endpoint."""
    with in_process_runner(tmp_path_factory.mktemp("security")) as env:
        settings, app, client, runner, _ = env
        alice = new_owner(app)
        corpus = upload(client, alice, "a.txt", b"alice's private words\n").json()["id"]
        lineage = create_lineage(client, alice).json()["id"]
        first = add_domain(client, alice, lineage, "news")
        assert runner.run(first) == "succeeded"
        second = add_domain(client, alice, lineage, "law")
        ids = {"lineage_id": lineage, "corpus_id": corpus, "job_id": second, "position": 1}
        ids["key_id"] = client.get("/v1/api-keys", headers=alice.headers).json()["data"][0]["id"]
        hook = {"url": "https://93.184.215.14/alice"}  # public: no connection at registration
        webhook = client.post("/v1/webhooks", headers=alice.headers, json=hook)
        ids["webhook_id"] = webhook.json()["id"]
        yield settings, app, client, alice, ids


def _everything_logged(caplog) -> str:  # noqa: ANN001
    return "\n".join(
        f"{r.name} {r.getMessage()} {r.exc_text or ''}"
        + (
            "\n".join(logging.Formatter().formatException(r.exc_info).splitlines())
            if r.exc_info
            else ""
        )
        for r in caplog.records
    )


def test_api_keys_never_reach_the_logs(trained, caplog, monkeypatch):
    settings, app, client, alice, ids = trained
    wrong = "das_" + "Z" * 43
    same_prefix = alice.key[:12] + "x" * (len(alice.key) - 12)
    caplog.set_level(logging.DEBUG)
    for key in (wrong, same_prefix, alice.key):
        for path in ("/v1/lineages", f"/v1/jobs/{ids['job_id']}", "/v1/nowhere"):
            client.get(path, headers={"Authorization": f"Bearer {key}"})
        client.post(
            "/v1/lineages",
            headers={"Authorization": f"Bearer {key}"},
            json={"name": "x", "base_model": "no-such-model"},
        )

    # a request that fails inside the database, while looking the key up (a 500: logged with
    # its traceback) -- the bound parameters (the key's prefix) are hidden from the message
    def broken(_conn, _cursor, statement, *_rest):  # noqa: ANN001, ANN202
        if "api_keys" in statement:
            raise sqlite3.DatabaseError("database disk image is malformed (test)")

    event.listen(app.state.engine, "before_cursor_execute", broken)
    try:
        assert_problem(client.get("/v1/lineages", headers=alice.headers), 500, "internal_error")
    finally:
        event.remove(app.state.engine, "before_cursor_execute", broken)
    logged = _everything_logged(caplog)
    assert "unhandled error" in logged and "api_keys" in logged  # the failure was logged
    for secret in (wrong, same_prefix, alice.key, alice.key[:12], alice.key[4:12]):
        assert secret not in logged


def test_error_bodies_carry_no_secret(settings, caplog):
    """/readyz with a database and a broker that refuse: their URLs' passwords stay out of
    the 503 body and of the logs."""
    s = settings.model_copy(
        update={
            "database_url": "postgresql://das:db-pass-Secret1@127.0.0.1:9/das",
            "celery_broker_url": "redis://:broker-pass-Secret2@127.0.0.1:9/0",
        }
    )
    caplog.set_level(logging.DEBUG)
    app = create_app(s)
    from fastapi.testclient import TestClient

    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.get("/readyz")
        body = assert_problem(r, 503, "not_ready")
        assert body["checks"]["database"].startswith("unreachable")
        assert body["checks"]["broker"].startswith("unreachable")
        bearer = "das_" + "Q" * 43
        unauthorized = c.get("/v1/lineages", headers={"Authorization": f"Bearer {bearer}"})
    app.state.engine.dispose()
    for text in (r.text, unauthorized.text, _everything_logged(caplog)):
        assert "Secret1" not in text and "Secret2" not in text
    assert bearer not in unauthorized.text


def test_keys_are_compared_in_constant_time(trained, monkeypatch):
    import hmac

    import app.auth as auth

    _, _, client, alice, _ = trained
    calls: list[tuple[str, str]] = []
    real = hmac.compare_digest

    def spy(a, b):  # noqa: ANN001, ANN202
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    forged = alice.key[:12] + "x" * (len(alice.key) - 12)  # same lookup prefix, wrong key
    assert_problem(client.get("/v1/lineages", headers={"Authorization": f"Bearer {forged}"}), 401)
    assert client.get("/v1/lineages", headers=alice.headers).status_code == 200
    assert len(calls) == 2  # both decided by compare_digest on the SHA-256 digests
    assert all(len(a) == len(b) == 64 for a, b in calls)
    assert calls[1][1] == auth.hash_key(alice.key)


# -- owner isolation on every route ----------------------------------------------------------

ARTIFACT_HEADERS = [
    {},
    {"Range": "bytes=0-99"},
    {"Range": "bytes=-10", "If-Range": "*"},
    {"If-None-Match": "*"},
]


# well-formed ids that name nothing (an id is a type prefix and 20 random characters)
UNKNOWN = {
    f"{name}_id": f"{prefix}_{'Z' * 20}"
    for name, prefix in [("lineage", "lin"), ("corpus", "cor"), ("job", "job"), ("key", "key")]
}


def _routes_with_ids(app) -> list[tuple[str, str]]:  # noqa: ANN001
    """(method, path template) of every documented operation whose path holds an id."""
    return [
        (method.upper(), path)
        for path, item in app.openapi()["paths"].items()
        if "{" in path
        for method in item
    ]


def test_every_route_with_an_id_is_404_to_another_owner(trained):
    settings, app, client, alice, ids = trained
    bob = new_owner(app)
    routes = _routes_with_ids(app)
    assert len(routes) >= 9
    # alice's artifacts exist and are hers (and the ETag bob would send is the real one)
    own = client.get(f"/v1/lineages/{ids['lineage_id']}/stages/1/checkpoint", headers=alice.headers)
    assert own.status_code == 200
    etag = own.headers["etag"]
    for method, template in routes:
        path = re.sub(r"\{(\w+)\}", lambda m: str(ids[m.group(1)]), template)
        variants = ARTIFACT_HEADERS + [
            {"If-None-Match": etag},
            {"If-Range": etag, "Range": "bytes=5-"},
        ]
        for extra in variants if template.endswith(("checkpoint", "importance")) else [{}]:
            kwargs = {}
            if method == "POST" and template.endswith("/domains"):
                kwargs["json"] = {"corpus_id": ids["corpus_id"], "name": "stolen"}
            if method == "POST" and template.endswith("/fork"):
                kwargs["json"] = {"name": "stolen", "from_stage": 1}
            if method == "PUT" and template.endswith("/end-task"):
                kwargs["json"] = {"end_task_corpus_id": ids["corpus_id"]}
            r = client.request(method, path, headers={**bob.headers, **extra}, **kwargs)
            if method == "HEAD":  # no body to read: the status and the headers say it
                assert r.status_code == 404 and "etag" not in r.headers, (path, extra)
                assert r.headers["content-type"].startswith("application/problem+json")
                continue
            body = assert_problem(r, 404)
            assert body["code"].endswith("_not_found"), (method, path, body)
            assert "private" not in r.text and "etag" not in r.headers
        # exactly like an id that does not exist
        missing = re.sub(r"\{(\w+)\}", lambda m: UNKNOWN.get(m.group(1), "999999"), template)
        unknown_corpus = UNKNOWN["corpus_id"]
        kwargs = (
            {"json": {"corpus_id": unknown_corpus, "name": "x"}}
            if template.endswith("/domains")
            else {}
        )
        if template.endswith("/fork"):
            kwargs = {"json": {"name": "x", "from_stage": 1}}
        if template.endswith("/end-task"):
            kwargs = {"json": {"end_task_corpus_id": unknown_corpus}}
        assert client.request(method, missing, headers=bob.headers, **kwargs).status_code == 404
    # bob's own corpus cannot be attached to alice's lineage either, nor alice's to bob's
    bobs_lineage = create_lineage(client, bob).json()["id"]
    r = client.post(
        f"/v1/lineages/{bobs_lineage}/domains",
        headers=bob.headers,
        json={"corpus_id": ids["corpus_id"], "name": "stolen"},
    )
    assert_problem(r, 404, "corpus_not_found")
    r = client.post(
        f"/v1/lineages/{bobs_lineage}/domains",
        headers=bob.headers,
        data={"name": "x", "eval_corpus_id": str(ids["corpus_id"])},
        files={"file": ("x.txt", io.BytesIO(b"bob's words\n"))},
    )
    assert_problem(r, 404, "corpus_not_found")
    # and nothing of bob's attempts changed alice's lineage
    stages = client.get(f"/v1/lineages/{ids['lineage_id']}", headers=alice.headers).json()
    assert [s["name"] for s in stages["stages"]] == ["news", "law"]
    assert client.get(f"/v1/jobs/{ids['job_id']}", headers=alice.headers).json()["status"] == (
        "queued"
    )


def test_head_requests_do_not_bypass_ownership(trained):
    _, app, client, _, ids = trained
    bob = new_owner(app)
    url = f"/v1/lineages/{ids['lineage_id']}/stages/1/checkpoint"
    r = client.head(url, headers=bob.headers)
    assert r.status_code in (404, 405) and "etag" not in r.headers
