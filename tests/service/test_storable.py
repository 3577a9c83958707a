"""``app.storable``: what it lets through can be encoded and read back exactly; what it
refuses names the place; error bodies are always encodable."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from app.storable import MAX_JSON_DEPTH, encode_json, json_problems, scrub, text_problem

ODD = ["\ud800", "\udfff", "\x00", "\x1b", "\U0001f600", "\u200d", "\u05d0", "\u0301"]
TEXT = st.text(alphabet=st.one_of(st.characters(), st.sampled_from(ODD)), max_size=8)
VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**60), 2**60)
    | st.floats(allow_nan=True, allow_infinity=True)
    | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(VALUES)
def test_what_passes_is_encodable_and_round_trips(value):
    problems = json_problems(value, "v")
    if not problems:
        assert json.loads(encode_json(value)) == value
    else:
        assert all(p["field"].startswith("v") and p["message"] for p in problems)
    json.loads(encode_json(scrub(problems)))  # the 422 that quotes them can be sent


@settings(max_examples=200, deadline=None)
@given(VALUES)
def test_scrub_makes_anything_encodable(value):
    json.loads(encode_json(scrub({"detail": value, "errors": [value]})))


def test_depth_is_counted_without_recursion():
    deep: list = []
    for _ in range(100_000):  # far past Python's recursion limit
        deep = [deep]
    problems = json_problems(deep, "v")
    assert problems and f"deeper than {MAX_JSON_DEPTH}" in problems[0]["message"]
    shallow: list = []
    for _ in range(MAX_JSON_DEPTH):
        shallow = [shallow]
    assert json_problems(shallow, "v") == []


def test_text_rules():
    for ok in ("\U0001f469\u200d\U0001f469\u200d\U0001f467", "עברית\u200f", "中文", "e\u0301"):
        assert text_problem(ok) is None
    assert "surrogate" in text_problem("a\udc80")
    assert "NUL" in text_problem("a\x00")
    assert "control" in text_problem("a\nb") and text_problem("a\nb", single_line=False) is None
