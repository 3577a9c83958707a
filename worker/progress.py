"""A job's progress bar: the engine's progress events -> (presented phase, progress in [0, 1]).

The engine reports "importance" and "evaluating" both before training (general importance;
scoring the earlier stages on the new domain for the loss matrix) and after it (the domain's
importance; the held-out evaluation). Read naively, the pre-training scoring puts the bar at
the evaluation's share and it then sits there through the whole training. Here each part of
the stage has its own span of the bar, in the order the engine runs them, and the bar only
moves forward -- also across attempts (a resumed job starts from the progress it had).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# (presented phase, start, end) in the order the engine runs them; the spans tile [0, 1].
SEGMENTS: tuple[tuple[str, float, float], ...] = (
    ("preparing", 0.00, 0.03),  # lineage creation, tokenizing the corpus
    ("importance", 0.03, 0.08),  # the general importance (first stage only)
    ("scoring", 0.08, 0.15),  # earlier stages (and the base) on the new domain
    ("training", 0.15, 0.85),  # the optimizer steps: step / total
    ("importance", 0.85, 0.92),  # the domain's importance after training
    ("evaluating", 0.92, 0.97),  # held-out losses of the new model on every domain
    ("end_task", 0.97, 1.00),  # probes on the labelled sets (worker.end_task_phase)
)
PREPARING, IMPORTANCE_BEFORE, SCORING, TRAINING, IMPORTANCE_AFTER, EVALUATING, END_TASK = range(7)
PHASES = ("preparing", "importance", "scoring", "training", "evaluating", "end_task")


@dataclass
class ProgressTracker:
    """Where a job is in :data:`SEGMENTS`; both only move forward."""

    progress: float = 0.0
    segment: int = PREPARING

    @property
    def phase(self) -> str:
        return SEGMENTS[self.segment][0]

    def _segment_of(self, engine_phase: str, total: int) -> int:
        trained = self.segment >= TRAINING
        if engine_phase == "training":
            return TRAINING if total else PREPARING  # total 0: tokenizing, before any step
        if engine_phase == "importance":
            return IMPORTANCE_AFTER if trained else IMPORTANCE_BEFORE
        if engine_phase == "evaluating":
            return EVALUATING if trained else SCORING
        return self.segment  # a phase this bar does not know: stay where it is

    def update(self, engine_phase: str, step: int, total: int) -> bool:
        """Account for one engine event; True when the presented segment changed."""
        target = max(self.segment, self._segment_of(engine_phase, total))
        changed = target != self.segment
        self.segment = target
        _, lo, hi = SEGMENTS[target]
        fraction = 0.0
        # only the event of the segment itself says how far into it the job is
        if total and self._segment_of(engine_phase, total) == target:
            fraction = min(1.0, max(0.0, step / total))
        self.progress = min(1.0, max(self.progress, lo + (hi - lo) * fraction))
        return changed

    def enter(self, segment: int) -> None:
        """Move to ``segment`` (if it is ahead) without an engine event."""
        if segment > self.segment:
            self.segment = segment
            self.progress = max(self.progress, SEGMENTS[segment][1])

    def event_data(self, event: dict[str, Any]) -> dict[str, Any]:
        """The engine event as a job event's data: the presented phase and the bar."""
        return {**event, "phase": self.phase, "progress": round(self.progress, 4)}
