"""Soft-masking: the change to every parameter that writes unit u is scaled by (1 - I_u).

``mask_mode="update"`` (default) scales the optimizer's whole parameter change, weight
decay included, so protection survives Adam's per-parameter normalisation. It is done
inside the optimizer step (``MaskedAdamW``), so no copy of the weights is kept.
``mask_mode="gradient"`` multiplies the gradient (the paper's rule); under Adam a constant
per-parameter scale cancels out, which the benchmark shows.

A unit owns whole rows or columns, so a parameter's multiplier is a per-unit vector
broadcast over the other axis (``[out, 1]``, ``[1, in]`` or ``[n]``): one factor per axis
that units write, never a dense tensor of the parameter's shape. Factors are built once
per stage; each step runs a handful of ``_foreach`` kernels over the masked parameters.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from das_engine.importance import Importance
from das_engine.masked_adamw import MaskedAdamW
from das_engine.units import UNIT_KINDS, UnitMap


def parameter_factors(
    unit_map: UnitMap, importance: Importance, kinds: tuple[str, ...] = UNIT_KINDS
) -> dict[str, tuple[torch.Tensor, ...]]:
    """For each masked parameter name, broadcast vectors whose product is 1 - I of its units.

    One factor per axis written by units (slices of two kinds on the same axis multiply
    into one vector). Only units of ``kinds`` that ``importance`` holds are masked (the
    paper's three kinds by default; add EXTRA_KINDS to protect embedding rows or norm
    elements too).
    """
    per_axis: dict[str, dict[int, torch.Tensor]] = {}
    params: dict[str, torch.Tensor] = {}
    for s in unit_map.slices_of(tuple(k for k in kinds if k in importance.values)):
        unit_imp = importance.values[s.kind][s.layer].to(s.param.device, torch.float32)
        if s.group > 1:  # one K/V head serves `group` query heads: protect it as the max
            unit_imp = unit_imp.view(-1, s.group).amax(dim=1)
        index = s.unit_index.to(s.param.device)
        if bool((index < 0).any()):  # positions another slice owns: index -1 keeps them (1)
            unit_imp = torch.cat([unit_imp, unit_imp.new_zeros(1)])
        keep = 1.0 - unit_imp[index]
        axes = per_axis.setdefault(s.name, {})
        axes[s.axis] = axes[s.axis] * keep if s.axis in axes else keep
        params[s.name] = s.param
    out: dict[str, tuple[torch.Tensor, ...]] = {}
    for name, axes in per_axis.items():
        p = params[name]
        factors = []
        for axis in sorted(axes):
            view = [1] * p.dim()
            view[axis] = -1
            factors.append(axes[axis].view(view).to(p.dtype))
        out[name] = tuple(factors)
    return out


def parameter_multipliers(
    unit_map: UnitMap, importance: Importance, kinds: tuple[str, ...] = UNIT_KINDS
) -> dict[str, torch.Tensor]:
    """Each masked parameter's multiplier as one tensor broadcastable to it (for inspection).

    The factor itself where units write one axis (all supported families); the product
    of the factors otherwise. The masking itself always uses ``parameter_factors``.
    """
    return {n: _product(f) for n, f in parameter_factors(unit_map, importance, kinds).items()}


def _product(factors: tuple[torch.Tensor, ...]) -> torch.Tensor:
    mult = factors[0]
    for f in factors[1:]:
        mult = mult * f
    return mult


class SoftMask:
    """Applies (1 - I_acc) to updates or gradients of the unit-writing parameters."""

    def __init__(
        self,
        unit_map: UnitMap,
        importance: Importance,
        mode: str = "update",
        kinds: tuple[str, ...] = UNIT_KINDS,
    ) -> None:
        if mode not in ("update", "gradient"):
            raise ValueError(f"mask_mode must be 'update' or 'gradient', got {mode!r}")
        self.mode = mode
        factors = parameter_factors(unit_map, importance, kinds)
        by_name = {s.name: s.param for s in unit_map.slices + unit_map.extra_slices}
        self.names = sorted(factors)
        self.params = [by_name[n] for n in self.names]
        self.factors = [factors[n] for n in self.names]
        # gradient mode: one _foreach_mul_ per factor level (a second only for two-axis params)
        depth = max((len(f) for f in self.factors), default=0)
        pairs = list(zip(self.params, self.factors, strict=True))
        self._levels = [[(p, f[lv]) for p, f in pairs if len(f) > lv] for lv in range(depth)]

    @property
    def multipliers(self) -> list[torch.Tensor]:
        """Each masked parameter's broadcastable multiplier, in ``names`` order."""
        return [_product(f) for f in self.factors]

    def optimizer(self, params: Iterable, **adamw_kwargs) -> torch.optim.Optimizer:
        """The stage's optimizer: AdamW that scales the masked parameters' change (update
        mode), or plain AdamW (gradient mode, which acts on the gradients instead)."""
        if self.mode == "update":
            multipliers = dict(zip(self.params, self.factors, strict=True))
            return MaskedAdamW(params, multipliers, **adamw_kwargs)
        return torch.optim.AdamW(params, **adamw_kwargs)

    @torch.no_grad()
    def after_backward(self) -> None:
        """gradient mode: g <- g * (1 - I)."""
        if self.mode != "gradient":
            return
        for pairs in self._levels:
            hit = [(p.grad, f) for p, f in pairs if p.grad is not None]
            if hit:
                torch._foreach_mul_([g for g, _ in hit], [f for _, f in hit])
