"""The API on SQLite or on the real PostgreSQL, for tests that must hold on both."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.main import create_app
from app.migrate import upgrade
from service_core.models import ApiKey, Corpus, Job, Lineage, Stage, WebhookEndpoint
from tests.service.conftest import EnqueueRecorder, Owner, make_settings

BACKENDS = ["sqlite", "postgres"]


@contextmanager
def api_on(data_dir: Path, database_url: str | None) -> Iterator[tuple[object, TestClient]]:
    """(app, client) on a migrated database (SQLite under ``data_dir`` when the URL is None)."""
    settings = make_settings(data_dir, database_url=database_url)
    upgrade(settings)
    app = create_app(settings, enqueue=EnqueueRecorder(), broker_ping=lambda: None)
    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            yield app, client
    finally:
        app.state.engine.dispose()


def stored_rows(app, owner: Owner) -> dict[str, int]:  # noqa: ANN001
    """How many rows of each kind ``owner`` has (and API keys in all)."""
    with app.state.session_factory() as session:
        lineages = select(Lineage.id).where(Lineage.owner == owner.name)
        return {
            "lineages": session.scalar(select(func.count()).select_from(lineages.subquery())),
            "corpora": session.scalar(
                select(func.count(Corpus.id)).where(Corpus.owner == owner.name)
            ),
            "stages": session.scalar(
                select(func.count(Stage.id)).where(Stage.lineage_id.in_(lineages))
            ),
            "jobs": session.scalar(select(func.count(Job.id)).where(Job.owner == owner.name)),
            "keys": session.scalar(select(func.count(ApiKey.id))),
            "webhooks": session.scalar(
                select(func.count(WebhookEndpoint.id)).where(WebhookEndpoint.owner == owner.name)
            ),
        }


def reads_answer_200(client: TestClient, owner: Owner, lineage_id: int, corpus_id: int) -> None:
    for url in (
        "/v1/lineages?limit=100",
        f"/v1/lineages/{lineage_id}",
        "/v1/corpora?limit=100",
        f"/v1/corpora/{corpus_id}",
        "/v1/webhooks?limit=100",
    ):
        r = client.get(url, headers=owner.headers)
        assert r.status_code == 200, (url, r.text)
