"""The JSON schema of ``hyperparameters``, generated from ``das_engine.config.TrainingConfig``.

Names, types, defaults and enums come from the dataclass itself (``dataclasses.fields``
and its type hints; ``das_engine.config`` imports no torch), so a field added to the engine
appears in the OpenAPI document at once. Each strategy's own parameters (flat keys such as
``ewc_lambda``) come from its params dataclass, found by ``das_engine.strategy_registry``,
with the description and range declared there. What the general fields' dataclass cannot
say -- a sentence per field and the ranges ``TrainingConfig.validate`` enforces -- is kept
here;
``tests/service/test_openapi.py`` checks that every field has a description and that each
range here is the one the engine enforces. Validation itself stays the engine's: the schema
documents the JSON the service accepts, it does not replace the check.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from functools import lru_cache
from typing import Any

# field -> (description, minimum, maximum, minimum excluded)
Range = tuple[float | None, float | None, bool]
FIELDS: dict[str, tuple[str, Range]] = {
    "strategy": (
        "The continual-learning method; if given, it must equal the lineage's `strategy`.",
        (None, None, False),
    ),
    "learning_rate": ("AdamW learning rate.", (0.0, 1.0, True)),
    "weight_decay": ("AdamW weight decay (not applied to biases and norms).", (0.0, 1.0, False)),
    "batch_size": ("Chunks per optimisation micro-batch.", (1, 4096, False)),
    "grad_accum": ("Micro-batches accumulated per optimisation step.", (1, 1024, False)),
    "epochs": (
        "Passes over the domain's training chunks; ignored when `max_steps` is set.",
        (0.0, 1000.0, True),
    ),
    "max_steps": (
        "Optimisation steps per domain; overrides `epochs` when set.",
        (1, 10**7, False),
    ),
    "warmup_ratio": ("Share of the steps with a linear learning-rate warm-up.", (0.0, 0.5, False)),
    "block_size": (
        "Tokens per training chunk; at most the base model's position embeddings.",
        (8, 8192, False),
    ),
    "mlm_probability": ("Share of tokens masked (MLM bases only).", (0.0, 0.9, True)),
    "seed": ("Seed of sampling, masking and the held-out split.", (0, 2**31 - 1, False)),
    "mask_mode": (
        "DAS soft-masking: scale the update (`update`) or the gradient (`gradient`).",
        (None, None, False),
    ),
    "normalization": ("How unit importance is normalised before masking.", (None, None, False)),
    "importance_control": (
        "`permuted`: the importance values shuffled onto random units (a control run).",
        (None, None, False),
    ),
    "contrast_weight": (
        "Lambda, the weight of DAS's contrastive loss (the paper uses 1; 0: soft-masking only).",
        (0.0, 100.0, False),
    ),
    "temperature": ("Tau of the contrastive loss.", (0.0, 10.0, True)),
    "importance_sample_ratio": (
        "Share of the domain's chunks used to compute importance.",
        (0.0, 1.0, True),
    ),
    "importance_max_batches": ("Most batches used to compute importance.", (1, 100000, False)),
    "importance_dropout": (
        "Dropout of the two proxy-KL views, only for a base without dropout of its own (Llama, "
        "Mistral, Qwen2); 0 refuses such bases.",
        (0.0, 0.9, False),
    ),
    "freeze_embeddings": ("Freeze the word embeddings (and a tied LM head).", (None, None, False)),
    "freeze_layernorm": ("Freeze every normalisation layer.", (None, None, False)),
    "mask_embeddings": (
        "Measure and soft-mask the importance of each embedding row.",
        (None, None, False),
    ),
    "mask_layernorm": (
        "Measure and soft-mask the importance of each norm-layer element.",
        (None, None, False),
    ),
    "protection_budget": (
        "Share of units per layer and kind the soft mask may protect (the most important "
        "keep their importance, the others train freely); 1 protects every unit by its "
        "importance, as the paper does.",
        (0.0, 1.0, True),
    ),
    "eval_fraction": ("Share of the domain's documents held out to evaluate.", (0.0, 0.5, True)),
    "eval_max_batches": ("Most batches of each evaluation.", (1, 100000, False)),
    "checkpoint_every": ("Steps between two resumable checkpoints.", (1, 10**7, False)),
    "mixed_precision": (
        "`auto` picks bf16 on a GPU that has it; fp16 needs a GPU (refused when "
        "`DAS_WORKER_DEVICE=cpu`).",
        (None, None, False),
    ),
    "device": (
        "Chosen by the server (each worker trains on its own accelerator): only `auto`.",
        (None, None, False),
    ),
    "extra": (
        "Free-form values kept with the lineage (any JSON object, at most 32 levels deep).",
        (None, None, False),
    ),
    # precision and training loop (docs/engine.md, "Precision and training loop")
    "save_dtype": (
        "Dtype of each stage checkpoint; `auto` = the base model's own (bf16 base, bf16 "
        "checkpoints). Training always keeps float32 master weights.",
        (None, None, False),
    ),
    "lr_scheduler": (
        "LR schedule of each stage: `constant` (warm-up then constant, the original), "
        "`linear`, `cosine`, `constant_with_warmup`; warm-up restarts at every stage.",
        (None, None, False),
    ),
    "max_grad_norm": ("Gradient clipping norm; 0 or null = no clipping.", (0.0, 1e6, False)),
    "gradient_checkpointing": (
        "Recompute activations in the backward pass: less memory, one more forward.",
        (None, None, False),
    ),
}

_ENUMS_BY_NAME = {"device": ["auto"]}  # the service's own restriction


def _type_schema(hint: Any) -> dict[str, Any]:
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return {"type": "string", "enum": list(typing.get_args(hint))}
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        inner = (
            _type_schema(args[0]) if len(args) == 1 else {"anyOf": [_type_schema(a) for a in args]}
        )
        return {"anyOf": [inner, {"type": "null"}]}
    if hint is bool:
        return {"type": "boolean"}
    if hint is int:
        return {"type": "integer"}
    if hint is float:
        return {"type": "number"}
    if hint is str:
        return {"type": "string"}
    if origin is dict or hint is dict:
        return {"type": "object", "additionalProperties": True}
    return {}


def _with_range(schema: dict[str, Any], bounds: Range) -> dict[str, Any]:
    lo, hi, lo_open = bounds
    target = schema["anyOf"][0] if "anyOf" in schema else schema
    if lo is not None:
        target["exclusiveMinimum" if lo_open else "minimum"] = lo
    if hi is not None:
        target["maximum"] = hi
    return schema


def hyperparameters_schema() -> dict[str, Any]:
    """``{"type": "object", "properties": {...}, "additionalProperties": false}`` (a copy)."""
    return copy.deepcopy(_schema())


def _fields() -> list[tuple[dataclasses.Field, Any, tuple[str, Range]]]:
    """(field, type hint, (description, range)) of every key ``from_dict`` accepts."""
    from das_engine.config import TrainingConfig
    from das_engine.strategy_params import DESCRIPTION, RANGE
    from das_engine.strategy_registry import params_classes

    hints = typing.get_type_hints(TrainingConfig)
    out = []
    for f in dataclasses.fields(TrainingConfig):
        if f.name != "params":
            no_doc: tuple[str, Range] = (f.metadata.get("description", ""), (None, None, False))
            out.append((f, hints[f.name], FIELDS.get(f.name, no_doc)))
    for cls in params_classes().values():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            out.append((f, hints[f.name], (f.metadata[DESCRIPTION], f.metadata[RANGE])))
    return out


@lru_cache
def _schema() -> dict[str, Any]:
    from das_engine.strategy_registry import strategy_names

    properties: dict[str, Any] = {}
    for f, hint, (description, bounds) in _fields():
        schema = _type_schema(hint)
        if f.name == "strategy":
            schema = {"type": "string", "enum": list(strategy_names())}
        if f.name in _ENUMS_BY_NAME:
            schema["enum"] = _ENUMS_BY_NAME[f.name]
        schema = _with_range(schema, bounds)
        if f.default is not dataclasses.MISSING:
            schema["default"] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            schema["default"] = f.default_factory()
        if f.name == "strategy":
            schema.pop("default", None)  # the lineage's strategy is the default
        schema["description"] = description
        properties[f.name] = schema
    return {
        "type": "object",
        "title": "Hyperparameters",
        "description": "Fields of das_engine's TrainingConfig; each is optional (its default "
        "applies). Unknown names, values out of range and values no JSON answer can carry are "
        "a 422 `invalid_hyperparameters` naming the field.",
        "properties": properties,
        "additionalProperties": False,
    }
