"""Values made storable as strict JSON: JSON has no NaN or Infinity, so a non-finite number
(a diverged loss, an empty average) is written as null. The one rule for the engine's
files, the worker's events and the API's answers."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any


def finite(x: float | None) -> float | None:
    """``x``, or None when it is None, NaN or infinite."""
    return x if x is not None and math.isfinite(x) else None


def json_safe(value: Any, text: Callable[[str], str] = str) -> Any:
    """``value`` with non-finite floats as None, mapping keys as strings, tuples as lists
    and paths (and any other object) as their text; ``text`` maps every string and key
    (e.g. replacing lone surrogates)."""
    if isinstance(value, bool) or value is None or isinstance(value, int):
        return value
    if isinstance(value, float):
        return finite(value)
    if isinstance(value, str):
        return text(value)
    if isinstance(value, dict):
        return {text(str(k)): json_safe(v, text) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v, text) for v in value]
    if isinstance(value, Path):
        return text(str(value))
    return text(str(value))
