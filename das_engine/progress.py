"""What a stage reports while it runs (progress events) and how it is asked to stop.

Its own module so that the lineage, the trainer and a strategy's stage hooks can all
report progress without importing one another."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass


@dataclass
class ProgressEvent:
    phase: str  # "importance" | "training" | "evaluating"
    step: int
    total: int
    loss: float | None = None
    tokens_per_s: float | None = None
    eta_s: float | None = None
    trained_tokens: int = 0
    message: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


ProgressFn = Callable[[ProgressEvent], None]
CancelFn = Callable[[], bool]


def no_progress(_event: ProgressEvent) -> None:
    """The default reporter: progress goes nowhere."""
