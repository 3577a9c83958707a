"""A real HTTP receiver on 127.0.0.1 for the webhook tests: records every request (headers,
body, arrival time) and answers the status codes it is given, then 200 (after ``delay``)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic()

    @property
    def json(self) -> dict:
        return json.loads(self.body)


@dataclass
class Receiver:
    url: str
    answers: list[int] = field(default_factory=list)  # next status codes, then 200
    requests: list[Received] = field(default_factory=list)
    delay: float = 0.0  # seconds before each answer
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, *codes: int) -> None:
        with self.lock:
            self.answers.extend(codes)

    def received(self) -> list[Received]:
        with self.lock:
            return list(self.requests)

    def of_job(self, job_id: int) -> list[Received]:
        return [r for r in self.received() if r.json["data"]["job"]["id"] == job_id]


@contextmanager
def receiver(path: str = "/hooks") -> Iterator[Receiver]:
    state = Receiver(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the http.server API
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            with state.lock:
                state.requests.append(
                    Received(
                        self.path,
                        {k.lower(): v for k, v in self.headers.items()},
                        body,
                        time.monotonic(),
                    )
                )
                code = state.answers.pop(0) if state.answers else 200
            time.sleep(state.delay)
            self.send_response(code)
            if 300 <= code < 400:
                self.send_header("Location", f"http://127.0.0.1:{self.server.server_port}/moved")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_port}{path}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def closed_port_url() -> str:
    """A URL on loopback where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/dead"


def verify(secret: str, request: Received) -> bool:
    """The Standard Webhooks check a receiver makes (what docs/service.md shows)."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    msg_id, ts = request.headers["webhook-id"], request.headers["webhook-timestamp"]
    signed = f"{msg_id}.{ts}.".encode() + request.body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return any(
        hmac.compare_digest(s.partition(",")[2], expected)
        for s in request.headers["webhook-signature"].split()
    )
