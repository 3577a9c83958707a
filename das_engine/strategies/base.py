"""The small interface every continual-learning strategy implements.

Per stage, the lineage calls ``begin_stage`` (before it scores the earlier models on the
new domain) and ``prepare``; the trainer calls ``build_optimizer`` once, then per
optimizer step ``loss`` (per micro-batch), ``after_backward``, ``before_step``,
``after_step``; the lineage then calls ``finish``, takes ``final_model`` and calls
``end_stage`` (before the held-out evaluation and the commit). A strategy is a recipe
over the tested components (units, importance, softmask, contrastive).

A subclass with its own ``name`` registers itself (``REGISTRY``); its parameters, if any,
are a ``StrategyParams`` dataclass in the same file named by ``params``
(das_engine/strategy_registry.py reads both without importing the file).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from das_engine import strategy_registry
from das_engine.config import TrainingConfig
from das_engine.data import ChunkStore
from das_engine.importance import Importance
from das_engine.objective import Batcher, lm_forward
from das_engine.precision import Precision
from das_engine.progress import ProgressFn, no_progress
from das_engine.strategy_params import StrategyParams
from das_engine.units import UnitMap

#: every strategy class imported so far, by name (das_engine.strategies imports them all)
REGISTRY: dict[str, type[Strategy]] = {}


@dataclass
class StageContext:
    model: nn.Module
    unit_map: UnitMap
    config: TrainingConfig
    accumulated: Importance | None  # I_acc(t-1), when the lineage keeps one
    stage_dir: Path | None = None  # the stage being trained (``strategy/`` is the strategy's)
    previous_stage_dirs: list[Path] = field(default_factory=list)  # finished, in order
    base_dir: Path | None = None  # the lineage's base model (HF directory)
    train_store: ChunkStore | None = None
    batcher: Batcher | None = None
    # for the stage hooks (``begin_stage``/``end_stage``); the lineage sets them
    lineage_dir: Path | None = None  # the lineage's own files (e.g. ``importance/``)
    domain: str = ""  # the new domain's name
    from_base: bool = False  # ``model`` was loaded from the base (stage 1, or ONE)
    precision: Precision | None = None  # the stage's precision context
    progress: ProgressFn = no_progress

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def strategy_dir(self) -> Path:
        """Where a strategy keeps its own state for this stage (read back by later stages)."""
        assert self.stage_dir is not None
        path = self.stage_dir / "strategy"
        path.mkdir(parents=True, exist_ok=True)
        return path


class Strategy:
    name = "base"
    #: start every stage from the base model instead of the previous stage (ONE)
    starts_from_base = False
    #: the strategy's own parameters (a StrategyParams dataclass of the same file), or None
    params: type[StrategyParams] | StrategyParams | None = None

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__ or not cls.__module__.startswith(__package__ + "."):
            return  # only this package's files declare strategies (a test's subclass: no)
        declared = strategy_registry.declared().get(cls.name)
        ours = cls.__dict__.get("params")
        theirs = declared.params if declared is not None else None
        if declared is None or (ours is None) != (theirs is None):
            raise TypeError(f"{cls.__name__}: not declared as the registry reads it")
        if ours is not None:
            cls.params = theirs  # the one class TrainingConfig holds instances of
        REGISTRY[cls.name] = cls

    def __init__(self, config: TrainingConfig) -> None:
        self.config = config
        self.params = config.strategy_params(self.name)  # this strategy's, or None

    def begin_stage(self, ctx: StageContext) -> None:
        """Before the earlier models are scored on the new domain and before ``prepare``:
        derive what this stage needs from the earlier ones (DAS: I_acc(t-1), measuring
        I_general at stage 1). Runs on every rank, before any weight changes."""

    def prepare(self, ctx: StageContext) -> None:
        self.ctx = ctx

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        out = lm_forward(model, self.ctx.unit_map, batch)
        return out.loss, {"lm_loss": float(out.loss.detach())}

    def build_optimizer(self, params, **adamw_kwargs) -> torch.optim.Optimizer:
        """The stage's optimizer over ``params`` (parameters or groups); AdamW unless a
        strategy folds something into the step (DAS's update mask)."""
        params = list(params)
        return torch.optim.AdamW(params, **{"fused": _all_on_cuda(params), **adamw_kwargs})

    def build_scheduler(self, optimizer, config: TrainingConfig, total: int):
        """The stage's LR schedule (``config.lr_scheduler``); a strategy may bring its own."""
        from das_engine.trainer import make_scheduler

        return make_scheduler(optimizer, config, total)

    def after_backward(self) -> None:
        pass

    def before_step(self) -> None:
        pass

    def after_step(self) -> None:
        pass

    def finish(self, ctx: StageContext) -> None:
        """After the last step, before the stage is committed: save state for later stages
        under ``ctx.strategy_dir()`` (e.g. EWC's Fisher, a replay buffer's chunk ids)."""

    def final_model(self, model: nn.Module) -> nn.Module:
        """The model to save as the stage checkpoint (e.g. adapters merged into weights)."""
        return model

    def growth(self) -> dict | None:
        """What the stage added to the model or beside it (ELLE: new units and layers, CPT:
        plugin neurons and masks), for the stage's result; None when nothing grows."""
        return None

    def end_stage(self, ctx: StageContext, model: nn.Module) -> dict:
        """After ``final_model``, before the held-out evaluation: measure what later stages
        need from the trained ``model`` (DAS: I(t), I_acc(t)) and save it under
        ``ctx.stage_dir``. Returns entries for the stage's ``stage.json``."""
        return {}


def _all_on_cuda(params: list) -> bool:
    """Fused AdamW on CUDA: the foreach kernels allocate a temporary as large as all the
    moments (an 8B model on one 139 GiB H200 ran out of memory there); the fused one does
    not. CPU keeps the foreach path (and its bit-for-bit results)."""
    tensors = [t for g in params for t in (g["params"] if isinstance(g, dict) else [g])]
    return bool(tensors) and all(t.is_cuda and t.is_floating_point() for t in tensors)
