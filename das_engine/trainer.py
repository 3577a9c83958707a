"""The training loop: fp32 master weights under autocast (``precision.Precision``, no
process-wide state), LR schedule with per-stage warm-up, gradient clipping, optional
gradient checkpointing, gradient accumulation, step checkpoints (the last step included),
exact resume, progress and cooperative cancel. The one loop of the project: lineage
stages, ``das-engine init-base --pretrain-steps`` and the benchmark's base builder
(``das_engine.pretraining``) all run it; the last two use its options for pre-training
(an LR multiplier per step, e.g. ``warmup_linear_decay``; head-only steps first; a
graceful early stop).

Determinism: the data order, the MLM masks and the dropout RNG of step ``s`` are all
functions of (seed, s), so a run resumed from a checkpoint at step s ends with the same
weights as a run never stopped (on CPU).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import nn
from torch.nn.utils import clip_grad_norm_

from das_engine import distributed
from das_engine.config import TrainingConfig
from das_engine.data import ChunkStore
from das_engine.errors import Cancelled, IncompatibleConfigError
from das_engine.layout import TRAINER_FILE, step_checkpoints, step_dir_name
from das_engine.objective import Batcher
from das_engine.optimizer_state import load_training_state, save_training_state
from das_engine.precision import Precision, resolve_mode
from das_engine.progress import CancelFn, ProgressEvent, ProgressFn
from das_engine.storage import atomic_dir
from das_engine.strategies.base import Strategy


def select_device(preference: str = "auto") -> torch.device:
    """cuda > cpu, unless the config names a device; under torchrun, this rank's GPU."""
    return distributed.device(preference)


def mixed_precision_for(config: TrainingConfig, device: torch.device) -> str:
    return resolve_mode(config, device)


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainingConfig, total: int):
    """The stage's LR schedule; its warm-up (``warmup_ratio`` of this stage's steps) starts
    again at every stage: re-warming, then re-decaying for linear/cosine, per stage
    (Ibrahim et al. 2024, "Simple and Scalable Strategies to Continually Pre-train LLMs").

    "constant" is the engine's original schedule, kept bit-for-bit: LR x (s+1)/warmup
    during warm-up, then constant. The others are ``transformers.get_scheduler``'s (their
    warm-up starts at LR 0 on the first step)."""
    warmup = int(config.warmup_ratio * total)
    if config.lr_scheduler == "constant":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda s: min(1.0, (s + 1) / warmup) if warmup and s < warmup else 1.0,
        )
    from transformers import get_scheduler

    return get_scheduler(
        config.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total
    )


def warmup_linear_decay(total: int, warmup: int, floor: float = 0.0) -> Callable[[int], float]:
    """LR multiplier of step s: linear warm-up over ``warmup`` steps, then linear decay
    towards 0 at ``total``, never below ``floor`` (the benchmark base's schedule)."""
    warmup, decay = max(1, warmup), max(1, total - warmup)
    return lambda s: min((s + 1) / warmup, max(floor, (total - s) / decay))


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """HF gradient checkpointing, non-reentrant: the recomputed forward runs the same
    forward hooks (DAS gates) and keeps the dropout RNG, so gradients are unchanged.
    (transformers >= 5.x names it ``activation_checkpointing_enable``; older ones
    ``gradient_checkpointing_enable``.)"""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise IncompatibleConfigError(
            f"gradient_checkpointing is not supported by {type(model).__name__}",
            details=[{"field": "gradient_checkpointing", "message": "not supported by the model"}],
        )
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False  # a KV cache is useless in training and clashes


def disable_gradient_checkpointing(model: nn.Module) -> None:
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def gradient_checkpointing_active(model: nn.Module) -> bool:
    if hasattr(model, "activation_checkpointing_disable"):
        return bool(model.is_activation_checkpointing)
    return bool(model.is_gradient_checkpointing)


def total_steps(config: TrainingConfig, n_train: int) -> int:
    if config.max_steps is not None:
        return config.max_steps
    per_step = config.batch_size * config.grad_accum
    return max(1, math.ceil(config.epochs * n_train / per_step))


class SampleOrder:
    """A fresh seeded permutation per epoch; sample k of the run is ``order[k]``."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self._perms: dict[int, torch.Tensor] = {}

    def __getitem__(self, k: int) -> int:
        epoch, pos = divmod(k, self.n)
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=gen)}
        return int(self._perms[epoch][pos])


def _decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or "norm" in name.lower() else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def apply_freezing(model: nn.Module, config: TrainingConfig) -> None:
    """Optional: freeze word embeddings (tied to the LM head) and/or every norm layer."""
    if config.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    if config.freeze_layernorm:
        for module in model.modules():
            if "norm" in type(module).__name__.lower():
                for p in module.parameters(recurse=False):
                    p.requires_grad_(False)


def head_only_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters outside the LM head (the unit map's ``head_module``): the
    ones a head-only warm-up holds still."""
    from das_engine.units import build_unit_map

    head = {id(p) for p in build_unit_map(model).head_module(model).parameters()}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in head]


@dataclass
class TrainSummary:
    steps: int
    trained_tokens: int
    final_loss: float | None
    resumed_from: int
    seconds: float


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        strategy: Strategy,
        config: TrainingConfig,
        train: ChunkStore,
        batcher: Batcher,
        checkpoint_dir: Path,
        *,
        progress: ProgressFn | None = None,
        should_cancel: CancelFn | None = None,
        keep_checkpoints: int = 2,
        precision: Precision | None = None,
        lr_lambda: Callable[[int], float] | None = None,
        head_only_steps: int = 0,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        """``lr_lambda``: an LR multiplier per step instead of the config's schedule.
        ``head_only_steps``: the first steps train the LM head only (a fresh head on a
        pretrained body), then every trainable parameter. ``should_stop``: end early
        after a step, as if that were the last (checkpointed; not an error)."""
        self.config = config
        self.strategy = strategy
        self.train_store = train
        self.batcher = batcher
        self.checkpoint_dir = Path(checkpoint_dir)
        self.progress = progress or (lambda _e: None)
        self.should_cancel = should_cancel or (lambda: False)
        self.keep = keep_checkpoints
        self.device = next(model.parameters()).device
        self.precision = precision or Precision.for_stage(config, self.device)
        self.scaler = self.precision.grad_scaler()  # fp16 only; this stage's own
        # DDP (several processes) or a no-op (see das_engine/distributed.py)
        self.replicas = distributed.DataParallel(model, strategy, batcher.objective)
        self.total = total_steps(config, len(train))
        self.model = model
        self.optimizer = strategy.build_optimizer(
            _decay_groups(model, config.weight_decay), lr=config.learning_rate
        )
        self.scheduler = (
            torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda)
            if lr_lambda is not None
            else strategy.build_scheduler(self.optimizer, config, self.total)
        )
        self.head_only_steps = head_only_steps
        self._body = head_only_parameters(model) if head_only_steps > 0 else []
        if self._body and distributed.world_size() > 1:
            raise IncompatibleConfigError("head-only steps run in one process only")
        self.should_stop = should_stop
        self.order = SampleOrder(len(train), config.seed)

    @property
    def unwrapped_model(self) -> nn.Module:
        """The plain model (the one the lineage scores and saves)."""
        return getattr(self.model, "module", self.model)

    # -- checkpoints -------------------------------------------------------------------
    def _checkpoints(self) -> list[tuple[int, Path]]:
        return [(c.step, c.path) for c in step_checkpoints(self.checkpoint_dir)]

    def save_checkpoint(self, step: int, trained_tokens: int, loss: float | None = None) -> Path:
        """fp32 master weights + optimizer/scheduler/scaler state (no pickles)."""
        target = self.checkpoint_dir / step_dir_name(step)
        if not distributed.is_main():  # ranks hold identical weights: rank 0 saves them
            return target
        with atomic_dir(target) as tmp:
            save_model(self.unwrapped_model, str(tmp / "model.safetensors"))
            save_training_state(tmp, self.optimizer, self.scheduler, self.scaler)
            (tmp / TRAINER_FILE).write_text(
                json.dumps(
                    {
                        "step": step,
                        "trained_tokens": trained_tokens,
                        "total": self.total,
                        "loss": loss,
                    }
                )
            )
        for _, old in self._checkpoints()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return target

    def load_latest(self) -> tuple[int, int, float | None]:
        """(step, trained tokens, last loss) of the newest checkpoint; (0, 0, None) if none."""
        found = self._checkpoints()
        if not found:
            return 0, 0, None
        _, path = found[-1]
        load_model(self.unwrapped_model, str(path / "model.safetensors"))
        load_training_state(path, self.optimizer, self.scheduler, self.scaler)
        meta = json.loads((path / TRAINER_FILE).read_text())
        return int(meta["step"]), int(meta["trained_tokens"]), meta.get("loss")

    # -- the loop ----------------------------------------------------------------------
    def _micro_batch(self, step: int, micro: int) -> dict:
        cfg = self.config
        first = (step * cfg.grad_accum + micro) * cfg.batch_size
        rows = self.train_store.rows([self.order[first + j] for j in range(cfg.batch_size)])
        batch = self.batcher(
            rows["input_ids"], rows["attention_mask"], seed=cfg.seed * 1_000_003 + first
        )
        return {k: v.to(self.device) for k, v in batch.items()}

    def run(self) -> TrainSummary:
        if self.config.gradient_checkpointing:
            enable_gradient_checkpointing(self.unwrapped_model)
        try:
            return self._run()
        finally:
            if self.config.gradient_checkpointing:
                disable_gradient_checkpointing(self.unwrapped_model)
            for p in self._body:  # after a head-only warm-up, everything trains again
                p.requires_grad_(True)

    def _backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def _optimizer_step(self) -> None:
        """Unscale (fp16), strategy hooks, clip, step; a step the scaler skips (inf/nan
        gradients) leaves the weights as they were, the update mask included."""
        cfg = self.config
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        self.strategy.after_backward()
        if cfg.max_grad_norm:
            clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
        self.strategy.before_step()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.strategy.after_step()
        self.scheduler.step()

    def _run(self) -> TrainSummary:
        cfg = self.config
        start, trained, loss_value = self.load_latest()
        self.model.train()
        started = time.perf_counter()
        tokens_this_run = 0
        done = start
        for step in range(start, self.total):
            if distributed.any_rank(self.should_cancel()):
                raise Cancelled(f"cancelled at step {step} of {self.total}")
            for p in self._body:  # a function of the step: the same after a resume
                p.requires_grad_(step >= self.head_only_steps)
            # dropout masks depend on the step (and the rank) only
            torch.manual_seed(cfg.seed * 7919 + step + distributed.seed_offset())
            self.optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for micro in range(cfg.grad_accum):
                batch = self._micro_batch(step, micro)  # the global micro-batch
                local, weight = self.replicas.shard(batch)  # this rank's rows of it
                with self.replicas.sync(micro == cfg.grad_accum - 1):
                    with self.precision.autocast():
                        loss, logs = self.replicas.loss(local)
                    self._backward(loss * weight / cfg.grad_accum)
                # report the LM loss (comparable across strategies), not the total objective
                step_loss += weight * logs.get("lm_loss", float(loss.detach())) / cfg.grad_accum
                n_tok = int(batch["attention_mask"].sum())
                trained += n_tok
                tokens_this_run += n_tok
            self._optimizer_step()
            loss_value = self.replicas.mean(step_loss)
            done = step + 1
            elapsed = time.perf_counter() - started
            rate = tokens_this_run / elapsed if elapsed > 0 else None
            steps_left = self.total - done
            eta = elapsed / (done - start) * steps_left if done > start else None
            self.progress(
                ProgressEvent("training", done, self.total, loss_value, rate, eta, trained)
            )
            # the last step too: a crash in the importance/evaluation after training
            # resumes there instead of retraining up to checkpoint_every steps
            stop = (
                self.should_stop is not None
                and done < self.total
                and distributed.any_rank(self.should_stop())
            )
            if done % cfg.checkpoint_every == 0 or done == self.total or stop:
                self.save_checkpoint(done, trained, loss_value)
            if stop:
                break
        return TrainSummary(
            steps=done,
            trained_tokens=trained,
            final_loss=loss_value,
            resumed_from=start,
            seconds=time.perf_counter() - started,
        )
