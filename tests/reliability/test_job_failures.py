"""Out of memory and a full disk inside a real engine run (in-process worker, SQLite, the
tiny base), injected deep in the engine rather than around it:

- out of memory (``torch.OutOfMemoryError`` as CUDA raises it, or ``MemoryError``) in each
  phase is recorded as ``error.code = "out_of_memory"`` with that phase, nothing is left
  half-written, and submitting the domain again succeeds (resuming from the last step
  checkpoint when training had reached one);
- a full disk (``ENOSPC``) while a step checkpoint or an importance snapshot is written fails
  the job with ``disk_full``; the previous snapshot and checkpoint stay byte-identical, no
  temporary file is left, and submitting the domain again succeeds.

``tests/service/test_worker.py`` already maps each exception type to its code (with the engine
replaced by a stub); these tests check the real engine's phases, files and the retry.
"""

from __future__ import annotations

import errno
import hashlib
from pathlib import Path

import pytest
import torch

from tests.reliability.helpers import events, job
from tests.service.conftest import (
    TINY_HP,
    add_domain,
    create_lineage,
    in_process_runner,
    lineage_path,
    new_owner,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

HP = {**TINY_HP, "max_steps": 6, "checkpoint_every": 2}


@pytest.fixture(scope="module")
def env(tmp_path_factory):  # noqa: ANN201
    # in this process (isolate=False): the faults are monkeypatched into the engine here
    with in_process_runner(tmp_path_factory.mktemp("failures"), isolate=False) as (
        settings,
        app,
        client,
        runner,
        _,
    ):
        yield settings, app, client, runner


def _cuda_oom(*_a, **_k):  # noqa: ANN202
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def _host_oom(*_a, **_k):  # noqa: ANN202
    raise MemoryError()


def _fail_on_call(n: int, real, exc):  # noqa: ANN001, ANN202
    """``real``, except that its ``n``-th call raises ``exc()``."""
    calls = {"n": 0}

    def wrapper(*args, **kwargs):  # noqa: ANN202
        calls["n"] += 1
        if calls["n"] == n:
            exc()
        return real(*args, **kwargs)

    return wrapper


def _stage_dir(settings, lineage: int, position: int) -> Path:  # noqa: ANN001
    stages = lineage_path(settings, lineage) / "stages"
    return next(stages.glob(f"{position:03d}-*"))


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _temporaries(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]


def _result(client, owner, job_id: int) -> dict:  # noqa: ANN001
    return next(e for e in events(client, owner, job_id) if e["type"] == "result")["data"]


@pytest.mark.parametrize(
    ("phase", "target", "make_fault"),
    [
        # the general importance (proxy KL) of the first stage
        (
            "importance",
            "das_engine.strategies.das_importance.general_importance",
            lambda real: _cuda_oom,
        ),
        # the third training step (two step checkpoints... one at step 2 exists by then)
        (
            "training",
            "das_engine.trainer.Trainer._micro_batch",
            lambda real: _fail_on_call(3, real, _host_oom),
        ),
        # the held-out evaluation after training (the first call scores the base)
        (
            "evaluating",
            "das_engine.lineage.heldout_loss",
            lambda real: _fail_on_call(2, real, _cuda_oom),
        ),
    ],
    ids=["importance", "training", "evaluating"],
)
def test_out_of_memory_is_recorded_with_its_phase_then_a_retry_succeeds(
    env, monkeypatch, phase, target, make_fault
):
    import importlib

    settings, app, client, runner = env
    owner = new_owner(app)
    lineage = create_lineage(client, owner, hyperparameters=HP).json()["id"]
    job_id = add_domain(client, owner, lineage, "news")
    module_name, _, attr = target.rpartition(".")
    try:
        holder = importlib.import_module(module_name)
    except ModuleNotFoundError:  # a method: module.Class.attr
        module_name, _, cls = module_name.rpartition(".")
        holder = getattr(importlib.import_module(module_name), cls)
    monkeypatch.setattr(holder, attr, make_fault(getattr(holder, attr)))

    assert runner.run(job_id) == "failed"
    state = job(client, owner, job_id)
    assert state["status"] == "failed"
    assert state["error"]["code"] == "out_of_memory", state["error"]
    assert state["error"]["phase"] == phase, state["error"]
    assert "memory" in state["error"]["message"]
    failed = [e for e in events(client, owner, job_id) if e["type"] == "failed"]
    assert len(failed) == 1 and failed[0]["data"]["error"]["code"] == "out_of_memory"
    assert failed[0]["level"] == "error"
    lineage_dir = lineage_path(settings, lineage)
    assert not (lineage_dir / "stages" / "001-news").exists()  # no stage from a failed run
    assert _temporaries(lineage_dir) == []

    monkeypatch.undo()  # memory is back: the same domain, submitted again, trains
    retry = add_domain(client, owner, lineage, "news")
    assert runner.run(retry) == "succeeded"
    body = client.get(f"/v1/lineages/{lineage}", headers=owner.headers).json()
    assert [(s["position"], s["name"], s["status"]) for s in body["stages"]] == [
        (1, "news", "failed"),
        (2, "news", "succeeded"),
    ]
    if phase == "training":  # the step-2 checkpoint written before the failure is reused
        assert _result(client, owner, retry)["resumed_from_step"] == 2


@pytest.mark.parametrize(
    ("where", "phase"),
    [("step checkpoint", "training"), ("accumulated importance snapshot", "importance")],
    ids=["step-checkpoint", "importance-snapshot"],
)
def test_disk_full_keeps_the_previous_snapshot_and_a_retry_succeeds(env, monkeypatch, where, phase):
    import das_engine.importance
    import das_engine.trainer

    settings, app, client, runner = env
    owner = new_owner(app)
    lineage = create_lineage(client, owner, hyperparameters=HP).json()["id"]
    first = add_domain(client, owner, lineage, "news")
    assert runner.run(first) == "succeeded"
    lineage_dir = lineage_path(settings, lineage)
    before = {
        "stage 1": _digests(_stage_dir(settings, lineage, 1)),
        "general": _digests(lineage_dir / "importance"),
    }
    url = f"/v1/lineages/{lineage}/stages/1/checkpoint"
    etag = client.get(url, headers=owner.headers).headers["etag"]

    def enospc(*_a, **_k):  # noqa: ANN202
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "step checkpoint":  # the second one (step 4); step 2's is on disk
        monkeypatch.setattr(
            das_engine.trainer,
            "save_model",
            _fail_on_call(2, das_engine.trainer.save_model, enospc),
        )
    else:  # half the accumulated snapshot written, then the disk is full
        real_save = das_engine.importance.save_file

        def save_file(tensors, path, metadata=None):  # noqa: ANN001, ANN202
            if "accumulated" in str(path):
                Path(path).write_bytes(b"\x00" * 100)
                enospc()
            return real_save(tensors, path, metadata)

        monkeypatch.setattr(das_engine.importance, "save_file", save_file)

    second = add_domain(client, owner, lineage, "law")
    assert runner.run(second) == "failed"
    state = job(client, owner, second)
    assert state["error"]["code"] == "disk_full" and state["error"]["phase"] == phase
    assert str(settings.data_dir) not in state["error"]["message"]
    # the previous stage and the lineage's importance are untouched, nothing half-written
    assert _digests(_stage_dir(settings, lineage, 1)) == before["stage 1"]
    assert _digests(lineage_dir / "importance") == before["general"]
    assert _temporaries(lineage_dir) == []
    partial = next((lineage_dir / "stages").glob("002-law.partial"))
    if where == "step checkpoint":
        assert sorted(p.name for p in (partial / "checkpoints").iterdir()) == ["step-00000002"]
    else:
        assert not (partial / "importance" / "accumulated.safetensors").exists()
    assert client.get(url, headers=owner.headers).headers["etag"] == etag

    monkeypatch.undo()  # space freed: the same domain, submitted again, trains
    retry = add_domain(client, owner, lineage, "law")
    assert runner.run(retry) == "succeeded"
    # training: the step-2 checkpoint; importance: the final step's (6), no step retrained
    assert _result(client, owner, retry)["resumed_from_step"] == (2 if phase == "training" else 6)
    metrics = client.get(f"/v1/lineages/{lineage}/metrics", headers=owner.headers).json()
    assert metrics["domains"] == ["news", "law"]
    assert all(v is not None for row in metrics["loss_matrix"] for v in row)
    assert _digests(_stage_dir(settings, lineage, 1)) == before["stage 1"]
