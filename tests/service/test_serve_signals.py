"""SIGTERM (what ``docker stop`` and systemd send) to ``das-service serve`` with a job
training: the API and the worker stop, the job stops at its next step and goes back to the
queue with its step checkpoint, no process of the service is left; started again, the
service resumes the job from that checkpoint and it succeeds."""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.service.conftest import (
    REPO,
    TINY_HP,
    corpus_text,
    lineage_path,
    make_settings,
    service_env,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """One ``das-service serve`` process on ``data``."""

    def __init__(self, data: Path, env: dict[str, str], name: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = data / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve"],
            cwd=REPO,
            env={**env, "PORT": str(self.port)},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, as under docker or systemd
        )
        self.worker_log = data / "logs" / "worker.log"
        self.worker_pid = 0

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self) -> tuple[str, int]:
        """(API key, worker pid) once the API answers and the worker is ready."""
        ready_before = (
            self.worker_log.read_bytes().count(b" ready.") if self.worker_log.exists() else 0
        )

        def up() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"serve exited:\n{self.output()}")
            try:
                return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, 180, "das-service serve to listen")
        key = re.search(r"API key \(owner 'local'\): (\S+)", self.output()).group(1)
        worker_pid = self.worker_pid = int(re.search(r"worker pid (\d+)", self.output()).group(1))
        wait_for(
            lambda: self.worker_log.read_bytes().count(b" ready.") > ready_before,
            180,
            "the worker",
        )
        return key, worker_pid

    def close(self) -> None:
        """Whatever happened: nothing of this service is left running."""
        for group in (self.process.pid, self.worker_pid):
            if group:
                try:
                    os.killpg(group, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.process.wait()
        self._log.close()


def _tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def _alive(processes: list[psutil.Process]) -> list[str]:
    out = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
        except psutil.NoSuchProcess:
            pass
    return out


def _in_groups(groups: set[int]) -> list[str]:
    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if os.getpgid(p.pid) in groups and p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{p.pid} {' '.join(p.info['cmdline'] or [])[:120]}")
        except (psutil.NoSuchProcess, ProcessLookupError, PermissionError):
            pass
    return out


def _sigterm_and_check_nothing_is_left(served: Served, worker_pid: int) -> None:
    processes = _tree(served.process.pid)
    groups = {served.process.pid, worker_pid}  # serve's group, the worker's own session
    served.process.send_signal(signal.SIGTERM)
    assert served.process.wait(timeout=180) == 0, served.output()[-3000:]
    wait_for(lambda: not _alive(processes), 30, "every process of the service to end")
    assert _in_groups(groups) == []


def test_sigterm_stops_serve_and_requeues_the_running_job_which_resumes(tmp_path):
    settings = make_settings(tmp_path, lease_seconds=30)
    env = service_env(settings)
    env.pop("DATABASE_URL", None)
    env.pop("CELERY_BROKER_URL", None)
    # Long enough that SIGTERM lands mid-training: 40 tiny steps end in about 2 s on an
    # idle machine, before the signal reaches the job's process.
    hp = {**TINY_HP, "max_steps": 400, "checkpoint_every": 10}
    first = Served(tmp_path, env, "serve-1")
    try:
        key, worker_pid = first.wait_ready()
        h = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=first.url, headers=h, timeout=60) as http:
            r = http.post(
                "/v1/lineages",
                json={"name": "sigterm", "base_model": "tiny-roberta", "hyperparameters": hp},
            )
            lineage = r.json()["id"]
            r = http.post(
                f"/v1/lineages/{lineage}/domains",
                data={"name": "news"},
                files={"file": ("news.txt", io.BytesIO(corpus_text("news")))},
            )
            assert r.status_code == 202, r.text
            job_id = r.json()["job"]["id"]

            def past_a_checkpoint() -> bool:
                job = http.get(f"/v1/jobs/{job_id}").json()
                assert job["status"] in ("validating", "queued", "running"), job
                return job["phase"] == "training" and (job["step"] or 0) >= 12

            wait_for(past_a_checkpoint, 300, "training past a step checkpoint", interval=0.2)
            assert len(_tree(worker_pid)) >= 2  # the worker and the job's own process
        started = time.monotonic()
        _sigterm_and_check_nothing_is_left(first, worker_pid)
        print(f"\nSIGTERM -> every process gone: {time.monotonic() - started:.1f}s")
    finally:
        first.close()
    partial = next((lineage_path(settings, lineage) / "stages").glob("001-*.partial"))
    assert any((partial / "checkpoints").glob("step-*"))  # the step checkpoint is kept

    second = Served(tmp_path, env, "serve-2")
    try:
        key, worker_pid = second.wait_ready()
        with httpx.Client(base_url=second.url, headers={"Authorization": f"Bearer {key}"}) as http:
            events = http.get(f"/v1/jobs/{job_id}/events?limit=500").json()["data"]
            stopped = [e for e in events if e["type"] == "interrupted"]
            assert len(stopped) == 1 and stopped[0]["data"]["step"] >= 12, events

            def finished() -> dict | None:
                job = http.get(f"/v1/jobs/{job_id}").json()
                return job if job["status"] in ("succeeded", "failed", "cancelled") else None

            job = wait_for(finished, 300, "the resumed job")
            events = http.get(f"/v1/jobs/{job_id}/events?limit=500").json()["data"]
            types = [e["type"] for e in events]
            assert job["status"] == "succeeded" and job["attempts"] == 2, (job, types)
            assert types.count("resumed") == 1 and types.count("succeeded") == 1, types
            result = next(e for e in events if e["type"] == "result")["data"]
            assert result["steps"] == 400 and result["resumed_from_step"] >= 10, result
            progress = [e["data"]["progress"] for e in events if "progress" in e["data"]]
            assert progress == sorted(progress)
        _sigterm_and_check_nothing_is_left(second, worker_pid)
    finally:
        second.close()
