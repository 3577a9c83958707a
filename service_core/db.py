"""Database engine and sessions: one place that knows SQLite from PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from service_core.settings import Settings

READ_ONLY = "das_read_only"  # execution option of the read-only sessions


def make_engine(settings: Settings) -> Engine:
    url = settings.resolved_database_url
    if url.startswith("sqlite"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"timeout": 60, "check_same_thread": False},
            hide_parameters=True,
            pool_size=20,  # the API's thread pool (40) reads concurrently
            max_overflow=20,
        )
        _configure_sqlite(engine)
        return engine
    # pool_pre_ping: a connection dropped by the server (restart, idle kill) is replaced at
    # checkout; hide_parameters: no bound value (a key prefix, a path) in errors and logs
    return create_engine(
        url, pool_pre_ping=True, pool_size=10, max_overflow=20, hide_parameters=True
    )


def _configure_sqlite(engine: Engine) -> None:
    """WAL for concurrent readers, and ``BEGIN IMMEDIATE`` so that a transaction that reads
    and then writes waits for the write lock instead of failing with 'database is locked'
    (the API and the worker are two processes writing the same file)."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:  # noqa: ANN001
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=60000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:  # noqa: ANN001
        # A read (see make_read_session_factory) takes no lock and opens no transaction:
        # each SELECT runs on its own, in WAL mode beside the worker's writes. Taking the
        # write lock for every GET serialised all requests (p99 of seconds under 200
        # polling clients, benchmarks/load_status.py).
        if not conn.get_execution_options().get(READ_ONLY, False):
            conn.exec_driver_sql("BEGIN IMMEDIATE")


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def make_read_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions for requests that only read (the GET routes, authentication): on SQLite
    their statements run without a transaction (no lock: the reads of one request may see
    two snapshots, which no route minds); elsewhere they are ordinary sessions."""
    return sessionmaker(engine.execution_options(**{READ_ONLY: True}), expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session that commits on success and rolls back on any exception."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
