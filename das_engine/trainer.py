"""The training loop: device and mixed precision via ``accelerate``, gradient
accumulation, periodic step checkpoints, exact resume, progress and cooperative cancel.

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
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from das_engine import distributed
from das_engine.config import TrainingConfig
from das_engine.data import ChunkStore
from das_engine.errors import Cancelled
from das_engine.objective import Batcher
from das_engine.storage import atomic_dir
from das_engine.strategies.base import Strategy


@dataclass
class ProgressEvent:
    phase: str  # "importance" | "training" | "evaluating"
    step: int
    total: int
    loss: float | None = None
    tokens_per_s: float | None = None
    eta_s: float | None = None
    trained_tokens: int = 0
    message: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


ProgressFn = Callable[[ProgressEvent], None]
CancelFn = Callable[[], bool]


def select_device(preference: str = "auto") -> torch.device:
    """cuda > cpu, unless the config names a device; under torchrun, this rank's GPU."""
    return distributed.device(preference)


def mixed_precision_for(config: TrainingConfig, device: torch.device) -> str:
    if config.mixed_precision != "auto":
        return config.mixed_precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


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
    ) -> None:
        from accelerate import Accelerator

        self.config = config
        self.strategy = strategy
        self.train_store = train
        self.batcher = batcher
        self.checkpoint_dir = Path(checkpoint_dir)
        self.progress = progress or (lambda _e: None)
        self.should_cancel = should_cancel or (lambda: False)
        self.keep = keep_checkpoints
        device = next(model.parameters()).device
        # DDP (several processes) or a no-op; joins the process group before accelerate does
        self.replicas = distributed.DataParallel(model, strategy, batcher.objective)
        self.accelerator = Accelerator(
            mixed_precision=mixed_precision_for(config, device), cpu=device.type == "cpu"
        )
        self.total = total_steps(config, len(train))
        optimizer = torch.optim.AdamW(
            _decay_groups(model, config.weight_decay), lr=config.learning_rate
        )
        warmup = int(config.warmup_ratio * self.total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda s: min(1.0, (s + 1) / warmup) if warmup and s < warmup else 1.0,
        )
        # the model is not handed to accelerate: with several processes it would wrap it in
        # DDP, hiding base_model / lm_head from the strategies (see das_engine/distributed.py)
        self.model, self.optimizer = model, self.accelerator.prepare(optimizer)
        self.scheduler = scheduler
        self.order = SampleOrder(len(train), config.seed)

    # -- checkpoints -------------------------------------------------------------------
    def _checkpoints(self) -> list[tuple[int, Path]]:
        if not self.checkpoint_dir.exists():
            return []
        found = []
        for d in self.checkpoint_dir.glob("step-*"):
            if (d / "trainer.json").exists():
                found.append((int(d.name.split("-")[1]), d))
        return sorted(found)

    def save_checkpoint(self, step: int, trained_tokens: int) -> Path:
        target = self.checkpoint_dir / f"step-{step:08d}"
        if not distributed.is_main():  # ranks hold identical weights: rank 0 saves them
            return target
        model = self.accelerator.unwrap_model(self.model)
        with atomic_dir(target) as tmp:
            save_model(model, str(tmp / "model.safetensors"))
            torch.save(
                {
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                },
                tmp / "optimizer.pt",
            )
            (tmp / "trainer.json").write_text(
                json.dumps({"step": step, "trained_tokens": trained_tokens, "total": self.total})
            )
        for _, old in self._checkpoints()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return target

    def load_latest(self) -> tuple[int, int]:
        found = self._checkpoints()
        if not found:
            return 0, 0
        _, path = found[-1]
        load_model(self.accelerator.unwrap_model(self.model), str(path / "model.safetensors"))
        state = torch.load(path / "optimizer.pt", weights_only=False, map_location="cpu")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        meta = json.loads((path / "trainer.json").read_text())
        return int(meta["step"]), int(meta["trained_tokens"])

    # -- the loop ----------------------------------------------------------------------
    def _micro_batch(self, step: int, micro: int) -> dict:
        cfg = self.config
        first = (step * cfg.grad_accum + micro) * cfg.batch_size
        rows = self.train_store.rows([self.order[first + j] for j in range(cfg.batch_size)])
        batch = self.batcher(
            rows["input_ids"], rows["attention_mask"], seed=cfg.seed * 1_000_003 + first
        )
        return {k: v.to(self.accelerator.device) for k, v in batch.items()}

    def run(self) -> TrainSummary:
        cfg = self.config
        start, trained = self.load_latest()
        self.model.train()
        started = time.perf_counter()
        tokens_this_run = 0
        loss_value: float | None = None
        for step in range(start, self.total):
            if distributed.any_rank(self.should_cancel()):
                raise Cancelled(f"cancelled at step {step} of {self.total}")
            # dropout masks depend on the step (and the rank) only
            torch.manual_seed(cfg.seed * 7919 + step + distributed.seed_offset())
            self.optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for micro in range(cfg.grad_accum):
                batch = self._micro_batch(step, micro)  # the global micro-batch
                local, weight = self.replicas.shard(batch)  # this rank's rows of it
                with self.replicas.sync(micro == cfg.grad_accum - 1):
                    with self.accelerator.autocast():
                        loss, logs = self.replicas.loss(local)
                    self.accelerator.backward(loss * weight / cfg.grad_accum)
                # report the LM loss (comparable across strategies), not the total objective
                step_loss += weight * logs.get("lm_loss", float(loss.detach())) / cfg.grad_accum
                n_tok = int(batch["attention_mask"].sum())
                trained += n_tok
                tokens_this_run += n_tok
            self.strategy.after_backward()
            self.accelerator.clip_grad_norm_(self.model.parameters(), 1.0)
            self.strategy.before_step()
            self.optimizer.step()
            self.strategy.after_step()
            self.scheduler.step()
            loss_value = self.replicas.mean(step_loss)
            done = step + 1
            elapsed = time.perf_counter() - started
            rate = tokens_this_run / elapsed if elapsed > 0 else None
            steps_left = self.total - done
            eta = elapsed / (done - start) * steps_left if done > start else None
            self.progress(
                ProgressEvent("training", done, self.total, loss_value, rate, eta, trained)
            )
            if done % cfg.checkpoint_every == 0 and done < self.total:
                self.save_checkpoint(done, trained)
        return TrainSummary(
            steps=self.total,
            trained_tokens=trained,
            final_loss=loss_value,
            resumed_from=start,
            seconds=time.perf_counter() - started,
        )
