"""Contrastive knowledge integration (InfoNCE with cosine similarity).

For anchor o_i the positive is o_i+ (a second dropout view of the *same* input x_i);
the negatives are every previous-knowledge view o_prev_j (gates set to I_acc) and the
other examples' positives o_k+ (k != i). The research code paired two different chunks
via ``repeat`` + ``view`` (defect 2); here row i of each tensor always comes from x_i.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(
    anchor: torch.Tensor, positive: torch.Tensor, previous: torch.Tensor, temperature: float = 0.05
) -> torch.Tensor:
    """L = -mean_i log( exp(s(o_i, o_i+)/tau) / sum_c exp(s(o_i, c)/tau) ), all [B, E]."""
    if not (anchor.shape == positive.shape == previous.shape):
        raise ValueError("anchor, positive and previous views must have the same shape [B, E]")
    a = F.normalize(anchor.float(), dim=-1)
    candidates = torch.cat(
        [F.normalize(positive.float(), dim=-1), F.normalize(previous.float(), dim=-1)]
    )
    logits = a @ candidates.T / temperature  # [B, 2B]: columns 0..B-1 are positives
    target = torch.arange(anchor.shape[0], device=anchor.device)
    return F.cross_entropy(logits, target)
