"""EWC: elastic weight consolidation with a diagonal Fisher, accumulated online.

After each domain t, the diagonal Fisher F_t of the LM loss is estimated from
``ewc_fisher_samples`` chunks of the domain (one backward per chunk, so it is the mean of
squared per-sample gradients, not the square of a batch mean), and folded in online:
    F <- gamma * F + F_t,      theta* <- theta after domain t
(Schwarz et al. 2018). Both are saved as ``strategy/ewc.safetensors`` in the stage. While
training a later domain:
    L = L_LM + lambda / 2 * sum_p F_p (theta_p - theta*_p)^2
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from das_engine.objective import lm_forward
from das_engine.storage import atomic_path
from das_engine.strategies.base import StageContext, Strategy
from das_engine.strategy_params import StrategyParams, param

FILE = "ewc.safetensors"


@dataclass
class EWCParams(StrategyParams):
    ewc_lambda: float = param(
        100.0, "Strategy `ewc`: penalty weight lambda.", minimum=0.0, maximum=1e12
    )
    ewc_gamma: float = param(
        0.9, "Strategy `ewc`: online decay of the accumulated Fisher.", minimum=0.0, maximum=1.0
    )
    ewc_fisher_samples: int = param(
        64,
        "Strategy `ewc`: chunks used to estimate a domain's Fisher (one backward each).",
        minimum=1,
        maximum=100000,
    )


Tensors = dict[str, torch.Tensor]


def ewc_penalty(params: Tensors, fisher: Tensors, anchor: Tensors) -> torch.Tensor:
    """sum_p F_p (theta_p - theta*_p)^2 over the parameters that have a Fisher entry."""
    total = None
    for name, f in fisher.items():
        term = (f * (params[name] - anchor[name]).pow(2)).sum()
        total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return total


def load_state(stage_dir) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None:
    path = stage_dir / "strategy" / FILE
    if not path.exists():
        return None
    tensors = load_file(str(path))
    fisher = {k[len("fisher.") :]: v for k, v in tensors.items() if k.startswith("fisher.")}
    anchor = {k[len("anchor.") :]: v for k, v in tensors.items() if k.startswith("anchor.")}
    return fisher, anchor


class EWC(Strategy):
    name = "ewc"
    params = EWCParams

    def prepare(self, ctx: StageContext) -> None:
        super().prepare(ctx)
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}
        state = load_state(ctx.previous_stage_dirs[-1]) if ctx.previous_stage_dirs else None
        if state is not None:
            trainable = {n for n, p in ctx.model.named_parameters() if p.requires_grad}
            fisher, anchor = state
            self.fisher = {n: f.to(ctx.device) for n, f in fisher.items() if n in trainable}
            self.anchor = {n: anchor[n].to(ctx.device) for n in self.fisher}

    def penalty(self, model: nn.Module) -> torch.Tensor:
        params = dict(model.named_parameters())
        return ewc_penalty(params, self.fisher, self.anchor)

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        out = lm_forward(model, self.ctx.unit_map, batch)
        if not self.fisher:
            return out.loss, {"lm_loss": float(out.loss.detach())}
        pen = self.penalty(model)
        total = out.loss + self.params.ewc_lambda / 2 * pen
        return total, {"lm_loss": float(out.loss.detach()), "ewc": float(pen.detach())}

    def domain_fisher(self, ctx: StageContext) -> dict[str, torch.Tensor]:
        """Mean of squared per-chunk gradients of the LM loss (eval mode, seeded chunks)."""
        model, cfg = ctx.model, self.config
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        fisher = {n: torch.zeros_like(p) for n, p in named}
        store, batcher = ctx.train_store, ctx.batcher
        n = min(self.params.ewc_fisher_samples, len(store))
        gen = torch.Generator().manual_seed(cfg.seed + 4099)
        picked = torch.randperm(len(store), generator=gen)[:n].tolist()
        was_training = model.training
        model.eval()
        try:
            for j, idx in enumerate(picked):
                rows = store.rows([idx])
                batch = batcher(rows["input_ids"], rows["attention_mask"], seed=cfg.seed + 7 * j)
                batch = {k: v.to(ctx.device) for k, v in batch.items()}
                out = lm_forward(model, ctx.unit_map, batch)
                if out.n_predicted == 0:
                    continue
                grads = torch.autograd.grad(out.loss, [p for _, p in named], allow_unused=True)
                for (name, _), g in zip(named, grads, strict=True):
                    if g is not None:
                        fisher[name] += g.detach().pow(2) / n
        finally:
            model.train(was_training)
        return fisher

    def finish(self, ctx: StageContext) -> None:
        if ctx.train_store is None or ctx.batcher is None:
            raise ValueError("ewc needs the stage's training chunks to estimate the Fisher")
        new = self.domain_fisher(ctx)
        gamma = self.params.ewc_gamma
        tensors = {}
        for name, f in new.items():
            old = self.fisher.get(name)
            acc = f if old is None else gamma * old + f
            tensors[f"fisher.{name}"] = acc.detach().float().cpu().contiguous()
        params = dict(ctx.model.named_parameters())
        for name in new:
            tensors[f"anchor.{name}"] = params[name].detach().float().cpu().contiguous()
        with atomic_path(ctx.strategy_dir() / FILE) as tmp:
            save_file(tensors, str(tmp), {"gamma": str(gamma)})
