"""Merge: train on the domain as NCL does, then merge the result back into the model it came
from (task arithmetic or TIES), so each stage keeps only part of its change.

With theta_ref the reference (``merge_with``: the previous stage's model, the base at stage
1; or always the base) and tau = theta_trained - theta_ref the stage's task vector:

- ``task_arithmetic`` (Ilharco et al. 2023): theta = theta_ref + alpha * tau, computed as
  ``torch.lerp`` so alpha = 0 gives theta_ref and alpha = 1 theta_trained exactly;
- ``ties`` (Yadav et al. 2023, TIES-merging): each task vector is trimmed to its
  ``merge_density`` share of largest magnitudes, a sign is elected per coordinate (the sign
  of the summed trimmed values, i.e. the side with more total magnitude), and the values
  agreeing with it are averaged (disjoint mean); theta = theta_ref + alpha * merged. Here
  there is one task vector per merge, so the election never disagrees and the disjoint
  mean is the trimmed value itself: TIES reduces to keeping the top ``merge_density`` of
  each tensor's change (trimming is per tensor, as mergekit does; the paper trims over the
  whole vector, which would need every magnitude in memory at once).

Memory: the reference is streamed tensor by tensor from its safetensors files into the
trained model in place; nothing of the model's size is copied. A family whose saved names
differ from its parameter names falls back to loading the reference model once.

``das_merge`` is DAS (soft-masked training, importance and all) followed by the same
merge; its domain importance is measured on the merged model.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from torch import nn

from das_engine.strategies.base import Strategy
from das_engine.strategies.das import DAS
from das_engine.strategy_params import StrategyParams, param


@dataclass
class MergeParams(StrategyParams):
    merge_method: Literal["task_arithmetic", "ties"] = param(
        "task_arithmetic",
        "Strategies `merge`, `das_merge`: `task_arithmetic` (theta_ref + alpha * tau) or "
        "`ties` (tau trimmed to its top `merge_density`, then scaled by alpha).",
    )
    merge_alpha: float = param(
        0.5,
        "Strategies `merge`, `das_merge`: the merge coefficient alpha (0: keep the "
        "reference, 1: keep the trained weights; above 1 extrapolates).",
        minimum=0.0,
        maximum=4.0,
    )
    merge_with: Literal["previous", "base"] = param(
        "previous",
        "Strategies `merge`, `das_merge`: the reference merged with: the previous stage's "
        "model (the base at stage 1) or always the base.",
    )
    merge_density: float = param(
        0.2,
        "Strategies `merge`, `das_merge` with `ties`: share of each tensor's change kept "
        "(largest magnitudes).",
        minimum=0.0,
        maximum=1.0,
        exclusive_minimum=True,
    )


def trim_top(tau: torch.Tensor, density: float) -> torch.Tensor:
    """``tau`` with all but its ``round(density * numel)`` largest magnitudes set to 0."""
    keep = round(density * tau.numel())
    if keep >= tau.numel():
        return tau.clone()
    flat = tau.flatten()
    out = torch.zeros_like(flat)
    if keep > 0:
        idx = flat.abs().topk(keep, sorted=False).indices
        out[idx] = flat[idx]
    return out.view_as(tau)


def ties_merge(taus: list[torch.Tensor], density: float) -> torch.Tensor:
    """TIES over task vectors of one tensor: trim each, elect a sign per coordinate, mean of
    the trimmed values that agree with it (0 where none does)."""
    trimmed = torch.stack([trim_top(t, density) for t in taus])
    sign = torch.sign(trimmed.sum(0))
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    count = agree.sum(0)
    total = torch.where(agree, trimmed, torch.zeros_like(trimmed)).sum(0)
    return torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))


def merged_tensor(ref: torch.Tensor, new: torch.Tensor, params: MergeParams) -> torch.Tensor:
    """One tensor's merge (``ref`` and ``new`` of the same dtype and device)."""
    if params.merge_method == "ties":
        return ref + params.merge_alpha * ties_merge([new - ref], params.merge_density)
    return torch.lerp(ref, new, params.merge_alpha)


@contextmanager
def reference_tensors(model_dir: Path) -> Iterator[dict[str, Callable[[], torch.Tensor]]]:
    """Name -> a loader of that one tensor, over an HF directory's safetensors file(s)."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.exists()
        else ["model.safetensors"]
    )
    with ExitStack() as stack:
        loaders: dict[str, Callable[[], torch.Tensor]] = {}
        for f in files:
            fh = stack.enter_context(safe_open(str(model_dir / f), "pt"))
            for name in fh.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                loaders[name] = lambda fh=fh, name=name: fh.get_tensor(name)
        yield loaders


@torch.no_grad()
def merge_into(model: nn.Module, reference: Path, params: MergeParams) -> None:
    """Merge ``model``'s parameters, in place, with the reference's, tensor by tensor."""
    named = list(model.named_parameters())
    with reference_tensors(reference) as loaders:
        if not all(n in loaders for n, _ in named):  # saved under other names: load it whole
            from das_engine.bases import load_model

            state = load_model(reference).state_dict()
            loaders = {n: (lambda t=t: t) for n, t in state.items()}  # noqa: PLW2901
        for name, p in named:
            ref = loaders[name]().to(p.device, p.dtype)
            p.copy_(merged_tensor(ref, p.detach(), params))


def reference_dir(strategy: Strategy) -> Path:
    ctx, params = strategy.ctx, strategy.params
    if params.merge_with == "previous" and ctx.previous_stage_dirs:
        return ctx.previous_stage_dirs[-1] / "model"
    if ctx.base_dir is None:
        raise ValueError("merge needs the lineage's base model directory")
    return ctx.base_dir


class Merge(Strategy):
    name = "merge"
    params = MergeParams

    def final_model(self, model: nn.Module) -> nn.Module:
        merge_into(model, reference_dir(self), self.params)
        return model


class DASMerge(DAS):
    name = "das_merge"
    params = MergeParams

    def final_model(self, model: nn.Module) -> nn.Module:
        merge_into(super().final_model(model), reference_dir(self), self.params)
        return model
