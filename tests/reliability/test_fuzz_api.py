"""schemathesis against the live OpenAPI schema of the app (ASGI, in-process, SQLite): every
operation gets generated valid and invalid requests, authenticated as an owner who has a
corpus, a lineage with a trained stage (its artifacts downloadable) and a queued one, so that
ids hit real rows as well as missing ones. Checked on every response: no 5xx, the status code
and the content type are documented for the operation, the body and headers match the schema.
Bounded (a few dozen examples an operation) to stay well under two minutes."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app.main import create_app
from app.migrate import upgrade
from tests.service.conftest import (
    TINY_HP,
    EnqueueRecorder,
    Owner,
    add_domain,
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
    download) and a queued one."""
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
    KNOWN.update({"lineage_id": [lineage], "corpus_id": [corpus], "job_id": [trained, queued]})
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
