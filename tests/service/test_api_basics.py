"""Auth, problem+json for every error, health, OpenAPI, body limits, CORS."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from tests.service.conftest import assert_problem, make_settings, new_owner

LIN, COR, JOB = "lin_" + "A" * 20, "cor_" + "A" * 20, "job_" + "A" * 20  # well-formed, unknown
V1_GETS = [
    "/v1/lineages",
    f"/v1/lineages/{LIN}",
    f"/v1/lineages/{LIN}/metrics",
    f"/v1/lineages/{LIN}/stages/1/checkpoint",
    f"/v1/lineages/{LIN}/stages/1/importance",
    "/v1/corpora",
    f"/v1/corpora/{COR}",
    f"/v1/jobs/{JOB}",
    f"/v1/jobs/{JOB}/events",
    "/v1/base-models",
]


def test_healthz_and_readyz(client):
    assert client.get("/healthz").json() == {"status": "ok", "checks": {}}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": "ok", "broker": "ok"}


def test_readyz_reports_an_unreachable_broker(settings):
    def down() -> None:
        raise ConnectionError("no broker")

    app = create_app(settings, enqueue=lambda ids: [], broker_ping=down)
    with TestClient(app) as c:
        body = assert_problem(c.get("/readyz"), 503, "not_ready")
    assert body["checks"]["broker"].startswith("unreachable")
    assert body["checks"]["database"] == "ok"


@pytest.mark.parametrize("path", V1_GETS)
def test_every_v1_route_needs_a_key(client, path):
    body = assert_problem(client.get(path), 401, "unauthorized")
    assert "Authorization" in body["detail"]


@pytest.mark.parametrize(
    "header",
    [
        "Bearer das_wrong",
        "Bearer " + "das_" + "x" * 43,
        "Basic dXNlcjpwYXNz",
        "Bearer",
        "das_nobearer",
    ],
)
def test_a_wrong_key_is_401(client, header):
    response = client.get("/v1/lineages", headers={"Authorization": header})
    assert_problem(response, 401, "unauthorized")
    assert response.headers["www-authenticate"] == "Bearer"


def test_a_key_is_stored_hashed(api, alice):
    from sqlalchemy import select

    from service_core.models import ApiKey

    with api.state.session_factory() as session:
        rows = session.scalars(select(ApiKey).where(ApiKey.owner == alice.name)).all()
    assert len(rows) == 1
    assert alice.key not in (rows[0].key_hash, rows[0].prefix)
    assert len(rows[0].key_hash) == 64


def test_revoked_key_is_refused(api, client):
    from sqlalchemy import update

    from service_core.models import ApiKey, utcnow

    carol = new_owner(api)
    assert client.get("/v1/lineages", headers=carol.headers).status_code == 200
    with api.state.session_factory() as session, session.begin():
        session.execute(
            update(ApiKey).where(ApiKey.owner == carol.name).values(revoked_at=utcnow())
        )
    assert_problem(client.get("/v1/lineages", headers=carol.headers), 401)


def test_unknown_route_and_method_are_problems(client, alice):
    assert_problem(client.get("/nope"), 404, "not_found")
    assert_problem(client.get("/v1/nothing-here", headers=alice.headers), 404, "not_found")
    assert_problem(client.delete("/v1/lineages", headers=alice.headers), 405, "method_not_allowed")
    assert_problem(client.put("/healthz"), 405)


def test_path_parameter_validation_is_a_422_problem(client, alice):
    url = f"/v1/lineages/{LIN}/stages/abc/checkpoint"
    body = assert_problem(client.get(url, headers=alice.headers), 422)
    assert body["errors"][0]["field"].endswith("position")
    assert_problem(client.get("/v1/lineages?limit=0", headers=alice.headers), 422)
    assert_problem(client.get("/v1/lineages?limit=1000", headers=alice.headers), 422)
    assert_problem(client.get("/v1/lineages?after=xyz", headers=alice.headers), 422)


def test_huge_integer_and_malformed_ids_are_404_not_500(client, alice):
    assert_problem(client.get(f"/v1/jobs/{2**70}", headers=alice.headers), 404, "job_not_found")
    assert_problem(client.get("/v1/lineages/-5", headers=alice.headers), 404)
    assert_problem(client.get("/v1/jobs/abc", headers=alice.headers), 404, "job_not_found")


def test_malformed_json_is_a_422_problem(client, alice):
    response = client.post(
        "/v1/lineages",
        headers={**alice.headers, "Content-Type": "application/json"},
        content=b"{not json",
    )
    assert_problem(response, 422, "validation_error")


def test_json_body_size_limit(client, alice):
    huge = {"name": "x", "base_model": "tiny-roberta", "hyperparameters": {"pad": "a" * (2 << 20)}}
    assert_problem(
        client.post("/v1/lineages", headers=alice.headers, json=huge), 413, "payload_too_large"
    )


def test_unexpected_errors_are_500_problems_without_details(api, client, alice, monkeypatch):
    import app.routes.jobs as jobs

    def boom(*_a, **_k):
        raise RuntimeError("secret-internal-detail /etc/passwd")

    monkeypatch.setattr(jobs, "owned_job", boom)
    response = client.get(f"/v1/jobs/{JOB}", headers=alice.headers)
    body = assert_problem(response, 500, "internal_error")
    assert "secret" not in response.text and "passwd" not in response.text
    assert body["detail"]


def test_openapi_documents_every_route_and_problem_errors(client):
    schema = client.get("/openapi.json").json()
    for path in (
        "/v1/lineages",
        "/v1/lineages/{lineage_id}",
        "/v1/lineages/{lineage_id}/domains",
        "/v1/lineages/{lineage_id}/stages/{position}/checkpoint",
        "/v1/lineages/{lineage_id}/stages/{position}/importance",
        "/v1/lineages/{lineage_id}/metrics",
        "/v1/base-models",
        "/v1/corpora",
        "/v1/corpora/{corpus_id}",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/events",
        "/v1/jobs/{job_id}/cancel",
        "/healthz",
        "/readyz",
    ):
        assert path in schema["paths"], path
    op = schema["paths"]["/v1/lineages"]["post"]
    assert "application/problem+json" in op["responses"]["422"]["content"]
    upload = schema["paths"]["/v1/corpora"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in upload
    assert client.get("/docs").status_code == 200


def test_cors_is_off_by_default(client):
    response = client.options(
        "/v1/lineages",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"},
    )
    assert "access-control-allow-origin" not in response.headers
    response = client.get("/healthz", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in response.headers


def test_cors_can_be_enabled_for_named_origins(settings):
    s = settings.model_copy(update={"cors_origins": ["https://ui.example"]})
    app = create_app(s, enqueue=lambda ids: [], broker_ping=lambda: None)
    with TestClient(app) as c:
        ok = c.get("/healthz", headers={"Origin": "https://ui.example"})
        assert ok.headers["access-control-allow-origin"] == "https://ui.example"
        other = c.get("/healthz", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


def test_rate_limit_on_writes(tmp_path):
    from app.migrate import upgrade

    s = make_settings(tmp_path, rate_limit_per_minute=1, rate_limit_burst=2)
    upgrade(s)
    app = create_app(s, enqueue=lambda ids: [], broker_ping=lambda: None)
    owner = new_owner(app)
    with TestClient(app) as c:
        codes = [
            c.post("/v1/lineages", headers=owner.headers, json={"name": "x"}).status_code
            for _ in range(3)
        ]
        assert codes[:2] == [422, 422]
        limited = c.post("/v1/lineages", headers=owner.headers, json={"name": "x"})
        body = assert_problem(limited, 429, "rate_limited")
        assert int(limited.headers["retry-after"]) >= 1
        assert body["detail"]
        # reads are not limited, and another key has its own bucket
        assert c.get("/v1/lineages", headers=owner.headers).status_code == 200
        other = new_owner(app)
        assert c.post("/v1/lineages", headers=other.headers, json={}).status_code == 422
