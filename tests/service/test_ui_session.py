"""The dashboard's login: an API key becomes an HttpOnly, SameSite=Strict session cookie
that the /v1 API accepts like the Bearer header; writes with the cookie need the session's
CSRF header; logout and a revoked key end the session."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.migrate import upgrade
from app.ui.sessions import COOKIE, CSRF_HEADER
from tests.service.conftest import TINY_HP, EnqueueRecorder, assert_problem, make_settings

LINEAGE = {"name": "ui ✓ 日本語", "base_model": "tiny-roberta", "hyperparameters": TINY_HP}


@pytest.fixture(
    scope="module",
    params=["sqlite", pytest.param("postgres", marks=pytest.mark.integration)],
)
def api(request, tmp_path_factory):  # noqa: ANN001, ANN201
    """The API on the embedded default (SQLite) and on the real PostgreSQL (this module's
    ``alice`` and ``bob`` are owners of it)."""
    url = request.getfixturevalue("postgres_url") if request.param == "postgres" else None
    settings = make_settings(tmp_path_factory.mktemp(f"ui-{request.param}"), database_url=url)
    upgrade(settings)
    app = create_app(settings, enqueue=EnqueueRecorder(), broker_ping=lambda: None)
    yield app
    app.state.engine.dispose()


def _login(client: TestClient, key: str):  # noqa: ANN202
    return client.post("/ui/login", json={"api_key": key})


def _set_cookie(response) -> str:  # noqa: ANN001
    return next(v for v in response.headers.get_list("set-cookie") if v.startswith(COOKIE + "="))


def test_login_sets_an_httponly_strict_cookie_and_never_returns_the_key(api, alice):
    with TestClient(api) as client:
        r = _login(client, alice.key)
        assert r.status_code == 200, r.text
        cookie = _set_cookie(r)
        attributes = {a.strip().split("=")[0].lower() for a in cookie.split(";")}
        assert {"httponly", "path", "max-age"} <= attributes
        assert "samesite=strict" in cookie.lower()
        assert "secure" not in attributes  # plain http (a local server)
        assert alice.key not in r.text and alice.key not in cookie
        assert r.json()["owner"] == alice.name and r.json()["csrf_token"]
        assert r.headers["cache-control"] == "no-store"


def test_login_over_https_marks_the_cookie_secure(api, alice):
    with TestClient(api, base_url="https://testserver") as client:
        cookie = _set_cookie(_login(client, alice.key))
        assert "secure" in {a.strip().lower() for a in cookie.split(";")}


def test_a_wrong_key_is_a_401_problem_and_sets_no_cookie(api, alice):
    with TestClient(api) as client:
        r = _login(client, alice.key[:-2] + "xy")
        assert_problem(r, 401, "unauthorized")
        assert COOKIE not in r.headers.get("set-cookie", "")
        assert_problem(_login(client, ""), 422, "validation_error")
        # a form (what another site could post) is refused: JSON only
        r = client.post("/ui/login", data={"api_key": alice.key})
        assert_problem(r, 415, "unsupported_media_type")
        assert_problem(client.get("/ui/session"), 401)


def test_the_cookie_authenticates_reads(api, alice):
    with TestClient(api) as client:
        assert_problem(client.get("/v1/lineages"), 401)
        _login(client, alice.key)
        created = client.post("/v1/lineages", headers=alice.headers, json=LINEAGE).json()
        r = client.get("/v1/lineages")  # the cookie alone
        assert r.status_code == 200, r.text
        assert [lin["id"] for lin in r.json()["data"]] == [created["id"]]
        assert client.get(f"/v1/lineages/{created['id']}").json()["name"] == LINEAGE["name"]
        assert client.get("/ui/session").json()["owner"] == alice.name


def test_a_cookie_write_needs_the_sessions_csrf_header(api, alice):
    with TestClient(api) as client:
        csrf = _login(client, alice.key).json()["csrf_token"]
        assert_problem(client.post("/v1/lineages", json=LINEAGE), 403, "csrf_failed")
        r = client.post("/v1/lineages", json=LINEAGE, headers={CSRF_HEADER: "not-it"})
        assert_problem(r, 403, "csrf_failed")
        assert client.get("/v1/lineages").json()["data"] == []  # nothing was created
        r = client.post("/v1/lineages", json=LINEAGE, headers={CSRF_HEADER: csrf})
        assert r.status_code == 201, r.text
        assert r.json()["name"] == LINEAGE["name"]


def test_logout_closes_the_session_on_the_server(api, alice):
    with TestClient(api) as client:
        csrf = _login(client, alice.key).json()["csrf_token"]
        token = client.cookies.get(COOKIE)
        assert_problem(client.post("/ui/logout"), 403, "csrf_failed")  # not from another site
        r = client.post("/ui/logout", headers={CSRF_HEADER: csrf})
        assert r.status_code == 204
        assert "max-age=0" in _set_cookie(r).lower() or "expires=" in _set_cookie(r).lower()
        assert_problem(client.get("/v1/lineages"), 401)
    with TestClient(api, cookies={COOKIE: token}) as replay:  # a copy of the old cookie
        assert_problem(replay.get("/v1/lineages"), 401, "unauthorized")


def test_a_revoked_keys_session_stops_working(api, alice):
    with TestClient(api) as client:
        _login(client, alice.key)
        assert client.get("/v1/lineages").status_code == 200
        keys = client.get("/v1/api-keys", headers=alice.headers).json()["data"]
        assert len(keys) == 1
        r = client.delete(f"/v1/api-keys/{keys[0]['id']}", headers=alice.headers)
        assert r.status_code == 204, r.text
        assert_problem(client.get("/v1/lineages"), 401, "unauthorized")
        assert_problem(client.get("/ui/session"), 401)


def test_a_garbage_cookie_is_a_401_not_a_500(api):
    with TestClient(api) as client:
        for value in ("x", "a" * 43, "../../etc/passwd", "é" * 43, "é" * 22):
            cookie = f"{COOKIE}={value}".encode()  # raw bytes: UTF-8 where the client sends it
            r = client.get("/v1/lineages", headers={"cookie": cookie})
            assert_problem(r, 401, "unauthorized")


def test_the_pages_are_served_offline_with_a_strict_policy(api):
    with TestClient(api) as client:
        page = client.get("/ui/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        policy = page.headers["content-security-policy"]
        assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy
        assert "http://" not in page.text and "https://" not in page.text  # no CDN
        for asset in ("app.js", "api.js", "charts.js", "app.css", "views/forgetting.js"):
            r = client.get(f"/ui/static/{asset}")
            assert r.status_code == 200, asset
            assert "https://" not in r.text.replace("http://www.w3.org/2000/svg", ""), asset
        assert client.get("/ui", follow_redirects=False).status_code == 308


def test_every_static_asset_is_package_data():
    """A non-editable install (a wheel) ships only what pyproject's package-data names."""
    import fnmatch
    import tomllib
    from pathlib import Path

    from app.ui.routes import STATIC

    repo = Path(__file__).resolve().parents[2]
    globs = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["app.ui"]
    assets = [p.relative_to(STATIC.parent).as_posix() for p in STATIC.rglob("*") if p.is_file()]
    assert len(assets) >= 10
    missing = [a for a in assets if not any(fnmatch.fnmatchcase(a, g) for g in globs)]
    assert missing == [], f"add to [tool.setuptools.package-data] app.ui: {missing}"


def test_the_scripts_treat_ids_as_opaque_strings():
    """Every id the pages put in an API path or a page address goes through ``enc``
    (encodeURIComponent), and none is parsed as a number: ids may be any string."""
    import re

    from app.ui.routes import STATIC

    scripts = {p.relative_to(STATIC).as_posix(): p.read_text() for p in STATIC.rglob("*.js")}
    assert "views/lineage.js" in scripts
    for name, source in scripts.items():
        assert "parseInt(" not in source and "parseFloat(" not in source, name
        for literal in re.findall(r"`[^`]*`", source):
            if "/v1/" in literal or "#/" in literal:
                for expr in re.findall(r"\$\{([^}]*)\}", literal):
                    assert expr.startswith("enc("), (name, literal)
