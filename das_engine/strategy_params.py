"""A strategy's own hyper-parameters: a small dataclass declared in the strategy's file.

Fields are declared with :func:`param` (default, one-sentence description, range), so
validation, the CLI's ``--set`` and the API's ``hyperparameters`` schema all read the same
declaration. Field names are flat and unique across strategies (``ewc_lambda``,
``replay_ratio``): ``TrainingConfig`` accepts them as top-level keys, as it always has.
Imports no torch (the API validates and documents these without loading the engine).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any

#: the metadata keys of a param: description, (minimum, maximum, minimum excluded)
DESCRIPTION, RANGE = "description", "range"


def param(
    default: Any,
    description: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
) -> Any:
    """A dataclass field with its description and the range ``validate`` enforces."""
    return dataclasses.field(
        default=default,
        metadata={DESCRIPTION: description, RANGE: (minimum, maximum, exclusive_minimum)},
    )


def _type_problem(value: Any, hint: Any) -> str | None:
    """Why ``value`` does not fit ``hint`` (bool, int, float or a Literal of strings)."""
    if typing.get_origin(hint) is typing.Literal:
        choices = typing.get_args(hint)
        return None if value in choices else f"must be one of {', '.join(choices)}"
    if hint is bool:
        return None if isinstance(value, bool) else f"must be true or false, got {value!r}"
    if hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else f"must be an integer, got {value!r}"
    if hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return None if ok and math.isfinite(value) else "must be a finite number"
    return None


def _range_problem(value: float, bounds: tuple) -> str | None:
    lo, hi, lo_open = bounds
    low_bad = lo is not None and (value <= lo if lo_open else value < lo)
    if low_bad or (hi is not None and value > hi):
        left = "(" if lo_open else "["
        return f"must be in {left}{lo}, {hi}], got {value}"
    return None


@dataclass
class StrategyParams:
    """Base class: subclass it as a ``@dataclass`` whose fields are :func:`param` s."""

    def problems(self) -> list[dict]:
        """``[{"field", "message"}]`` (ConfigError's details format), empty when valid."""
        out: list[dict] = []
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            why = _type_problem(value, hints[f.name])
            if why is None and f.metadata.get(RANGE) and isinstance(value, int | float):
                why = _range_problem(value, f.metadata[RANGE])
            if why is not None:
                out.append({"field": f.name, "message": why})
        return out + (self.check() if not out else [])

    def check(self) -> list[dict]:
        """Checks across fields (after each field is valid on its own); override."""
        return []
