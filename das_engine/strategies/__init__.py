"""Strategies by name. Adding one = one file with a ``Strategy`` subclass + one line here."""

from das_engine.config import TrainingConfig
from das_engine.errors import ConfigError
from das_engine.strategies.adapter import Adapter
from das_engine.strategies.base import StageContext, Strategy
from das_engine.strategies.das import DAS
from das_engine.strategies.ewc import EWC
from das_engine.strategies.kd import KD
from das_engine.strategies.ncl import NCL
from das_engine.strategies.one import ONE
from das_engine.strategies.replay import Replay

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (DAS, NCL, ONE, KD, EWC, Replay, Adapter)
}


def strategy_class(name: str) -> type[Strategy]:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ConfigError(f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}") from None


def make_strategy(config: TrainingConfig) -> Strategy:
    return strategy_class(config.strategy)(config)


__all__ = ["STRATEGIES", "StageContext", "Strategy", "make_strategy", "strategy_class"]
