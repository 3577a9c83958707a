"""json_safe: the one rule for non-finite values in the engine's files, the worker's events
and the API's answers."""

import json
import math
from pathlib import Path

from das_engine.jsonsafe import finite, json_safe


def test_non_finite_values_become_null_at_any_depth():
    value = {
        "a": math.nan,
        "b": [1.5, math.inf, (-math.inf, 2)],
        3: {"c": None, "d": True, "e": 7, "f": "ünïcödé 🙂"},
        "p": Path("/x/y"),
    }
    out = json_safe(value)
    assert out == {
        "a": None,
        "b": [1.5, None, [None, 2]],
        "3": {"c": None, "d": True, "e": 7, "f": "ünïcödé 🙂"},
        "p": "/x/y",
    }
    json.dumps(out, allow_nan=False)  # strict JSON now


def test_booleans_and_integers_stay_as_they_are():
    assert json_safe(True) is True and json_safe(2**60) == 2**60


def test_text_maps_every_string_and_key():
    assert json_safe({"k": ["v", 1.0]}, text=str.upper) == {"K": ["V", 1.0]}


def test_finite():
    assert finite(1.0) == 1.0 and finite(None) is None
    assert finite(math.nan) is None and finite(-math.inf) is None
