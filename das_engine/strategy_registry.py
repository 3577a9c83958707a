"""Which strategies exist and which parameters each declares, read from the strategy files.

Adding a strategy is one file in ``das_engine/strategies/`` (plus its test): a ``Strategy``
subclass with ``name = "..."`` and, when it has parameters of its own, ``params = XParams``
naming a ``StrategyParams`` dataclass declared in the same file. Every name list (the
CLI's ``--strategy`` choices, ``TrainingConfig`` validation, the API's schema) comes from
here.

The files are read, not imported: a strategy module imports torch, and the web API (which
validates and documents hyper-parameters) must not (``tests/test_layers.py``). So the
declarations are found in each file's syntax tree and only the params classes are
executed, each on its own, with the names a params class may use (``dataclass``,
``param``, ``StrategyParams``, ``Literal``). ``das_engine.strategies`` imports the same
modules for real and checks that both views agree
(``tests/engine/test_strategy_registry.py``).
"""

from __future__ import annotations

import ast
import dataclasses
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

from das_engine.strategy_params import StrategyParams, param

PACKAGE = Path(__file__).with_name("strategies")
DEFAULT = "das"


@dataclass(frozen=True)
class Declared:
    name: str
    module: str  # the module's name inside das_engine.strategies
    class_name: str
    params: type[StrategyParams] | None


def _own_assignment(cls: ast.ClassDef, target: str) -> ast.expr | None:
    for node in cls.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == target for t in node.targets
        ):
            return node.value
    return None


def _params_class(node: ast.ClassDef, path: Path, module: str) -> type[StrategyParams]:
    namespace = {
        "__name__": f"das_engine.strategies.{module}",
        "dataclass": dataclass,
        "param": param,
        "StrategyParams": StrategyParams,
        "Literal": Literal,
    }
    tree = ast.Module(body=[node], type_ignores=[])
    # eager annotations (no inherited "from __future__ import annotations"): the class is
    # complete without its module in sys.modules
    code = compile(tree, str(path), "exec", dont_inherit=True)
    exec(code, namespace)  # noqa: S102 - our own package's source
    cls = namespace[node.name]
    if not (isinstance(cls, type) and issubclass(cls, StrategyParams)):
        raise TypeError(f"{path}: {node.name} is not a StrategyParams dataclass")
    return cls


def _declared_in(path: Path) -> list[Declared]:
    module = path.stem
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    out = []
    made: dict[str, type[StrategyParams]] = {}  # one class object per declaration
    for cls in classes.values():
        name = _own_assignment(cls, "name")
        if not (isinstance(name, ast.Constant) and isinstance(name.value, str)):
            continue
        ref = _own_assignment(cls, "params")
        params = None
        if isinstance(ref, ast.Name):
            if ref.id not in classes:
                raise TypeError(f"{path}: {cls.name}.params must name a class of the same file")
            if ref.id not in made:
                made[ref.id] = _params_class(classes[ref.id], path, module)
            params = made[ref.id]
        out.append(Declared(name.value, module, cls.name, params))
    return out


@lru_cache
def declared() -> dict[str, Declared]:
    """Every strategy, by name: the default (``das``) first, then by file and line."""
    found: dict[str, Declared] = {}
    for path in sorted(PACKAGE.glob("*.py")):
        if path.stem in ("__init__", "base"):
            continue
        for d in _declared_in(path):
            if d.name in found:
                raise TypeError(f"strategy {d.name!r} is declared twice")
            found[d.name] = d
    ordered = sorted(found.values(), key=lambda d: d.name != DEFAULT)
    return {d.name: d for d in ordered}


def strategy_names() -> tuple[str, ...]:
    return tuple(declared())


@lru_cache
def params_classes() -> dict[str, type[StrategyParams]]:
    """Each params class once (two strategies may share one), by class name."""
    out: dict[str, type[StrategyParams]] = {}
    for d in declared().values():
        if d.params is not None:
            out.setdefault(d.params.__name__, d.params)
    return out


@lru_cache
def flat_fields() -> dict[str, str]:
    """Flat hyper-parameter name -> the name of the params class that holds it."""
    owners: dict[str, str] = {}
    for cls_name, cls in params_classes().items():
        for f in dataclasses.fields(cls):
            if f.name in owners:
                raise TypeError(f"parameter {f.name!r} is declared by two params classes")
            owners[f.name] = cls_name
    return owners


def params_for(strategy: str) -> type[StrategyParams] | None:
    d = declared().get(strategy)
    return d.params if d is not None else None
