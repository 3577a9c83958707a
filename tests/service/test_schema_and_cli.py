"""The migrations create exactly the models' schema; the ``das-service`` commands work."""

from __future__ import annotations

import subprocess
import sys

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from fastapi.testclient import TestClient

from app.main import create_app
from app.migrate import upgrade
from service_core.db import make_engine
from service_core.models import Base
from tests.service.conftest import REPO, make_settings, service_env


def test_migrations_match_the_models(tmp_path):
    settings = make_settings(tmp_path)
    upgrade(settings)
    upgrade(settings)  # idempotent
    engine = make_engine(settings)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    assert diff == []


def _cli(settings, *args: str) -> subprocess.CompletedProcess:  # noqa: ANN001
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=REPO,
        env=service_env(settings),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_cli_migrate_create_key_and_sweep(tmp_path):
    settings = make_settings(tmp_path)
    migrate = _cli(settings, "migrate")
    assert migrate.returncode == 0, migrate.stderr
    made = _cli(settings, "create-api-key", "--owner", "team-a")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert key.startswith("das_") and len(key) > 40
    app = create_app(settings, enqueue=lambda ids: [], broker_ping=lambda: None)
    with TestClient(app) as client:
        assert client.get("/v1/lineages", headers={"Authorization": f"Bearer {key}"}).is_success
    assert key not in (tmp_path / "das.sqlite3").read_bytes().decode("latin-1")
    bad = _cli(settings, "create-api-key", "--owner", "  ")
    assert bad.returncode == 2 and "owner" in bad.stderr
    swept = _cli(settings, "sweep")
    assert swept.returncode == 0 and "sent 0 job(s)" in swept.stdout


def test_local_key_is_reused_and_private(tmp_path):
    from app.cli import local_api_key

    settings = make_settings(tmp_path)
    upgrade(settings)
    first = local_api_key(settings)
    assert local_api_key(settings) == first
    assert (settings.local_key_file.stat().st_mode & 0o777) == 0o600
    settings.local_key_file.write_text("das_not-a-valid-key\n")
    assert local_api_key(settings) != first


def test_integration_tests_skip_or_fail_when_services_are_down(monkeypatch):
    import pytest

    from tests.service import conftest

    monkeypatch.setattr(conftest, "_postgres_problem", lambda: "PostgreSQL unreachable (test)")
    monkeypatch.delenv("DAS_REQUIRE_SERVICES", raising=False)
    with pytest.raises(pytest.skip.Exception, match="unreachable"):
        conftest.require_services("postgres")
    monkeypatch.setenv("DAS_REQUIRE_SERVICES", "1")
    with pytest.raises(pytest.fail.Exception, match="DAS_REQUIRE_SERVICES=1"):
        conftest.require_services("postgres")
