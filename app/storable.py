"""What the database and a JSON answer can hold, checked before anything is stored.

Python's JSON parser accepts input that cannot be stored or sent back: lone UTF-16
surrogates (``"\\udfff"``: no UTF-8 encoding, PostgreSQL refuses them), NUL characters
(PostgreSQL text and JSON cannot hold them), ``NaN``/``Infinity`` (not JSON), integers no
JSON client reads exactly, and nesting deep enough to overflow a serialiser's stack. A
request carrying any of them is refused with a 422 naming the field, so that a row that
would break every later read of it is never written.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from typing import Any

from das_engine.jsonsafe import json_safe

# RFC 7493 (I-JSON): integers beyond +-(2**53 - 1) are not read exactly by every JSON parser
MAX_JSON_INT = 2**53 - 1
MAX_JSON_DEPTH = 32
_SURROGATE = re.compile("[\ud800-\udfff]")


def text_problem(value: str, *, single_line: bool = True) -> str | None:
    """Why ``value`` cannot be stored as text, or None. Any valid Unicode (emoji, CJK, RTL,
    combining marks) is fine; control characters are refused in single-line fields."""
    if _SURROGATE.search(value):
        return "contains a lone UTF-16 surrogate (not valid Unicode)"
    if "\x00" in value:
        return "contains a NUL character"
    if single_line and any(unicodedata.category(ch) == "Cc" for ch in value):
        return "contains a control character"
    return None


def json_problems(value: Any, field: str, *, max_depth: int = MAX_JSON_DEPTH) -> list[dict]:
    """Every place in ``value`` (parsed JSON) that cannot be stored and answered back, as
    ``[{field, message}]`` with dotted paths under ``field``. Iterative: a deeply nested
    value cannot overflow the stack here."""
    problems: list[dict] = []
    stack: list[tuple[Any, str, int]] = [(value, field, 0)]
    while stack and len(problems) < 20:
        item, path, depth = stack.pop()
        if depth > max_depth:
            problems.append({"field": path, "message": f"nested deeper than {max_depth} levels"})
            continue
        if isinstance(item, dict):
            for key, child in item.items():
                if not isinstance(key, str):
                    problems.append({"field": path, "message": "object keys must be strings"})
                    continue
                why = text_problem(key, single_line=False)
                child_path = f"{path}.{_printable(key)}"
                if why:
                    problems.append({"field": child_path, "message": f"key {why}"})
                    continue
                stack.append((child, child_path, depth + 1))
        elif isinstance(item, list | tuple):
            stack.extend((child, f"{path}[{i}]", depth + 1) for i, child in enumerate(item))
        elif isinstance(item, str):
            why = text_problem(item, single_line=False)
            if why:
                problems.append({"field": path, "message": why})
        elif isinstance(item, bool) or item is None:
            continue
        elif isinstance(item, int):
            if abs(item) > MAX_JSON_INT:
                problems.append(
                    {"field": path, "message": f"integer beyond +-{MAX_JSON_INT} (2**53 - 1)"}
                )
        elif isinstance(item, float):
            if not math.isfinite(item):
                problems.append({"field": path, "message": "must be a finite number"})
        else:
            problems.append({"field": path, "message": f"not a JSON value ({type(item).__name__})"})
    return problems


def _printable(key: str) -> str:
    """A key as it may appear in an error message (lone surrogates shown as U+FFFD)."""
    return scrub(key)[:100]


def scrub(value: Any) -> Any:
    """``value`` made encodable as strict JSON in UTF-8: lone surrogates become U+FFFD,
    non-finite floats null (``json_safe``). For error bodies, which may quote the
    offending input."""
    return json_safe(value, text=_without_surrogates)


def _without_surrogates(text: str) -> str:
    return _SURROGATE.sub("\ufffd", text)


def encode_json(value: Any) -> bytes:
    """``value`` as the answer's bytes (what Starlette's JSONResponse sends); raises
    ValueError when it cannot be sent, so that the caller can roll back first."""
    return json.dumps(
        value, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")
    ).encode("utf-8")
