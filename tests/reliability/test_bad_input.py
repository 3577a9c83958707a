"""Bad input that ``tests/service`` did not cover yet; each is a 4xx problem+json naming the
problem (with line numbers for corpora), nothing is stored, and nothing answers 5xx:

- corpora: UTF-16, non-UTF-8 or malformed JSON inside a gzip (line numbers counted in the
  decompressed text), an empty gzip, a UTF-8 sequence cut at the end of the file, an
  over-long line with no newline at all, ``"text": null``, data after the JSON object, only
  empty texts, a UTF-8 byte-order mark in JSONL; two file parts, too many or too large form
  fields;
- base models: a folder of ``DAS_MODELS_DIR`` with missing or truncated weights, no tokenizer,
  an unparsable config or an unknown architecture (refused before anything is stored, absent
  from ``/v1/base-models``, the server's folder never named);
- hyper-parameters: each out of range or of the wrong type, NaN and Infinity, a device;
- a JSON body over the cap sent without ``Content-Length`` (chunked);
- the same domain name submitted concurrently: exactly one stage;
- ``Idempotency-Key``: reuse with another body on the domains route, a request still in
  progress (409 with Retry-After), concurrent replays (one resource), malformed keys.
"""

from __future__ import annotations

import gzip
import json
import shutil
import threading

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.main import create_app
from service_core.models import Corpus, IdempotencyRecord, Lineage, Stage
from tests.reliability.backends import BACKENDS, api_on, reads_answer_200, stored_rows
from tests.service.conftest import (
    TINY_HP,
    assert_problem,
    by_public,
    corpus_text,
    create_lineage,
    new_owner,
    upload,
)

# -- corpora ---------------------------------------------------------------------------------


def _corpora(app, owner) -> int:  # noqa: ANN001
    with app.state.session_factory() as session:
        return session.scalar(select(func.count(Corpus.id)).where(Corpus.owner == owner.name))


def _uploads(settings) -> set[str]:  # noqa: ANN001
    root = settings.uploads_dir
    return {p.name for p in root.iterdir()} if root.exists() else set()


@pytest.mark.parametrize(
    ("filename", "content", "needle", "line"),
    [
        ("utf16.txt", "hello world\n".encode("utf-16"), "binary", 1),
        ("latin.txt.gz", gzip.compress("ok\ncaf\xe9\n".encode("latin-1")), "UTF-8", 2),
        (
            "bad.jsonl.gz",
            gzip.compress(b'{"text": "a"}\n{"text": "b"}\n{"text": broken}\n'),
            "malformed JSON",
            3,
        ),
        ("empty.txt.gz", gzip.compress(b""), "empty", None),
        ("cut.txt", "a whole line\nthen caf\xe9".encode()[:-1], "UTF-8", 2),
        ("long.txt", b"x" * 1_200_000, "longer than 1000000", 1),
        ("null.jsonl", b'{"text": "a"}\n{"text": null}\n', "must be a string", 2),
        ("extra.jsonl", b'{"text": "a"} {"text": "b"}\n', "Extra data", 1),
        ("blank.jsonl", b'{"text": ""}\n{"text": "   "}\n', "empty", None),
        # a BOM opening the file is accepted (Windows editors); anywhere else it is data
        ("bom.jsonl", b'{"text": "a"}\n\xef\xbb\xbf{"text": "b"}\n', "BOM", 2),
    ],
    ids=[
        "utf-16",
        "gzip-latin-1",
        "gzip-malformed-jsonl",
        "gzip-empty",
        "cut-utf-8",
        "long-line-no-newline",
        "null-text",
        "data-after-object",
        "only-empty-texts",
        "jsonl-bom-mid-file",
    ],
)
def test_more_bad_corpora_are_422_with_line_numbers(
    client, alice, settings, filename, content, needle, line
):
    before = _uploads(settings)
    body = assert_problem(upload(client, alice, filename, content), 422, "invalid_corpus")
    assert needle in body["detail"], body
    assert body["errors"][0]["line"] == line, body
    assert _uploads(settings) == before and _corpora(client.app, alice) == 0


def test_multipart_shape_problems(client, alice, settings):
    before = _uploads(settings)
    two = client.post(
        "/v1/corpora",
        headers=alice.headers,
        files=[("file", ("a.txt", b"one\n")), ("file", ("b.txt", b"two\n"))],
    )
    assert_problem(two, 422, "too_many_files")
    many = client.post(
        "/v1/corpora",
        headers=alice.headers,
        data={f"f{i}": "x" for i in range(40)},
        files={"file": ("a.txt", b"text\n")},
    )
    assert_problem(many, 422, "too_many_fields")
    big = client.post(
        "/v1/corpora",
        headers=alice.headers,
        data={"note": "x" * (64 * 1024)},
        files={"file": ("a.txt", b"text\n")},
    )
    assert_problem(big, 413, "field_too_large")
    assert _uploads(settings) == before and _corpora(client.app, alice) == 0


# -- base models --------------------------------------------------------------------------------


@pytest.fixture
def broken_models(tmp_path, settings):  # noqa: ANN201
    """A models folder with one good base and one broken base per way of being broken."""
    from das_engine.bases import builtin_tiny_dir

    root = tmp_path / "models"
    tiny = builtin_tiny_dir()
    shutil.copytree(tiny, root / "good")
    for name in ("no-weights", "no-tokenizer", "cut-header", "cut-tensors"):
        shutil.copytree(tiny, root / name)
    (root / "no-weights" / "model.safetensors").unlink()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (root / "no-tokenizer" / f).unlink()
    weights = (root / "cut-header" / "model.safetensors").read_bytes()
    (root / "cut-header" / "model.safetensors").write_bytes(weights[:100])
    (root / "cut-tensors" / "model.safetensors").write_bytes(weights[:-1000])
    (root / "bad-config").mkdir()
    (root / "bad-config" / "config.json").write_text("{not json")
    (root / "unknown-arch").mkdir()
    (root / "unknown-arch" / "config.json").write_text(json.dumps({"model_type": "nosuch"}))
    s = settings.model_copy(update={"models_dir": root})
    app = create_app(s, enqueue=lambda ids: list(ids), broker_ping=lambda: None)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c, root


@pytest.mark.parametrize(
    ("base", "needle"),
    [
        ("no-weights", "no model weights"),
        ("no-tokenizer", "no tokenizer"),
        ("cut-header", "model.safetensors"),
        ("cut-tensors", "truncated"),
        ("bad-config", "config"),
        ("unknown-arch", "nosuch"),
    ],
)
def test_unloadable_bases_are_refused_before_anything_is_stored(broken_models, alice, base, needle):
    c, root = broken_models
    listed = [m["id"] for m in c.get("/v1/base-models", headers=alice.headers).json()["data"]]
    assert "good" in listed and base not in listed
    r = create_lineage(c, alice, base_model=base)
    body = assert_problem(r, 422, "base_model_unloadable")
    assert needle in body["detail"] and body["errors"][0]["field"] == "base_model"
    assert str(root) not in r.text and str(root.parent) not in r.text  # no server folder
    with c.app.state.session_factory() as session:
        assert session.scalars(select(Lineage).where(Lineage.owner == alice.name)).all() == []
    assert create_lineage(c, alice, base_model="good").status_code == 201


# -- hyper-parameters --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ('{"learning_rate": NaN}', "learning_rate"),
        ('{"learning_rate": Infinity}', "learning_rate"),
        ('{"learning_rate": -1e-4}', "learning_rate"),
        ('{"max_steps": true}', "max_steps"),
        ('{"max_steps": 2.5}', "max_steps"),
        ('{"max_steps": "10"}', "max_steps"),
        ('{"max_steps": 100000000000000000000000000000}', "max_steps"),
        ('{"max_steps": -1}', "max_steps"),
        ('{"block_size": 100000}', "block_size"),
        ('{"batch_size": 0}', "batch_size"),
        ('{"seed": -1}', "seed"),
        ('{"eval_fraction": 1.5}', "eval_fraction"),
        ('{"mlm_probability": 0}', "mlm_probability"),
        ('{"checkpoint_every": 0}', "checkpoint_every"),
        ('{"normalization": "magic"}', "normalization"),
        ('{"device": "cuda:99"}', "device"),
        ('{"device": "cpu; rm -rf /"}', "device"),
    ],
)
def test_each_out_of_range_hyperparameter_is_named(client, alice, raw, field):
    body = f'{{"name": "x", "base_model": "tiny-roberta", "hyperparameters": {raw}}}'.encode()
    r = client.post(
        "/v1/lineages", headers={**alice.headers, "Content-Type": "application/json"}, content=body
    )
    problem = assert_problem(r, 422, "invalid_hyperparameters")
    assert f"hyperparameters.{field}" in [e["field"] for e in problem["errors"]], problem
    assert client.get("/v1/lineages", headers=alice.headers).json()["data"] == []


def test_a_chunked_json_body_over_the_cap_is_413(client, alice):
    """No Content-Length to trust: the cap is counted while the body arrives."""

    def chunks():  # noqa: ANN202
        yield b'{"name": "x", "base_model": "tiny-roberta", "hyperparameters": {"pad": "'
        for _ in range(40):
            yield b"a" * 65536
        yield b'"}}'

    r = client.post(
        "/v1/lineages",
        headers={**alice.headers, "Content-Type": "application/json"},
        content=chunks(),
    )
    assert_problem(r, 413, "payload_too_large")
    assert client.get("/v1/lineages", headers=alice.headers).json()["data"] == []


# -- duplicate domains and idempotency under concurrency -----------------------------------------


def _in_threads(n: int, call) -> list:  # noqa: ANN001
    results: list = [None] * n
    barrier = threading.Barrier(n)

    def run(i: int) -> None:
        barrier.wait()
        results[i] = call()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_the_same_domain_submitted_concurrently_makes_one_stage(client, alice):
    lineage = create_lineage(client, alice).json()["id"]
    corpus = upload(client, alice, "news.txt", corpus_text("news")).json()["id"]
    responses = _in_threads(
        6,
        lambda: client.post(
            f"/v1/lineages/{lineage}/domains",
            headers=alice.headers,
            json={"corpus_id": corpus, "name": "news"},
        ),
    )
    codes = sorted(r.status_code for r in responses)
    assert codes == [202, 409, 409, 409, 409, 409], [r.text for r in responses]
    for r in responses:
        if r.status_code == 409:
            assert_problem(r, 409)
    with client.app.state.session_factory() as session:
        stages = session.scalars(
            select(Stage).where(Stage.lineage_id == by_public(session, Lineage, lineage).id)
        ).all()
    assert [(s.position, s.name) for s in stages] == [(1, "news")]


def test_concurrent_replays_of_one_key_create_one_lineage(client, alice):
    headers = {**alice.headers, "Idempotency-Key": "burst-1"}
    body = {"name": "burst", "base_model": "tiny-roberta"}
    responses = _in_threads(5, lambda: client.post("/v1/lineages", headers=headers, json=body))
    created = [r for r in responses if r.status_code == 201]
    busy = [r for r in responses if r.status_code == 409]
    assert created and len(created) + len(busy) == 5, [r.text for r in responses]
    assert len({r.json()["id"] for r in created}) == 1  # replays answer the same lineage
    for r in busy:
        assert_problem(r, 409, "idempotency_in_progress")
        assert r.headers["retry-after"] == "1"
    assert len(client.get("/v1/lineages", headers=alice.headers).json()["data"]) == 1


def test_a_key_still_in_progress_is_409_with_retry_after(client, alice):
    with client.app.state.session_factory() as session, session.begin():
        session.add(IdempotencyRecord(owner=alice.name, key="slow-one"))  # no response yet
    r = client.post(
        "/v1/lineages",
        headers={**alice.headers, "Idempotency-Key": "slow-one"},
        json={"name": "x", "base_model": "tiny-roberta"},
    )
    assert_problem(r, 409, "idempotency_in_progress")
    assert r.headers["retry-after"] == "1"
    assert client.get("/v1/lineages", headers=alice.headers).json()["data"] == []


def test_a_domain_key_reused_with_another_body_is_409(client, alice):
    lineage = create_lineage(client, alice).json()["id"]
    corpus = upload(client, alice, "news.txt", corpus_text("news")).json()["id"]
    url = f"/v1/lineages/{lineage}/domains"
    headers = {**alice.headers, "Idempotency-Key": "domain-key"}
    first = client.post(url, headers=headers, json={"corpus_id": corpus, "name": "news"})
    assert first.status_code == 202
    other = client.post(url, headers=headers, json={"corpus_id": corpus, "name": "other"})
    assert_problem(other, 409, "idempotency_key_reused")
    stages = client.get(f"/v1/lineages/{lineage}", headers=alice.headers).json()["stages"]
    assert [s["name"] for s in stages] == ["news"]


@pytest.mark.parametrize("key", ["k" * 256, "tab\there", "new\nline", "\u00e9" * 300])
def test_malformed_idempotency_keys_are_400(client, alice, key):
    r = client.post(
        "/v1/lineages",
        headers=[*alice.headers.items(), ("Idempotency-Key", key.encode("utf-8"))],
        json={"name": "x", "base_model": "tiny-roberta"},
    )
    assert_problem(r, 400, "invalid_idempotency_key")


# -- unstorable values, on SQLite and on PostgreSQL ---------------------------------------------
#
# Python's JSON parser accepts what neither database nor a JSON answer can hold. Each such
# request is a 4xx problem naming the field; afterwards the list and get routes answer 200
# and no row was stored.


def _deep(levels: int, opener: str = "[", closer: str = "]") -> str:
    return opener * levels + closer * levels


LINEAGE_BAD = {
    "lone-low-surrogate": r'{"extra": {"a": "\udfff"}}',
    "lone-high-surrogate": r'{"extra": {"a": "x\ud800y"}}',
    "surrogate-key": r'{"extra": {"\ud800": 1}}',
    "nul-value": r'{"extra": {"a": "x\u0000y"}}',
    "nul-key": r'{"extra": {"a\u0000": 1}}',
    "nan-extra": '{"extra": {"a": NaN}}',
    "infinity-extra": '{"extra": {"a": [1, -Infinity]}}',
    "overflowing-float": '{"extra": {"a": 1e400}}',
    "int-over-2**53": '{"extra": {"a": 9007199254740993}}',
    "int-over-2**64": '{"extra": {"a": -18446744073709551617}}',
    "deep-lists": '{"extra": ' + _deep(40) + "}",
    "deep-objects": '{"extra": ' + '{"a": ' * 40 + "1" + "}" * 40 + "}",
    "surrogate-unknown-key": r'{"\udc80": 1}',
}


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request, tmp_path_factory):  # noqa: ANN001, ANN201
    """(app, client) on SQLite, then on the real PostgreSQL (a fresh test database)."""
    url = request.getfixturevalue("postgres_url") if request.param == "postgres" else None
    with api_on(tmp_path_factory.mktemp(f"bad-{request.param}"), url) as pair:
        yield pair


@pytest.fixture
def seeded(backend):  # noqa: ANN001, ANN201
    """An owner with one lineage and one corpus on the backend."""
    app, client = backend
    owner = new_owner(app)
    lineage = create_lineage(client, owner)
    assert lineage.status_code == 201, lineage.text
    corpus = upload(client, owner, "news.txt", corpus_text("news"))
    assert corpus.status_code == 201, corpus.text
    return app, client, owner, lineage.json()["id"], corpus.json()["id"]


def _post_json(client, owner, url: str, raw: str):  # noqa: ANN001, ANN202
    return client.post(
        url, headers={**owner.headers, "Content-Type": "application/json"}, content=raw.encode()
    )


@pytest.mark.parametrize("case", sorted(LINEAGE_BAD))
def test_unstorable_hyperparameters_are_422_and_store_nothing(seeded, case):
    app, client, owner, lineage, corpus = seeded
    before = stored_rows(app, owner)
    raw = f'{{"name": "x", "base_model": "tiny-roberta", "hyperparameters": {LINEAGE_BAD[case]}}}'
    problem = assert_problem(_post_json(client, owner, "/v1/lineages", raw), 422)
    assert problem["code"] == "invalid_hyperparameters", problem
    assert all(e["field"].startswith("hyperparameters") for e in problem["errors"]), problem
    assert stored_rows(app, owner) == before
    reads_answer_200(client, owner, lineage, corpus)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("name", r"a\udfffb"),
        ("name", r"a\u0000b"),
        ("name", r"line\nbreak"),
        ("name", r"esc\u001b[31m"),
        ("base_model", r"tiny\u0000roberta"),
        ("base_model", r"\ud800"),
        ("strategy", r"das\u0000"),
    ],
)
def test_unstorable_strings_in_a_lineage_are_422_naming_the_field(seeded, field, value):
    app, client, owner, lineage, corpus = seeded
    before = stored_rows(app, owner)
    body = {"name": "x", "base_model": "tiny-roberta"}
    raw = json.dumps(body)[:-1] + f', "{field}": "{value}"}}'
    problem = assert_problem(_post_json(client, owner, "/v1/lineages", raw), 422)
    assert field in [e["field"] for e in problem["errors"]], problem
    assert stored_rows(app, owner) == before
    reads_answer_200(client, owner, lineage, corpus)


@pytest.mark.parametrize(
    "raw",
    [
        r'{"corpus_id": CORPUS, "name": "a\udfff"}',
        r'{"corpus_id": CORPUS, "name": "a\u0000"}',
        r'{"corpus_id": CORPUS, "name": "\ud83d\ude00"}',
        r'{"corpus_id": 100000000000000000000000000000, "name": "news"}',
        r'{"corpus_id": CORPUS, "name": "news", "eval_corpus_id": -18446744073709551617}',
        r'{"corpus_id": CORPUS, "name": "news", "eval_corpus_id": 1e400}',
        '{"corpus_id": CORPUS, "name": "news", "x": ' + _deep(60) + "}",
    ],
)
def test_unstorable_domain_requests_store_nothing(seeded, raw):
    app, client, owner, lineage, corpus = seeded
    before = stored_rows(app, owner)
    r = _post_json(
        client, owner, f"/v1/lineages/{lineage}/domains", raw.replace("CORPUS", json.dumps(corpus))
    )
    assert 400 <= r.status_code < 500, r.text
    assert_problem(r, r.status_code)
    assert stored_rows(app, owner) == before
    reads_answer_200(client, owner, lineage, corpus)


UNICODE = [
    "\U0001f600 emoji",
    "\U0001f469\u200d\U0001f469\u200d\U0001f467 family (ZWJ)",
    "中文名称",
    "עברית \u200fשלום",  # RTL with a right-to-left mark
    "العربية",
    "e\u0301 combining, \u0928\u093f Devanagari",
    "\U0001d400 math bold, \ufeff BOM, \u00a0 nbsp",
]


@pytest.mark.parametrize("text", UNICODE)
def test_valid_unicode_round_trips_in_every_string_field(seeded, text):
    app, client, owner, _, _ = seeded
    hyper = {**TINY_HP, "extra": {text: [text, {"k": text}]}}
    r = client.post(
        "/v1/lineages",
        headers=owner.headers,
        json={"name": text, "base_model": "tiny-roberta", "hyperparameters": hyper},
    )
    assert r.status_code == 201, r.text
    got = client.get(f"/v1/lineages/{r.json()['id']}", headers=owner.headers).json()
    assert got["name"] == text and got["hyperparameters"]["extra"] == hyper["extra"]
    listed = client.get("/v1/lineages?limit=100", headers=owner.headers).json()["data"]
    assert text in [lin["name"] for lin in listed]
    corpus = upload(client, owner, f"{text}.txt", corpus_text("law"))
    assert corpus.status_code == 201, corpus.text
    assert corpus.json()["filename"] == f"{text}.txt"
    stored = client.get(f"/v1/corpora/{corpus.json()['id']}", headers=owner.headers).json()
    assert stored["filename"] == corpus.json()["filename"]


def test_integer_ids_are_404_and_numeric_cursors_422(seeded):
    """Found by the fuzzing on PostgreSQL: an id past INTEGER was a database error (500).
    Ids are opaque strings now: an integer is an unknown id wherever it is sent."""
    app, client, owner, lineage, corpus = seeded
    big = 2**31
    for url in (f"/v1/lineages/{big}", f"/v1/corpora/{big}", f"/v1/jobs/{big}"):
        assert_problem(client.get(url, headers=owner.headers), 404)
    r = client.post(
        f"/v1/lineages/{lineage}/domains",
        headers=owner.headers,
        json={"corpus_id": corpus, "name": "news", "eval_corpus_id": big},
    )
    assert_problem(r, 404, "corpus_not_found")
    # a cursor is the public id of a page's last row: a number is no cursor
    page = client.get("/v1/lineages?after=999999999999999999", headers=owner.headers)
    assert_problem(page, 422, "validation_error")


@pytest.mark.parametrize(
    "hyper",
    [
        '{"extra": ' + _deep(5000) + "}",  # deeper than Python's parser recurses
        '{"extra": {"a": ' + "9" * 5000 + "}}",  # more digits than int() converts
    ],
    ids=["nesting-5000", "digits-5000"],
)
def test_bodies_the_json_parser_gives_up_on_are_4xx_and_store_nothing(seeded, hyper):
    app, client, owner, lineage, corpus = seeded
    before = stored_rows(app, owner)
    raw = f'{{"name": "x", "base_model": "tiny-roberta", "hyperparameters": {hyper}}}'
    r = _post_json(client, owner, "/v1/lineages", raw)
    assert 400 <= r.status_code < 500, r.text
    assert_problem(r, r.status_code)
    assert stored_rows(app, owner) == before
    reads_answer_200(client, owner, lineage, corpus)
