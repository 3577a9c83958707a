"""The worker's job runner with the real engine on the tiny base, in-process on SQLite:
claim semantics, ordered stages, results as rows, artifacts, metrics, cancel, resume after
an expired lease, and the mapping of failures to ``error {code, message, phase}``."""

from __future__ import annotations

import errno
import functools
import io
import math
import tarfile
import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import select

from service_core.models import Job, JobEvent, utcnow
from tests.service.conftest import (
    EnqueueRecorder,
    add_domain,
    assert_problem,
    by_public,
    create_lineage,
    in_process_runner,
    lineage_path,
    new_owner,
    row_id,
    wait_for,
)


@pytest.fixture(scope="module")
def env(tmp_path_factory):  # noqa: ANN201
    with in_process_runner(tmp_path_factory.mktemp("worker")) as env:
        yield env


def _run_here(runner, job_id) -> str:  # noqa: ANN001
    """Run the job in this process, where a test's monkeypatch lives."""
    runner.isolate = False
    try:
        return runner.run(job_id)
    finally:
        runner.isolate = True


def _events(app, job_id):  # noqa: ANN001, ANN202
    with app.state.session_factory() as session:
        return session.scalars(
            select(JobEvent)
            .join(Job, Job.id == JobEvent.job_id)
            .where(Job.public_id == job_id)
            .order_by(JobEvent.seq)
        ).all()


@pytest.fixture(scope="module")
def trained(env):  # noqa: ANN201
    """One lineage trained on two domains by the runner."""
    settings, app, client, runner, recorder = env
    owner = new_owner(app)
    lineage = create_lineage(client, owner).json()["id"]
    first = add_domain(client, owner, lineage, "news")
    second = add_domain(client, owner, lineage, "law")
    assert runner.run(second) == "blocked"  # stage 1 has not run yet
    assert runner.run(first) == "succeeded"
    assert recorder.sent[-1] == row_id(
        app, Job, second
    )  # the next stage was sent when stage 1 succeeded
    assert runner.run(second) == "succeeded"
    return owner, lineage, first, second


def test_stages_succeed_in_order_with_results(env, trained):
    _, app, client, _, _ = env
    owner, lineage, first, second = trained
    body = client.get(f"/v1/lineages/{lineage}", headers=owner.headers).json()
    assert [(s["name"], s["status"], s["steps"]) for s in body["stages"]] == [
        ("news", "succeeded", 4),
        ("law", "succeeded", 4),
    ]
    job = client.get(f"/v1/jobs/{first}", headers=owner.headers).json()
    assert job["progress"] == 1.0 and job["attempts"] == 1 and job["error"] is None
    assert job["trained_tokens"] > 0 and job["finished_at"] >= job["started_at"]
    types = [e.type for e in _events(app, first)]
    assert types[:2] == ["queued", "claimed"] and "succeeded" in types and "progress" in types
    phases = {e.data.get("phase") for e in _events(app, first) if e.type in ("phase", "progress")}
    assert {"importance", "training", "evaluating"} <= phases


def test_metrics_are_a_finite_2x2_matrix(env, trained):
    _, _, client, _, _ = env
    owner, lineage, _, _ = trained
    m = client.get(f"/v1/lineages/{lineage}/metrics", headers=owner.headers).json()
    assert m["domains"] == ["news", "law"]
    assert len(m["loss_matrix"]) == 2 and all(len(row) == 2 for row in m["loss_matrix"])
    assert all(math.isfinite(x) for row in m["loss_matrix"] for x in row)
    for row_l, row_p in zip(m["loss_matrix"], m["perplexity_matrix"], strict=True):
        for loss, ppl in zip(row_l, row_p, strict=True):
            assert ppl == pytest.approx(math.exp(loss))
    assert len(m["base_losses"]) == 2
    assert math.isfinite(m["forgetting_rate"]) and m["bwt"] == pytest.approx(-m["forgetting_rate"])
    assert m["fwt"] is not None and len(m["per_domain"]) == 2


def test_checkpoint_and_importance_downloads(env, trained):
    _, _, client, _, _ = env
    owner, lineage, _, _ = trained
    url = f"/v1/lineages/{lineage}/stages/2/checkpoint"
    r = client.get(url, headers=owner.headers)
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-tar"
    assert int(r.headers["content-length"]) == len(r.content)
    names = tarfile.open(fileobj=io.BytesIO(r.content)).getnames()
    top = f"lineage-{lineage}-stage-2-law"
    assert f"{top}/config.json" in names and f"{top}/model.safetensors" in names
    assert any(n.startswith(f"{top}/tokenizer") for n in names)
    cached = client.get(url, headers={**owner.headers, "If-None-Match": r.headers["etag"]})
    assert cached.status_code == 304
    # a resumed download: the rest of the archive from byte 1000, then a suffix range
    rest = client.get(url, headers={**owner.headers, "Range": "bytes=1000-"})
    assert rest.status_code == 206 and rest.content == r.content[1000:]
    assert rest.headers["content-range"] == f"bytes 1000-{len(r.content) - 1}/{len(r.content)}"
    tail = client.get(url, headers={**owner.headers, "Range": "bytes=-700"})
    assert tail.content == r.content[-700:]
    stale = client.get(url, headers={**owner.headers, "Range": "bytes=0-9", "If-Range": '"old"'})
    assert stale.status_code == 200 and stale.content == r.content
    bad = client.get(url, headers={**owner.headers, "Range": f"bytes={len(r.content)}-"})
    assert_problem(bad, 416, "range_not_satisfiable")
    imp = client.get(f"/v1/lineages/{lineage}/stages/1/importance", headers=owner.headers)
    assert imp.status_code == 200
    files = {n.rsplit("/", 1)[-1] for n in tarfile.open(fileobj=io.BytesIO(imp.content)).getnames()}
    assert {"general.safetensors", "domain.safetensors", "accumulated.safetensors"} <= files
    stranger = new_owner(client.app)
    assert_problem(client.get(url, headers=stranger.headers), 404)


def test_a_redelivered_message_does_nothing(env, trained):
    _, app, _, runner, _ = env
    _, _, first, _ = trained
    before = len(_events(app, first))
    assert runner.run(first).startswith("not_claimable")
    assert len(_events(app, first)) == before
    assert runner.run(10**9) == "not_found"


def test_a_live_lease_is_not_taken_but_an_expired_one_is_resumed(env):
    settings, app, client, runner, _ = env
    owner = new_owner(app)
    lineage = create_lineage(client, owner).json()["id"]
    job_id = add_domain(client, owner, lineage, "bio")
    factory = app.state.session_factory
    with factory() as session, session.begin():
        job = by_public(session, Job, job_id)
        job.status, job.attempts, job.claim_token = "running", 1, "a-dead-worker"
        job.lease_expires_at = utcnow() + timedelta(seconds=300)
    assert runner.run(job_id) == "not_claimable (running)"
    with factory() as session, session.begin():
        by_public(session, Job, job_id).lease_expires_at = utcnow() - timedelta(seconds=1)
    assert runner.run(job_id) == "succeeded"
    job = client.get(f"/v1/jobs/{job_id}", headers=owner.headers).json()
    assert job["attempts"] == 2 and job["status"] == "succeeded"
    assert "resumed" in [e.type for e in _events(app, job_id)]


def test_a_job_whose_worker_keeps_dying_fails_after_max_attempts(env):
    """A poison job (its worker killed by the OOM killer every time) must not loop forever."""
    settings, app, client, runner, _ = env
    owner = new_owner(app)
    lineage = create_lineage(client, owner).json()["id"]
    job_id = add_domain(client, owner, lineage, "news")
    queued_behind = add_domain(client, owner, lineage, "law")
    factory = app.state.session_factory
    with factory() as session, session.begin():
        job = by_public(session, Job, job_id)
        job.status, job.claim_token = "running", "a-dead-worker"
        job.attempts = settings.max_attempts
        job.lease_expires_at = utcnow() - timedelta(seconds=1)
    assert runner.run(job_id) == "failed (worker_lost)"
    job = client.get(f"/v1/jobs/{job_id}", headers=owner.headers).json()
    assert job["status"] == "failed" and job["attempts"] == settings.max_attempts
    assert job["error"]["code"] == "worker_lost"
    assert str(settings.max_attempts) in job["error"]["message"]
    behind = client.get(f"/v1/jobs/{queued_behind}", headers=owner.headers).json()
    assert behind["status"] == "cancelled"  # stages queued behind a failure are cancelled
    assert runner.run(job_id).startswith("not_claimable")


def test_cancel_mid_training(env):
    settings, app, client, runner, _ = env
    owner = new_owner(app)
    hp = {
        "max_steps": 400,
        "batch_size": 4,
        "block_size": 32,
        "eval_max_batches": 2,
        "importance_max_batches": 2,
        "checkpoint_every": 5,
    }
    lineage = create_lineage(client, owner, hyperparameters=hp).json()["id"]
    job_id = add_domain(client, owner, lineage, "news")
    outcome: list[str] = []
    thread = threading.Thread(target=lambda: outcome.append(runner.run(job_id)))
    thread.start()

    def training() -> bool:
        job = client.get(f"/v1/jobs/{job_id}", headers=owner.headers).json()
        return job["phase"] == "training" and (job["step"] or 0) >= 2

    wait_for(training, 120, "training to start")
    started = time.monotonic()
    r = client.post(f"/v1/jobs/{job_id}/cancel", headers=owner.headers)
    assert r.status_code == 202 and r.json()["status"] == "cancelling"
    thread.join(timeout=120)
    assert outcome == ["cancelled"] and time.monotonic() - started < 30
    job = client.get(f"/v1/jobs/{job_id}", headers=owner.headers).json()
    assert job["status"] == "cancelled" and (job["step"] or 0) < 400
    # nothing half-written became a stage
    stages = lineage_path(settings, lineage) / "stages"
    assert [p.name for p in stages.iterdir() if not p.name.endswith(".partial")] == []


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (MemoryError(), "out_of_memory"),
        (OSError(errno.ENOSPC, "No space left on device"), "disk_full"),
        (RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"), "out_of_memory"),
        (ValueError("token=hunter2 something broke"), "internal_error"),
    ],
)
def test_failures_become_error_codes(env, exc, code):
    """The job's child process raises (the fault is injected there, where the job runs):
    each failure ends in its code, with the phase, and nothing of the exception's text."""
    from tests.service.child_faults import raise_in_add_domain
    from worker.runner import JobRunner

    settings, app, client, runner, recorder = env
    failing = JobRunner(
        settings,
        app.state.session_factory,
        recorder,
        worker_id="test-worker",
        child_setup=functools.partial(raise_in_add_domain, exc),
    )
    owner = new_owner(app)
    lineage = create_lineage(client, owner).json()["id"]
    first = add_domain(client, owner, lineage, "news")
    second = add_domain(client, owner, lineage, "law")
    assert failing.run(first) == "failed"
    job = client.get(f"/v1/jobs/{first}", headers=owner.headers).json()
    assert job["status"] == "failed"
    assert job["error"]["code"] == code and job["error"]["phase"] == "training"
    assert "hunter2" not in job["error"]["message"]
    if code == "internal_error":  # the trace is in the server log, under this id
        correlation_id = job["error"]["correlation_id"]
        assert len(correlation_id) == 16 and correlation_id in job["error"]["message"]
    else:
        assert job["error"]["correlation_id"] is None
    assert "traceback" not in [e.type for e in _events(app, first)]
    follower = client.get(f"/v1/jobs/{second}", headers=owner.headers).json()
    assert follower["status"] == "cancelled"
    assert follower["error"]["code"] == "previous_stage_not_completed"


def test_engine_errors_keep_their_code(env):
    settings, app, client, runner, _ = env
    owner = new_owner(app)
    lineage = create_lineage(client, owner).json()["id"]
    job_id = add_domain(client, owner, lineage, "news")
    stage = client.get(f"/v1/lineages/{lineage}", headers=owner.headers).json()["stages"][0]
    from service_core.models import Corpus

    with app.state.session_factory() as session:
        path = settings.data_dir / by_public(session, Corpus, stage["corpus_id"]).storage_path
    path.unlink()  # the corpus vanished from the disk
    assert runner.run(job_id) == "failed"
    error = client.get(f"/v1/jobs/{job_id}", headers=owner.headers).json()["error"]
    assert error["code"] == "lineage_error" and "does not exist" in error["message"]
    assert str(settings.data_dir) not in error["message"]


def test_sweep_finds_lost_messages_and_dead_workers(env):
    from service_core.lifecycle import jobs_to_enqueue
    from service_core.sweep import sweep

    settings, app, client, runner, _ = env
    owner = new_owner(app)
    lineage = create_lineage(client, owner).json()["id"]
    queued = add_domain(client, owner, lineage, "news")
    waiting = add_domain(client, owner, lineage, "law")
    other = create_lineage(client, owner).json()["id"]
    dead = add_domain(client, owner, other, "bio")
    factory = app.state.session_factory
    with factory() as session, session.begin():
        job = by_public(session, Job, dead)
        job.status, job.claim_token = "running", "gone"
        job.lease_expires_at = utcnow() - timedelta(seconds=5)
    queued, dead, waiting = (row_id(app, Job, j) for j in (queued, dead, waiting))  # as sent
    with factory() as session:
        found = jobs_to_enqueue(session, stale_before=None)
        assert queued in found and dead in found and waiting not in found
        # recently sent jobs are not sent again by the periodic sweep
        recent = jobs_to_enqueue(session, stale_before=utcnow() - timedelta(seconds=60))
        assert queued not in recent and dead in recent
    sent = EnqueueRecorder()
    assert set(sweep(settings, stale_before=None, factory=factory, enqueue=sent)) >= {queued, dead}


def test_a_lineage_locked_by_a_stale_worker_is_left_to_the_sweep(env, monkeypatch):
    from das_engine.errors import LineageBusyError
    from das_engine.lineage import Lineage

    settings, app, client, runner, _ = env
    owner = new_owner(app)
    lineage = create_lineage(client, owner).json()["id"]
    job_id = add_domain(client, owner, lineage, "news")

    def busy(self, *args, **kwargs):  # noqa: ANN001, ANN202
        raise LineageBusyError(f"{self.path} is being trained by another process")

    monkeypatch.setattr(Lineage, "add_domain", busy)
    assert _run_here(runner, job_id) == "lineage_busy"
    job = client.get(f"/v1/jobs/{job_id}", headers=owner.headers).json()
    assert job["status"] == "running" and job["error"] is None  # its lease will expire


def test_a_stage_the_engine_finished_but_the_database_missed_is_adopted(env, monkeypatch):
    """A crash between the engine's commit and the database's: the next attempt finds the
    stage done (DomainExistsError) and records the engine's result instead of failing."""
    from das_engine.lineage import Lineage

    settings, app, client, runner, _ = env
    owner = new_owner(app)
    lineage = create_lineage(client, owner).json()["id"]
    job_id = add_domain(client, owner, lineage, "news")
    real = Lineage.add_domain
    trained = []

    def trained_before(self, *args, **kwargs):  # noqa: ANN001, ANN202
        trained.append(real(self, *args, **kwargs))  # the earlier attempt's engine commit
        return real(self, *args, **kwargs)  # this attempt: the stage is there already

    monkeypatch.setattr(Lineage, "add_domain", trained_before)
    assert _run_here(runner, job_id) == "succeeded"
    body = client.get(f"/v1/lineages/{lineage}", headers=owner.headers).json()
    assert [(s["name"], s["status"], s["steps"]) for s in body["stages"]] == [
        ("news", "succeeded", trained[0].steps)
    ]
    result = [e for e in _events(app, job_id) if e.type == "result"][-1].data
    assert result["eval_losses"] == trained[0].eval_losses
    assert result["column"] == trained[0].column  # the whole result, read back from disk
    r = client.get(f"/v1/lineages/{lineage}/stages/1/importance", headers=owner.headers)
    assert r.status_code == 200
