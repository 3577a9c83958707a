"""Pre-flight validation in the request and per-owner quotas: what the worker would fail on
(or what a server must not accept) is refused before anything is stored."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from app.main import create_app
from app.migrate import upgrade
from service_core.models import Corpus, Job
from tests.service.conftest import (
    TINY_HP,
    EnqueueRecorder,
    assert_problem,
    corpus_text,
    create_lineage,
    make_settings,
    new_owner,
    upload,
)

# -- hyper-parameters against the base ---------------------------------------------------------


def test_block_size_beyond_the_bases_positions_is_422(client, alice):
    # tiny-roberta: 514 position embeddings, RoBERTa's offset of pad_token_id + 1 -> 512
    r = create_lineage(client, alice, hyperparameters={**TINY_HP, "block_size": 1024})
    body = assert_problem(r, 422, "invalid_hyperparameters")
    assert body["errors"][0]["field"] == "hyperparameters.block_size"
    assert body["limit"] == 512 and body["value"] == 1024 and "512 positions" in body["detail"]
    assert_problem(
        create_lineage(client, alice, hyperparameters={**TINY_HP, "block_size": 513}), 422
    )
    assert create_lineage(client, alice, hyperparameters={**TINY_HP, "block_size": 512}).is_success
    assert len(client.get("/v1/lineages", headers=alice.headers).json()["data"]) == 1


def test_the_api_runs_the_engines_model_checks(client, alice, monkeypatch):
    """Gradient checkpointing on a model class without it is refused in the request, by the
    same check the engine runs before training, and both problems are named at once."""
    from transformers import RobertaForMaskedLM

    monkeypatch.setattr(RobertaForMaskedLM, "supports_gradient_checkpointing", False)
    hp = {**TINY_HP, "gradient_checkpointing": True, "block_size": 600}
    body = assert_problem(create_lineage(client, alice, hyperparameters=hp), 422)
    assert body["code"] == "invalid_hyperparameters"
    assert [e["field"] for e in body["errors"]] == [
        "hyperparameters.block_size",
        "hyperparameters.gradient_checkpointing",
    ]
    assert body["limit"] == 512 and body["value"] == 600
    monkeypatch.undo()
    hp = {**TINY_HP, "gradient_checkpointing": True}
    assert create_lineage(client, alice, hyperparameters=hp).status_code == 201


def test_max_positions_follows_each_family():
    from transformers import BertConfig, GPT2Config, LlamaConfig, RobertaConfig

    from app.preflight import max_positions

    assert max_positions(RobertaConfig(max_position_embeddings=514, pad_token_id=1)) == 512
    assert max_positions(BertConfig(max_position_embeddings=512)) == 512
    assert max_positions(GPT2Config(n_positions=1024)) == 1024
    assert max_positions(LlamaConfig(max_position_embeddings=2048)) == 2048


def test_fp16_is_refused_when_the_workers_train_on_cpu(client, alice, settings):
    r = create_lineage(client, alice, hyperparameters={**TINY_HP, "mixed_precision": "fp16"})
    body = assert_problem(r, 422, "invalid_hyperparameters")
    assert body["errors"][0]["field"] == "hyperparameters.mixed_precision"
    for ok in ("bf16", "no", "auto"):
        assert create_lineage(client, alice, hyperparameters={**TINY_HP, "mixed_precision": ok})
    gpu = create_app(
        settings.model_copy(update={"worker_device": "cuda"}),
        enqueue=lambda ids: list(ids),
        broker_ping=lambda: None,
    )
    with TestClient(gpu, raise_server_exceptions=False) as c:
        r = create_lineage(c, alice, hyperparameters={**TINY_HP, "mixed_precision": "fp16"})
    assert r.status_code == 201, r.text


def test_a_job_over_the_token_limit_is_422_with_limit_and_value(client, alice):
    hp = {"max_steps": 10**7, "batch_size": 4096, "block_size": 128}
    body = assert_problem(create_lineage(client, alice, hyperparameters=hp), 422)
    assert body["code"] == "job_token_limit_exceeded"
    assert body["value"] == 10**7 * 4096 * 128 and body["limit"] == 10_000_000_000
    assert body["errors"][0]["field"] == "hyperparameters.max_steps"
    assert client.get("/v1/lineages", headers=alice.headers).json()["data"] == []


# -- corpora too small for the lineage's block size ----------------------------------------------


def _stages(client, owner, lineage_id: int) -> list:  # noqa: ANN001
    return client.get(f"/v1/lineages/{lineage_id}", headers=owner.headers).json()["stages"]


def test_a_corpus_too_small_for_two_chunks_is_refused_when_the_domain_is_added(client, alice):
    lineage = create_lineage(client, alice).json()["id"]  # block_size 32
    tiny = upload(client, alice, "tiny.txt", b"abc")
    assert tiny.status_code == 201  # a valid corpus: what it is too small for is a lineage's
    r = client.post(
        f"/v1/lineages/{lineage}/domains",
        headers=alice.headers,
        json={"corpus_id": tiny.json()["id"], "name": "tiny"},
    )
    body = assert_problem(r, 422, "corpus_too_small")
    assert body["chunks"] == 1 and body["required_chunks"] == 2 and body["block_size"] == 32
    assert 0 < body["tokens"] < 30 and "2 chunks" in body["detail"]
    assert body["errors"][0]["field"] == "corpus_id"
    # the multipart form: 422 as well, and the uploaded file is not kept
    corpora = len(client.get("/v1/corpora", headers=alice.headers).json()["data"])
    r = client.post(
        f"/v1/lineages/{lineage}/domains",
        headers=alice.headers,
        data={"name": "tiny"},
        files={"file": ("tiny.txt", io.BytesIO(b"abc"))},
    )
    assert assert_problem(r, 422, "corpus_too_small")["errors"][0]["field"] == "file"
    assert len(client.get("/v1/corpora", headers=alice.headers).json()["data"]) == corpora
    assert _stages(client, alice, lineage) == []
    # a big enough corpus passes, and so does the tiny one as a separate evaluation corpus
    news = upload(client, alice, "news.txt", corpus_text("news")).json()["id"]
    r = client.post(
        f"/v1/lineages/{lineage}/domains",
        headers=alice.headers,
        json={"corpus_id": news, "name": "news", "eval_corpus_id": tiny.json()["id"]},
    )
    assert r.status_code == 202, r.text


def test_a_general_corpus_is_checked_at_the_lineages_block_size(client, alice):
    general = upload(client, alice, "general.txt", corpus_text("bio")).json()["id"]
    r = create_lineage(client, alice, general_corpus_id=general)
    assert r.status_code == 201, r.text


@pytest.fixture(scope="module")
def tiny_tokenizer():  # noqa: ANN201
    from das_engine.bases import builtin_tiny_dir, load_tokenizer

    return load_tokenizer(builtin_tiny_dir())


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    database=None,
)
@given(
    words=st.lists(
        st.sampled_from(["market", "court", "enzyme", "à", "中文", "\U0001f600", "x"]),
        min_size=1,
        max_size=120,
    ),
    lines_per_doc=st.integers(1, 12),
    block_size=st.sampled_from([8, 16, 32, 64]),
)
def test_the_preflight_accepts_a_corpus_exactly_when_the_engine_can_split_it(
    tiny_tokenizer, words, lines_per_doc, block_size
):
    """Property: measure_corpus says >= 2 chunks iff das_engine.data.build_datasets makes a
    train and an eval split from the corpus (its document-level split or its fallback)."""
    import threading

    from app.preflight import measure_corpus
    from das_engine.data import build_datasets
    from das_engine.errors import CorpusError

    docs = [" ".join(words[i : i + lines_per_doc]) for i in range(0, len(words), lines_per_doc)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.txt"
        path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
        measure = measure_corpus(
            path,
            tiny_tokenizer,
            threading.Lock(),
            block_size=block_size,
            objective="mlm",
            need=2,
            split=(42, 0.05),
        )
        try:
            counts = build_datasets(
                path,
                tiny_tokenizer,
                Path(tmp) / "data",
                block_size=block_size,
                objective="mlm",
                eval_fraction=0.05,
                seed=42,
            )
            engine_ok = counts["train_chunks"] >= 1 and counts["eval_chunks"] >= 1
        except CorpusError:
            engine_ok = False
    assert (measure.chunks >= 2) == engine_ok, (measure, docs)


# -- per-owner quotas -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_quotas(tmp_path_factory):  # noqa: ANN201
    s = make_settings(
        tmp_path_factory.mktemp("quotas"),
        max_active_jobs=2,
        max_storage_bytes=20_000,
        max_job_tokens=200_000,
    )
    upgrade(s)
    app = create_app(s, enqueue=EnqueueRecorder(), broker_ping=lambda: None)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield app, c
    app.state.engine.dispose()


def _add(client, owner, lineage: int, corpus: int, name: str):  # noqa: ANN001, ANN202
    return client.post(
        f"/v1/lineages/{lineage}/domains",
        headers=owner.headers,
        json={"corpus_id": corpus, "name": name},
    )


def test_unfinished_jobs_over_the_limit_are_429_until_one_finishes(small_quotas):
    app, client = small_quotas
    owner = new_owner(app)
    lineage = create_lineage(client, owner).json()["id"]
    corpus = upload(client, owner, "news.txt", corpus_text("news", documents=10)).json()["id"]
    first = _add(client, owner, lineage, corpus, "one")
    assert first.status_code == 202 and _add(client, owner, lineage, corpus, "two").is_success
    r = _add(client, owner, lineage, corpus, "three")
    body = assert_problem(r, 429, "too_many_active_jobs")
    assert body["limit"] == 2 and body["value"] == 3 and r.headers["retry-after"] == "30"
    multipart = client.post(  # refused before the file is read
        f"/v1/lineages/{lineage}/domains",
        headers=owner.headers,
        data={"name": "three"},
        files={"file": ("x.txt", io.BytesIO(corpus_text("law", documents=10)))},
    )
    assert_problem(multipart, 429, "too_many_active_jobs")
    other = new_owner(app)  # the limit is per owner
    other_lineage = create_lineage(client, other).json()["id"]
    other_corpus = upload(client, other, "n.txt", corpus_text("news", documents=10)).json()["id"]
    assert _add(client, other, other_lineage, other_corpus, "one").status_code == 202
    cancel = client.post(f"/v1/jobs/{first.json()['job']['id']}/cancel", headers=owner.headers)
    assert cancel.status_code == 202  # also cancels "two" queued behind it
    assert _add(client, owner, lineage, corpus, "three").status_code == 202
    with app.state.session_factory() as session:
        unfinished = session.scalar(
            select(func.count(Job.id)).where(Job.owner == owner.name, Job.status == "queued")
        )
    assert unfinished == 1


def test_storage_over_the_quota_is_403_and_nothing_is_kept(small_quotas):
    app, client = small_quotas
    owner = new_owner(app)
    first = upload(client, owner, "a.txt", b"x" * 12_000 + b"\n")
    assert first.status_code == 201
    r = upload(client, owner, "b.txt", b"y" * 12_000 + b"\n")
    body = assert_problem(r, 403, "storage_quota_exceeded")
    assert body["limit"] == 20_000 and body["value"] == 24_002 and body["used"] == 12_001
    assert upload(client, owner, "c.txt", b"small enough\n").status_code == 201
    with app.state.session_factory() as session:
        kept = session.scalars(select(Corpus.filename).where(Corpus.owner == owner.name)).all()
    assert sorted(kept) == ["a.txt", "c.txt"]
    uploads = {p.name for p in app.state.settings.uploads_dir.iterdir()}
    assert len(uploads) >= 2  # the refused file's folder is gone: one folder per corpus kept
    with app.state.session_factory() as session:
        total = session.scalar(select(func.count(Corpus.id)))
    assert len(uploads) == total


def test_an_epochs_job_over_the_token_limit_is_refused_when_its_corpus_is_known(small_quotas):
    app, client = small_quotas
    owner = new_owner(app)
    hp = {"epochs": 1000.0, "batch_size": 4, "block_size": 32}  # no max_steps: from the corpus
    lineage = create_lineage(client, owner, hyperparameters=hp)
    assert lineage.status_code == 201, lineage.text
    corpus = upload(client, owner, "news.txt", corpus_text("news", documents=10)).json()["id"]
    body = assert_problem(_add(client, owner, lineage.json()["id"], corpus, "news"), 422)
    assert body["code"] == "job_token_limit_exceeded" and body["limit"] == 200_000
    assert body["value"] > 200_000 and "about" in body["detail"]
    one_epoch = create_lineage(client, owner, hyperparameters={**hp, "epochs": 1.0}).json()["id"]
    assert _add(client, owner, one_epoch, corpus, "news").status_code == 202
