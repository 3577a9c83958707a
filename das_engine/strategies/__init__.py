"""Strategies by name, found in this package: adding one = one file with a ``Strategy``
subclass that sets ``name`` (and ``params``, if it has parameters), plus its test."""

import importlib
import pkgutil

from das_engine.config import TrainingConfig
from das_engine.errors import ConfigError
from das_engine.strategies.base import REGISTRY, StageContext, Strategy
from das_engine.strategy_registry import strategy_names

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

#: every strategy, by name (the registry's order: the default first)
STRATEGIES: dict[str, type[Strategy]] = {name: REGISTRY[name] for name in strategy_names()}


def strategy_class(name: str) -> type[Strategy]:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ConfigError(f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}") from None


def make_strategy(config: TrainingConfig) -> Strategy:
    return strategy_class(config.strategy)(config)


__all__ = ["STRATEGIES", "StageContext", "Strategy", "make_strategy", "strategy_class"]
