"""Adapter (the paper's Adapter-ONE): a frozen backbone and one LoRA adapter per domain.

Each stage starts from the base model, freezes every weight, and trains only low-rank
deltas W + (alpha / r) * B A on every 2-D projection of the transformer layers (query,
key, value, attention output, FFN in and out; B starts at zero, so training starts at the
base model). The deltas are weight parametrizations, not model code, so any family with a
unit map works. At the end of the stage the adapter is saved as
``strategy/adapter.safetensors`` and *merged* into the weights: the stage checkpoint is a
plain transformers model that loads without any adapter library.
"""

from __future__ import annotations

import math

import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import parametrize

from das_engine.storage import atomic_path
from das_engine.strategies.base import StageContext, Strategy

FILE = "adapter.safetensors"


class LoRADelta(nn.Module):
    """weight -> weight + scale * B @ A, for a 2-D weight of shape [rows, cols]."""

    def __init__(self, rows: int, cols: int, rank: int, alpha: float) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, cols))
        self.B = nn.Parameter(torch.zeros(rows, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.scale = alpha / rank

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.scale * (self.B @ self.A).to(weight.dtype)


def adapted_modules(ctx: StageContext) -> list[tuple[str, nn.Module]]:
    """Every module with a 2-D ``weight`` inside the transformer layers."""
    out = []
    for i, layer in enumerate(ctx.unit_map.layers):
        for name, module in layer.named_modules():
            w = getattr(module, "weight", None)
            if isinstance(module, nn.Embedding) or not isinstance(w, nn.Parameter):
                continue
            if w.dim() == 2:
                out.append((f"layer{i}.{name}", module))
    return out


class Adapter(Strategy):
    name = "adapter"
    starts_from_base = True

    def prepare(self, ctx: StageContext) -> None:
        super().prepare(ctx)
        cfg = self.config
        for p in ctx.model.parameters():
            p.requires_grad_(False)
        torch.manual_seed(cfg.seed)
        self.adapted: list[tuple[str, nn.Module]] = []
        for name, module in adapted_modules(ctx):
            rows, cols = module.weight.shape
            delta = LoRADelta(rows, cols, cfg.adapter_rank, cfg.adapter_alpha)
            delta.to(module.weight.device)
            parametrize.register_parametrization(module, "weight", delta)
            self.adapted.append((name, module))

    def finish(self, ctx: StageContext) -> None:
        tensors = {}
        for name, module in self.adapted:
            delta = module.parametrizations.weight[0]
            tensors[f"{name}.A"] = delta.A.detach().float().cpu().contiguous()
            tensors[f"{name}.B"] = delta.B.detach().float().cpu().contiguous()
        with atomic_path(ctx.strategy_dir() / FILE) as tmp:
            save_file(tensors, str(tmp), {"rank": str(self.config.adapter_rank)})

    def final_model(self, model: nn.Module) -> nn.Module:
        """Merge every delta into its weight and drop the parametrizations."""
        for _, module in self.adapted:
            if parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        for p in model.parameters():
            p.requires_grad_(True)
        self.adapted = []
        return model
