"""The progress bar of a job (``worker.progress``): whatever the engine reports, in whatever
order, the bar stays in [0, 1] and never goes back, and the phases keep their spans."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from worker.progress import SEGMENTS, ProgressTracker

EVENTS = st.tuples(
    st.sampled_from(["training", "importance", "evaluating", "something-new"]),
    st.integers(min_value=-5, max_value=500),
    st.integers(min_value=0, max_value=400),
)


def test_the_segments_tile_the_bar_in_order():
    assert SEGMENTS[0][1] == 0.0 and SEGMENTS[-1][2] == 1.0
    for (_, _, end), (_, start, _) in zip(SEGMENTS, SEGMENTS[1:], strict=False):
        assert end == start
    assert all(lo < hi for _, lo, hi in SEGMENTS)


@given(st.floats(min_value=0.0, max_value=1.0), st.lists(EVENTS, max_size=60))
def test_progress_and_segment_never_go_back(start, events):
    tracker = ProgressTracker(progress=start)
    last_progress, last_segment = tracker.progress, tracker.segment
    for phase, step, total in events:
        tracker.update(phase, step, total)
        assert 0.0 <= tracker.progress <= 1.0
        assert tracker.progress >= last_progress and tracker.segment >= last_segment
        _, lo, _ = SEGMENTS[tracker.segment]
        assert tracker.progress >= lo
        last_progress, last_segment = tracker.progress, tracker.segment


def test_a_stage_as_the_engine_reports_it():
    """Tokenizing, general importance, scoring earlier stages (reported as "evaluating"
    before training), 4 steps, the domain's importance, the held-out evaluation."""
    tracker = ProgressTracker()
    seen = []
    for phase, step, total in [
        ("training", 0, 0),
        ("importance", 0, 1),
        ("evaluating", 0, 2),
        *[("training", s, 4) for s in range(1, 5)],
        ("importance", 0, 1),
        ("evaluating", 0, 2),
    ]:
        tracker.update(phase, step, total)
        seen.append((tracker.phase, round(tracker.progress, 3)))
    assert seen == [
        ("preparing", 0.0),
        ("importance", 0.03),
        ("scoring", 0.08),
        ("training", 0.325),
        ("training", 0.5),
        ("training", 0.675),
        ("training", 0.85),
        ("importance", 0.85),
        ("evaluating", 0.92),
    ]
