"""The small interface every continual-learning strategy implements.

The trainer calls, per stage: ``prepare`` once, then per optimizer step ``loss`` (per
micro-batch), ``after_backward``, ``before_step``, ``after_step``. A strategy is a recipe
over the tested components (units, importance, softmask, contrastive).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from das_engine.config import TrainingConfig
from das_engine.importance import Importance
from das_engine.objective import lm_forward
from das_engine.units import UnitMap


@dataclass
class StageContext:
    model: nn.Module
    unit_map: UnitMap
    config: TrainingConfig
    accumulated: Importance | None  # I_acc(t-1), when the lineage keeps one


class Strategy:
    name = "base"
    #: start every stage from the base model instead of the previous stage (ONE)
    starts_from_base = False
    #: compute general importance at stage 1 and domain importance after each stage
    uses_importance = False

    def __init__(self, config: TrainingConfig) -> None:
        self.config = config

    def prepare(self, ctx: StageContext) -> None:
        self.ctx = ctx

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        out = lm_forward(model, self.ctx.unit_map, batch)
        return out.loss, {"lm_loss": float(out.loss.detach())}

    def after_backward(self) -> None:
        pass

    def before_step(self) -> None:
        pass

    def after_step(self) -> None:
        pass
