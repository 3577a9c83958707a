"""DAS: soft-masked DAP-training plus contrastive knowledge integration (spec, "Training
domain t"). One step, in the spec's order:

1. L_MLM on view 1 of x (full model, dropout on);
2. o_i, o_i+: mean-pooled last hidden states of two dropout views of the same x_i
   (both views run as one doubled batch, so row i and row B+i are always x_i; a model
   without dropout gets ``importance_dropout`` on the o+ half only);
3. o_prev: the gated "previous knowledge" view, gates = I_acc, no gradient;
4. L_DAP = L_MLM + lambda * InfoNCE(o, o+, o_prev);
5. the optimizer's change to unit-writing parameters is scaled by (1 - I_acc): inside the
   AdamW step (update mode, ``build_optimizer``) or on the gradients (gradient mode).

Per stage (``das_importance``): ``begin_stage`` loads I_acc(t-1) into ``ctx.accumulated``
(measuring I_general at stage 1); ``end_stage`` measures I(t) and saves
I_acc(t) = EMax(I_acc(t-1), I(t)). ``ctx.accumulated`` is the one I_acc: the permuted
control only shuffles the copy the mask and the o_prev gates are built from.
"""

from __future__ import annotations

import torch
from torch import nn

from das_engine.contrastive import info_nce
from das_engine.errors import ConfigError
from das_engine.objective import IGNORE, lm_forward, mean_pool
from das_engine.softmask import SoftMask
from das_engine.strategies import das_importance
from das_engine.strategies.base import StageContext, Strategy
from das_engine.units import UNIT_KINDS, gates_attached
from das_engine.view_dropout import injected_dropout, native_dropout, view_dropout


class DAS(Strategy):
    name = "das"

    def begin_stage(self, ctx: StageContext) -> None:
        ctx.accumulated = das_importance.accumulated_before(ctx)

    def prepare(self, ctx: StageContext) -> None:
        super().prepare(ctx)
        gates = ctx.accumulated
        if gates is not None and ctx.config.importance_control == "permuted":
            gates = gates.permuted(ctx.config.seed)  # the control: same values, random units
        self.mask = (
            SoftMask(
                ctx.unit_map,
                # the budget limits what the mask protects; o_prev still sees all of I_acc
                gates.budgeted(ctx.config.protection_budget),
                ctx.config.mask_mode,
                UNIT_KINDS + ctx.config.extra_unit_kinds(),
            )
            if gates is not None
            else None
        )
        # a model without dropout of its own gets importance_dropout on the positive half
        # of the doubled batch only (view_dropout): o+ then differs from o, the LM loss not
        self.positive_dropout = injected_dropout(ctx.model, ctx.config.importance_dropout)
        no_views = native_dropout(ctx.model) == 0 and self.positive_dropout == 0
        if ctx.config.contrast_weight > 0 and no_views:
            raise ConfigError(
                "contrast_weight > 0 needs two different views of each input, but this model "
                "has no dropout and importance_dropout is 0: set importance_dropout > 0 or "
                "contrast_weight 0"
            )
        device = next(ctx.model.parameters()).device
        self.prev_gates = (
            {k: gates.values[k].to(device) for k in UNIT_KINDS} if gates is not None else None
        )

    def views(
        self, model: nn.Module, batch: dict
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(L_MLM, o, o+, o_prev): row i of o, o+ and o_prev all come from input x_i."""
        b = batch["input_ids"].shape[0]
        # (1)+(2): two dropout views of the same inputs in one forward pass
        doubled = {k: torch.cat([v, v]) for k, v in batch.items()}
        doubled["labels"] = torch.cat([batch["labels"], torch.full_like(batch["labels"], IGNORE)])
        p = self.positive_dropout if model.training else 0.0
        with view_dropout(self.ctx.model, self.ctx.unit_map, p, first_row=b):
            out = lm_forward(model, self.ctx.unit_map, doubled)
        pooled = mean_pool(out.hidden, doubled["attention_mask"])
        anchor, positive = pooled[:b], pooled[b:]
        # (3): previous knowledge only: gates set to the accumulated importance
        with torch.no_grad(), gates_attached(model, self.ctx.unit_map, self.prev_gates):
            prev_hidden = model.base_model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).last_hidden_state
        previous = mean_pool(prev_hidden, batch["attention_mask"])
        return out.loss, anchor, positive, previous

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        lam = self.config.contrast_weight
        if lam == 0 or self.prev_gates is None:
            return super().loss(model, batch)
        lm_loss, anchor, positive, previous = self.views(model, batch)
        # (4)
        contrast = info_nce(anchor, positive, previous, self.config.temperature)
        total = lm_loss + lam * contrast
        return total, {"lm_loss": float(lm_loss.detach()), "contrast": float(contrast.detach())}

    # (5)
    def build_optimizer(self, params, **adamw_kwargs) -> torch.optim.Optimizer:
        if self.mask is None:
            return super().build_optimizer(params, **adamw_kwargs)
        return self.mask.optimizer(params, **adamw_kwargs)

    def after_backward(self) -> None:
        if self.mask is not None:
            self.mask.after_backward()

    def end_stage(self, ctx: StageContext, model: nn.Module) -> dict:
        assert ctx.accumulated is not None, "begin_stage loads I_acc(t-1)"
        return {"importance": das_importance.record_domain(ctx, model, ctx.accumulated)}
