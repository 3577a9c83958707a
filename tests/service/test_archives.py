"""The streamed tar: exact length, readable by tarfile, any byte range equals the same slice
of the whole archive."""

from __future__ import annotations

import io
import os
import tarfile

from hypothesis import given, settings
from hypothesis import strategies as st

from app.archives import TarPlan, parse_range


def _tree(tmp_path):  # noqa: ANN001, ANN202
    (tmp_path / "sub").mkdir()
    (tmp_path / "config.json").write_bytes(b"{}")
    (tmp_path / "sub" / "weights.bin").write_bytes(os.urandom(70_001))
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "link").symlink_to("/etc/passwd")
    return TarPlan.of_directory(tmp_path, "model")


def test_archive_is_exact_and_readable(tmp_path):
    plan = _tree(tmp_path)
    data = b"".join(plan.stream())
    assert len(data) == plan.content_length
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = tar.getnames()
        assert (
            tar.extractfile("model/sub/weights.bin").read()
            == (tmp_path / "sub" / "weights.bin").read_bytes()
        )
    assert "model/link" not in names  # links are never followed out of the folder
    assert {"model", "model/config.json", "model/empty", "model/sub"} <= set(names)


def test_etag_changes_with_content(tmp_path):
    plan = _tree(tmp_path)
    (tmp_path / "config.json").write_bytes(b'{"a": 1}')
    assert TarPlan.of_directory(tmp_path, "model").etag != plan.etag


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_any_range_is_the_same_slice(tmp_path_factory, data):
    root = tmp_path_factory.mktemp("tree")
    plan = _tree(root)
    whole = b"".join(plan.stream())
    start = data.draw(st.integers(0, len(whole) - 1))
    end = data.draw(st.integers(start, len(whole)))
    assert b"".join(plan.stream(start, end)) == whole[start:end]


def test_parse_range():
    assert parse_range("bytes=0-9", 100) == (0, 10)
    assert parse_range("bytes=90-", 100) == (90, 100)
    assert parse_range("bytes=-10", 100) == (90, 100)
    assert parse_range("bytes=5-1000", 100) == (5, 100)
    for bad in ("bytes=100-", "bytes=1-2,4-5", "items=0-1", "bytes=-0", "bytes=x-y", "bytes=9-3"):
        assert parse_range(bad, 100) is None
