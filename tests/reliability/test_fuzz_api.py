"""schemathesis against the live OpenAPI schema of the app (ASGI, in-process, SQLite): every
operation gets generated valid and invalid requests, authenticated as an owner who has a
corpus, a lineage with a trained stage (its artifacts downloadable) and a queued one, so that
ids hit real rows as well as missing ones. Checked on every response: no 5xx, the status code
and the content type are documented for the operation, the body and headers match the schema.
Bounded (a few dozen examples an operation) to stay well under two minutes."""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy import func, select

from app.auth import hash_key
from app.main import create_app
from app.migrate import upgrade
from tests.reliability.backends import BACKENDS, api_on, reads_answer_200, stored_rows
from tests.service.conftest import (
    TINY_HP,
    EnqueueRecorder,
    Owner,
    add_domain,
    corpus_text,
    create_lineage,
    make_settings,
    new_owner,
    upload,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]

CONFIG = """
[generation]
max-examples = 30
mode = "all"

[phases.stateful]
enabled = false
"""


# The schema is loaded from the app when the module is imported (schemathesis builds one
# test per operation at collection); the database and the owner's rows are made by the
# module fixture below, before any request is sent.
DATA = Path(tempfile.mkdtemp(prefix="das-fuzz-"))
atexit.register(shutil.rmtree, DATA, True)
# streams of the queued job close after a second instead of running for ever
SETTINGS = make_settings(DATA, max_upload_bytes=1 << 20, stream_max_seconds=1.0)
APP = create_app(SETTINGS, enqueue=EnqueueRecorder(), broker_ping=lambda: None)
KNOWN: dict[str, list[int]] = {}  # path parameter -> the owner's real ids
OWNER: list[Owner] = []

schema = schemathesis.openapi.from_asgi(
    "/openapi.json", APP, config=schemathesis.config.SchemathesisConfig.from_str(CONFIG)
)


@schema.hook
def before_generate_path_parameters(context, strategy):  # noqa: ANN001, ANN202
    """Half of the valid ids generated are replaced by the owner's real ones."""

    def known(params: object) -> st.SearchStrategy:
        if not isinstance(params, dict) or not params:  # a negative case: left as generated
            return st.just(params)
        choices = {
            name: st.deferred(lambda name=name: st.sampled_from(KNOWN[name]))
            for name in params
            if name in KNOWN and isinstance(params[name], int)
        }
        return st.fixed_dictionaries(choices).map(lambda real: {**params, **real})

    return st.one_of(strategy, strategy.flatmap(known))


@pytest.fixture(scope="module", autouse=True)
def seeded() -> Iterator[None]:
    """Migrations, an owner with a corpus, a lineage with a trained stage (artifacts to
    download) and a queued one, and a webhook endpoint."""
    from worker.runner import JobRunner

    upgrade(SETTINGS)
    runner = JobRunner(SETTINGS, APP.state.session_factory, EnqueueRecorder())
    with TestClient(APP, raise_server_exceptions=False) as client:
        owner = new_owner(APP)
        corpus = upload(client, owner, "seed.txt", b"a seed corpus\n").json()["id"]
        lineage = create_lineage(client, owner, hyperparameters=TINY_HP).json()["id"]
        trained = add_domain(client, owner, lineage, "news")
        assert runner.run(trained) == "succeeded"
        queued = add_domain(client, owner, lineage, "law")
        # a public address: registered without a connection (no dispatcher runs here)
        hook = client.post(
            "/v1/webhooks", headers=owner.headers, json={"url": "https://93.184.215.14/hook"}
        ).json()["id"]
    KNOWN.update({"lineage_id": [lineage], "corpus_id": [corpus], "job_id": [trained, queued]})
    KNOWN["webhook_id"] = [hook]
    KNOWN["position"] = [1, 2]
    OWNER.append(owner)
    try:
        yield
    finally:
        APP.state.engine.dispose()


@schema.parametrize()
@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
    database=None,
)
def test_no_server_error_and_responses_match_the_schema(case):  # noqa: ANN001
    # the owner's key replaces the random bearer tokens generated from the security scheme
    # (the 401 paths are tested in tests/service); other generated headers are kept
    case.call_and_validate(headers=OWNER[0].headers, checks=CHECKS)


# -- values the schema cannot express: lone surrogates, NUL, deep nesting, huge numbers ------------
#
# schemathesis sends only what JSON generators make (valid Unicode, finite numbers). Python's
# parser also accepts lone-surrogate escapes, NaN/Infinity, any integer and deep nesting; these
# are sent here as raw JSON into every string field and into ``hyperparameters``, on SQLite and
# on the real PostgreSQL. After each request: no 5xx, a 4xx stores nothing, a 2xx round-trips,
# and the list and get routes still answer 200.

_ODD_CHARS = ["\ud800", "\udbff", "\udc00", "\udfff", "\x00", "\x1b", "\n", "\u202e", "\ufeff"]
_ODD_CHARS += ["\U0001f600", "\u200d", "\u0301", "\u05d0", "\u4e2d", "\ufffd", "\uffff"]
ODD_TEXT = st.text(alphabet=st.one_of(st.characters(), st.sampled_from(_ODD_CHARS)), max_size=12)
ODD_NUMBER = st.one_of(
    st.integers(-(2**80), 2**80),
    st.integers(2**53 - 3, 2**53 + 3),
    st.floats(allow_nan=True, allow_infinity=True),
)
ODD_JSON = st.recursive(
    st.none() | st.booleans() | ODD_NUMBER | ODD_TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(ODD_TEXT, inner, max_size=3),
    max_leaves=8,
)
DEEP = st.integers(20, 120).map(lambda depth: functools.reduce(lambda v, _: [v], range(depth), 0))
ODD_VALUE = st.one_of(ODD_JSON, DEEP)
HYPERPARAMETERS = st.one_of(
    st.fixed_dictionaries({"extra": st.dictionaries(ODD_TEXT, ODD_VALUE, max_size=3)}),
    st.dictionaries(ODD_TEXT, ODD_VALUE, max_size=2),
    st.fixed_dictionaries(
        {},
        optional={"max_steps": ODD_NUMBER, "learning_rate": ODD_NUMBER, "normalization": ODD_TEXT},
    ),
)
SHORT_TEXT = st.one_of(st.just("fine"), ODD_TEXT)


def _raw(body: object) -> bytes:
    # ensure_ascii: lone surrogates travel as \\udXXX escapes; allow_nan: NaN, Infinity
    return json.dumps(body, ensure_ascii=True, allow_nan=True).encode()


@pytest.fixture(scope="module", params=BACKENDS)
def odd_backend(request, tmp_path_factory):  # noqa: ANN001, ANN201
    """(app, client, owner, lineage id, corpus id) on SQLite, then on PostgreSQL."""
    url = request.getfixturevalue("postgres_url") if request.param == "postgres" else None
    with api_on(tmp_path_factory.mktemp(f"odd-{request.param}"), url) as (app, client):
        owner = new_owner(app)
        lineage = create_lineage(client, owner, hyperparameters=TINY_HP).json()["id"]
        corpus = upload(client, owner, "seed.txt", corpus_text("news")).json()["id"]
        yield app, client, owner, lineage, corpus


def _sent_and_kept(app, client, owner, lineage, corpus, response, before) -> None:  # noqa: ANN001
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert response.headers["content-type"].startswith("application/problem+json")
        assert stored_rows(app, owner) == before
    reads_answer_200(client, owner, lineage, corpus)


def _post_odd(odd_backend, path: str, body: dict):  # noqa: ANN001, ANN202
    """POST ``body`` as raw JSON: no 5xx, a 4xx stores nothing, the reads still answer."""
    app, client, owner, lineage, corpus = odd_backend
    before = stored_rows(app, owner)
    r = client.post(
        path,
        headers={**owner.headers, "Content-Type": "application/json"},
        content=_raw(body),
    )
    _sent_and_kept(app, client, owner, lineage, corpus, r, before)
    return r


ODD_SETTINGS = settings(
    max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None
)


@ODD_SETTINGS
@given(
    name=SHORT_TEXT, base_model=st.one_of(st.just("tiny-roberta"), ODD_TEXT), hyper=HYPERPARAMETERS
)
def test_odd_values_in_a_lineage_never_break_it(odd_backend, name, base_model, hyper):
    client, owner = odd_backend[1], odd_backend[2]
    body = {"name": name, "base_model": base_model, "hyperparameters": hyper}
    r = _post_odd(odd_backend, "/v1/lineages", body)
    if r.status_code == 201:  # what was accepted is what is read back
        got = client.get(f"/v1/lineages/{r.json()['id']}", headers=owner.headers).json()
        assert got["name"] == name and got["hyperparameters"] == hyper


@ODD_SETTINGS
@given(
    name=SHORT_TEXT,
    corpus_id=st.one_of(st.none(), ODD_NUMBER),
    eval_corpus_id=st.one_of(st.none(), ODD_NUMBER, ODD_TEXT),
    extra=st.one_of(st.none(), ODD_VALUE),
)
def test_odd_values_in_a_domain_never_break_the_lineage(
    odd_backend, name, corpus_id, eval_corpus_id, extra
):
    app, client, owner, lineage, corpus = odd_backend
    before = stored_rows(app, owner)
    body: dict = {"corpus_id": corpus if corpus_id is None else corpus_id, "name": name}
    if eval_corpus_id is not None:
        body["eval_corpus_id"] = eval_corpus_id
    if extra is not None:
        body["extra"] = extra
    r = client.post(
        f"/v1/lineages/{lineage}/domains",
        headers={**owner.headers, "Content-Type": "application/json"},
        content=_raw(body),
    )
    _sent_and_kept(app, client, owner, lineage, corpus, r, before)
    if r.status_code == 202:
        assert r.json()["stage"]["name"] == name
        cancel = client.post(f"/v1/jobs/{r.json()['job']['id']}/cancel", headers=owner.headers)
        assert cancel.status_code == 202  # frees the name and the owner's job quota


@ODD_SETTINGS
@given(filename=ODD_TEXT, field=ODD_TEXT)
def test_odd_file_names_and_form_fields_never_break_uploads(odd_backend, filename, field):
    app, client, owner, lineage, corpus = odd_backend
    before = stored_rows(app, owner)
    # a multipart header carries bytes: what is not UTF-8 encodable travels as replacement
    name = filename.encode("utf-8", "surrogatepass").decode("utf-8", "replace") + ".txt"
    r = client.post(
        f"/v1/lineages/{lineage}/domains",
        headers=owner.headers,
        data={"name": field.encode("utf-8", "surrogatepass").decode("utf-8", "replace")},
        files={"file": (name, corpus_text("law", documents=8))},
    )
    _sent_and_kept(app, client, owner, lineage, corpus, r, before)
    if r.status_code == 202:
        client.post(f"/v1/jobs/{r.json()['job']['id']}/cancel", headers=owner.headers)
    up = client.post("/v1/corpora", headers=owner.headers, files={"file": (name, b"some text\n")})
    assert up.status_code in (201, 422), up.text  # a name without .txt left is a 422
    if up.status_code == 201:
        got = client.get(f"/v1/corpora/{up.json()['id']}", headers=owner.headers).json()
        assert got["filename"] == up.json()["filename"] and "\x00" not in got["filename"]


ODD_URL = st.one_of(
    ODD_TEXT,
    ODD_TEXT.map(lambda t: f"https://{t}/hook"),
    ODD_TEXT.map(lambda t: f"http://93.184.215.14/{t}"),
    st.sampled_from(["http://[::1]/", "https://[fe80::1%25eth0]/", "http://0x7f.1/", "http://:80"]),
)


@ODD_SETTINGS
@given(
    url=ODD_URL,
    description=st.one_of(st.none(), ODD_TEXT),
    events=st.one_of(st.none(), st.lists(st.one_of(st.just("job.failed"), ODD_TEXT), max_size=3)),
)
def test_odd_values_in_a_webhook_never_break_the_list(odd_backend, url, description, events):
    client, owner = odd_backend[1], odd_backend[2]
    body: dict = {"url": url}
    if description is not None:
        body["description"] = description
    if events is not None:
        body["events"] = events
    r = _post_odd(odd_backend, "/v1/webhooks", body)
    if r.status_code == 201:  # what was accepted is what is read back
        got = client.get(f"/v1/webhooks/{r.json()['id']}", headers=owner.headers).json()
        assert got["url"] == url and got["description"] == (description or "")
        assert client.delete(f"/v1/webhooks/{got['id']}", headers=owner.headers).status_code == 204


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(owner=ODD_TEXT)
def test_owner_names_of_create_api_key_are_stored_or_refused_cleanly(odd_backend, owner):
    """``das-service create-api-key --owner``: a name is stored as given (stripped) or refused
    with a ValueError (the CLI's exit status 2 and message); never a database error."""
    from app.auth import create_api_key
    from service_core.models import ApiKey

    app = odd_backend[0]
    with app.state.session_factory() as session:
        keys = session.scalar(select(func.count(ApiKey.id)))
    try:
        with app.state.session_factory() as session, session.begin():
            key = create_api_key(session, owner)
    except ValueError:
        with app.state.session_factory() as session:
            assert session.scalar(select(func.count(ApiKey.id))) == keys
        return
    with app.state.session_factory() as session:
        row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key)))
    assert row is not None and row.owner == owner.strip()


def test_the_cli_refuses_an_unstorable_owner_with_status_2(tmp_path, monkeypatch, capsys):
    from app import cli

    monkeypatch.setattr(cli, "get_settings", lambda: make_settings(tmp_path))
    assert cli.main(["create-api-key", "--owner", "bad\udcffname"]) == 2  # argv not UTF-8
    assert "surrogate" in capsys.readouterr().err
    assert cli.main(["create-api-key", "--owner", "ok \U0001f600"]) == 0
    assert capsys.readouterr().out.startswith("das_")
