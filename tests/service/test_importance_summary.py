"""GET /v1/lineages/{id}/importance: the stored snapshots summarised per layer and unit
kind, stage by stage (what the dashboard's importance view draws)."""

from __future__ import annotations

import torch
from sqlalchemy import select

from das_engine.importance import Importance
from service_core.models import ImportanceSnapshot, Lineage
from tests.service.conftest import add_domain, assert_problem, create_lineage


def _succeed_first_stage(api, owner: str, snapshots: dict[str, str]) -> None:  # noqa: ANN001
    """Mark the owner's (only) lineage's stage 1 succeeded with these snapshot files; rows
    are found by owner, never by an id built here."""
    with api.state.session_factory() as session, session.begin():
        lineage = session.scalars(select(Lineage).where(Lineage.owner == owner)).one()
        stage = lineage.stages[0]
        stage.job.status = "succeeded"
        for kind, path in snapshots.items():
            session.add(ImportanceSnapshot(stage_id=stage.id, kind=kind, path=path))


def test_the_summary_per_layer_and_unit_kind(api, client, alice, bob, tmp_path):
    lineage = create_lineage(client, alice, name="importance ✓").json()["id"]
    add_domain(client, alice, lineage, "news")
    url = f"/v1/lineages/{lineage}/importance"
    assert client.get(url, headers=alice.headers).json()["stages"] == []  # not trained yet
    values = {
        "head": torch.tensor([[0.9, 0.2], [0.6, 0.7]]),
        "intermediate": torch.tensor([[0.1, 0.2, 0.3, 0.9], [0.0, 0.0, 0.0, 0.0]]),
        "output": torch.tensor([[0.4, 0.4], [0.8, 0.2]]),
    }
    Importance(values).save(tmp_path / "accumulated.safetensors", "accumulated")
    (tmp_path / "domain.safetensors").write_bytes(b"not a safetensors file")
    _succeed_first_stage(
        api,
        alice.name,
        {
            "accumulated": str(tmp_path / "accumulated.safetensors"),
            "domain": str(tmp_path / "domain.safetensors"),  # damaged: left out, not a 500
            "general": str(tmp_path / "gone.safetensors"),  # missing: left out
        },
    )
    r = client.get(url, headers=alice.headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["lineage_id"] == lineage
    [stage] = body["stages"]
    assert (stage["position"], stage["name"]) == (1, "news")
    assert set(stage["snapshots"]) == {"accumulated"}
    head = stage["snapshots"]["accumulated"]["head"]
    assert (head["layers"], head["units"]) == (2, 2)
    assert head["share_above_half"] == [0.5, 1.0]
    inter = stage["snapshots"]["accumulated"]["intermediate"]
    assert inter["share_above_half"] == [0.25, 0.0] and inter["units"] == 4
    assert abs(inter["mean"][0] - 0.375) < 1e-6
    assert_problem(client.get(url, headers=bob.headers), 404, "lineage_not_found")
