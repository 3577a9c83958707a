"""Lifecycle with the real engine on the tiny base, in-process on SQLite: the per-step
series and checkpoints of trained jobs, HEAD on artifacts, forking a trained lineage and
training the fork on, deleting a parent without touching its fork, and a forced delete
while a stage trains (the worker removes the files once it stopped)."""

from __future__ import annotations

import io
import math
import tarfile
import threading
import time

import pytest

from service_core.models import Lineage
from tests.service.conftest import (
    add_domain,
    assert_problem,
    by_public,
    create_lineage,
    in_process_runner,
    lineage_path,
    new_owner,
    wait_for,
)


@pytest.fixture(scope="module")
def env(tmp_path_factory):  # noqa: ANN201
    with in_process_runner(tmp_path_factory.mktemp("lifecycle")) as env:
        yield env


@pytest.fixture(scope="module")
def trained(env):  # noqa: ANN201
    """A lineage trained on news then law (4 steps each, an event every step)."""
    _, app, client, runner, _ = env
    owner = new_owner(app)
    lineage = create_lineage(client, owner).json()["id"]
    first = add_domain(client, owner, lineage, "news")
    second = add_domain(client, owner, lineage, "law")
    assert runner.run(first) == "succeeded"
    assert runner.run(second) == "succeeded"
    return owner, lineage, first, second


def _members(content: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(content)) as tar:
        return {
            m.name.split("/", 1)[-1]: tar.extractfile(m).read()  # type: ignore[union-attr]
            for m in tar.getmembers()
            if m.isfile()
        }


def test_job_metrics_series_and_eval_loss(env, trained):
    _, _, client, _, _ = env
    owner, lineage, first, second = trained
    matrix = client.get(f"/v1/lineages/{lineage}/metrics", headers=owner.headers).json()
    for row, job in enumerate((first, second)):
        body = client.get(f"/v1/jobs/{job}/metrics", headers=owner.headers).json()
        assert [p["step"] for p in body["series"]] == [1, 2, 3, 4]
        assert all(math.isfinite(p["train_loss"]) for p in body["series"])
        assert all(p["tokens_per_s"] > 0 for p in body["series"])
        elapsed = [p["elapsed_s"] for p in body["series"]]
        assert elapsed == sorted(elapsed) and elapsed[0] >= 0
        tokens = [p["trained_tokens"] for p in body["series"]]
        assert tokens == sorted(tokens) and tokens[0] > 0
        assert body["eval_loss"] == pytest.approx(matrix["loss_matrix"][row][row])
        # the model after this stage on every domain (later ones back-filled as they came)
        assert body["eval_losses"] == pytest.approx(
            dict(zip(matrix["domains"], matrix["loss_matrix"][row], strict=True))
        )


def test_final_checkpoint_is_listed_and_head_matches_get(env, trained):
    _, _, client, _, _ = env
    owner, lineage, _, second = trained
    listed = client.get(f"/v1/jobs/{second}/checkpoints", headers=owner.headers).json()
    assert [(c["step"], c["final"], c["available"]) for c in listed["data"]] == [(4, True, True)]
    url = listed["data"][0]["download_url"]
    assert url == f"/v1/lineages/{lineage}/stages/2/checkpoint"
    for artifact in (url, f"/v1/lineages/{lineage}/stages/1/importance"):
        got = client.get(artifact, headers=owner.headers)
        head = client.head(artifact, headers=owner.headers)
        assert head.status_code == 200 and head.content == b""
        assert head.headers["content-length"] == str(len(got.content))
        assert head.headers["etag"] == got.headers["etag"]
        assert head.headers["content-type"] == "application/x-tar"
        same = client.head(
            artifact, headers={**owner.headers, "If-None-Match": got.headers["etag"]}
        )
        assert same.status_code == 304
    stranger = new_owner(client.app)
    assert client.head(url, headers=stranger.headers).status_code == 404


def test_fork_copies_stages_and_trains_on(env, trained):
    settings, app, client, runner, _ = env
    owner, lineage, _, _ = trained
    url = f"/v1/lineages/{lineage}/fork"
    step = client.post(
        url, headers=owner.headers, json={"name": "b", "from_stage": 1, "from_checkpoint": 2}
    )
    assert_problem(step, 422, "checkpoint_not_supported")
    r = client.post(
        url,
        headers=owner.headers,
        json={"name": "branch", "from_stage": "news", "from_checkpoint": 4},
    )
    assert r.status_code == 201, r.text
    fork = r.json()
    assert fork["id"] != lineage and fork["name"] == "branch"
    assert (fork["forked_from_id"], fork["forked_from_position"]) == (lineage, 1)
    assert [(s["position"], s["name"], s["status"]) for s in fork["stages"]] == [
        (1, "news", "succeeded")
    ]
    parent = client.get(f"/v1/lineages/{lineage}", headers=owner.headers).json()
    assert fork["hyperparameters"] == parent["hyperparameters"]
    assert fork["strategy"] == parent["strategy"] and fork["base_model"] == parent["base_model"]
    # the fork's stage 1 is the parent's stage 1, byte for byte, from the fork's own files
    mine = _members(
        client.get(f"/v1/lineages/{fork['id']}/stages/1/checkpoint", headers=owner.headers).content
    )
    theirs = _members(
        client.get(f"/v1/lineages/{lineage}/stages/1/checkpoint", headers=owner.headers).content
    )
    assert mine == theirs and "model.safetensors" in mine
    imp = client.get(f"/v1/lineages/{fork['id']}/stages/1/importance", headers=owner.headers)
    assert imp.status_code == 200
    parent_m = client.get(f"/v1/lineages/{lineage}/metrics", headers=owner.headers).json()
    fork_m = client.get(f"/v1/lineages/{fork['id']}/metrics", headers=owner.headers).json()
    assert fork_m["domains"] == ["news"]
    assert fork_m["loss_matrix"] == [[parent_m["loss_matrix"][0][0]]]
    copied_job = fork["stages"][0]["job_id"]
    assert [
        p["step"]
        for p in client.get(f"/v1/jobs/{copied_job}/metrics", headers=owner.headers).json()[
            "series"
        ]
    ] == [1, 2, 3, 4]
    # a new domain on the fork trains after the copied stage; the parent is untouched
    job = add_domain(client, owner, fork["id"], "bio")
    assert runner.run(job) == "succeeded"
    fork_m = client.get(f"/v1/lineages/{fork['id']}/metrics", headers=owner.headers).json()
    assert fork_m["domains"] == ["news", "bio"]
    assert all(math.isfinite(x) for row in fork_m["loss_matrix"] for x in row)
    assert fork_m["loss_matrix"][0][0] == parent_m["loss_matrix"][0][0]
    again = client.get(f"/v1/lineages/{lineage}/metrics", headers=owner.headers).json()
    assert again == parent_m
    # deleting the parent leaves the fork whole
    assert client.delete(f"/v1/lineages/{lineage}", headers=owner.headers).status_code == 204
    assert not lineage_path(settings, lineage).exists()
    for position in (1, 2):
        got = client.get(
            f"/v1/lineages/{fork['id']}/stages/{position}/checkpoint", headers=owner.headers
        )
        assert got.status_code == 200
    assert_problem(
        client.post(url, headers=owner.headers, json={"name": "c", "from_stage": 1}), 404
    )


def test_forced_delete_while_training(env):
    settings, app, client, runner, _ = env
    owner = new_owner(app)
    hp = {
        "max_steps": 400,
        "batch_size": 4,
        "block_size": 32,
        "eval_max_batches": 2,
        "importance_max_batches": 2,
        "checkpoint_every": 3,
    }
    lineage = create_lineage(client, owner, hyperparameters=hp).json()["id"]
    job_id = add_domain(client, owner, lineage, "news")
    outcome: list[str] = []
    thread = threading.Thread(target=lambda: outcome.append(runner.run(job_id)))
    thread.start()

    def step_checkpoints() -> list:
        body = client.get(f"/v1/jobs/{job_id}/checkpoints", headers=owner.headers).json()
        return [c for c in body["data"] if not c["final"]]

    try:
        listed = wait_for(step_checkpoints, 120, "a step checkpoint")
        assert all(c["step"] % 3 == 0 and c["available"] for c in listed)
        assert_problem(
            client.delete(f"/v1/lineages/{lineage}", headers=owner.headers), 409, "lineage_training"
        )
        started = time.monotonic()
        r = client.delete(f"/v1/lineages/{lineage}?force=true", headers=owner.headers)
        assert r.status_code == 204
        assert_problem(client.get(f"/v1/lineages/{lineage}", headers=owner.headers), 404)
    finally:
        thread.join(timeout=120)
    assert outcome == ["cancelled"] and time.monotonic() - started < 60
    # the worker removed the folder once it had recorded the cancel
    assert not lineage_path(settings, lineage).exists()
    with app.state.session_factory() as session:
        assert by_public(session, Lineage, lineage).files_removed_at is not None
