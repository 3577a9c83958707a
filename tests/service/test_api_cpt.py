"""The ``cpt`` strategy through the API: in the schema's strategy enum with its own typed
parameters (found by the registry, no API code), accepted, and its parameters checked."""

from __future__ import annotations

from tests.service.conftest import TINY_HP, assert_problem, create_lineage


def test_cpt_is_in_the_schema_with_its_parameters(api):  # noqa: ANN001
    schemas = api.openapi()["components"]["schemas"]
    props = schemas["LineageCreate"]["properties"]["hyperparameters"]["properties"]
    assert "cpt" in props["strategy"]["enum"]
    assert props["cpt_export_mask"]["enum"] == ["domain", "union"]
    assert props["cpt_plugin_size"]["type"] == "integer"
    assert props["cpt_plugin_size"]["minimum"] == 1 and props["cpt_s_max"]["default"] == 400.0


def test_a_cpt_lineage_is_accepted_and_its_parameters_validated(client, alice):  # noqa: ANN001
    bad = {"cpt_plugin_size": 0, "cpt_s_max": 0.5, "cpt_sparsity": -1, "cpt_export_mask": "all"}
    r = create_lineage(client, alice, strategy="cpt", hyperparameters={**TINY_HP, **bad})
    fields = {e["field"] for e in assert_problem(r, 422, "invalid_hyperparameters")["errors"]}
    assert fields == {f"hyperparameters.{k}" for k in bad}
    hp = {**TINY_HP, "cpt_plugin_size": 8, "cpt_sparsity": 0.5, "cpt_export_mask": "union"}
    r = create_lineage(client, alice, name="plugins ✓ 日本", strategy="cpt", hyperparameters=hp)
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["strategy"] == "cpt" and body["hyperparameters"] == hp
    assert body["name"] == "plugins ✓ 日本"
