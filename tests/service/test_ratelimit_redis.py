"""The write rate limit kept in the real Redis: every API process of a deployment shares
one budget per key; it fails open while Redis is unreachable."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.ratelimit import RedisTokenBucket, TokenBucket, make_rate_limiter
from tests.service.conftest import assert_problem, make_settings, new_owner


@pytest.fixture
def clean_redis(redis_url):  # noqa: ANN001, ANN201
    import redis

    client = redis.Redis.from_url(redis_url)

    def wipe() -> None:
        for key in client.scan_iter("das:rl*"):
            client.delete(key)

    wipe()
    yield redis_url
    wipe()


def test_two_processes_share_one_budget_per_key(clean_redis):
    a = RedisTokenBucket(clean_redis, per_minute=1, burst=3, prefix="das:rl-test")
    b = RedisTokenBucket(clean_redis, per_minute=1, burst=3, prefix="das:rl-test")
    waits = [a.take(7), b.take(7), a.take(7), b.take(7)]
    assert waits[:3] == [0.0, 0.0, 0.0]
    assert 50 < waits[3] <= 60  # one token a minute: the next one in about a minute
    assert a.take(8) == 0.0  # another key has its own bucket


def test_the_bucket_refills_at_its_rate(clean_redis):
    bucket = RedisTokenBucket(clean_redis, per_minute=600, burst=1, prefix="das:rl-test")
    assert bucket.take(1) == 0.0
    wait = bucket.take(1)
    assert 0 < wait <= 0.1
    time.sleep(wait + 0.05)
    assert bucket.take(1) == 0.0


def test_fails_open_when_redis_is_unreachable():
    bucket = RedisTokenBucket("redis://127.0.0.1:1/0", per_minute=1, burst=1)
    assert [bucket.take(1) for _ in range(3)] == [0.0, 0.0, 0.0]


def test_the_limiter_follows_the_broker():
    assert make_rate_limiter(0, 10, "redis://127.0.0.1:6379/0") is None
    assert isinstance(make_rate_limiter(60, 10, None), TokenBucket)
    assert isinstance(make_rate_limiter(60, 10, "redis://127.0.0.1:6379/0"), RedisTokenBucket)


def test_two_api_instances_over_http_draw_on_one_budget(tmp_path, clean_redis):
    from app.migrate import upgrade

    s = make_settings(
        tmp_path, rate_limit_per_minute=1, rate_limit_burst=2, celery_broker_url=clean_redis
    )
    upgrade(s)
    first = create_app(s, enqueue=lambda ids: [], broker_ping=lambda: None)
    second = create_app(s, enqueue=lambda ids: [], broker_ping=lambda: None)
    owner = new_owner(first)
    with TestClient(first) as c1, TestClient(second) as c2:
        # 422: an invalid body still costs a token (the limit is checked first)
        assert c1.post("/v1/lineages", headers=owner.headers, json={}).status_code == 422
        assert c2.post("/v1/lineages", headers=owner.headers, json={}).status_code == 422
        limited = c1.post("/v1/lineages", headers=owner.headers, json={})
        assert_problem(limited, 429, "rate_limited")
        assert int(limited.headers["retry-after"]) >= 1
