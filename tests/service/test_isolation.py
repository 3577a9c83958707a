"""Each job in a fresh child process of the worker (the real engine on the tiny base, the
API on SQLite): no state of one job reaches the next, a child that dies frees its job for a
retry, progress only moves forward through meaningful phases, and nothing a user reads
names the server (its folders, host, pids) or shows a traceback."""

from __future__ import annotations

import functools
import json
import re
import socket
import sys

import pytest
from sqlalchemy import select

from service_core.models import Job
from tests.service.conftest import (
    TINY_HP,
    add_domain,
    by_public,
    create_lineage,
    in_process_runner,
    new_owner,
    row_id,
    wait_for,
)

TERMINAL = ("succeeded", "failed", "cancelled")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

BF16 = {**TINY_HP, "mixed_precision": "bf16"}


@pytest.fixture(scope="module")
def env(tmp_path_factory):  # noqa: ANN201
    with in_process_runner(tmp_path_factory.mktemp("isolation")) as env:
        yield env


def _events(client, owner, job_id: int) -> list[dict]:  # noqa: ANN001
    r = client.get(f"/v1/jobs/{job_id}/events?limit=500", headers=owner.headers)
    assert r.status_code == 200, r.text
    return r.json()["data"]


def _job(client, owner, job_id: int) -> dict:  # noqa: ANN001
    return client.get(f"/v1/jobs/{job_id}", headers=owner.headers).json()


def _finished(client, owner, job_id: int) -> dict:  # noqa: ANN001
    """The job once the API shows it finished. Reads are served from the API's job watch,
    up to one poll tick behind writes made by another process (the worker), so a read
    right after ``runner.run`` returns may still show the job running."""
    return wait_for(
        lambda: (j := _job(client, owner, job_id))["status"] in TERMINAL and j,
        30,
        f"the API to show job {job_id} finished",
        interval=0.05,
    )


def _assert_private(settings, text: str) -> None:  # noqa: ANN001
    """No server folder, host name, pid-bearing worker id or traceback in ``text``."""
    assert str(settings.data_dir) not in text
    assert sys.prefix not in text and sys.base_prefix not in text
    assert re.search(rf"\b{re.escape(socket.gethostname())}\b", text) is None, text
    assert "Traceback" not in text and 'File "' not in text
    assert "test-worker" not in text  # the runner's worker id


def _assert_monotone_progress(events: list[dict], job: dict) -> None:
    """The bar over a real job's events: never back, training in its own middle span
    (not stuck at the evaluation's share), phases in the engine's order, 1.0 at the end."""
    marks = [(e["data"]["phase"], e["data"]["progress"]) for e in events if "progress" in e["data"]]
    values = [p for _, p in marks]
    assert values == sorted(values), marks
    assert all(0.0 <= v <= 1.0 for v in values)
    order = ["preparing", "importance", "scoring", "training", "evaluating"]
    seen = [phase for phase, _ in marks]
    assert {"importance", "scoring", "training", "evaluating"} <= set(seen), seen
    # scoring (pre-training) comes before training, the held-out evaluation after it
    assert seen.index("scoring") < seen.index("training") < seen.index("evaluating")
    assert all(p in order for p in seen)
    training = [p for phase, p in marks if phase == "training"]
    assert training[0] < 0.5 and training[-1] > 0.8, training  # 1 step of 4, then all
    assert job["progress"] == 1.0 and job["phase"] in order


def test_bf16_then_default_then_bf16_in_one_worker_for_two_owners(env):
    """A bf16 job used to leave accelerate's process-wide state behind, and every later job
    of the worker failed; each job in its own process, all three succeed."""
    from accelerate.state import AcceleratorState

    settings, app, client, runner, _ = env
    before = dict(AcceleratorState._shared_state)  # the worker's own state
    alice, bob = new_owner(app), new_owner(app)
    jobs = []
    for owner, hp, domain in ((alice, BF16, "news"), (bob, TINY_HP, "law"), (bob, BF16, "bio")):
        lineage = create_lineage(client, owner, hyperparameters=hp).json()["id"]
        jobs.append((owner, add_domain(client, owner, lineage, domain)))
    outcomes = [runner.run(job_id) for _, job_id in jobs]
    assert outcomes == ["succeeded"] * 3, [_job(client, o, j) for o, j in jobs]
    assert AcceleratorState._shared_state == before  # no job's state reached the worker
    for owner, job_id in jobs:
        job, events = _finished(client, owner, job_id), _events(client, owner, job_id)
        assert job["status"] == "succeeded" and job["error"] is None
        _assert_monotone_progress(events, job)
        result = next(e for e in events if e["type"] == "result")["data"]
        assert result["checkpoint_url"] == f"/v1/lineages/{job['lineage_id']}/stages/1/checkpoint"
        assert "model_dir" not in result and "importance_dir" not in result
        claimed = next(e for e in events if e["type"] == "claimed")
        assert claimed["data"] == {"attempt": 1}
        _assert_private(settings, json.dumps(job) + json.dumps(events))


def test_a_failed_job_shows_a_correlation_id_not_a_traceback(env, capfd):
    from tests.service.child_faults import raise_in_add_domain
    from worker.runner import JobRunner

    settings, app, client, _, recorder = env
    path = settings.data_dir / "secret" / "file.bin"
    failing = JobRunner(
        settings,
        app.state.session_factory,
        recorder,
        worker_id="test-worker",
        child_setup=functools.partial(raise_in_add_domain, KeyError(f"{path} {sys.prefix}")),
    )
    owner = new_owner(app)
    lineage = create_lineage(client, owner).json()["id"]
    job_id = add_domain(client, owner, lineage, "news")
    assert failing.run(job_id) == "failed"
    job, events = _job(client, owner, job_id), _events(client, owner, job_id)
    assert job["error"]["code"] == "internal_error" and job["error"]["phase"] == "training"
    correlation_id = job["error"]["correlation_id"]
    assert correlation_id in job["error"]["message"]
    assert "traceback" not in [e["type"] for e in events]
    _assert_private(settings, json.dumps(job) + json.dumps(events))
    # the trace is in the server's log (the child's stderr, the worker's log), under the id
    log = capfd.readouterr().err
    line = next(i for i, text in enumerate(log.splitlines()) if correlation_id in text)
    assert "Traceback" in "\n".join(log.splitlines()[line:]) and "KeyError" in log


def test_older_rows_with_server_details_are_scrubbed_when_shown(env):
    """Rows written before this version (a traceback event, a worker id, absolute paths)
    are shown without them."""
    from service_core.lifecycle import add_event

    settings, app, client, _, _ = env
    owner = new_owner(app)
    lineage = create_lineage(client, owner).json()["id"]
    job_id = add_domain(client, owner, lineage, "law")
    host = socket.gethostname()
    with app.state.session_factory() as session, session.begin():
        row = by_public(session, Job, job_id).id
        add_event(
            session,
            row,
            "traceback",
            f'Traceback (most recent call last):\n  File "{sys.prefix}/lib/x.py"',
            level="error",
        )
        add_event(
            session,
            row,
            "claimed",
            f"attempt 1 on {host}:4242",
            data={"attempt": 1, "worker": f"{host}:4242"},
        )
        add_event(
            session,
            row,
            "result",
            "stage result",
            data={"model_dir": str(settings.data_dir / "lineages" / "1" / "model")},
        )
    events = _events(client, owner, job_id)
    _assert_private(settings, json.dumps(events))
    assert events[-2]["data"] == {"attempt": 1}
    assert events[-1]["data"]["model_dir"].startswith("$DAS_DATA_DIR/")


def test_the_job_child_trains_at_a_lower_priority_than_the_api(env, tmp_path):
    """``job_nice`` (10 by default): the child yields the cores to the API's status reads."""
    import os

    from tests.service.child_faults import record_niceness
    from worker.runner import JobRunner

    settings, app, client, _, recorder = env
    assert settings.job_nice == 10
    out = tmp_path / "nice.txt"
    runner = JobRunner(
        settings,
        app.state.session_factory,
        recorder,
        worker_id="test-worker",
        child_setup=functools.partial(record_niceness, str(out)),
    )
    owner = new_owner(app)
    job_id = add_domain(client, owner, create_lineage(client, owner).json()["id"], "news")
    assert runner.run(job_id) == "succeeded"
    assert int(out.read_text()) == min(19, os.nice(0) + settings.job_nice)


def test_a_killed_child_frees_its_job_which_then_resumes(env):
    """The job's process SIGKILLed at step 3 (as the OOM killer would): the worker survives,
    frees the lease at once and sends the job again; the next run resumes from the step-2
    checkpoint and succeeds."""
    from tests.service.child_faults import kill_at_step
    from worker.runner import JobRunner

    settings, app, client, runner, recorder = env
    doomed = JobRunner(
        settings,
        app.state.session_factory,
        recorder,
        worker_id="test-worker",
        child_setup=functools.partial(kill_at_step, 3),
    )
    owner = new_owner(app)
    hp = {**TINY_HP, "max_steps": 6, "checkpoint_every": 2}
    lineage = create_lineage(client, owner, hyperparameters=hp).json()["id"]
    job_id = add_domain(client, owner, lineage, "news")
    assert doomed.run(job_id) == "process_died"
    assert recorder.sent[-1] == row_id(app, Job, job_id)  # sent again at once, not after the lease
    job = _job(client, owner, job_id)
    assert job["status"] == "running" and job["attempts"] == 1 and job["error"] is None
    died = next(e for e in _events(client, owner, job_id) if e["type"] == "process_died")
    assert died["level"] == "warning" and "SIGKILL" in died["message"]
    assert runner.run(job_id) == "succeeded"
    job, events = _finished(client, owner, job_id), _events(client, owner, job_id)
    assert job["attempts"] == 2 and [e["type"] for e in events].count("resumed") == 1
    assert next(e for e in events if e["type"] == "result")["data"]["resumed_from_step"] == 2
    progress = [e["data"]["progress"] for e in events if "progress" in e["data"]]
    assert progress == sorted(progress)  # across the two attempts too
    with app.state.session_factory() as session:
        assert session.scalar(select(Job.claim_token).where(Job.public_id == job_id)) is None
