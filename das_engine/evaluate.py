"""Held-out LM loss of a model on a domain's evaluation split.

MLM masks are seeded by the batch number alone, so every stage's model is scored on the
very same masked positions: entries of the loss matrix are comparable across stages.
With several processes, batch b is scored by rank b % world and the sums are all-reduced:
every rank gets the single-process figure.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from das_engine import distributed
from das_engine.data import ChunkStore
from das_engine.objective import Batcher, lm_forward
from das_engine.units import UnitMap

EVAL_SEED = 20230203


@torch.no_grad()
def heldout_loss(
    model: nn.Module,
    unit_map: UnitMap,
    store: ChunkStore,
    batcher: Batcher,
    *,
    batch_size: int,
    max_batches: int,
) -> float:
    """Token-weighted mean loss over at most ``max_batches`` batches of the split."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for b, start in enumerate(range(0, len(store), batch_size)):
            if b >= max_batches:
                break
            if not distributed.owns(b):
                continue
            rows = store.rows(range(start, min(start + batch_size, len(store))))
            batch = batcher(rows["input_ids"], rows["attention_mask"], seed=EVAL_SEED + b)
            batch = {k: v.to(device) for k, v in batch.items()}
            out = lm_forward(model, unit_map, batch)
            total += float(out.loss) * out.n_predicted
            count += out.n_predicted
    finally:
        model.train(was_training)
    total, count = distributed.sum_over_ranks([total, count])
    return total / count if count else math.nan
