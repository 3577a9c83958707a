"""Many concurrent pollers on a real socket (uvicorn in a thread, SQLite): every request
answers 200. Before the fix, 200 concurrent GETs deadlocked the API for good: each sync
endpoint's response was validated in the thread pool after the endpoint, while the request's
database session still held its pooled connection, so every pool thread ended up waiting for
a connection that only a free thread would release. (The latency figures are
``benchmarks/load_status.py``'s business, not a test's.)"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import httpx
import pytest
import uvicorn

from app.cli import KEEP_ALIVE_S
from service_core.lifecycle import add_event
from service_core.models import Job
from tests.service.conftest import add_domain, by_public, create_lineage

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

CLIENTS = 200
ROUNDS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _poll_all(url: str, key: str, job_id: int) -> list[int | str]:
    async def poller() -> list[int | str]:
        codes = []
        async with httpx.AsyncClient(
            base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60
        ) as http:
            for _ in range(ROUNDS):
                for path in (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/events?limit=50"):
                    try:
                        codes.append((await http.get(path)).status_code)
                    except httpx.HTTPError as exc:  # named, so a failure says what happened
                        codes.append(type(exc).__name__)
        return codes

    results = await asyncio.gather(*(poller() for _ in range(CLIENTS)))
    return [code for codes in results for code in codes]


def test_two_hundred_concurrent_pollers_all_get_answers(api, client, alice):
    lineage = create_lineage(client, alice).json()["id"]
    job_id = add_domain(client, alice, lineage, "news")
    with api.state.session_factory() as session, session.begin():
        for i in range(100):
            add_event(
                session,
                by_public(session, Job, job_id).id,
                "progress",
                f"step {i}",
                data={"step": i},
            )
    port = _free_port()
    server = uvicorn.Server(
        # the keep-alive time-out `das-service serve` uses: with uvicorn's 5 s, a poller whose
        # next request comes 5 s later on a loaded machine races the server closing it
        uvicorn.Config(
            api,
            host="127.0.0.1",
            port=port,
            log_level="warning",
            access_log=False,
            timeout_keep_alive=KEEP_ALIVE_S,
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        started = time.monotonic()
        codes = asyncio.run(_poll_all(f"http://127.0.0.1:{port}", alice.key, job_id))
        elapsed = time.monotonic() - started
    finally:
        server.should_exit = True
        thread.join(30)
    assert len(codes) == CLIENTS * ROUNDS * 2
    assert set(codes) == {200}, {c: codes.count(c) for c in set(codes)}
    assert elapsed < 120
    assert not thread.is_alive()  # it shut down: no request was left hanging
