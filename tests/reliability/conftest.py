"""Fixtures of the reliability tests: those of ``tests/service`` (a SQLite API with per-test
owners, and the real PostgreSQL + Redis with the skip-or-fail rule), and a guard that leaves
the shared Redis running whatever a test did to it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.reliability.helpers import redis_up, start_redis
from tests.service.conftest import (  # noqa: F401 - fixtures shared with tests/service
    alice,
    api,
    bob,
    client,
    postgres_url,
    recorder,
    redis_url,
    settings,
)


@pytest.fixture(scope="session", autouse=True)
def _redis_is_left_running() -> Iterator[None]:
    """Whatever a test did, the shared Redis is running when the session ends."""
    was_up = redis_up()
    yield
    if was_up and not redis_up():
        start_redis()
