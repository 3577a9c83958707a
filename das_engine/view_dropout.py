"""Dropout for the two-view objectives on models that have none of their own.

The proxy-KL importance (spec, step 0) and the contrastive positive compare two dropout
views of the same input. Llama, Qwen, Gemma, Phi-3 (any config with every dropout at 0)
have no dropout, so both views would be identical. ``view_dropout`` then adds dropout by
forward hooks, only inside its ``with`` block, at the places where GPT-2 and BERT apply
their own: the word-embedding output and, in every layer, the outputs of the attention
output projection and of the FFN output projection (the two residual branches). The
hooks are removed on exit; no module, parameter or config value is ever changed.

The rule: a model with dropout of its own (an ``nn.Dropout`` with p > 0, or a config
``attention_dropout`` > 0, which Llama-style attention applies functionally) keeps its own
dropout and gets no hooks; only a dropout-free model gets ``importance_dropout``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from das_engine.families import text_config
from das_engine.units import UnitMap


def native_dropout(model: nn.Module) -> float:
    """The largest dropout probability the model applies in train mode (0 = none)."""
    p = max((m.p for m in model.modules() if isinstance(m, nn.Dropout)), default=0.0)
    config = getattr(model, "config", None)
    config = text_config(config) if config is not None else None
    return max(float(p), float(getattr(config, "attention_dropout", 0.0) or 0.0))


def injected_dropout(model: nn.Module, requested: float) -> float:
    """The dropout ``view_dropout`` should add: ``requested`` only on a dropout-free model."""
    return 0.0 if native_dropout(model) > 0 else float(requested)


@contextmanager
def view_dropout(
    model: nn.Module, unit_map: UnitMap, p: float, first_row: int = 0
) -> Iterator[None]:
    """Apply dropout ``p`` (inverted scaling, fresh mask per call) at the hook points.

    ``first_row`` > 0 leaves rows ``[:first_row]`` of the batch untouched: DAS runs its two
    contrastive views as one doubled batch and only the positive half gets dropout, so the
    LM loss stays the model's own (dropout-free) training objective. ``p == 0`` is a no-op.
    """
    if p <= 0:
        yield
        return

    def hook(_module, _args, output):
        if first_row <= 0:
            return F.dropout(output, p, training=True)
        kept, dropped = output[:first_row], output[first_row:]
        return torch.cat([kept, F.dropout(dropped, p, training=True)])

    fam = unit_map.family
    modules = [model.get_input_embeddings()]
    for i in range(unit_map.num_layers):
        modules += [unit_map.module(i, fam.attn_out), unit_map.module(i, fam.ffn_out)]
    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
