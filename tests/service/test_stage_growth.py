"""A stage's size through the service: the checkpoint's parameter count and what the
strategy grew (ELLE), shown in the lineage, the metrics and a fork; null for DAS."""

from __future__ import annotations

import pytest

from tests.service.conftest import (
    TINY_HP,
    add_domain,
    create_lineage,
    in_process_runner,
    new_owner,
)

ELLE_HP = {**TINY_HP, "elle_ffn_growth": 0.5, "elle_new_layers": 1, "elle_warmup_steps": 2}


@pytest.fixture(scope="module")
def env(tmp_path_factory):  # noqa: ANN201
    with in_process_runner(tmp_path_factory.mktemp("growth")) as env:
        yield env


def test_elle_growth_is_shown_per_stage_and_kept_by_a_fork(env):  # noqa: ANN001
    settings, app, client, runner, _ = env
    owner = new_owner(app)
    r = create_lineage(client, owner, name="grows ✓", strategy="elle", hyperparameters=ELLE_HP)
    assert r.status_code == 201, r.text
    lineage = r.json()["id"]
    jobs = [add_domain(client, owner, lineage, d) for d in ("news", "law")]
    assert [runner.run(j) for j in jobs] == ["succeeded", "succeeded"]
    stages = client.get(f"/v1/lineages/{lineage}", headers=owner.headers).json()["stages"]
    first, second = (s["growth"] for s in stages)
    # stage 1 trains the base as it is; stage 2 widens every FFN by half and adds a layer
    assert first["expanded"] is False and second["expanded"] is True
    assert second["intermediate_size"] == round(first["intermediate_size"] * 1.5)
    assert second["num_layers"] == first["num_layers"] + 1
    assert second["parameters_before"] == stages[0]["parameters"] < stages[1]["parameters"]
    assert stages[1]["parameters"] == second["parameters"]
    m = client.get(f"/v1/lineages/{lineage}/metrics", headers=owner.headers).json()
    assert [(g["position"], g["name"], g["parameters"]) for g in m["growth"]] == [
        (s["position"], s["name"], s["parameters"]) for s in stages
    ]
    assert m["growth"][1]["growth"] == second
    body = {"name": "branch ✓", "from_stage": 2}
    r = client.post(f"/v1/lineages/{lineage}/fork", headers=owner.headers, json=body)
    assert r.status_code in (200, 201, 202), r.text
    fork = r.json()
    forked = client.get(f"/v1/lineages/{fork['id']}", headers=owner.headers).json()["stages"]
    assert [(s["parameters"], s["growth"]) for s in forked] == [
        (s["parameters"], s["growth"]) for s in stages
    ]


def test_a_das_stage_reports_its_size_and_no_growth(env):  # noqa: ANN001
    _, app, client, runner, _ = env
    owner = new_owner(app)
    lineage = create_lineage(client, owner).json()["id"]
    assert runner.run(add_domain(client, owner, lineage, "news")) == "succeeded"
    (stage,) = client.get(f"/v1/lineages/{lineage}", headers=owner.headers).json()["stages"]
    assert stage["growth"] is None and stage["parameters"] > 0
