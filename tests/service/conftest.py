"""Fixtures of the service tests.

API tests run on a SQLite database created by the Alembic migrations (once per session);
each test gets its own owner (API key), so tests never see each other's rows. Integration
tests need the real PostgreSQL and Redis: when those are unreachable they are skipped with
the reason, except under ``DAS_REQUIRE_SERVICES=1`` (set by ``.ci/run``), where they fail.
"""

from __future__ import annotations

import hashlib
import io
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.auth import create_api_key
from app.main import create_app
from app.migrate import upgrade
from service_core.settings import Settings

REPO = Path(__file__).resolve().parents[2]
PG_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=3"
# DAS_TEST_REDIS_DB lets two test sessions on one machine use separate Redis databases
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
REDIS_DB = int(os.environ.get("DAS_TEST_REDIS_DB", "11"))

# Hyper-parameters small enough for a CPU test (a stage takes seconds).
TINY_HP = {
    "max_steps": 4,
    "batch_size": 4,
    "block_size": 32,
    "eval_max_batches": 2,
    "importance_max_batches": 2,
    "checkpoint_every": 2,
}


# -- corpora the tests upload ----------------------------------------------------------------

_WORDS = {
    "news": "market shares rose as the central bank held rates while investors weighed "
    "earnings reports from banks and energy companies",
    "law": "the court held that the contract was void because the defendant lacked capacity "
    "and the statute of frauds required a signed writing",
    "bio": "the protein binds the receptor and the enzyme catalyses the reaction inside the "
    "cell membrane while genes regulate expression",
}


def corpus_text(domain: str, documents: int = 40, seed: int = 0) -> bytes:
    """A small deterministic corpus of ``documents`` blank-line-separated documents."""
    words = _WORDS[domain].split()
    out = []
    for d in range(documents):
        digest = hashlib.sha256(f"{domain}{seed}{d}".encode()).digest()
        sentence = [words[(b + i) % len(words)] for i, b in enumerate(digest[:24])]
        out.append(" ".join(sentence) + ".")
    return ("\n\n".join(out) + "\n").encode()


# -- the API on SQLite -------------------------------------------------------------------------


@dataclass
class EnqueueRecorder:
    """Stands in for the broker in API tests: remembers the job ids sent."""

    sent: list[int] = field(default_factory=list)

    def __call__(self, job_ids) -> list[int]:  # noqa: ANN001
        ids = list(job_ids)
        self.sent.extend(ids)
        return ids


def by_public(session, model, public_id: str):  # noqa: ANN001, ANN201
    """The row behind an id the API showed (tests reach rows by their public id)."""
    from sqlalchemy import select

    row = session.scalar(select(model).where(model.public_id == public_id))
    assert row is not None, f"no {model.__name__} {public_id}"
    return row


def row_id(app, model, public_id: str) -> int:  # noqa: ANN001
    """The integer row id behind a public id (what queue messages carry)."""
    with app.state.session_factory() as session:
        return by_public(session, model, public_id).id


def lineage_path(settings: Settings, public_id: str) -> Path:
    """The engine folder of the lineage the API showed as ``public_id`` (folders are named
    by row id, which users never see)."""
    from sqlalchemy import select

    from service_core.db import make_engine
    from service_core.models import Lineage
    from service_core.storage import lineage_dir

    engine = make_engine(settings)
    try:
        with engine.connect() as connection:
            row = connection.scalar(select(Lineage.id).where(Lineage.public_id == public_id))
    finally:
        engine.dispose()
    assert row is not None, f"no lineage {public_id}"
    return lineage_dir(settings, row)


def make_settings(data_dir: Path, **overrides) -> Settings:
    base = {
        "data_dir": data_dir,
        "database_url": None,
        "celery_broker_url": None,
        "rate_limit_per_minute": 100_000,
        "rate_limit_burst": 100_000,
    }
    base.update(overrides)
    return Settings(**base)


@pytest.fixture(scope="session")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    s = make_settings(tmp_path_factory.mktemp("das-service"))
    upgrade(s)
    return s


@pytest.fixture(scope="session")
def recorder() -> EnqueueRecorder:
    return EnqueueRecorder()


@pytest.fixture(scope="session")
def api(settings: Settings, recorder: EnqueueRecorder):  # noqa: ANN201
    return create_app(settings, enqueue=recorder, broker_ping=lambda: None)


@pytest.fixture
def client(api) -> Iterator[TestClient]:  # noqa: ANN001
    with TestClient(api, raise_server_exceptions=False) as c:
        yield c


@dataclass
class Owner:
    name: str
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


def new_owner(app) -> Owner:  # noqa: ANN001
    name = f"owner-{secrets.token_hex(4)}"
    with app.state.session_factory() as session, session.begin():
        key = create_api_key(session, name)
    return Owner(name, key)


@pytest.fixture
def alice(api) -> Owner:  # noqa: ANN001
    return new_owner(api)


@pytest.fixture
def bob(api) -> Owner:  # noqa: ANN001
    return new_owner(api)


def upload(
    client: TestClient,
    owner: Owner,
    filename: str,
    content: bytes,
    headers: dict[str, str] | None = None,
):  # noqa: ANN201
    return client.post(
        "/v1/corpora",
        headers={**owner.headers, **(headers or {})},
        files={"file": (filename, io.BytesIO(content), "application/octet-stream")},
    )


def create_lineage(client: TestClient, owner: Owner, **body):  # noqa: ANN201
    payload = {"name": "demo", "base_model": "tiny-roberta", "hyperparameters": TINY_HP}
    payload.update(body)
    return client.post("/v1/lineages", headers=owner.headers, json=payload)


def add_domain(client: TestClient, owner: Owner, lineage_id: str, domain: str, name=None) -> str:  # noqa: ANN001
    """Upload ``domain``'s corpus (see :func:`corpus_text`) and add it to the lineage as
    ``name`` (default: the domain); returns the job id."""
    corpus = upload(client, owner, f"{domain}.txt", corpus_text(domain)).json()["id"]
    r = client.post(
        f"/v1/lineages/{lineage_id}/domains",
        headers=owner.headers,
        json={"corpus_id": corpus, "name": name or domain},
    )
    assert r.status_code == 202, r.text
    return r.json()["job"]["id"]


def assert_problem(response, status: int, code: str | None = None) -> dict:  # noqa: ANN001
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status
    assert {"type", "title", "detail", "code"} <= set(body)
    assert "Traceback" not in response.text
    if code is not None:
        assert body["code"] == code, body
    return body


@contextmanager
def in_process_runner(data: Path, *, isolate: bool = True, **overrides) -> Iterator[tuple]:
    """(settings, app, client, runner, recorder): the API on SQLite and the worker's
    ``JobRunner`` in this process (``runner.run(job_id)`` trains with the real engine, in a
    child process as the worker does, or in this process with ``isolate=False``: faults
    injected by monkeypatching reach the engine only there); the recorder stands in for the
    broker."""
    from worker.runner import JobRunner

    settings = make_settings(data, **{"event_every_steps": 1, **overrides})
    upgrade(settings)
    recorder = EnqueueRecorder()
    app = create_app(settings, enqueue=recorder, broker_ping=lambda: None)
    runner = JobRunner(
        settings, app.state.session_factory, recorder, worker_id="test-worker", isolate=isolate
    )
    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            yield settings, app, client, runner, recorder
    finally:
        app.state.engine.dispose()


# -- real services -------------------------------------------------------------------------------


def _postgres_problem() -> str | None:
    try:
        import psycopg

        with psycopg.connect(PG_DSN) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:  # noqa: BLE001
        return f"PostgreSQL at 127.0.0.1:5432 unreachable: {type(exc).__name__}: {exc}"
    return None


def _redis_problem() -> str | None:
    try:
        import redis

        redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB, socket_timeout=3).ping()
    except Exception as exc:  # noqa: BLE001
        return f"Redis at {REDIS_HOST}:{REDIS_PORT} unreachable: {type(exc).__name__}: {exc}"
    return None


def require_services(*names: str) -> None:
    """Skip (or, under DAS_REQUIRE_SERVICES=1, fail) when a needed server is unreachable."""
    checks = {"postgres": _postgres_problem, "redis": _redis_problem}
    problems = [p for p in (checks[n]() for n in names) if p]
    if not problems:
        return
    reason = "; ".join(problems)
    if os.environ.get("DAS_REQUIRE_SERVICES") == "1":
        pytest.fail(f"DAS_REQUIRE_SERVICES=1 but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    require_services("postgres")
    import psycopg

    name = f"das_test_{secrets.token_hex(6)}"
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    require_services("redis")
    import redis

    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB)
    client.flushdb()
    try:
        yield f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"
    finally:
        client.flushdb()


def service_env(settings: Settings) -> dict[str, str]:
    """The environment a subprocess (worker, serve) needs to share ``settings``."""
    env = dict(os.environ)
    env.update(
        {
            "DAS_DATA_DIR": str(settings.data_dir),
            "DAS_LEASE_SECONDS": str(settings.lease_seconds),
            "DAS_EVENT_EVERY_STEPS": str(settings.event_every_steps),
            "DAS_SWEEP_INTERVAL_SECONDS": str(settings.sweep_interval_seconds),
            "DAS_SWEEP_STALE_SECONDS": str(settings.sweep_stale_seconds),
            "DAS_PROGRESS_INTERVAL_SECONDS": str(settings.progress_interval_seconds),
            "DAS_CELERY_QUEUE": settings.celery_queue,
            "DAS_MAX_UPLOAD_BYTES": str(settings.max_upload_bytes),
            "PYTHONPATH": str(REPO),
            "PYTHONUNBUFFERED": "1",
        }
    )
    for var, value in (
        ("DATABASE_URL", settings.database_url),
        ("CELERY_BROKER_URL", settings.celery_broker_url),
    ):
        if value:
            env[var] = value
        else:
            env.pop(var, None)
    return env


class WorkerProcess:
    """A real Celery worker (``celery -A worker.celery_app worker --pool=solo -c 1``);
    ``module`` runs another module than ``celery`` with the same arguments (a test wrapper),
    ``env`` adds variables."""

    def __init__(
        self,
        settings: Settings,
        log_path: Path,
        module: str = "celery",
        env: dict[str, str] | None = None,
    ) -> None:
        from app.cli import worker_command

        command = worker_command(settings)
        command[command.index("celery")] = module
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            command,
            cwd=REPO,
            env={**service_env(settings), **(env or {})},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited early:\n{self.log()}")
            if b" ready." in self.log_path.read_bytes():
                return
            time.sleep(0.3)
        raise TimeoutError(f"worker not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


@contextmanager
def service_stack(
    data: Path,
    database_url: str,
    broker_url: str,
    queue: str,
    worker: dict | None = None,
    **overrides,
) -> Iterator[tuple[Settings, object, TestClient, WorkerProcess]]:
    """Migrations on the database, an API (in-process, its real broker dispatcher) and one
    real worker process reading ``queue``; ``overrides`` are more settings, ``worker`` more
    arguments of :class:`WorkerProcess`."""
    options = {
        "database_url": database_url,
        "celery_broker_url": broker_url,
        "celery_queue": queue,
        "lease_seconds": 15,
        "event_every_steps": 1,
        "sweep_interval_seconds": 5,
    }
    options.update(overrides)
    settings = make_settings(data, **options)
    upgrade(settings)
    app = create_app(settings)
    process = WorkerProcess(settings, data / "worker.log", **(worker or {}))
    try:
        process.wait_ready()
        with TestClient(app, raise_server_exceptions=False) as client:
            yield settings, app, client, process
    finally:
        process.stop()
        app.state.engine.dispose()


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def load_checkpoint_in_subprocess(model_dir: Path, *, causal: bool = False) -> dict:
    """Load a downloaded checkpoint with plain transformers (an MLM, or with ``causal`` a
    causal LM), in a process that never imports das_engine; returns what it printed (JSON):
    whether the logits are finite, their shape, the model type and the weights' dtype."""
    import json

    auto = "AutoModelForCausalLM" if causal else "AutoModelForMaskedLM"
    code = (
        "import json, sys, torch\n"
        f"from transformers import {auto} as Auto, AutoTokenizer\n"
        "path = sys.argv[1]\n"
        "tok = AutoTokenizer.from_pretrained(path)\n"
        "model = Auto.from_pretrained(path)\n"
        "batch = tok(['the court held that the contract was void'], return_tensors='pt')\n"
        "with torch.no_grad():\n"
        "    logits = model(**batch).logits\n"
        "assert 'das_engine' not in sys.modules\n"
        "print(json.dumps({'finite': bool(torch.isfinite(logits).all()),\n"
        "                  'shape': list(logits.shape), 'type': model.config.model_type,\n"
        "                  'dtype': str(next(model.parameters()).dtype)}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-c", code, str(model_dir)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd="/",
        env=env,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Served:
    """A running ``das-service serve`` (the API and its worker subprocess)."""

    url: str
    key: str
    process: subprocess.Popen
    worker_pid: int
    log_path: Path

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def serve_embedded(
    data: Path, env_extra: dict[str, str] | None = None, **overrides
) -> Iterator[Served]:
    """``das-service serve`` in the embedded default mode (SQLite, the filesystem broker, a
    real worker) on a free port of 127.0.0.1, once it answers /readyz and its worker is
    ready; killed on exit if still running."""
    import re

    import httpx

    env = service_env(make_settings(data, **overrides))
    env.pop("DATABASE_URL", None)
    env.pop("CELERY_BROKER_URL", None)
    port = free_port()
    env["PORT"] = str(port)
    env.update(env_extra or {})
    log_path = data / "serve.log"
    log = log_path.open("wb")
    serve = [sys.executable, "-m", "app.cli", "serve"]
    process = subprocess.Popen(serve, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"serve exited:\n{log_path.read_text(errors='replace')}")
        try:
            return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, 120, "das-service serve to listen")
        text = log_path.read_text(errors="replace")
        key = re.search(r"API key \(owner 'local'\): (\S+)", text).group(1)
        worker_pid = int(re.search(r"worker pid (\d+)", text).group(1))
        worker_log = data / "logs" / "worker.log"
        wait_for(lambda: b" ready." in worker_log.read_bytes(), 120, "the worker")
        yield Served(url, key, process, worker_pid, log_path)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()
