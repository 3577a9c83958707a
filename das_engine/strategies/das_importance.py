"""DAS's per-stage half (spec, "Step 0" and "After training domain t"): the importance the
soft mask and the previous-knowledge view are built from.

    stage 1:     I_general from the proxy KL of the base model (once per lineage)
    stage t:     I_acc(t-1) = EMax(I_general, I(1), ..., I(t-1))  (stored per stage)
    after t:     I(t) from the domain's own loss; I_acc(t) = EMax(I_acc(t-1), I(t))

Files (read back by later stages, listed by ``Lineage.artifacts``):
``<lineage>/importance/general.safetensors`` and, per stage,
``importance/{domain,accumulated}.safetensors``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from das_engine import distributed
from das_engine.bases import load_model
from das_engine.config import TrainingConfig
from das_engine.data import ChunkStore
from das_engine.importance import Importance, domain_importance, general_importance
from das_engine.objective import Batcher
from das_engine.progress import ProgressEvent
from das_engine.strategies.base import StageContext
from das_engine.units import build_unit_map

GENERAL_FILE = Path("importance") / "general.safetensors"  # under the lineage
DOMAIN_FILE = Path("importance") / "domain.safetensors"  # under a stage
ACCUMULATED_FILE = Path("importance") / "accumulated.safetensors"  # under a stage


def importance_batches(
    config: TrainingConfig, store: ChunkStore, batcher: Batcher, device: torch.device
) -> list[dict]:
    """A seeded sample of the training split (``importance_sample_ratio``, at most
    ``importance_max_batches``): the same batches on a resume, and for I_general and I(t)."""
    cfg = config
    n = max(1, int(round(cfg.importance_sample_ratio * len(store))))
    n = min(n, cfg.importance_max_batches * cfg.batch_size, len(store))
    torch.manual_seed(cfg.seed + 13)  # proxy-KL dropout masks: reproducible on resume
    gen = torch.Generator().manual_seed(cfg.seed + 17)
    picked = torch.randperm(len(store), generator=gen)[:n].tolist()
    batches = []
    for j in range(0, n, cfg.batch_size):
        rows = store.rows(picked[j : j + cfg.batch_size])
        b = batcher(rows["input_ids"], rows["attention_mask"], seed=cfg.seed + 31 + j)
        batches.append({k: v.to(device) for k, v in b.items()})
    return batches


def accumulated_before(ctx: StageContext) -> Importance:
    """I_acc(t-1): the previous stage's snapshot (one load), or rebuilt from I_general and
    the earlier stages' I(i) when there is none or it lacks a unit kind asked for now."""
    extra = ctx.config.extra_unit_kinds()
    previous = ctx.previous_stage_dirs
    acc_path = previous[-1] / ACCUMULATED_FILE if previous else None
    if acc_path is not None and acc_path.exists():
        accumulated = Importance.load(acc_path)
        if set(extra) <= accumulated.kinds:
            return accumulated
    accumulated = _general(ctx)
    for stage_dir in previous:  # a lineage switched to DAS later: fold earlier stages in
        dom = stage_dir / DOMAIN_FILE
        if dom.exists():
            accumulated = accumulated.emax(Importance.load(dom))
    return accumulated


def _general(ctx: StageContext) -> Importance:
    """I_general: the lineage's snapshot, measured on the base model when missing."""
    cfg, extra = ctx.config, ctx.config.extra_unit_kinds()
    assert ctx.lineage_dir is not None and ctx.train_store is not None and ctx.batcher
    general_path = ctx.lineage_dir / GENERAL_FILE
    general = Importance.load(general_path) if general_path.exists() else None
    if general is not None and set(extra) <= general.kinds:
        return general
    ctx.progress(ProgressEvent("importance", 0, 1, message="general importance (proxy KL)"))
    device = ctx.device
    assert ctx.base_dir is not None and ctx.precision is not None
    base_model = ctx.model if ctx.from_base else load_model(ctx.base_dir).to(device)
    batches = importance_batches(cfg, ctx.train_store, ctx.batcher, device)
    with ctx.precision.autocast_unscaled():
        general = general_importance(
            base_model,
            build_unit_map(base_model),
            batches,
            cfg.normalization,
            extra,
            dropout=cfg.importance_dropout,
        )
    if distributed.is_main():  # every rank holds the same all-reduced values
        general.save(general_path, "general", {"normalization": cfg.normalization})
    return general


def record_domain(ctx: StageContext, model: nn.Module, accumulated: Importance) -> dict:
    """I(t) from the domain's own loss, then I_acc(t) = EMax(I_acc(t-1), I(t)); both saved
    in the stage. Returns their summary statistics for ``stage.json``."""
    cfg = ctx.config
    assert ctx.stage_dir is not None and ctx.train_store is not None and ctx.batcher
    assert ctx.precision is not None
    ctx.progress(ProgressEvent("importance", 0, 1, message="domain importance"))
    batches = importance_batches(cfg, ctx.train_store, ctx.batcher, ctx.device)
    with ctx.precision.autocast_unscaled():
        dom = domain_importance(
            model, ctx.unit_map, batches, cfg.normalization, cfg.extra_unit_kinds()
        )
    updated = accumulated.emax(dom)
    if distributed.is_main():
        dom.save(
            ctx.stage_dir / DOMAIN_FILE,
            "domain",
            {"normalization": cfg.normalization, "domain": ctx.domain},
        )
        updated.save(
            ctx.stage_dir / ACCUMULATED_FILE,
            "accumulated",
            {"normalization": cfg.normalization},
        )
    return {"domain": dom.stats(), "accumulated": updated.stats()}
