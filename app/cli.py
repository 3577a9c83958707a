"""``das-service``: create-api-key, migrate, serve, worker, sweep."""

from __future__ import annotations

import argparse
import functools
import os
import signal
import subprocess
import sys
from pathlib import Path

from service_core.settings import Settings, get_settings

KEEP_ALIVE_S = 75


def _session_factory(settings: Settings):  # noqa: ANN202
    from service_core.db import make_engine, make_session_factory

    return make_session_factory(make_engine(settings))


def cmd_create_api_key(args: argparse.Namespace, settings: Settings) -> int:
    from app.auth import create_api_key
    from app.migrate import upgrade

    upgrade(settings)
    factory = _session_factory(settings)
    with factory() as session, session.begin():
        key = create_api_key(session, args.owner)
    print(key)
    return 0


def cmd_migrate(_: argparse.Namespace, settings: Settings) -> int:
    from app.migrate import upgrade

    upgrade(settings)
    print("database schema is up to date")
    return 0


def local_api_key(settings: Settings, owner: str = "local") -> str:
    """The key kept in ``DAS_DATA_DIR/local-api-key`` (mode 600) for ``serve``; a new one is
    created when the file is missing or its key is no longer valid."""
    from app.auth import create_api_key, verify_api_key

    factory = _session_factory(settings)
    path = settings.local_key_file
    with factory() as session, session.begin():
        if path.exists():
            key = path.read_text().strip()
            if verify_api_key(session, key) is not None:
                return key
        key = create_api_key(session, owner)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")
    return key


def worker_command(settings: Settings) -> list[str]:
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery_app",
        "worker",
        "--pool=solo",
        "--concurrency=1",
        "--prefetch-multiplier=1",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        "--loglevel=INFO",
        "-Q",
        settings.celery_queue,
    ]


def cmd_worker(_: argparse.Namespace, settings: Settings) -> int:
    from app.migrate import upgrade

    upgrade(settings)
    os.execv(sys.executable, worker_command(settings))
    return 0  # not reached


def cmd_sweep(_: argparse.Namespace, settings: Settings) -> int:
    from service_core.sweep import sweep

    sent = sweep(settings, stale_before=None)
    print(f"sent {len(sent)} job(s) to the broker: {sent}")
    return 0


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from app.main import create_app
    from app.migrate import upgrade
    from service_core.processes import set_parent_death_signal

    upgrade(settings)
    key = local_api_key(settings)
    port = args.port or settings.port
    env = dict(os.environ)
    env.setdefault("DAS_DATA_DIR", str(settings.data_dir))
    repo_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root, env.get("PYTHONPATH")) if p)
    log_dir = settings.data_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    worker_log = (log_dir / "worker.log").open("ab")
    # SIGTERM (docker stop, systemd) stops the service as Ctrl-C does. uvicorn handles both
    # while it serves, then raises the signal again: without a handler of ours SIGTERM's
    # default action would kill this process before it stops the worker.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _raise_stop)
    worker = subprocess.Popen(
        worker_command(settings),
        env=env,
        stdout=worker_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # a terminal's Ctrl-C reaches us; we stop the worker
        # should serve be killed without a chance to stop it (kill -9), the kernel sends the
        # worker SIGTERM: its warm shutdown
        preexec_fn=functools.partial(set_parent_death_signal, signal.SIGTERM),
    )
    url = f"http://{settings.host}:{port}"
    try:
        print(
            f"DAS service on {url}  (API docs: {url}/docs)\n"
            f"API key (owner 'local'): {key}\n"
            f"  export DAS_URL={url} DAS_KEY={key}\n"
            f"worker pid {worker.pid}, log {log_dir / 'worker.log'}\n"
            f"data in {settings.data_dir}; Ctrl-C (or SIGTERM) stops both",
            flush=True,
        )
        # keep-alive longer than a poller's interval (and than a proxy's idle timeout):
        # with uvicorn's 5 s, a client polling every 5 s races the server closing its
        # connection and gets a reset (benchmarks/load_status.py --interval 5)
        uvicorn.run(
            create_app(settings),
            host=settings.host,
            port=port,
            log_level="info",
            timeout_keep_alive=KEEP_ALIVE_S,
        )
    except _Stop:
        pass
    finally:
        print("stopping the worker (the running job stops at its next step)", flush=True)
        _stop(worker)
        worker_log.close()
    return 0


class _Stop(BaseException):
    """SIGTERM or SIGINT: stop the API and the worker (BaseException: no ``except
    Exception`` on the way swallows it)."""


def _raise_stop(signum: int, _frame: object) -> None:
    raise _Stop(signum)


STOP_GRACE_S = 60.0


def _stop(process: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """Warm shutdown: the running job stops at its next step and goes back to the queue
    (it resumes from its last step checkpoint at the next start); the worker's process group
    (the worker and the job's process) is killed if it does not exit in time, or at a
    second SIGTERM / Ctrl-C."""

    def kill_group(*_: object) -> None:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # the worker leads its own session
        except (ProcessLookupError, PermissionError):
            process.kill()

    if process.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, kill_group)
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        kill_group()
        process.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="das-service", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("create-api-key", help="create an API key for an owner and print it")
    p.add_argument("--owner", required=True)
    p.set_defaults(func=cmd_create_api_key)
    p = sub.add_parser("migrate", help="apply the database migrations")
    p.set_defaults(func=cmd_migrate)
    p = sub.add_parser(
        "serve", help="migrate, then run the API and one worker (Ctrl-C or SIGTERM stops)"
    )
    p.add_argument("--port", type=int, default=None, help="default: $PORT or 8000")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("worker", help="run one Celery worker (one job at a time)")
    p.set_defaults(func=cmd_worker)
    p = sub.add_parser("sweep", help="send again the jobs whose message was lost")
    p.set_defaults(func=cmd_sweep)
    args = parser.parse_args(argv)
    try:
        return args.func(args, get_settings())
    except ValueError as exc:
        print(f"das-service: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
