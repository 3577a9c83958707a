"""Helpers of the reliability tests: drive the API, wait for jobs, read events; stop and
start the shared Redis."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.service.conftest import REDIS_HOST, REDIS_PORT, Owner, wait_for

TERMINAL = {"succeeded", "failed", "cancelled"}


def job(client, owner: Owner, job_id: int) -> dict:  # noqa: ANN001
    return client.get(f"/v1/jobs/{job_id}", headers=owner.headers).json()


def events(client, owner: Owner, job_id: int) -> list[dict]:  # noqa: ANN001
    r = client.get(f"/v1/jobs/{job_id}/events?limit=500", headers=owner.headers)
    assert r.status_code == 200, r.text
    return r.json()["data"]


def wait_job(client, owner: Owner, job_id: int, timeout: float, log=lambda: "") -> dict:  # noqa: ANN001
    """The job once it is terminal; on a time-out, an AssertionError with its state and
    ``log()`` (the worker's log)."""

    def done() -> dict | None:
        state = job(client, owner, job_id)
        return state if state["status"] in TERMINAL else None

    try:
        return wait_for(done, timeout, f"job {job_id} to finish", interval=0.3)
    except TimeoutError as exc:
        raise AssertionError(f"{job(client, owner, job_id)}\nworker log:\n{log()}") from exc


def new_lineage(client, owner: Owner, name: str, hyperparameters: dict) -> int:  # noqa: ANN001
    r = client.post(
        "/v1/lineages",
        headers=owner.headers,
        json={"name": name, "base_model": "tiny-roberta", "hyperparameters": hyperparameters},
    )
    assert r.status_code == 201, r.text
    return r.json()["id"]


def assert_ran_once(client, owner: Owner, job_id: int) -> dict:  # noqa: ANN001
    """Succeeded, claimed once, never resumed, one ``succeeded`` event: trained exactly once."""
    state = job(client, owner, job_id)
    assert state["status"] == "succeeded", state
    types = [e["type"] for e in events(client, owner, job_id)]
    assert types.count("claimed") == 1, types
    assert types.count("succeeded") == 1, types
    assert "resumed" not in types and "failed" not in types, types
    assert state["attempts"] == 1, state
    return state


# The command .ci/run starts Redis with: a restart must bring back the same server.
REDIS_START = [
    "redis-server",
    "--daemonize",
    "yes",
    "--bind",
    "127.0.0.1",
    "-::1",
    "--port",
    str(REDIS_PORT),
    "--save",
    "",
    "--appendonly",
    "no",
    "--dir",
    "/var/lib/redis",
    "--logfile",
    "/var/log/redis/ci.log",
]


def redis_up() -> bool:
    import redis

    try:
        return bool(redis.Redis(host=REDIS_HOST, port=REDIS_PORT, socket_timeout=1).ping())
    except redis.RedisError:
        return False


def start_redis(timeout: float = 20.0) -> None:
    for folder in ("/var/lib/redis", "/var/log/redis"):
        Path(folder).mkdir(parents=True, exist_ok=True)
    subprocess.run(REDIS_START, check=True, capture_output=True, timeout=30)
    deadline = time.monotonic() + timeout
    while not redis_up():
        if time.monotonic() > deadline:
            raise RuntimeError("redis-server did not come back")
        time.sleep(0.1)


@contextmanager
def redis_stopped() -> Iterator[None]:
    """Redis down (``shutdown nosave``: every queued and unacknowledged message is lost) for
    the body of the ``with``; always started again, whatever happens inside."""
    try:
        subprocess.run(
            ["redis-cli", "-p", str(REDIS_PORT), "shutdown", "nosave"],
            capture_output=True,
            timeout=30,
            check=False,
        )
        deadline = time.monotonic() + 20
        while redis_up():
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not stop")
            time.sleep(0.1)
        yield
    finally:
        if not redis_up():
            start_redis()
