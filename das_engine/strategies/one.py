"""ONE: each domain DAP-trained independently from the base model (no transfer, no forgetting
of the base by construction; the lineage's later stages do not build on earlier ones)."""

from das_engine.strategies.base import Strategy


class ONE(Strategy):
    name = "one"
    starts_from_base = True
