"""Training configuration as data (a dataclass), validated once, serialised with the lineage."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from das_engine.errors import ConfigError

STRATEGIES = ("das", "ncl", "one", "kd", "ewc", "replay", "adapter")
MASK_MODES = ("update", "gradient")
NORMALIZATIONS = ("paper", "one_sided", "rank")


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
    # dropout of its own (Llama, Mistral, Qwen2, any config with every dropout at 0):
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
    # evaluation and bookkeeping
    eval_fraction: float = 0.05
    eval_max_batches: int = 16
    checkpoint_every: int = 50
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    device: str = "auto"
    extra: dict[str, Any] = field(default_factory=dict)
    # baselines (strategies kd, ewc, replay, adapter)
    kd_weight: float = 1.0  # KD: weight of the MSE to the previous model's last hidden states
    ewc_lambda: float = 100.0  # EWC: penalty lambda/2 * sum F (theta - theta*)^2
    ewc_gamma: float = 0.9  # EWC: online decay of the accumulated Fisher
    ewc_fisher_samples: int = 64  # EWC: chunks (one backward each) for a domain's Fisher
    replay_buffer_size: int = 256  # replay: chunk ids kept (with their stored outputs)
    replay_alpha: float = 0.5  # replay (DER++): weight of the stored-output matching
    replay_beta: float = 0.5  # replay (DER++): weight of the LM loss on replayed chunks
    adapter_rank: int = 8  # adapter: LoRA rank of every adapted projection
    adapter_alpha: float = 16.0  # adapter: LoRA scaling numerator (scale = alpha / rank)

    def __post_init__(self) -> None:
        self.validate()

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

        if self.strategy not in STRATEGIES:
            bad("strategy", f"must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
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
        in_range("eval_fraction", 0.0, 0.5, lo_open=True)
        in_range("epochs", 0.0, 1000.0, lo_open=True)
        in_range("kd_weight", 0.0, 1e4)
        in_range("ewc_lambda", 0.0, 1e12)
        in_range("ewc_gamma", 0.0, 1.0)
        in_range("replay_alpha", 0.0, 1e4)
        in_range("replay_beta", 0.0, 1e4)
        in_range("adapter_alpha", 0.0, 1e4, lo_open=True)
        for name, lo, hi in (
            ("batch_size", 1, 4096),
            ("grad_accum", 1, 1024),
            ("block_size", 8, 8192),
            ("importance_max_batches", 1, 100000),
            ("eval_max_batches", 1, 100000),
            ("checkpoint_every", 1, 10**7),
            ("seed", 0, 2**31 - 1),
            ("ewc_fisher_samples", 1, 100000),
            ("replay_buffer_size", 1, 10**6),
            ("adapter_rank", 1, 4096),
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                bad(name, f"must be an integer in [{lo}, {hi}], got {v!r}")
        for name in ("freeze_embeddings", "freeze_layernorm", "mask_embeddings", "mask_layernorm"):
            if not isinstance(getattr(self, name), bool):
                bad(name, f"must be true or false, got {getattr(self, name)!r}")
        if self.max_steps is not None and (
            isinstance(self.max_steps, bool)
            or not isinstance(self.max_steps, int)
            or not 1 <= self.max_steps <= 10**7
        ):
            bad("max_steps", f"must be null or an integer in [1, 10000000], got {self.max_steps!r}")
        if problems:
            raise ConfigError(
                "invalid hyper-parameters: "
                + "; ".join(f"{p['field']} {p['message']}" for p in problems),
                details=problems,
            )

    # -- (de)serialisation ------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> TrainingConfig:
        data = dict(data or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"unknown hyper-parameter(s): {', '.join(unknown)}",
                details=[{"field": u, "message": "unknown hyper-parameter"} for u in unknown],
            )
        try:
            return cls(**data)
        except TypeError as exc:  # pragma: no cover - dataclass signature mismatch
            raise ConfigError(str(exc)) from exc

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainingConfig:
        return dataclasses.replace(self, **changes)
