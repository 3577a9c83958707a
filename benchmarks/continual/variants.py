"""The benchmark's variants: a name, a strategy and the config fields it changes.

Every variant of a benchmark gets the same data, seeds and token budget; a variant only
names what differs from the common configuration. The controls the issue asks for are
always added (see :func:`expand`): DAS with importance permuted onto random units and NCL's
learning-rate sweep (its frontier of forgetting against new-domain learning); by default
also DAS with gradient masking and the normalisation variants (the studies).
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: strategies that train as DAS does (soft-masking and importance), pinned alike
DAS_STRATEGIES = ("das", "das_merge", "das_replay")


@dataclass(frozen=True)
class Variant:
    name: str
    strategy: str
    overrides: dict = field(default_factory=dict)
    lr_scale: float = 1.0  # multiplies the common learning rate
    note: str = ""

    def config(self, common: dict, seed: int) -> dict:
        # DAS variants pin the paper's lambda = 1 and the paper's units (no embedding rows,
        # no norms) unless they say otherwise, so results do not move when the engine's
        # defaults change
        paper = (
            {"contrast_weight": 1.0, "mask_embeddings": False, "mask_layernorm": False}
            if self.strategy in DAS_STRATEGIES
            else {}
        )
        cfg = {**paper, **common, **self.overrides, "strategy": self.strategy, "seed": seed}
        cfg["learning_rate"] = common.get("learning_rate", 1e-4) * self.lr_scale
        return cfg

    def to_dict(self) -> dict:
        return {
            "strategy": self.strategy,
            "overrides": dict(self.overrides),
            "lr_scale": self.lr_scale,
            "note": self.note,
        }


NCL_LR_SWEEP = (1.0, 0.5, 0.25, 0.1)


def _ncl(scale: float) -> Variant:
    name = "ncl" if scale == 1.0 else f"ncl_lr{scale:g}"
    return Variant(name, "ncl", lr_scale=scale, note=f"NCL, learning rate x{scale:g}")


def _das(
    name: str, note: str, strategy: str = "das", lr_scale: float = 1.0, **overrides
) -> Variant:
    """A DAS variant: update masking and the paper's normalisation unless it says otherwise."""
    return Variant(
        name,
        strategy,
        {"mask_mode": "update", "normalization": "paper", **overrides},
        lr_scale=lr_scale,
        note=note,
    )


#: the engine default's own learning-rate sweep (x1 is ``das_emb_ln``): does DAS learn
#: less only because its mask shrinks the updates, and does a larger rate buy the learning
#: back at less forgetting than NCL's?
DAS_LR_SWEEP = (2.0, 0.5)
#: protection budgets studied (share of units per layer and kind the mask may protect)
BUDGETS = (0.5, 0.25)
#: the engine's default DAS (embedding rows and norms masked), which the sweeps start from
ENGINE_UNITS = {"mask_embeddings": True, "mask_layernorm": True}


def _das_lr(scale: float) -> Variant:
    return _das(
        f"das_emb_ln_lr{scale:g}",
        f"das_emb_ln, learning rate x{scale:g}",
        lr_scale=scale,
        **ENGINE_UNITS,
    )


def _budget(share: float, permuted: bool = False) -> Variant:
    base = f"das_emb_ln_budget{share:g}"
    note = f"das_emb_ln protecting at most the top {share:.0%} of units per layer and kind"
    extra = {"importance_control": "permuted"} if permuted else {}
    return _das(
        base + ("_permuted" if permuted else ""),
        f"control for {base}" if permuted else note,
        protection_budget=share,
        **ENGINE_UNITS,
        **extra,
    )


KNOWN: dict[str, Variant] = {
    v.name: v
    for v in (
        *(_ncl(s) for s in NCL_LR_SWEEP),
        *(_das_lr(s) for s in DAS_LR_SWEEP),
        *(_budget(b, permuted) for b in BUDGETS for permuted in (False, True)),
        Variant("one", "one", note="each domain trained from the base"),
        _das("das", "DAS, update masking, paper normalisation |tanh(z)|"),
        _das(
            "das_permuted",
            "control: das with importance shuffled onto random units",
            importance_control="permuted",
        ),
        _das("das_gradient", "DAS, gradient masking (the paper's rule)", mask_mode="gradient"),
        _das("das_one_sided", "DAS, update masking, tanh(max(z, 0))", normalization="one_sided"),
        _das(
            "das_one_sided_permuted",
            "control for das_one_sided",
            normalization="one_sided",
            importance_control="permuted",
        ),
        _das("das_rank", "DAS, update masking, rank quantile", normalization="rank"),
        _das(
            "das_rank_permuted",
            "control for das_rank",
            normalization="rank",
            importance_control="permuted",
        ),
        _das(
            "das_freeze_emb",
            "DAS with the word embeddings (tied to the LM head) frozen",
            freeze_embeddings=True,
        ),
        _das(
            "das_freeze_emb_ln",
            "DAS with embeddings and LayerNorms frozen",
            freeze_embeddings=True,
            freeze_layernorm=True,
        ),
        _das(
            "das_emb_ln",
            "DAS also soft-masking embedding rows (per-token importance) and norm elements",
            mask_embeddings=True,
            mask_layernorm=True,
        ),
        _das(
            "das_emb_ln_permuted",
            "control for das_emb_ln",
            mask_embeddings=True,
            mask_layernorm=True,
            importance_control="permuted",
        ),
        _das(
            "das_emb",
            "DAS also soft-masking embedding rows (per-token importance); norms free",
            mask_embeddings=True,
        ),
        _das(
            "das_ln",
            "DAS also soft-masking norm elements; embeddings free",
            mask_layernorm=True,
        ),
        _das(
            "das_emb_ln_rank",
            "das_emb_ln with rank-quantile normalisation",
            normalization="rank",
            mask_embeddings=True,
            mask_layernorm=True,
        ),
        _das(
            "das_emb_ln_rank_permuted",
            "control for das_emb_ln_rank",
            normalization="rank",
            importance_control="permuted",
            **ENGINE_UNITS,
        ),
        _das(
            "das_emb_ln_one_sided",
            "das_emb_ln with one-sided normalisation tanh(max(z, 0))",
            normalization="one_sided",
            **ENGINE_UNITS,
        ),
        _das(
            "das_emb_ln_one_sided_permuted",
            "control for das_emb_ln_one_sided",
            normalization="one_sided",
            importance_control="permuted",
            **ENGINE_UNITS,
        ),
        _das(
            "das_no_contrast",
            "DAS soft-masking only (lambda = 0)",
            contrast_weight=0.0,
        ),
        _das(
            "das_no_contrast_permuted",
            "control for das_no_contrast",
            contrast_weight=0.0,
            importance_control="permuted",
        ),
        Variant(
            "ncl_freeze_emb",
            "ncl",
            {"freeze_embeddings": True},
            note="NCL with the word embeddings frozen",
        ),
        Variant("kd", "kd", note="distil the previous stage's last hidden states"),
        Variant(
            "ewc",
            "ewc",
            {"ewc_lambda": 500.0},
            note="online EWC, diagonal Fisher; lambda 500: the penalty at NCL's drift after"
            " 48 steps is ~0.5 nats on the benchmark base",
        ),
        Variant("replay", "replay", note="DER++-style replay of stored chunk ids + outputs"),
        Variant(
            "adapter",
            "adapter",
            lr_scale=10.0,
            note="Adapter-ONE: per-domain LoRA on a frozen backbone (learning rate x10)",
        ),
        Variant(
            "cpt",
            "cpt",
            lr_scale=10.0,
            note="CPT: CL-plugins with HAT task masks on a frozen backbone (learning rate x10)",
        ),
        # current practice for continued pre-training (issue 11): replay mixing with LR
        # re-warming, and merging each stage back into the model it came from
        Variant(
            "replay_mix",
            "replay_mix",
            note="Ibrahim et al. 2024: 5% earlier-domain chunks in every batch, LR re-warmed"
            " (5% of the stage) and cosine re-decayed to 10% every stage",
        ),
        Variant(
            "ncl_rewarm",
            "ncl",
            {"lr_scheduler": "cosine", "warmup_ratio": 0.05},
            note="NCL with replay_mix's LR re-warming and re-decay, no replay (its control)",
        ),
        Variant("merge", "merge", note="task arithmetic with the previous stage, alpha 0.5"),
        Variant(
            "elle", "elle", note="ELLE: FFN +25% per stage, recovery warm-up, prompts, 5% replay"
        ),
        Variant(
            "merge_ties",
            "merge",
            {"merge_method": "ties", "merge_density": 0.2},
            note="TIES with the previous stage: the top 20% of each tensor's change, alpha 0.5",
        ),
        _das(
            "das_rewarm",
            "DAS with per-stage LR re-warming and cosine re-decay (no code: the schedule)",
            lr_scheduler="cosine",
            warmup_ratio=0.05,
        ),
        _das("das_merge", "DAS training, then task arithmetic, alpha 0.5", "das_merge"),
        _das(
            "das_replay",
            "das_emb_ln on replay_mix's batches (5% earlier-domain chunks) with its LR"
            " re-warming and re-decay",
            "das_replay",
            **ENGINE_UNITS,
        ),
        _das(
            "das_replay_lr2",
            "das_replay, learning rate x2 (the mask and the re-decay learn less than NCL)",
            "das_replay",
            lr_scale=2.0,
            **ENGINE_UNITS,
        ),
        _das(
            "das_replay_permuted",
            "control for das_replay",
            "das_replay",
            importance_control="permuted",
            **ENGINE_UNITS,
        ),
        _das(
            "das_merge_permuted",
            "control for das_merge",
            "das_merge",
            importance_control="permuted",
        ),
    )
}

#: what the issue requires next to any variant: DAS, its random-unit control, NCL's
#: frontier and DAS's own learning-rate sweep
CONTROLS = (
    "das_permuted",
    *(_ncl(s).name for s in NCL_LR_SWEEP),
    "das",
    *(_das_lr(s).name for s in DAS_LR_SWEEP),
)
#: the mask-mode and normalisation studies, added unless ``studies`` is off
STUDIES = ("das_gradient", "das_one_sided", "das_rank")


def parse(spec: str) -> Variant:
    """A known variant name, or ``strategy[:key=value,key=value]`` for an ad-hoc one."""
    if spec in KNOWN:
        return KNOWN[spec]
    strategy, _, rest = spec.partition(":")
    overrides: dict = {}
    for item in filter(None, rest.split(",")):
        key, _, raw = item.partition("=")
        overrides[key] = _value(raw)
    lr_scale = float(overrides.pop("lr_scale", 1.0))
    return Variant(spec, strategy, overrides, lr_scale, note="ad hoc")


def _value(raw: str):
    low = raw.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return raw


def expand(specs: list[str], controls: bool = True, studies: bool = True) -> list[Variant]:
    """The requested variants plus (unless ``controls`` is off) the mandatory controls and
    (unless ``studies`` is off too) the mask-mode and normalisation studies."""
    names = list(specs) + (list(CONTROLS) if controls else [])
    names += list(STUDIES) if controls and studies else []
    out: dict[str, Variant] = {}
    for spec in names:
        v = parse(spec)
        out.setdefault(v.name, v)
    return list(out.values())
