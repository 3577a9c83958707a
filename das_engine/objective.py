"""The language-modelling objective (MLM or causal) with logits computed only where a
label exists, plus the last hidden states that the contrastive loss and proxy-KL use."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from das_engine.units import UnitMap

IGNORE = -100


@dataclass
class LMOutput:
    loss: torch.Tensor
    hidden: torch.Tensor  # last hidden states [B, T, D]
    n_predicted: int


class Batcher:
    """Turns token chunks into model inputs; MLM masking is seeded per call, so a step
    replayed after a resume sees exactly the same masked positions."""

    def __init__(self, tokenizer, objective: str, mlm_probability: float = 0.15) -> None:
        self.objective = objective
        self.mlm_probability = mlm_probability
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.mask_id = tokenizer.mask_token_id
        self.vocab_size = len(tokenizer)
        self.special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
        if objective == "mlm" and self.mask_id is None:
            raise ValueError("an MLM objective needs a tokenizer with a mask token")

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, seed: int) -> dict:
        input_ids = input_ids.long()
        attention_mask = attention_mask.long()
        if self.objective == "clm":
            labels = input_ids.masked_fill(attention_mask == 0, IGNORE)
            return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        gen = torch.Generator().manual_seed(int(seed))
        special = torch.isin(input_ids, self.special_ids) | (attention_mask == 0)
        probs = torch.full(input_ids.shape, self.mlm_probability).masked_fill(special, 0.0)
        chosen = torch.bernoulli(probs, generator=gen).bool()
        labels = input_ids.masked_fill(~chosen, IGNORE)
        inputs = input_ids.clone()
        # 80% [MASK], 10% random token, 10% unchanged (BERT's recipe)
        roll = torch.rand(input_ids.shape, generator=gen)
        inputs[chosen & (roll < 0.8)] = self.mask_id
        rand_pos = chosen & (roll >= 0.8) & (roll < 0.9)
        random_tokens = torch.randint(self.vocab_size, input_ids.shape, generator=gen)
        inputs[rand_pos] = random_tokens[rand_pos]
        return {"input_ids": inputs, "attention_mask": attention_mask, "labels": labels}


def lm_forward(model: nn.Module, unit_map: UnitMap, batch: dict) -> LMOutput:
    """Loss of the LM head on labelled positions only (2-3x faster than full logits)."""
    out = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return lm_loss(model, unit_map, out.last_hidden_state, batch["labels"])


def lm_loss(
    model: nn.Module, unit_map: UnitMap, hidden: torch.Tensor, labels: torch.Tensor
) -> LMOutput:
    """The LM loss of last hidden states ``hidden`` [B, T, D] against ``labels`` [B, T]
    (causal: position t predicts label t+1); a strategy that builds its own inputs (ELLE's
    prompts) scores its states here."""
    if unit_map.objective == "clm":
        states, targets = hidden[:, :-1], labels[:, 1:]
    else:
        states, targets = hidden, labels
    keep = targets != IGNORE
    n = int(keep.sum())
    if n == 0:
        return LMOutput(hidden.sum() * 0.0, hidden, 0)
    logits = unit_map.logits(model, states[keep])
    loss = F.cross_entropy(logits.float(), targets[keep])
    return LMOutput(loss, hidden, n)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states over real (non-padding) tokens: [B, T, D] -> [B, D]."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
