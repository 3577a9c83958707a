"""Training configuration as data (a dataclass), validated once, serialised with the lineage."""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from das_engine.errors import ConfigError
from das_engine.strategy_params import StrategyParams
from das_engine.strategy_registry import (
    flat_fields,
    params_classes,
    params_for,
    strategy_names,
)

MASK_MODES = ("update", "gradient")
NORMALIZATIONS = ("paper", "one_sided", "rank")
LR_SCHEDULERS = ("constant", "linear", "cosine", "constant_with_warmup")


def __getattr__(name: str) -> Any:
    """``STRATEGIES``: every strategy's name, from the registry (a tuple, as it was)."""
    if name == "STRATEGIES":
        return strategy_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class TrainingConfig:
    """Everything that decides how one domain is trained; stored in ``lineage.json``."""

    strategy: str = "das"
    # optimisation
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    batch_size: int = 8
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs when set
    warmup_ratio: float = 0.0
    block_size: int = 128
    mlm_probability: float = 0.15
    seed: int = 42
    # DAS
    mask_mode: Literal["update", "gradient"] = "update"
    normalization: Literal["paper", "one_sided", "rank"] = "paper"
    # "permuted": the same importance values shuffled onto random units within each layer
    # and unit kind (a control: same amount of masking, wrong units)
    importance_control: Literal["none", "permuted"] = "none"
    # lambda. The paper uses 1; the default is 0 (soft-masking only) because on our
    # benchmark (docs/benchmark.md) lambda = 1 made the general corpus forget ~37% more on
    # every seed, learned a little less and cost ~20% more time, with no gain in domain
    # forgetting. Set 1.0 for the paper's full objective.
    contrast_weight: float = 0.0
    temperature: float = 0.05  # tau
    importance_sample_ratio: float = 0.25  # share of the domain's chunks used for importance
    importance_max_batches: int = 32
    # Dropout for the two proxy-KL views (and the contrastive positive) of a model with no
    # dropout of its own (Llama, Qwen, Gemma, Phi-3, any config with every dropout at 0):
    # applied by hooks inside those views only, never in training or evaluation. A model
    # with its own dropout keeps it and ignores this. 0 = refuse such models (KL = 0).
    importance_dropout: float = 0.1
    freeze_embeddings: bool = False
    freeze_layernorm: bool = False
    # DAS on units the paper leaves free: per-vocabulary-row importance of the word
    # embeddings (tied LM head included) and per-element importance of every norm layer,
    # each soft-masked like the other units. On by default: on the pretrained-base
    # benchmark (docs/benchmark.md) they cut forgetting from 61% to 43% of NCL's (every
    # seed) at 4% less learning; the paper's units alone did no better than random units.
    # Set both false for the paper's masking.
    mask_embeddings: bool = True
    mask_layernorm: bool = True
    # The share of units, per layer and unit kind, that the soft mask may protect: the
    # units with the highest accumulated importance keep it, the rest train freely. 1.0
    # (default) is the paper's rule, which protects every unit by its importance; EMax
    # drives that towards most units above 0.5 after a few domains (docs/benchmark.md).
    protection_budget: float = 1.0
    # evaluation and bookkeeping
    eval_fraction: float = 0.05
    eval_max_batches: int = 16
    checkpoint_every: int = 50
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    device: str = "auto"
    extra: dict[str, Any] = field(default_factory=dict)
    # precision and training loop (docs/engine.md, "Precision and training loop")
    save_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto = base's
    # "constant": the original schedule (linear warm-up, then constant); the others are
    # transformers.get_scheduler's. Warm-up (warmup_ratio of the stage) restarts every stage.
    lr_scheduler: Literal["constant", "linear", "cosine", "constant_with_warmup"] = "constant"
    max_grad_norm: float | None = 1.0  # 0 or null: no clipping
    gradient_checkpointing: bool = False  # recompute activations in backward (less memory)
    # each strategy's own parameters (its ``params`` dataclass, das_engine/strategies/), by
    # params class name, defaults filled in. Outside (JSON, --set, lineage.json) they are
    # flat keys (``ewc_lambda``): ``from_dict`` routes them here, ``to_dict`` flattens them.
    params: dict[str, StrategyParams] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        given = dict(self.params)
        self.params = {
            name: given.pop(name, None) or cls() for name, cls in params_classes().items()
        }
        if given:
            raise ConfigError(f"unknown strategy params: {', '.join(sorted(given))}")
        self.validate()

    def __getattr__(self, name: str) -> Any:
        """A strategy's flat parameter (``cfg.ewc_lambda``), read from its params."""
        owner = flat_fields().get(name) if not name.startswith("_") else None
        params = self.__dict__.get("params")
        if owner is None or params is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(params[owner], name)

    def strategy_params(self, strategy: str | None = None) -> StrategyParams | None:
        """The params of ``strategy`` (default: this config's), None if it declares none."""
        cls = params_for(strategy or self.strategy)
        return None if cls is None else self.params[cls.__name__]

    @classmethod
    def field_names(cls) -> list[str]:
        """Every key ``from_dict`` accepts: the general fields, then each strategy's."""
        general = [f.name for f in dataclasses.fields(cls) if f.name != "params"]
        return general + list(flat_fields())

    def extra_unit_kinds(self) -> tuple[str, ...]:
        """The EXTRA_KINDS this config measures and masks."""
        return tuple(
            k
            for k, on in (("embedding", self.mask_embeddings), ("layernorm", self.mask_layernorm))
            if on
        )

    # -- validation ---------------------------------------------------------------
    def validate(self) -> None:
        problems: list[dict] = []

        def bad(name: str, why: str) -> None:
            problems.append({"field": name, "message": why})

        def in_range(name: str, lo: float, hi: float, *, lo_open: bool = False) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                bad(name, "must be a finite number")
            elif (v <= lo if lo_open else v < lo) or v > hi:
                left = "(" if lo_open else "["
                bad(name, f"must be in {left}{lo}, {hi}], got {v}")

        names = strategy_names()
        if self.strategy not in names:
            bad("strategy", f"must be one of {', '.join(names)}, got {self.strategy!r}")
        if self.mask_mode not in MASK_MODES:
            bad("mask_mode", f"must be one of {', '.join(MASK_MODES)}")
        if self.normalization not in NORMALIZATIONS:
            bad("normalization", f"must be one of {', '.join(NORMALIZATIONS)}")
        if self.importance_control not in ("none", "permuted"):
            bad("importance_control", "must be one of none, permuted")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            bad("mixed_precision", "must be one of auto, no, bf16, fp16")
        in_range("learning_rate", 0.0, 1.0, lo_open=True)
        in_range("weight_decay", 0.0, 1.0)
        in_range("warmup_ratio", 0.0, 0.5)
        in_range("mlm_probability", 0.0, 0.9, lo_open=True)
        in_range("contrast_weight", 0.0, 100.0)
        in_range("temperature", 0.0, 10.0, lo_open=True)
        in_range("importance_sample_ratio", 0.0, 1.0, lo_open=True)
        in_range("importance_dropout", 0.0, 0.9)
        in_range("protection_budget", 0.0, 1.0, lo_open=True)
        in_range("eval_fraction", 0.0, 0.5, lo_open=True)
        in_range("epochs", 0.0, 1000.0, lo_open=True)
        for name, lo, hi in (
            ("batch_size", 1, 4096),
            ("grad_accum", 1, 1024),
            ("block_size", 8, 8192),
            ("importance_max_batches", 1, 100000),
            ("eval_max_batches", 1, 100000),
            ("checkpoint_every", 1, 10**7),
            ("seed", 0, 2**31 - 1),
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                bad(name, f"must be an integer in [{lo}, {hi}], got {v!r}")
        for name in ("freeze_embeddings", "freeze_layernorm", "mask_embeddings", "mask_layernorm"):
            if not isinstance(getattr(self, name), bool):
                bad(name, f"must be true or false, got {getattr(self, name)!r}")
        # precision and training loop
        if self.save_dtype not in ("auto", "float32", "bfloat16", "float16"):
            bad("save_dtype", "must be one of auto, float32, bfloat16, float16")
        if self.lr_scheduler not in LR_SCHEDULERS:
            bad("lr_scheduler", f"must be one of {', '.join(LR_SCHEDULERS)}")
        if self.max_grad_norm is not None:
            in_range("max_grad_norm", 0.0, 1e6)
        if not isinstance(self.gradient_checkpointing, bool):
            bad("gradient_checkpointing", "must be true or false")
        if self.max_steps is not None and (
            isinstance(self.max_steps, bool)
            or not isinstance(self.max_steps, int)
            or not 1 <= self.max_steps <= 10**7
        ):
            bad("max_steps", f"must be null or an integer in [1, 10000000], got {self.max_steps!r}")
        for params in self.params.values():
            problems.extend(params.problems())
        if problems:
            raise ConfigError(
                "invalid hyper-parameters: "
                + "; ".join(f"{p['field']} {p['message']}" for p in problems),
                details=problems,
            )

    # -- (de)serialisation ------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> TrainingConfig:
        """From flat keys (a request, ``--set``, ``lineage.json``): a strategy's parameter
        goes to its params, whichever strategy the config is for (stored configs hold all)."""
        data = dict(data or {})
        unknown = sorted(set(data) - set(cls.field_names()))
        if unknown:
            raise ConfigError(
                f"unknown hyper-parameter(s): {', '.join(unknown)}",
                details=[{"field": u, "message": "unknown hyper-parameter"} for u in unknown],
            )
        owners = flat_fields()
        grouped: dict[str, dict[str, Any]] = {}
        for key in [k for k in data if k in owners]:
            grouped.setdefault(owners[key], {})[key] = data.pop(key)
        params = {name: params_classes()[name](**values) for name, values in grouped.items()}
        try:
            return cls(**data, params=params)
        except TypeError as exc:  # pragma: no cover - dataclass signature mismatch
            raise ConfigError(str(exc)) from exc

    def to_dict(self) -> dict[str, Any]:
        """Flat: the general fields, then every strategy's parameters."""
        out = {
            f.name: copy.deepcopy(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if f.name != "params"
        }
        for params in self.params.values():
            out.update(dataclasses.asdict(params))
        return out

    def replace(self, **changes: Any) -> TrainingConfig:
        """A copy with ``changes`` (flat keys, strategy parameters included), validated."""
        return TrainingConfig.from_dict({**self.to_dict(), **changes})
