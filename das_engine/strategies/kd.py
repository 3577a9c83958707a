"""KD: knowledge distillation from the previous stage's model (the paper's KD baseline).

The teacher is the model this stage starts from (the previous stage's checkpoint, or the
base model at stage 1), frozen and in eval mode. Loss:
    L = L_LM + kd_weight * MSE(h_student, h_teacher)
over the last hidden states of the real (non-padding) tokens of the same inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from das_engine.objective import lm_forward
from das_engine.strategies.base import StageContext, Strategy
from das_engine.strategy_params import StrategyParams, param


@dataclass
class KDParams(StrategyParams):
    kd_weight: float = param(
        1.0,
        "Strategy `kd`: weight of the distillation loss (MSE to the previous model's last "
        "hidden states).",
        minimum=0.0,
        maximum=1e4,
    )


def masked_mse(a: torch.Tensor, b: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens of the per-token mean squared difference ([B, T, D] inputs)."""
    mask = attention_mask.to(a.dtype)
    per_token = (a.float() - b.float()).pow(2).mean(-1)
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)


def teacher_dir(ctx: StageContext):
    """The model a stage starts from: the last finished stage, or the base."""
    if ctx.previous_stage_dirs:
        return ctx.previous_stage_dirs[-1] / "model"
    return ctx.base_dir


class KD(Strategy):
    name = "kd"
    params = KDParams

    def prepare(self, ctx: StageContext) -> None:
        from das_engine.bases import load_model

        super().prepare(ctx)
        source = teacher_dir(ctx)
        if source is None:
            raise ValueError("kd needs the previous stage's model or the base model directory")
        self.teacher = load_model(source).to(ctx.device).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def distill(self, hidden: torch.Tensor, batch: dict) -> torch.Tensor:
        with torch.no_grad():
            target = self.teacher.base_model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).last_hidden_state
        return masked_mse(hidden, target, batch["attention_mask"])

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        out = lm_forward(model, self.ctx.unit_map, batch)
        kd = self.distill(out.hidden, batch)
        total = out.loss + self.params.kd_weight * kd
        return total, {"lm_loss": float(out.loss.detach()), "kd": float(kd.detach())}

    def finish(self, ctx: StageContext) -> None:
        del self.teacher  # free the teacher's memory before evaluation
