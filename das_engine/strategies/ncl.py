"""NCL: naive continual learning, plain DAP-training on each domain in turn (forgets)."""

from das_engine.strategies.base import Strategy


class NCL(Strategy):
    name = "ncl"
