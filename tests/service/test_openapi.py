"""The OpenAPI document: a description on every operation, parameter and request field, a
typed ``hyperparameters`` schema generated from das_engine's ``TrainingConfig`` (whose
ranges are the engine's), and ``Idempotency-Key`` declared where it is honoured."""

from __future__ import annotations

import subprocess
import sys
import typing

import pytest

from das_engine.config import STRATEGIES, TrainingConfig
from das_engine.errors import ConfigError
from tests.service.conftest import REPO

IDEMPOTENT = {
    ("post", "/v1/lineages"),
    ("post", "/v1/lineages/{lineage_id}/domains"),
    ("post", "/v1/corpora"),
    ("post", "/v1/jobs/{job_id}/cancel"),
}


@pytest.fixture(scope="module")
def doc(api) -> dict:  # noqa: ANN001
    return api.openapi()


def _operations(doc: dict):  # noqa: ANN202
    for path, item in doc["paths"].items():
        for method, op in item.items():
            yield method, path, op


def _resolve(doc: dict, schema: dict) -> dict:
    while "$ref" in schema:
        schema = doc["components"]["schemas"][schema["$ref"].split("/")[-1]]
    return schema


def _undescribed(doc: dict, schema: dict, where: str, seen: set) -> list[str]:
    """Properties (recursively) with no description."""
    schema = _resolve(doc, schema)
    if id(schema) in seen:
        return []
    seen.add(id(schema))
    missing = []
    for name, prop in schema.get("properties", {}).items():
        if not prop.get("description") and not _resolve(doc, prop).get("description"):
            missing.append(f"{where}.{name}")
        missing += _undescribed(doc, prop, f"{where}.{name}", seen)
    for key in ("anyOf", "allOf", "oneOf"):
        for sub in schema.get(key, []):
            missing += _undescribed(doc, sub, where, seen)
    return missing


def test_every_operation_and_parameter_has_a_description(doc):
    for method, path, op in _operations(doc):
        assert op.get("summary") and len(op.get("description", "")) > 20, (method, path)
        for param in op.get("parameters", []):
            if param["in"] != "path":
                assert param.get("description"), (method, path, param["name"])


def test_every_property_of_every_request_body_has_a_description(doc):
    bodies = 0
    for method, path, op in _operations(doc):
        for media, content in op.get("requestBody", {}).get("content", {}).items():
            bodies += 1
            missing = _undescribed(doc, content["schema"], f"{method} {path} {media}", set())
            assert missing == [], missing
    assert bodies >= 4  # lineages (JSON), domains (JSON and multipart), corpora (multipart)


def test_hyperparameters_are_typed_from_the_training_config(doc):
    lineage = doc["components"]["schemas"]["LineageCreate"]
    hyper = lineage["properties"]["hyperparameters"]
    assert hyper["type"] == "object" and hyper["additionalProperties"] is False
    props = hyper["properties"]
    hints = typing.get_type_hints(TrainingConfig)
    defaults = TrainingConfig().to_dict()
    assert set(props) == set(TrainingConfig.field_names()) == set(defaults)
    # each strategy's parameters keep their flat names (requests and stored lineages use them)
    flat = {"kd_weight", "ewc_lambda", "ewc_gamma", "ewc_fisher_samples", "adapter_rank"}
    flat |= {"replay_buffer_size", "replay_alpha", "replay_beta", "adapter_alpha"}
    assert flat <= set(props) and "params" not in props
    assert props["strategy"]["enum"] == list(STRATEGIES)
    for name in TrainingConfig.field_names():
        schema = props[name]
        kind = schema.get("type") or schema["anyOf"][0].get("type")
        assert kind in ("integer", "number", "string", "boolean", "object"), name
        assert schema["description"], name
        if name in hints and typing.get_origin(hints[name]) is typing.Literal:
            assert schema["enum"] == list(typing.get_args(hints[name])), name
        if defaults[name] is not None and name != "strategy":
            assert schema["default"] == defaults[name], name
    assert props["max_steps"]["anyOf"][1] == {"type": "null"}
    assert props["block_size"]["type"] == "integer" and props["learning_rate"]["type"] == "number"
    assert props["device"]["enum"] == ["auto"]


def _numeric():  # noqa: ANN202
    from app.hyperparameters import hyperparameters_schema

    for name, schema in hyperparameters_schema()["properties"].items():
        target = schema["anyOf"][0] if "anyOf" in schema else schema
        if target.get("type") in ("integer", "number"):
            yield name, target


def test_the_documented_ranges_are_the_ones_the_engine_enforces():
    from app.hyperparameters import hyperparameters_schema

    checked = 0
    for name, target in _numeric():
        step = 1 if target["type"] == "integer" else 1e-9
        ok: list = []
        bad: list = []
        if "minimum" in target:
            ok.append(target["minimum"])
            bad.append(target["minimum"] - step)
        if "exclusiveMinimum" in target:
            bad.append(target["exclusiveMinimum"])
            ok.append(target["exclusiveMinimum"] + (1 if step == 1 else 1e-6))
        if "maximum" in target:
            ok.append(target["maximum"])
            bad.append(target["maximum"] + step * (1 if step == 1 else 1e6))
        for value in ok:
            TrainingConfig.from_dict({name: value})
        for value in bad:
            with pytest.raises(ConfigError):
                TrainingConfig.from_dict({name: value})
        checked += 1
    assert checked >= 20
    assert len(hyperparameters_schema()["properties"]) == len(TrainingConfig.field_names())


def test_idempotency_key_is_declared_where_it_is_honoured(doc):
    declared = {
        (method, path)
        for method, path, op in _operations(doc)
        if any(
            p["name"] == "Idempotency-Key" and p["in"] == "header" for p in op.get("parameters", [])
        )
    }
    assert declared == IDEMPOTENT


def test_a_malformed_idempotency_key_is_still_a_400_not_a_422(client, alice):
    r = client.post(
        "/v1/lineages",
        headers={**alice.headers, "Idempotency-Key": "k" * 256},
        json={"name": "x", "base_model": "tiny-roberta"},
    )
    assert r.status_code == 400 and r.json()["code"] == "invalid_idempotency_key"


def test_importing_the_api_and_building_its_schema_does_not_import_torch():
    code = (
        "import sys, app.main, app.schemas\n"
        "app.schemas.LineageCreate.model_json_schema()\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
