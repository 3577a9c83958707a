"""Mixed precision without process-wide state: fp32 master weights, ``torch.autocast``
around every pass, and a ``GradScaler`` owned by one stage for fp16.

Why not ``accelerate``: its ``AcceleratorState`` is a process singleton, so a second stage
with another ``mixed_precision`` in the same process (the next job of a worker) died with
"AcceleratorState has already been initialized". A ``Precision`` is a plain value built
per stage; nothing of it outlives the stage.

The weights the optimizer and the soft-mask act on are always float32 (the lineage loads
every checkpoint in float32); autocast only lowers the precision of the matmuls. Stage
checkpoints are written in ``save_dtype`` ("auto" = the base's own dtype).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from das_engine.config import TrainingConfig

MODES = ("no", "bf16", "fp16")
SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_mode(config: TrainingConfig, device: torch.device) -> str:
    """``auto``: bf16 on a CUDA device that has it, fp16 (with a loss scaler) on one that
    does not, full precision on CPU (bf16 autocast on CPU is slow and changes results)."""
    if config.mixed_precision != "auto":
        return config.mixed_precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


@dataclass(frozen=True)
class Precision:
    """How one stage computes: ``mode`` in MODES on ``device``."""

    mode: str
    device: torch.device

    @classmethod
    def for_stage(cls, config: TrainingConfig, device: torch.device) -> Precision:
        return cls(resolve_mode(config, device), torch.device(device))

    @property
    def compute_dtype(self) -> torch.dtype:
        return _AUTOCAST_DTYPES.get(self.mode, torch.float32)

    def autocast(self) -> AbstractContextManager:
        """Forward passes: the trained loss and the held-out evaluation."""
        if self.mode == "no":
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.compute_dtype)

    def autocast_unscaled(self) -> AbstractContextManager:
        """Passes whose gradients are taken without a loss scaler (importance, a
        strategy's end-of-stage statistics): bf16 autocast has fp32's exponent range and
        needs no scaler; fp16 gradients could underflow unscaled, so fp16 runs these in
        full precision."""
        if self.mode == "fp16":
            return nullcontext()
        return self.autocast()

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """A fresh loss scaler for an fp16 stage (owned by its trainer), else None."""
        if self.mode != "fp16":
            return None
        return torch.amp.GradScaler(self.device.type)


def save_dtype_for(config: TrainingConfig, base_dir: Path) -> torch.dtype:
    """The dtype of a stage checkpoint: ``save_dtype``, or the base's own for "auto"."""
    if config.save_dtype != "auto":
        return SAVE_DTYPES[config.save_dtype]
    from das_engine.bases import checkpoint_dtype

    return checkpoint_dtype(base_dir)


def save_pretrained_as(model: nn.Module, tokenizer, out: Path, dtype: torch.dtype) -> None:
    """Write ``model`` (HF format, with its tokenizer) in ``dtype``, atomically.

    The model is cast in place (no second copy in memory) and left in ``dtype``: call it
    last, once the stage's model is no longer trained or scored."""
    from das_engine.storage import atomic_dir

    model.to(dtype)
    with atomic_dir(Path(out)) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
