"""What a user of a current decoder runs through the REST API: a Qwen3 base saved in bf16
with every dropout at 0 in the server's models folder, a lineage with a unicode name on
``das_replay`` with a protection budget and bf16 autocast, two domains trained by the
worker (each in its own child process), then the stage-2 checkpoint downloaded and loaded
by plain ``transformers`` as a bf16 Qwen3; and a Gemma 3 base with a vision tower, listed
and checked in the request."""

from __future__ import annotations

import io
import json
import math
import tarfile

import pytest

from tests.service.conftest import (
    TINY_HP,
    add_domain,
    create_lineage,
    in_process_runner,
    load_checkpoint_in_subprocess,
    new_owner,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

NAME = "Qwen3 → 法律 ✓"
HP = {
    **TINY_HP,
    "mixed_precision": "bf16",
    "protection_budget": 0.5,
    "replay_ratio": 0.25,
}


@pytest.fixture(scope="module")
def env(tmp_path_factory):  # noqa: ANN201
    import torch

    from das_engine.bases import build_tiny_model, bundled_tokenizer, save_base

    models = tmp_path_factory.mktemp("models")
    tok = bundled_tokenizer(decoder=True)
    model = build_tiny_model(
        tok, architecture="qwen3", hidden_size=32, layers=2, heads=4, intermediate_size=64,
        max_positions=128, dropout=0.0,
    )  # fmt: skip
    save_base(model.to(torch.bfloat16), tok, models / "qwen3-tiny")
    gemma = build_tiny_model(
        tok, architecture="gemma3", hidden_size=32, layers=2, heads=4, intermediate_size=64,
        max_positions=128, dropout=0.0,
    )  # fmt: skip
    save_base(gemma.to(torch.bfloat16), tok, models / "gemma3-tiny")  # beside a vision tower
    with in_process_runner(tmp_path_factory.mktemp("decoder"), models_dir=models) as env:
        yield env


def _finished(client, owner, job_id: str) -> dict:  # noqa: ANN001
    def done():  # noqa: ANN202
        job = client.get(f"/v1/jobs/{job_id}", headers=owner.headers).json()
        return job["status"] in ("succeeded", "failed", "cancelled") and job

    return wait_for(done, 30, f"the API to show job {job_id} finished", interval=0.05)


def test_bf16_qwen3_das_replay_lineage_through_the_api(env, tmp_path):
    settings, app, client, runner, _ = env
    owner = new_owner(app)
    bases = client.get("/v1/base-models", headers=owner.headers).json()["data"]
    qwen = next(b for b in bases if b["id"] == "qwen3-tiny")
    assert qwen["architecture"] == "qwen3" and qwen["objective"] == "clm"

    r = create_lineage(
        client, owner, name=NAME, base_model="qwen3-tiny", strategy="das_replay", hyperparameters=HP
    )
    assert r.status_code == 201, r.text
    lineage = r.json()
    assert lineage["name"] == NAME and lineage["strategy"] == "das_replay"
    assert {k: lineage["hyperparameters"][k] for k in HP} == HP

    for domain in ("news", "law"):
        job_id = add_domain(client, owner, lineage["id"], domain)
        assert runner.run(job_id) == "succeeded"
        job = _finished(client, owner, job_id)
        assert job["status"] == "succeeded" and job["error"] is None, job

    metrics = client.get(f"/v1/lineages/{lineage['id']}/metrics", headers=owner.headers).json()
    assert metrics["domains"] == ["news", "law"]
    assert all(math.isfinite(v) for row in metrics["loss_matrix"] for v in row)

    r = client.get(f"/v1/lineages/{lineage['id']}/stages/2/checkpoint", headers=owner.headers)
    assert r.status_code == 200, r.text
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
        tar.extractall(tmp_path, filter="data")
    [model_dir] = [p for p in tmp_path.iterdir() if p.is_dir()]
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["dtype"] == "bfloat16"  # the base's
    assert config["attention_dropout"] == 0  # DAS's views never switched dropout on
    loaded = load_checkpoint_in_subprocess(model_dir, causal=True)
    assert loaded["finite"] and loaded["type"] == "qwen3" and loaded["dtype"] == "torch.bfloat16"


def test_a_gemma3_base_with_a_vision_tower_is_listed_and_checked(env):
    """Gemma 3 4B-27B's layout (text settings in text_config): the base list counts its
    parameters, and the request's pre-flight reads the position limit from text_config."""
    _, app, client, _, _ = env
    owner = new_owner(app)
    bases = client.get("/v1/base-models", headers=owner.headers).json()["data"]
    gemma = next(b for b in bases if b["id"] == "gemma3-tiny")
    assert gemma["architecture"] == "gemma3" and gemma["objective"] == "clm"
    assert gemma["parameters"] > 0
    too_long = {**HP, "block_size": 256}
    r = create_lineage(client, owner, base_model="gemma3-tiny", hyperparameters=too_long)
    body = r.json()
    assert r.status_code == 422 and body["code"] == "invalid_hyperparameters", body
    assert body["limit"] == 128 and body["value"] == 256
    r = create_lineage(client, owner, base_model="gemma3-tiny", strategy="das", hyperparameters=HP)
    assert r.status_code == 201, r.text
