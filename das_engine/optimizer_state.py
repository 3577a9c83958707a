"""Optimizer, LR-scheduler and loss-scaler state on disk without pickles.

Tensors (Adam's moments and step counts) go to ``optimizer.safetensors``, everything else
(param groups, the scheduler's counters, the GradScaler's scale) to ``optimizer.json``.
Loading never runs ``torch.load(weights_only=False)``: a step checkpoint cannot execute
code. Float values round-trip exactly through JSON (repr), so resume stays bit-identical.
Step checkpoints of the previous format (``optimizer.pt``) still load, with
``weights_only=True``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

TENSORS = "optimizer.safetensors"
META = "optimizer.json"
LEGACY = "optimizer.pt"


def _split_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    groups = [
        {k: list(v) if isinstance(v, tuple) else v for k, v in g.items()}
        for g in state["param_groups"]
    ]
    return tensors, {"param_groups": groups, "scalars": scalars, "indices": list(state["state"])}


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {int(i): {} for i in meta["indices"]}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state[int(idx)][key] = value
    for idx, extra in meta["scalars"].items():
        state[int(idx)].update(extra)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def save_training_state(
    directory: Path,
    optimizer: torch.optim.Optimizer,
    scheduler,
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    """Write the state into ``directory`` (a step checkpoint's temp dir)."""
    tensors, meta = _split_optimizer(optimizer.state_dict())
    meta["scheduler"] = scheduler.state_dict()
    meta["scaler"] = scaler.state_dict() if scaler is not None else None
    save_file(tensors, str(Path(directory) / TENSORS))
    (Path(directory) / META).write_text(json.dumps(meta))


def load_training_state(
    directory: Path,
    optimizer: torch.optim.Optimizer,
    scheduler,
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    directory = Path(directory)
    if not (directory / META).exists() and (directory / LEGACY).exists():
        legacy = torch.load(directory / LEGACY, weights_only=True, map_location="cpu")
        optimizer.load_state_dict(legacy["optimizer"])
        scheduler.load_state_dict(legacy["scheduler"])
        return
    meta = json.loads((directory / META).read_text())
    optimizer.load_state_dict(_join_optimizer(load_file(str(directory / TENSORS)), meta))
    scheduler.load_state_dict(meta["scheduler"])
    if scaler is not None and meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
