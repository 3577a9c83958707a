"""Lineages, domains (stages), jobs, cancel, artifacts and metrics through the API (the
worker is not running here: jobs stay queued unless a test moves them)."""

from __future__ import annotations

import io

import pytest

from service_core.models import Job
from tests.service.conftest import (
    TINY_HP,
    assert_problem,
    by_public,
    corpus_text,
    create_lineage,
    new_owner,
    row_id,
    upload,
)


@pytest.fixture
def lineage(client, alice) -> dict:
    response = create_lineage(client, alice)
    assert response.status_code == 201, response.text
    return response.json()


@pytest.fixture
def news(client, alice) -> int:
    return upload(client, alice, "news.txt", corpus_text("news")).json()["id"]


@pytest.fixture
def law(client, alice) -> int:
    return upload(client, alice, "law.txt", corpus_text("law")).json()["id"]


def add_domain(client, owner, lineage_id, corpus_id, name, **extra):  # noqa: ANN001, ANN201
    return client.post(
        f"/v1/lineages/{lineage_id}/domains",
        headers=owner.headers,
        json={"corpus_id": corpus_id, "name": name, **extra},
    )


# -- lineages -----------------------------------------------------------------------------


def test_create_and_read_a_lineage(client, alice, lineage):
    assert lineage["base_model"] == "tiny-roberta"
    assert lineage["objective"] == "mlm" and lineage["architecture"] == "roberta"
    assert lineage["strategy"] == "das" and lineage["stages"] == []
    assert lineage["hyperparameters"] == TINY_HP
    got = client.get(f"/v1/lineages/{lineage['id']}", headers=alice.headers)
    assert got.json() == lineage


def test_base_models_lists_the_offline_demo_base(client, alice):
    body = client.get("/v1/base-models", headers=alice.headers).json()
    ids = {m["id"]: m for m in body["data"]}
    assert ids["tiny-roberta"]["objective"] == "mlm"
    assert ids["tiny-roberta"]["parameters"] > 0
    assert body["has_more"] is False


def test_bad_hyperparameters_are_422_listing_fields(client, alice):
    r = create_lineage(client, alice, hyperparameters={"learning_rate": 5, "batch_size": 0})
    body = assert_problem(r, 422, "invalid_hyperparameters")
    fields = {e["field"] for e in body["errors"]}
    assert fields == {"hyperparameters.learning_rate", "hyperparameters.batch_size"}
    r = create_lineage(client, alice, hyperparameters={"no_such_knob": 1})
    assert assert_problem(r, 422)["errors"][0]["field"] == "hyperparameters.no_such_knob"
    r = create_lineage(client, alice, strategy="das", hyperparameters={"strategy": "ncl"})
    assert_problem(r, 422, "invalid_hyperparameters")
    assert_problem(create_lineage(client, alice, strategy="magic"), 422, "validation_error")
    assert client.get("/v1/lineages", headers=alice.headers).json()["data"] == []


def test_strategy_parameters_are_flat_hyperparameters(client, alice):
    """A strategy's own parameters (declared in its file) are checked like the others."""
    bad = {"replay_ratio": 2, "merge_method": "average", "ewc_lambda": -1}
    r = create_lineage(client, alice, strategy="replay_mix", hyperparameters=bad)
    fields = {e["field"] for e in assert_problem(r, 422, "invalid_hyperparameters")["errors"]}
    assert fields == {f"hyperparameters.{k}" for k in bad}
    hp = {**TINY_HP, "replay_ratio": 0.1, "ewc_lambda": 5.0}
    r = create_lineage(client, alice, strategy="replay_mix", hyperparameters=hp)
    assert r.status_code == 201, r.text
    assert r.json()["strategy"] == "replay_mix" and r.json()["hyperparameters"] == hp


def test_elle_is_a_strategy_with_validated_parameters(client, alice):
    """ELLE (a strategy file, found by the registry): its parameters are checked by the API."""
    bad = {"elle_ffn_growth": -0.5, "elle_warmup_loss": "cosine", "elle_prompt_tokens": 1.5}
    r = create_lineage(client, alice, strategy="elle", hyperparameters=bad)
    fields = {e["field"] for e in assert_problem(r, 422, "invalid_hyperparameters")["errors"]}
    assert fields == {f"hyperparameters.{k}" for k in bad}
    hp = {**TINY_HP, "elle_ffn_growth": 0.5, "elle_new_layers": 1, "elle_warmup_loss": "mse"}
    r = create_lineage(client, alice, strategy="elle", hyperparameters=hp)
    assert r.status_code == 201, r.text
    assert r.json()["strategy"] == "elle" and r.json()["hyperparameters"] == hp


@pytest.mark.parametrize(
    "base", ["no-such-model", "/etc", "../../models/x", "~/models", "some-org/some-model", "."]
)
def test_unknown_or_path_like_base_models_are_422(client, alice, base):
    body = assert_problem(create_lineage(client, alice, base_model=base), 422)
    assert body["code"] in ("base_model_unloadable", "unsupported_architecture")
    assert body["errors"][0]["field"] == "base_model"


def test_models_dir_bases_are_accepted(tmp_path, settings):
    import shutil

    from fastapi.testclient import TestClient

    from app.main import create_app
    from das_engine.bases import builtin_tiny_dir

    models = tmp_path / "models"
    shutil.copytree(builtin_tiny_dir(), models / "my-encoder")
    s = settings.model_copy(update={"models_dir": models})
    app = create_app(s, enqueue=lambda ids: [], broker_ping=lambda: None)
    owner = new_owner(app)
    with TestClient(app) as c:
        ids = [m["id"] for m in c.get("/v1/base-models", headers=owner.headers).json()["data"]]
        assert "my-encoder" in ids
        r = c.post(
            "/v1/lineages", headers=owner.headers, json={"name": "x", "base_model": "my-encoder"}
        )
        assert r.status_code == 201, r.text


def test_general_corpus_must_be_yours(client, alice, bob, news):
    assert create_lineage(client, alice, general_corpus_id=news).status_code == 201
    assert_problem(create_lineage(client, bob, general_corpus_id=news), 404, "corpus_not_found")


def test_lineages_are_paginated_and_isolated(client, alice, bob):
    ids = [create_lineage(client, alice, name=f"l{i}").json()["id"] for i in range(3)]
    page = client.get("/v1/lineages?limit=2", headers=alice.headers).json()
    assert [x["id"] for x in page["data"]] == ids[:2] and page["has_more"]
    rest = client.get(f"/v1/lineages?after={page['next_after']}", headers=alice.headers).json()
    assert [x["id"] for x in rest["data"]] == ids[2:] and not rest["has_more"]
    assert client.get("/v1/lineages", headers=bob.headers).json()["data"] == []
    for path in ("", "/metrics", "/stages/1/checkpoint", "/stages/1/importance"):
        assert_problem(client.get(f"/v1/lineages/{ids[0]}{path}", headers=bob.headers), 404)


def test_idempotent_lineage_creation(client, alice):
    key = {"Idempotency-Key": "create-lineage-1"}
    body = {"name": "idem", "base_model": "tiny-roberta", "hyperparameters": {"max_steps": 3}}
    first = client.post("/v1/lineages", headers={**alice.headers, **key}, json=body)
    # same meaning, other key order: a replay
    reordered = {"hyperparameters": {"max_steps": 3}, "base_model": "tiny-roberta", "name": "idem"}
    again = client.post("/v1/lineages", headers={**alice.headers, **key}, json=reordered)
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json()
    assert len(client.get("/v1/lineages", headers=alice.headers).json()["data"]) == 1
    conflict = client.post(
        "/v1/lineages", headers={**alice.headers, **key}, json={**body, "name": "other"}
    )
    assert_problem(conflict, 409, "idempotency_key_reused")
    # the same key on another endpoint is another request: a conflict too
    other = client.post(
        "/v1/corpora",
        headers={**alice.headers, **key},
        files={"file": ("a.txt", io.BytesIO(b"hello there\n"))},
    )
    assert_problem(other, 409, "idempotency_key_reused")
    assert_problem(
        client.post("/v1/lineages", headers={**alice.headers, "Idempotency-Key": " "}, json=body),
        400,
        "invalid_idempotency_key",
    )


# -- domains --------------------------------------------------------------------------------


def test_add_domains_queues_stages_in_order(client, alice, lineage, news, law, recorder):
    first = add_domain(client, alice, lineage["id"], news, "news")
    assert first.status_code == 202, first.text
    body = first.json()
    assert body["stage"]["position"] == 1 and body["stage"]["status"] == "queued"
    assert body["job"]["status"] == "queued" and body["job"]["domain"] == "news"
    assert recorder.sent[-1] == row_id(client.app, Job, body["job"]["id"])  # it may start now
    second = add_domain(client, alice, lineage["id"], law, "law", eval_corpus_id=law).json()
    assert second["stage"]["position"] == 2
    assert row_id(client.app, Job, second["job"]["id"]) not in recorder.sent  # waits for stage 1
    stages = client.get(f"/v1/lineages/{lineage['id']}", headers=alice.headers).json()["stages"]
    assert [(s["position"], s["name"], s["status"]) for s in stages] == [
        (1, "news", "queued"),
        (2, "law", "queued"),
    ]
    assert stages[1]["eval_corpus_id"] == law


def test_domain_as_one_multipart_call(client, alice, lineage):
    r = client.post(
        f"/v1/lineages/{lineage['id']}/domains",
        headers=alice.headers,
        data={"name": "bio"},
        files={"file": ("bio.txt", io.BytesIO(corpus_text("bio")))},
    )
    assert r.status_code == 202, r.text
    corpus_id = r.json()["stage"]["corpus_id"]
    corpus = client.get(f"/v1/corpora/{corpus_id}", headers=alice.headers).json()
    assert corpus["documents"] == 40
    # a bad name, a bad file: 422 and no corpus kept
    n = len(client.get("/v1/corpora", headers=alice.headers).json()["data"])
    r = client.post(
        f"/v1/lineages/{lineage['id']}/domains",
        headers=alice.headers,
        data={"name": "../bad name"},
        files={"file": ("x.txt", io.BytesIO(b"text\n"))},
    )
    assert_problem(r, 422, "validation_error")
    r = client.post(
        f"/v1/lineages/{lineage['id']}/domains",
        headers=alice.headers,
        data={"name": "fine"},
        files={"file": ("x.txt", io.BytesIO(b"\xff\xfe bad bytes\n"))},
    )
    assert_problem(r, 422, "invalid_corpus")
    r = client.post(
        f"/v1/lineages/{lineage['id']}/domains",
        headers=alice.headers,
        data={"name": "bio"},
        files={"file": ("x.txt", io.BytesIO(b"text\n"))},
    )
    assert_problem(r, 409, "domain_exists")
    assert len(client.get("/v1/corpora", headers=alice.headers).json()["data"]) == n


def test_duplicate_domain_name_is_409(client, alice, lineage, news):
    assert add_domain(client, alice, lineage["id"], news, "news").status_code == 202
    assert_problem(add_domain(client, alice, lineage["id"], news, "news"), 409, "domain_exists")


@pytest.mark.parametrize(
    "name", ["", "a b", "../x", "x" * 65, "-start", "naïve", "新闻", "ｎｅｗｓ", "news🙂"]
)
def test_invalid_domain_names_are_422(client, alice, lineage, news, name):
    assert_problem(add_domain(client, alice, lineage["id"], news, name), 422, "validation_error")


def test_domain_body_errors(client, alice, lineage, news):
    url = f"/v1/lineages/{lineage['id']}/domains"
    assert_problem(client.post(url, headers=alice.headers, json={"name": "x"}), 422)
    assert_problem(
        client.post(url, headers=alice.headers, json={"corpus_id": news, "name": "x", "z": 1}),
        422,
    )
    assert_problem(
        client.post(url, headers={**alice.headers, "Content-Type": "text/plain"}, content=b"x"),
        415,
    )
    assert_problem(
        client.post(
            url, headers={**alice.headers, "Content-Type": "application/json"}, content=b"{oops"
        ),
        422,
    )


def test_domain_json_body_is_capped(client, alice, lineage, news):
    body = {"corpus_id": news, "name": "x" + "y" * (2 << 20)}
    r = client.post(f"/v1/lineages/{lineage['id']}/domains", headers=alice.headers, json=body)
    assert_problem(r, 413, "payload_too_large")


def test_foreign_ids_in_domains_are_404(client, alice, bob, lineage, news):
    assert_problem(add_domain(client, bob, lineage["id"], news, "x"), 404)
    bobs = upload(client, bob, "b.txt", b"bob text\n").json()["id"]
    assert_problem(add_domain(client, alice, lineage["id"], bobs, "x"), 404, "corpus_not_found")
    assert_problem(add_domain(client, alice, lineage["id"], news, "x", eval_corpus_id=bobs), 404)
    assert_problem(add_domain(client, alice, 10**9, news, "x"), 404, "lineage_not_found")


def test_idempotent_domain_submission(client, alice, lineage, news):
    key = {"Idempotency-Key": "domain-news"}
    url = f"/v1/lineages/{lineage['id']}/domains"
    body = {"corpus_id": news, "name": "news"}
    first = client.post(url, headers={**alice.headers, **key}, json=body)
    again = client.post(url, headers={**alice.headers, **key}, json=body)
    assert first.status_code == again.status_code == 202
    assert first.json() == again.json()
    stages = client.get(f"/v1/lineages/{lineage['id']}", headers=alice.headers).json()["stages"]
    assert len(stages) == 1


# -- jobs -------------------------------------------------------------------------------------


def test_job_status_and_events(client, alice, bob, lineage, news):
    job = add_domain(client, alice, lineage["id"], news, "news").json()["job"]
    got = client.get(f"/v1/jobs/{job['id']}", headers=alice.headers).json()
    assert got["status"] == "queued" and got["progress"] == 0.0 and got["attempts"] == 0
    events = client.get(f"/v1/jobs/{job['id']}/events", headers=alice.headers).json()
    assert [e["type"] for e in events["data"]] == ["queued"]
    assert events["has_more"] is False
    assert_problem(client.get(f"/v1/jobs/{job['id']}", headers=bob.headers), 404, "job_not_found")
    assert_problem(client.get(f"/v1/jobs/{job['id']}/events", headers=bob.headers), 404)
    assert_problem(client.post(f"/v1/jobs/{job['id']}/cancel", headers=bob.headers), 404)


def test_events_are_paginated(api, client, alice, lineage, news):
    from service_core.lifecycle import add_event

    job = add_domain(client, alice, lineage["id"], news, "news").json()["job"]
    with api.state.session_factory() as session, session.begin():
        for i in range(7):
            add_event(
                session,
                by_public(session, Job, job["id"]).id,
                "progress",
                f"step {i}",
                data={"step": i},
            )
    url = f"/v1/jobs/{job['id']}/events"
    page = client.get(f"{url}?limit=3", headers=alice.headers).json()
    assert len(page["data"]) == 3 and page["has_more"]
    seen = [e["id"] for e in page["data"]]
    while page["has_more"]:
        page = client.get(f"{url}?limit=3&after={page['next_after']}", headers=alice.headers).json()
        seen += [e["id"] for e in page["data"]]
    assert len(seen) == 8 and seen == sorted(seen)


def test_cancel_a_queued_job_cancels_the_stages_behind_it(client, alice, lineage, news, law):
    first = add_domain(client, alice, lineage["id"], news, "news").json()["job"]
    second = add_domain(client, alice, lineage["id"], law, "law").json()["job"]
    r = client.post(f"/v1/jobs/{first['id']}/cancel", headers=alice.headers)
    assert r.status_code == 202 and r.json()["status"] == "cancelled"
    follower = client.get(f"/v1/jobs/{second['id']}", headers=alice.headers).json()
    assert follower["status"] == "cancelled"
    assert follower["error"]["code"] == "previous_stage_not_completed"
    assert_problem(
        client.post(f"/v1/jobs/{first['id']}/cancel", headers=alice.headers), 409, "job_finished"
    )
    # the names are free again: the domains can be submitted anew, at the next positions
    again = add_domain(client, alice, lineage["id"], news, "news")
    assert again.status_code == 202 and again.json()["stage"]["position"] == 3


def test_cancel_a_running_job_asks_the_worker(api, client, alice, lineage, news):
    from service_core.models import Job

    job = add_domain(client, alice, lineage["id"], news, "news").json()["job"]
    with api.state.session_factory() as session, session.begin():
        by_public(session, Job, job["id"]).status = "running"
    r = client.post(f"/v1/jobs/{job['id']}/cancel", headers=alice.headers)
    assert r.status_code == 202 and r.json()["status"] == "cancelling"
    again = client.post(f"/v1/jobs/{job['id']}/cancel", headers=alice.headers)
    assert again.status_code == 202 and again.json()["status"] == "cancelling"


# -- artifacts and metrics before training -----------------------------------------------------


def test_artifacts_of_an_unfinished_stage(client, alice, lineage, news):
    add_domain(client, alice, lineage["id"], news, "news")
    base = f"/v1/lineages/{lineage['id']}/stages"
    assert_problem(
        client.get(f"{base}/1/checkpoint", headers=alice.headers), 409, "stage_not_ready"
    )
    assert_problem(client.get(f"{base}/1/importance", headers=alice.headers), 409)
    assert_problem(
        client.get(f"{base}/9/checkpoint", headers=alice.headers), 404, "stage_not_found"
    )


def test_metrics_of_an_empty_lineage(client, alice, lineage):
    m = client.get(f"/v1/lineages/{lineage['id']}/metrics", headers=alice.headers).json()
    assert m["domains"] == [] and m["loss_matrix"] == [] and m["forgetting_rate"] is None


def test_idempotent_cancel(client, alice, lineage, news):
    job = add_domain(client, alice, lineage["id"], news, "news").json()["job"]
    key = {**alice.headers, "Idempotency-Key": "cancel-once"}
    first = client.post(f"/v1/jobs/{job['id']}/cancel", headers=key)
    again = client.post(f"/v1/jobs/{job['id']}/cancel", headers=key)
    assert first.status_code == again.status_code == 202
    assert first.json() == again.json() and again.headers["idempotent-replayed"] == "true"
