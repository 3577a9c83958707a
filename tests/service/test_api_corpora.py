"""POST/GET /v1/corpora: streamed uploads, sha256, validation with precise problems, limits,
gzip bombs, odd file names, owner isolation, idempotency."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json

import pytest
from fastapi.testclient import TestClient
from starlette.requests import Request

from app.main import create_app
from app.migrate import upgrade
from app.problems import Problem
from app.uploads import receive_multipart
from tests.service.conftest import (
    assert_problem,
    corpus_text,
    make_settings,
    new_owner,
    upload,
)


def _upload_dirs(settings) -> set[str]:  # noqa: ANN001
    root = settings.uploads_dir
    return {p.name for p in root.iterdir()} if root.exists() else set()


def test_upload_txt_reports_bytes_sha256_documents(client, alice, settings):
    data = corpus_text("news", documents=12)
    response = upload(client, alice, "news.txt", data)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["bytes"] == len(data)
    assert body["sha256"] == hashlib.sha256(data).hexdigest()
    assert body["documents"] == 12
    assert body["status"] == "ready"
    assert body["format"] == "txt" and body["compressed"] is False
    assert body["report"]["ok"] is True
    assert client.get(f"/v1/corpora/{body['id']}", headers=alice.headers).json() == body


def test_a_jsonl_file_saved_with_a_byte_order_mark_is_accepted(client, alice):
    data = b"\xef\xbb\xbf" + b'{"text": "first"}\n{"text": "second"}\n'
    response = upload(client, alice, "windows.jsonl", data)
    assert response.status_code == 201, response.text
    assert response.json()["documents"] == 2


def test_upload_jsonl_and_gzip(client, alice):
    lines = b"".join(
        json.dumps({"text": f"document {i} about law"}).encode() + b"\n" for i in range(7)
    )
    r = upload(client, alice, "law.jsonl", lines)
    assert r.status_code == 201 and r.json()["documents"] == 7 and r.json()["format"] == "jsonl"
    packed = gzip.compress(lines)
    r = upload(client, alice, "law.jsonl.gz", packed)
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["compressed"] is True and body["documents"] == 7
    assert body["sha256"] == hashlib.sha256(packed).hexdigest()
    assert body["report"]["uncompressed_bytes"] == len(lines)


@pytest.mark.parametrize(
    ("filename", "content", "needle", "line"),
    [
        ("latin1.txt", "caf\xe9 cr\xe8me\n".encode("latin-1"), "UTF-8", 1),
        ("binary.txt", b"text\n\x00\x01\x02binary\n", "binary", 2),
        ("whitespace.txt", b"   \n\n\t\n", "empty", None),
        ("bad.jsonl", b'{"text": "ok"}\n{"text": broken\n{"text": "fine"}\n', "malformed JSON", 2),
        ("notext.jsonl", b'{"text": "ok"}\n{"body": "no text"}\n', 'missing "text"', 2),
        ("number.jsonl", b'{"text": 5}\n', "must be a string", 1),
    ],
)
def test_bad_corpora_are_422_with_line_numbers_and_nothing_kept(
    client, alice, settings, filename, content, needle, line
):
    before = _upload_dirs(settings)
    body = assert_problem(upload(client, alice, filename, content), 422, "invalid_corpus")
    assert needle in body["detail"]
    assert body["errors"][0]["line"] == line
    assert needle in body["errors"][0]["message"]
    assert _upload_dirs(settings) == before
    assert client.get("/v1/corpora", headers=alice.headers).json()["data"] == []


def test_empty_file_is_422(client, alice):
    body = assert_problem(upload(client, alice, "empty.txt", b""), 422, "invalid_corpus")
    assert "empty" in body["detail"]


def test_every_problem_line_is_listed(client, alice):
    content = b'{"text": "a"}\n{x\n{"text": "b"}\n[1]\n{"text": "c"}\n{y\n'
    body = assert_problem(upload(client, alice, "many.jsonl", content), 422)
    assert [e["line"] for e in body["errors"]] == [2, 4, 6]
    assert body["problem_count"] == 3


@pytest.mark.parametrize("filename", ["corpus.pdf", "corpus", "archive.tar.gz", "x.exe", "...."])
def test_unsupported_file_types_are_422(client, alice, filename):
    assert_problem(upload(client, alice, filename, b"hello\n"), 422, "unsupported_file_type")


@pytest.mark.parametrize(
    "filename",
    [
        "../../../../etc/passwd.txt",
        "..\\..\\windows\\win.ini.txt",
        "/absolute/path/news.txt",
        "name with spaces & symbols;rm -rf.txt",
        "\u202eevil\u0000name.txt",
        "日本語.jsonl",
        "a" * 400 + ".txt",
    ],
)
def test_odd_and_traversal_filenames_are_stored_safely(client, alice, settings, filename):
    content = b'{"text": "x"}\n' if filename.endswith(".jsonl") else b"some text\n"
    response = upload(client, alice, filename, content)
    assert response.status_code == 201, response.text
    body = response.json()
    assert "/" not in body["filename"] and "\\" not in body["filename"]
    assert all(ch.isprintable() for ch in body["filename"])
    from sqlalchemy import select

    from service_core.models import Corpus

    with client.app.state.session_factory() as session:
        corpus = session.scalar(select(Corpus).where(Corpus.public_id == body["id"]))
    stored = (settings.data_dir / corpus.storage_path).resolve()
    assert stored.is_relative_to(settings.uploads_dir.resolve())
    assert stored.read_bytes() == content
    assert not stored.name.startswith(".")


def test_missing_file_part_and_wrong_content_type(client, alice):
    r = client.post("/v1/corpora", headers=alice.headers, data={"name": "x"}, files={})
    assert r.status_code in (415, 422)
    assert r.headers["content-type"].startswith("application/problem+json")
    r = client.post(
        "/v1/corpora",
        headers=alice.headers,
        files={"other": ("x.txt", b"hello\n")},
    )
    assert_problem(r, 422, "unexpected_file")
    r = client.post("/v1/corpora", headers=alice.headers, json={"file": "hello"})
    assert_problem(r, 415, "unsupported_media_type")


def test_malformed_multipart_is_400(client, alice):
    r = client.post(
        "/v1/corpora",
        headers={**alice.headers, "Content-Type": "multipart/form-data; boundary=XYZ"},
        content=b'--XYZ\r\nContent-Disposition: form-data; name="file"; '
        b'filename="a.txt"\r\n\r\nabc',
    )
    assert r.status_code in (400, 422)
    assert r.headers["content-type"].startswith("application/problem+json")


# -- limits -----------------------------------------------------------------------------------


@pytest.fixture
def limited(tmp_path):  # noqa: ANN201
    s = make_settings(
        tmp_path,
        max_upload_bytes=64 * 1024,
        max_uncompressed_bytes=1 << 20,
        max_line_chars=1000,
    )
    upgrade(s)
    app = create_app(s, enqueue=lambda ids: [], broker_ping=lambda: None)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c, new_owner(app), s


def test_upload_over_the_limit_is_413_and_nothing_kept(limited):
    client, owner, s = limited
    body = assert_problem(upload(client, owner, "big.txt", b"word " * 40_000), 413)
    assert body["code"] == "upload_too_large"
    assert _upload_dirs(s) == set()


def test_gzip_bomb_is_413(limited):
    client, owner, s = limited
    bomb = gzip.compress(b"a" * (4 << 20))  # 4 MiB out of ~4 KiB in
    assert len(bomb) < 64 * 1024
    assert_problem(upload(client, owner, "bomb.txt.gz", bomb), 413, "uncompressed_too_large")
    assert _upload_dirs(s) == set()


def test_gzip_bomb_disguised_as_txt_is_caught_by_magic(limited):
    client, owner, _ = limited
    bomb = gzip.compress(b"a" * (4 << 20))
    assert_problem(upload(client, owner, "innocent.txt", bomb), 413)


def test_corrupt_gzip_is_422(limited):
    client, owner, _ = limited
    broken = gzip.compress(b"hello world\n" * 100)[:-12]
    assert_problem(upload(client, owner, "broken.txt.gz", broken), 422, "invalid_corpus")


def test_a_single_enormous_line_is_422(limited):
    client, owner, _ = limited
    body = assert_problem(upload(client, owner, "long.txt", b"x" * 5000 + b"\n"), 422)
    assert body["errors"][0]["line"] == 1
    assert "longer than 1000" in body["errors"][0]["message"]


def test_the_size_limit_stops_the_stream_early():
    """The limit is enforced while the body arrives: the parser stops reading the request
    (and deletes the partial file) soon after the limit, not after the whole body."""
    boundary = b"B0undary"
    head = (
        b"--" + boundary + b'\r\nContent-Disposition: form-data; name="file"; '
        b'filename="x.txt"\r\nContent-Type: text/plain\r\n\r\n'
    )
    chunk = b"y" * 65536
    total_chunks = 1000  # 64 MiB offered, 1 MiB allowed
    consumed = 0

    async def receive():  # noqa: ANN202
        nonlocal consumed
        consumed += 1
        if consumed == 1:
            return {"type": "http.request", "body": head, "more_body": True}
        return {"type": "http.request", "body": chunk, "more_body": consumed < total_chunks}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/corpora",
        "headers": [(b"content-type", b"multipart/form-data; boundary=" + boundary)],
    }

    async def run(tmp):  # noqa: ANN001, ANN202
        return await receive_multipart(Request(scope, receive), tmp, max_bytes=1 << 20)

    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        with pytest.raises(Problem) as info:
            asyncio.run(run(Path(tmp)))
        assert info.value.status == 413
        assert consumed < 20  # ~17 chunks of 64 KiB, not 1000
        assert list(Path(tmp).iterdir()) == []


# -- listing, isolation, idempotency -------------------------------------------------------------


def test_list_is_paginated_with_a_cursor(client, alice):
    ids = [upload(client, alice, f"c{i}.txt", b"text %d\n" % i).json()["id"] for i in range(5)]
    page = client.get("/v1/corpora?limit=2", headers=alice.headers).json()
    assert [c["id"] for c in page["data"]] == ids[:2] and page["has_more"] is True
    page2 = client.get(f"/v1/corpora?limit=2&after={page['next_after']}", headers=alice.headers)
    assert [c["id"] for c in page2.json()["data"]] == ids[2:4]
    last = client.get(f"/v1/corpora?limit=2&after={ids[3]}", headers=alice.headers).json()
    assert [c["id"] for c in last["data"]] == ids[4:] and last["has_more"] is False
    assert last["next_after"] is None


def test_other_owners_corpora_are_invisible(client, alice, bob):
    mine = upload(client, alice, "mine.txt", b"private words\n").json()["id"]
    assert_problem(client.get(f"/v1/corpora/{mine}", headers=bob.headers), 404, "corpus_not_found")
    assert client.get("/v1/corpora", headers=bob.headers).json()["data"] == []
    assert client.get(f"/v1/corpora/{mine}", headers=alice.headers).status_code == 200


def test_idempotent_upload_replays_and_detects_reuse(client, alice):
    key = {"Idempotency-Key": "upload-1"}
    first = upload(client, alice, "a.txt", b"alpha beta\n", key)
    again = upload(client, alice, "a.txt", b"alpha beta\n", key)
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json()
    assert again.headers.get("idempotent-replayed") == "true"
    assert len(client.get("/v1/corpora", headers=alice.headers).json()["data"]) == 1
    other = upload(client, alice, "a.txt", b"something else\n", key)
    assert_problem(other, 409, "idempotency_key_reused")
    # keys are per owner
    assert upload(client, new_owner(client.app), "a.txt", b"x y\n", key).status_code == 201


def test_a_failed_request_does_not_burn_its_idempotency_key(client, alice):
    key = {"Idempotency-Key": "retry-after-fix"}
    assert_problem(upload(client, alice, "bad.txt", b"\xff\xfe\n", key), 422)
    assert upload(client, alice, "good.txt", b"fixed text\n", key).status_code == 201
