"""Checks of a TrainingConfig against the model and the device, run before any work.

A config can be valid on its own and still impossible here: a block longer than the
model's position table (an IndexError deep in the embeddings, after the lineage directory
was made), fp16 autocast on a CPU, bf16 on a GPU without it, gradient checkpointing on a
model class that has none. ``check_config_against_model`` names each such field the way
``ConfigError`` does, so the CLI, the lineage and the service report it alike: the web API
runs the same checks on a base's config before it stores a lineage, so torch is imported
only where a device is checked.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from das_engine.config import TrainingConfig
from das_engine.errors import IncompatibleConfigError
from das_engine.families import FAMILIES, max_positions

if TYPE_CHECKING:
    import torch


def max_block_size(model_config) -> int | None:
    """The longest chunk the model can embed, from its config (None: no limit known)."""
    return max_positions(model_config)


def _supports_gradient_checkpointing(model_config) -> bool | None:
    """Whether the task model class of this config has HF gradient checkpointing."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    family = FAMILIES.get(getattr(model_config, "model_type", None))
    if family is None:
        return None
    auto = AutoModelForMaskedLM if family.objective == "mlm" else AutoModelForCausalLM
    try:
        cls = auto._model_mapping[type(model_config)]
    except (KeyError, ValueError):
        return None
    return bool(getattr(cls, "supports_gradient_checkpointing", False))


def resolve_device(config: TrainingConfig) -> torch.device:
    """``config.device`` as a usable torch device (cuda > cpu for "auto"; under torchrun
    a bare "cuda" is this rank's GPU, ``distributed.device``)."""
    import torch

    from das_engine import distributed

    problem = None
    if config.device == "auto":
        return distributed.device("auto")
    try:
        device = torch.device(config.device)
    except (RuntimeError, TypeError) as exc:
        problem = f"is not a device name ({exc})"
    else:
        if device.type == "cuda" and not torch.cuda.is_available():
            problem = "is cuda but no CUDA device is available here"
        elif device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            problem = f"names CUDA device {device.index}, this machine has fewer"
        elif device.type == "mps" and not torch.backends.mps.is_available():
            problem = "is mps but MPS is not available here"
        elif device.type not in ("cpu", "cuda", "mps"):
            problem = f"has unsupported device type {device.type!r}"
    if problem:
        raise IncompatibleConfigError(
            f"device {config.device!r} {problem}",
            details=[{"field": "device", "message": problem}],
        )
    return distributed.device(config.device)


def check_config_against_model(
    config: TrainingConfig, model_config, device: torch.device | None = None
) -> None:
    """Raise IncompatibleConfigError naming every field this model (and, when ``device``
    is given, this device) cannot run. ``model_config`` is a transformers config."""
    problems: list[dict] = []

    def bad(name: str, why: str) -> None:
        problems.append({"field": name, "message": why})

    limit = max_block_size(model_config)
    if limit is not None and config.block_size > limit:
        bad(
            "block_size",
            f"is {config.block_size} but this {model_config.model_type} model embeds at most "
            f"{limit} positions",
        )
    if config.gradient_checkpointing and _supports_gradient_checkpointing(model_config) is False:
        bad(
            "gradient_checkpointing",
            f"is not supported by this {model_config.model_type} model class",
        )
    if device is not None:
        import torch

        device = torch.device(device)
        mode = config.mixed_precision
        if mode == "fp16" and device.type != "cuda":
            bad("mixed_precision", f"fp16 autocast needs a CUDA device, this is {device.type}")
        if mode == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            bad("mixed_precision", "bf16 is not supported by this CUDA device; use fp16 or auto")
    if problems:
        raise IncompatibleConfigError(
            "hyper-parameters this model or device cannot run: "
            + "; ".join(f"{p['field']} {p['message']}" for p in problems),
            details=problems,
        )


def preflight(config: TrainingConfig, model_dir: Path | str) -> torch.device:
    """Every check for training ``model_dir`` here; returns the device to train on."""
    from transformers import AutoConfig

    device = resolve_device(config)
    check_config_against_model(config, AutoConfig.from_pretrained(str(model_dir)), device)
    return device
