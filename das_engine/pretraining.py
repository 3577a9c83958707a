"""Plain LM pre-training of a base model with the engine's one training loop (``Trainer``
with the NCL strategy), outside any lineage: ``das-engine init-base --pretrain-steps``
and the benchmark's base builder (``benchmarks/continual/prepare_base.py``)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from torch import nn
from transformers import PreTrainedTokenizerBase

from das_engine.config import TrainingConfig
from das_engine.data import ChunkStore
from das_engine.objective import Batcher
from das_engine.precision import Precision
from das_engine.progress import ProgressFn
from das_engine.strategies.base import StageContext
from das_engine.strategies.ncl import NCL
from das_engine.trainer import Trainer, TrainSummary
from das_engine.units import build_unit_map


def pretrain(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    train: ChunkStore,
    config: TrainingConfig,
    checkpoint_dir: Path,
    *,
    lr_lambda: Callable[[int], float] | None = None,
    head_only_steps: int = 0,
    should_stop: Callable[[], bool] | None = None,
    progress: ProgressFn | None = None,
    keep_checkpoints: bool = False,
) -> TrainSummary:
    """Train ``model`` (already on its device) in place on ``train``: resumes from
    ``checkpoint_dir`` when a crashed run left step checkpoints there, removes them at the
    end unless ``keep_checkpoints``."""
    unit_map = build_unit_map(model)
    batcher = Batcher(tokenizer, unit_map.objective, config.mlm_probability)
    strategy = NCL(config)
    ctx = StageContext(model, unit_map, config, None, train_store=train, batcher=batcher)
    strategy.prepare(ctx)
    device = next(model.parameters()).device
    trainer = Trainer(
        model,
        strategy,
        config,
        train,
        batcher,
        checkpoint_dir,
        progress=progress,
        precision=Precision.for_stage(config, device),
        lr_lambda=lr_lambda,
        head_only_steps=head_only_steps,
        should_stop=should_stop,
    )
    summary = trainer.run()
    if not keep_checkpoints:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return summary
