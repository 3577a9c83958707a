"""Continual-learning metrics as functions of one stored matrix (Avalanche's habit).

``L[t][i]`` is the held-out LM loss on domain i after training stage t (0-based rows and
columns, T stages, lower is better); ``base[i]`` is the base model's loss on domain i.
For a loss matrix, forgetting is an *increase* of loss:

- forgetting rate (paper): FR = 1/(T-1) * sum_{i<T-1} (L[T-1][i] - L[i][i])
- backward transfer: BWT = -FR (positive = later training helped earlier domains)
- forward transfer:  FWT = 1/(T-1) * sum_{i>=1} (base[i] - L[i-1][i])
  (positive = the model before seeing domain i already scored better than the base)
- max-forgetting (Chaudhry et al.): 1/(T-1) * sum_{i<T-1} (L[T-1][i] - min_{i<=l<T-1} L[l][i])

With a single stage there is nothing to forget: FR, BWT, FWT and max-forgetting are None.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Matrix = Sequence[Sequence[float | None]]


def _ok(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def forgetting_rate(L: Matrix) -> float | None:
    T = len(L)
    vals = [L[T - 1][i] - L[i][i] for i in range(T - 1) if _ok(L[T - 1][i]) and _ok(L[i][i])]
    return _mean(vals) if T > 1 else None


def backward_transfer(L: Matrix) -> float | None:
    fr = forgetting_rate(L)
    return None if fr is None else -fr


def forward_transfer(L: Matrix, base: Sequence[float | None] | None) -> float | None:
    T = len(L)
    if T < 2 or base is None:
        return None
    vals = [base[i] - L[i - 1][i] for i in range(1, T) if _ok(base[i]) and _ok(L[i - 1][i])]
    return _mean(vals)


def max_forgetting(L: Matrix) -> float | None:
    T = len(L)
    if T < 2:
        return None
    vals = []
    for i in range(T - 1):
        history = [L[t][i] for t in range(i, T - 1) if _ok(L[t][i])]
        if history and _ok(L[T - 1][i]):
            vals.append(L[T - 1][i] - min(history))
    return _mean(vals)


def _exp(x: float | None) -> float | None:
    if not _ok(x):
        return None
    return math.exp(min(x, 700.0))


def summarize(
    domains: list[str],
    loss_matrix: Matrix,
    base_losses: Sequence[float | None] | None = None,
    general: dict | None = None,
) -> dict:
    """Everything a user reads about a lineage, derived from the stored matrix."""
    L = [list(row) for row in loss_matrix]
    T = len(L)
    per_domain = []
    for i, name in enumerate(domains[:T]):
        final = L[T - 1][i] if T else None
        learned = L[i][i]
        entry = {
            "domain": name,
            "base_loss": base_losses[i]
            if base_losses is not None and i < len(base_losses)
            else None,
            "loss_after_own_stage": learned,
            "final_loss": final,
            "forgetting": (final - learned) if _ok(final) and _ok(learned) and i < T - 1 else None,
        }
        per_domain.append(entry)
    return {
        "domains": list(domains[:T]),
        "loss_matrix": L,
        "perplexity_matrix": [[_exp(x) for x in row] for row in L],
        "base_losses": list(base_losses) if base_losses is not None else None,
        "forgetting_rate": forgetting_rate(L),
        "bwt": backward_transfer(L),
        "fwt": forward_transfer(L, base_losses),
        "max_forgetting": max_forgetting(L),
        "per_domain": per_domain,
        "general": general or {},
    }
