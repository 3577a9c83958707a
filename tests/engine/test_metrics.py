"""Forgetting metrics are functions of the loss matrix, checked against hand computation."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from das_engine.metrics import (
    backward_transfer,
    forgetting_rate,
    forward_transfer,
    max_forgetting,
    summarize,
)

# rows = after stage t, columns = domain i
L = [
    [2.0, 5.0, 6.0],
    [2.5, 3.0, 5.5],
    [2.8, 3.3, 4.0],
]
BASE = [4.0, 5.2, 6.1]


def test_hand_computed_three_stages():
    # FR = ((2.8 - 2.0) + (3.3 - 3.0)) / 2 = 0.55
    assert forgetting_rate(L) == pytest.approx(0.55)
    assert backward_transfer(L) == pytest.approx(-0.55)
    # FWT = ((5.2 - 5.0) + (6.1 - 5.5)) / 2 = 0.4
    assert forward_transfer(L, BASE) == pytest.approx(0.4)
    # max-forgetting: domain 0: 2.8 - min(2.0, 2.5) = 0.8; domain 1: 3.3 - 3.0 = 0.3
    assert max_forgetting(L) == pytest.approx(0.55)


def test_max_forgetting_uses_the_best_earlier_point_not_the_diagonal():
    M = [[3.0, 9.0], [2.0, 4.0], [2.5, 4.5]]
    M = [row + [0.0] for row in M]
    # domain 0: final 2.5, best before the last stage = min(3.0, 2.0) = 2.0 -> 0.5
    # domain 1: final 4.5, best = 4.0 -> 0.5
    assert max_forgetting(M) == pytest.approx(0.5)
    assert forgetting_rate(M) == pytest.approx(((2.5 - 3.0) + (4.5 - 4.0)) / 2)


def test_single_stage_has_nothing_to_forget():
    m = summarize(["a"], [[3.0]], [4.0])
    assert m["forgetting_rate"] is None and m["bwt"] is None and m["fwt"] is None
    assert m["perplexity_matrix"][0][0] == pytest.approx(math.exp(3.0))


def test_summary_per_domain_and_missing_values():
    m = summarize(["a", "b"], [[2.0, None], [2.5, 3.0]], [4.0, 5.0])
    assert m["per_domain"][0]["forgetting"] == pytest.approx(0.5)
    assert m["per_domain"][1]["forgetting"] is None
    assert m["fwt"] is None  # L[0][1] missing
    assert m["perplexity_matrix"][0][1] is None


@settings(max_examples=50, deadline=None)
@given(st.integers(2, 6), st.lists(st.floats(0.1, 20), min_size=6, max_size=6))
def test_no_change_after_own_stage_means_zero_forgetting(T, col):
    M = [[col[i] if i <= t else 99.0 for i in range(T)] for t in range(T)]
    assert forgetting_rate(M) == pytest.approx(0.0)
    assert max_forgetting(M) == pytest.approx(0.0)
    assert backward_transfer(M) == pytest.approx(0.0)


@settings(max_examples=50, deadline=None)
@given(st.integers(2, 5), st.floats(0.01, 5))
def test_uniform_loss_increase_is_the_forgetting_rate(T, delta):
    M = [[1.0 + (delta if t > i else 0.0) for i in range(T)] for t in range(T)]
    assert forgetting_rate(M) == pytest.approx(delta)
    assert backward_transfer(M) == pytest.approx(-delta)
