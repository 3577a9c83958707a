"""End to end in the embedded default mode: ``das-service serve`` (SQLite, the filesystem
Celery transport, a real worker subprocess) driven over real HTTP, like the README's curl
walk-through; then Ctrl-C stops the API and the worker."""

from __future__ import annotations

import io
import math
import os
import select
import signal
import socket
import tarfile
import time

import httpx
import pytest

from tests.service.conftest import (
    TINY_HP,
    corpus_text,
    load_checkpoint_in_subprocess,
    serve_embedded,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def served(tmp_path_factory):  # noqa: ANN201
    webhooks = {"DAS_WEBHOOK_ALLOW_PRIVATE": "true", "DAS_WEBHOOK_POLL_SECONDS": "0.2"}
    data = tmp_path_factory.mktemp("embedded")
    with serve_embedded(data, env_extra=webhooks, max_upload_bytes=4 << 20) as s:
        yield s.url, s.key, s.process, s.worker_pid, s.output


def test_serve_prints_url_and_key(served):
    url, key, _, _, output = served
    text = output()
    assert url in text and key.startswith("das_")
    assert httpx.get(f"{url}/docs").status_code == 200


def test_the_embedded_worker_delivers_webhooks(served):
    """The worker that ``serve`` starts runs the webhook dispatcher."""
    from tests.service.webhook_receiver import receiver, verify

    url, key, _, _, _ = served
    with receiver() as hook, httpx.Client(base_url=url, timeout=60) as http:
        http.headers["Authorization"] = f"Bearer {key}"
        endpoint = http.post("/v1/webhooks", json={"url": hook.url}).json()
        lineage = http.post(
            "/v1/lineages",
            json={"name": "hooked", "base_model": "tiny-roberta", "hyperparameters": TINY_HP},
        ).json()["id"]
        r = http.post(
            f"/v1/lineages/{lineage}/domains",
            data={"name": "news"},
            files={"file": ("news.txt", io.BytesIO(corpus_text("news")))},
        )
        job = r.json()["job"]["id"]
        assert http.post(f"/v1/jobs/{job}/cancel").status_code == 202

        def types() -> list[str]:
            return [r.json["type"] for r in hook.of_job(job)]

        wait_for(lambda: "job.cancelled" in types(), 60, "the job.cancelled event")
        assert types()[0] == "job.queued"
        assert all(verify(endpoint["secret"], r) for r in hook.received())
        deliveries = http.get(f"/v1/webhooks/{endpoint['id']}/deliveries").json()["data"]
        assert {d["status"] for d in deliveries} == {"delivered"}


def test_walkthrough_over_http(served, tmp_path):
    url, key, _, _, output = served
    h = {"Authorization": f"Bearer {key}"}
    started = time.monotonic()
    with httpx.Client(base_url=url, headers=h, timeout=60) as http:
        lineage = http.post(
            "/v1/lineages",
            json={"name": "embedded", "base_model": "tiny-roberta", "hyperparameters": TINY_HP},
        ).json()["id"]
        jobs = []
        for domain in ("news", "law"):
            r = http.post(
                f"/v1/lineages/{lineage}/domains",
                data={"name": domain},
                files={"file": (f"{domain}.txt", io.BytesIO(corpus_text(domain)))},
            )
            assert r.status_code == 202, r.text
            jobs.append(r.json()["job"]["id"])

        def finished() -> bool:
            states = [http.get(f"/v1/jobs/{j}").json()["status"] for j in jobs]
            assert "failed" not in states and "cancelled" not in states, states
            return states == ["succeeded", "succeeded"]

        wait_for(finished, 300, "both stages")
        print(f"\ntwo-domain walk-through, embedded mode: {time.monotonic() - started:.1f}s")
        with http.stream("GET", f"/v1/lineages/{lineage}/stages/2/checkpoint") as r:
            assert r.status_code == 200
            data = b"".join(r.iter_bytes())
        tarfile.open(fileobj=io.BytesIO(data)).extractall(tmp_path, filter="data")
        loaded = load_checkpoint_in_subprocess(tmp_path / f"lineage-{lineage}-stage-2-law")
        assert loaded["finite"]
        m = http.get(f"/v1/lineages/{lineage}/metrics").json()
        assert [len(row) for row in m["loss_matrix"]] == [2, 2]
        assert all(math.isfinite(v) for row in m["loss_matrix"] for v in row)


def test_oversize_upload_is_refused_while_streaming(served):
    """A chunked upload without Content-Length: the 413 comes back long before the client
    has sent everything (the server stops reading at the limit)."""
    url, key, _, _, _ = served
    port = int(url.rsplit(":", 1)[1])
    boundary = "streamlimit"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
        f'filename="big.txt"\r\nContent-Type: text/plain\r\n\r\n'
    ).encode()
    offered = 64 << 20  # 64 MiB offered against a 4 MiB limit
    sent = 0
    response = b""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(
            (
                "POST /v1/corpora HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {key}\r\n"
                f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
                "Transfer-Encoding: chunked\r\n\r\n"
            ).encode()
        )
        chunk = b"word " * 13107  # ~64 KiB
        payload = head
        try:
            while sent < offered:
                frame = f"{len(payload + chunk):x}\r\n".encode() + payload + chunk + b"\r\n"
                payload = b""
                sock.sendall(frame)
                sent += len(chunk)
                if select.select([sock], [], [], 0)[0]:
                    break
        except (BrokenPipeError, ConnectionResetError):
            pass
        sock.settimeout(10)
        try:
            while b"\r\n\r\n" not in response:
                more = sock.recv(65536)
                if not more:
                    break
                response += more
        except (ConnectionResetError, TimeoutError):
            pass
    assert response.startswith(b"HTTP/1.1 413"), response[:200]
    assert sent < offered / 4


def test_ctrl_c_stops_api_and_worker(served):
    _, _, process, worker_pid, output = served
    process.send_signal(signal.SIGINT)
    process.wait(timeout=60)

    def worker_gone() -> bool:
        try:
            os.kill(worker_pid, 0)
        except ProcessLookupError:
            return True
        return False

    wait_for(worker_gone, 60, "the worker to stop")
