"""Soft-masking: the change to every parameter that writes unit u is scaled by (1 - I_u).

``mask_mode="update"`` (default) scales the optimizer's whole parameter change, weight
decay included, so protection survives Adam's per-parameter normalisation.
``mask_mode="gradient"`` multiplies the gradient (the paper's rule); under Adam a constant
per-parameter scale cancels out, which the benchmark shows.

Multipliers are built once per stage; each step runs a handful of fused ``_foreach``
kernels over all masked parameters, never a Python loop over them.
"""

from __future__ import annotations

import torch

from das_engine.importance import Importance
from das_engine.units import UNIT_KINDS, UnitMap


def parameter_multipliers(
    unit_map: UnitMap, importance: Importance, kinds: tuple[str, ...] = UNIT_KINDS
) -> dict[str, torch.Tensor]:
    """For each masked parameter name, a tensor of its shape holding 1 - I of its unit.

    Only units of ``kinds`` that ``importance`` holds are masked (the paper's three kinds by
    default; add EXTRA_KINDS to protect embedding rows or norm elements too).
    """
    out: dict[str, torch.Tensor] = {}
    for s in unit_map.slices_of(tuple(k for k in kinds if k in importance.values)):
        unit_imp = importance.values[s.kind][s.layer].to(s.param.device, torch.float32)
        if s.group > 1:  # one K/V head serves `group` query heads: protect it as the max
            unit_imp = unit_imp.view(-1, s.group).amax(dim=1)
        per_position = unit_imp[s.unit_index.to(s.param.device)]
        view = [1] * s.param.dim()
        view[s.axis] = -1
        mult = (1.0 - per_position).view(view).expand_as(s.param).to(s.param.dtype)
        out[s.name] = out[s.name] * mult if s.name in out else mult.contiguous()
    return out


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
        mults = parameter_multipliers(unit_map, importance, kinds)
        by_name = {s.name: s.param for s in unit_map.slices + unit_map.extra_slices}
        self.names = sorted(mults)
        self.params = [by_name[n] for n in self.names]
        self.multipliers = [mults[n] for n in self.names]
        self._before: list[torch.Tensor] = []

    @torch.no_grad()
    def after_backward(self) -> None:
        """gradient mode: g <- g * (1 - I)."""
        if self.mode != "gradient":
            return
        pairs = [
            (p.grad, m)
            for p, m in zip(self.params, self.multipliers, strict=True)
            if p.grad is not None
        ]
        if pairs:
            grads, mults = zip(*pairs, strict=True)
            torch._foreach_mul_(list(grads), list(mults))

    @torch.no_grad()
    def before_step(self) -> None:
        """update mode: remember the weights the optimizer is about to change."""
        if self.mode != "update":
            return
        if not self._before:
            self._before = [p.detach().clone() for p in self.params]
        else:
            torch._foreach_copy_(self._before, [p.detach() for p in self.params])

    @torch.no_grad()
    def after_step(self) -> None:
        """update mode: w <- w_before + (1 - I) * (w_after - w_before)."""
        if self.mode != "update":
            return
        data = [p.data for p in self.params]
        torch._foreach_sub_(data, self._before)
        torch._foreach_mul_(data, self.multipliers)
        torch._foreach_add_(data, self._before)
