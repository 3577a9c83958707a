"""ELLE (Qin et al. 2022, "ELLE: Efficient Lifelong Pre-training for Emerging Data"):
grow the model before each new domain without changing what it computes, recover the
old function on replayed data, then train the new domain with a domain prompt and replay.

Per stage (from stage 2 on; also stage 1 with ``elle_expand_first_stage``):

1. Growth (das_engine/expansion.py): every FFN widens by ``elle_ffn_growth`` (units
   duplicated, outgoing weights split: the same function) and ``elle_new_layers`` layers
   are inserted as copies of existing ones with zeroed output projections (identity for
   pre-LN decoders, approximate for post-LN encoders).
2. Function-recovery warm-up: ``elle_warmup_steps`` steps on the replay memory training
   the grown model to match the pre-growth model's logits (KL or MSE). Skipped when a
   resumed stage reloads its step checkpoint (which holds the warmed-up weights).
3. Training with a domain prompt: ``elle_prompt_tokens`` trainable vectors prepended to
   the input embeddings (attention mask widened, labels kept on the real tokens); replayed
   rows (a bounded reservoir of earlier chunks, replay_mix's buffer) get their own
   domain's prompt, frozen.

The stage checkpoint is the grown model alone (a standard config with the larger
``intermediate_size`` / layer count, no prompt inside); the prompts of every domain so far
are in ``<stage>/strategy/elle_prompts.safetensors`` (see :func:`load_prompts` and
:func:`prompted_inputs`), the growth in ``<stage>/strategy/elle.json``.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from das_engine.errors import IncompatibleConfigError
from das_engine.expansion import deepen, parameter_count, recover_function, widen_ffn
from das_engine.objective import lm_forward, lm_loss
from das_engine.storage import read_json, write_json
from das_engine.strategies.base import StageContext, Strategy
from das_engine.strategies.replay import stage_name
from das_engine.strategies.replay_mix import ReplayMix
from das_engine.strategy_params import StrategyParams, param
from das_engine.units import build_unit_map

PROMPTS_FILE = "elle_prompts.safetensors"
GROWTH_FILE = "elle.json"
PROMPT = "elle_domain_prompt"  # the trainable prompt, a parameter of the model while training
#: families whose positions are learned embeddings (prompts take positions from the block)
_LEARNED_POSITIONS = ("bert", "roberta", "xlm-roberta", "camembert", "gpt2")


@dataclass
class ElleParams(StrategyParams):
    elle_ffn_growth: float = param(
        0.25,
        "Strategy `elle`: share by which every FFN intermediate width grows at each "
        "expansion (0.25 = +25%; 0 = no width growth).",
        minimum=0.0,
        maximum=4.0,
    )
    elle_new_layers: int = param(
        0,
        "Strategy `elle`: layers inserted at each expansion (copies of evenly spaced layers, "
        "output projections zeroed).",
        minimum=0,
        maximum=64,
    )
    elle_expand_first_stage: bool = param(
        False,
        "Strategy `elle`: also grow the base before the first domain (false: from stage 2 on).",
    )
    elle_split_noise: float = param(
        0.01,
        "Strategy `elle`: noise on the split outgoing weights (times their std; sums to zero "
        "over a unit's copies, so the function is kept).",
        minimum=0.0,
        maximum=1.0,
    )
    elle_warmup_steps: int = param(
        20,
        "Strategy `elle`: function-recovery steps on the replay memory after each expansion.",
        minimum=0,
        maximum=100_000,
    )
    elle_warmup_loss: Literal["kl", "mse"] = param(
        "kl",
        "Strategy `elle`: the warm-up's distance to the pre-expansion model's logits.",
    )
    elle_prompt_tokens: int = param(
        8,
        "Strategy `elle`: trainable domain-prompt vectors prepended to each input (0 = none).",
        minimum=0,
        maximum=256,
    )
    elle_replay_ratio: float = param(
        0.05,
        "Strategy `elle`: share of each batch's examples replayed from earlier domains.",
        minimum=0.0,
        maximum=0.9,
    )
    elle_buffer_size: int = param(
        4096,
        "Strategy `elle`: earlier-domain chunk ids kept in the replay memory (a uniform "
        "reservoir sample).",
        minimum=1,
        maximum=10**7,
    )


def load_prompts(stage_dir: Path) -> dict[str, torch.Tensor]:
    """Every domain's prompt saved by an ``elle`` stage: domain name -> [tokens, hidden]."""
    path = Path(stage_dir) / "strategy" / PROMPTS_FILE
    if not path.exists():
        return {}
    domains = load_prompts_index(path)
    return {domains[k]: v for k, v in load_file(str(path)).items()}


def prompted_inputs(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompts: torch.Tensor
) -> dict[str, torch.Tensor]:
    """``inputs_embeds`` and ``attention_mask`` with ``prompts`` ([n, D] or per row
    [B, n, D]) before each row's token embeddings: pass them to the model instead of
    ``input_ids``; the outputs of the real tokens are the last T positions."""
    emb = model.get_input_embeddings()(input_ids)
    if prompts.dim() == 2:
        prompts = prompts.expand(input_ids.shape[0], -1, -1)
    prompts = prompts.to(emb.dtype)
    ones = attention_mask.new_ones(attention_mask.shape[0], prompts.shape[1])
    return {
        "inputs_embeds": torch.cat([prompts, emb], dim=1),
        "attention_mask": torch.cat([ones, attention_mask], dim=1),
    }


def _domain_of(stage_dir: Path) -> str:
    meta = stage_dir / "stage.json"
    name = read_json(meta).get("name") if meta.exists() else None
    return name or stage_name(stage_dir)


class Elle(ReplayMix):
    name = "elle"
    params = ElleParams

    @property
    def replay_ratio(self) -> float:
        return self.params.elle_replay_ratio

    @property
    def buffer_size(self) -> int:
        return self.params.elle_buffer_size

    # ELLE keeps the config's LR schedule (replay_mix's re-warming is not part of it)
    build_scheduler = Strategy.build_scheduler

    def prepare(self, ctx: StageContext) -> None:
        super().prepare(ctx)
        p, model = self.params, ctx.model
        position = len(ctx.previous_stage_dirs) + 1
        self._growth: dict = {"parameters_before": parameter_count(model), "expanded": False}
        if position > 1 or p.elle_expand_first_stage:
            self._grow(ctx, seed=self.config.seed * 1_009 + position)
        self._growth.update(
            parameters=parameter_count(model),
            intermediate_size=ctx.unit_map.intermediate_size,
            num_layers=ctx.unit_map.num_layers,
        )
        self.stage = stage_name(ctx.stage_dir) if ctx.stage_dir else "current"
        self.prompts: dict[str, torch.Tensor] = {}  # earlier domains', by stage (frozen)
        self.domains: dict[str, str] = {}
        if ctx.previous_stage_dirs:
            path = ctx.previous_stage_dirs[-1] / "strategy" / PROMPTS_FILE
            if path.exists():
                self.prompts = load_file(str(path))
                self.domains = load_prompts_index(path)
        if p.elle_prompt_tokens:
            self._add_prompt(ctx)

    def _resuming(self, ctx: StageContext) -> bool:
        root = ctx.stage_dir / "checkpoints" if ctx.stage_dir else None
        return root is not None and any(root.glob("step-*/trainer.json"))

    def _grow(self, ctx: StageContext, seed: int) -> None:
        p, model = self.params, ctx.model
        warm = p.elle_warmup_steps > 0 and not self._resuming(ctx)
        teacher = copy.deepcopy(model) if warm else None
        width = ctx.unit_map.intermediate_size
        new_width = round(width * (1 + p.elle_ffn_growth))
        if new_width > width:
            widen_ffn(model, new_width, noise=p.elle_split_noise, seed=seed)
        if p.elle_new_layers:
            deepen(model, p.elle_new_layers)
        ctx.unit_map = build_unit_map(model)
        if teacher is not None:
            gaps = recover_function(
                model,
                teacher,
                self._warmup_batches(ctx),
                steps=p.elle_warmup_steps,
                lr=self.config.learning_rate,
                kind=p.elle_warmup_loss,
            )
            if gaps:  # the gap to the pre-growth model: first and last warm-up step
                self._growth.update(warmup_steps=len(gaps), warmup_gap=[gaps[0], gaps[-1]])
        self._growth["expanded"] = True

    def _warmup_batches(self, ctx: StageContext) -> list[dict]:
        """Up to 8 batches of the replay memory (the new domain's chunks when it is empty,
        i.e. growing the base before stage 1)."""
        size, device = self.config.batch_size, ctx.device
        entries = self.buffer["entries"][: 8 * size]
        if entries:
            groups = [self._rows(entries[j : j + size]) for j in range(0, len(entries), size)]
        else:
            n = min(len(ctx.train_store), 8 * size)
            groups = [ctx.train_store.rows(range(j, min(j + size, n))) for j in range(0, n, size)]
        return [
            {
                "input_ids": g["input_ids"].long().to(device),
                "attention_mask": g["attention_mask"].long().to(device),
            }
            for g in groups
        ]

    def _add_prompt(self, ctx: StageContext) -> None:
        model, n = ctx.model, self.params.elle_prompt_tokens
        config = model.config
        limit = getattr(config, "max_position_embeddings", None) or getattr(
            config, "n_positions", 0
        )
        if config.model_type in _LEARNED_POSITIONS and self.config.block_size + n + 2 > limit:
            raise IncompatibleConfigError(
                f"block_size + elle_prompt_tokens ({self.config.block_size} + {n}) does not fit "
                f"the model's {limit} positions",
                details=[{"field": "elle_prompt_tokens", "message": "too long for the model"}],
            )
        emb = model.get_input_embeddings().weight
        gen = torch.Generator().manual_seed(self.config.seed * 31 + len(self.prompts))
        ids = torch.randint(emb.shape[0], (n,), generator=gen).to(emb.device)
        # a prompt starts as the embeddings of random vocabulary tokens (in the input's scale)
        model.register_parameter(PROMPT, nn.Parameter(emb.detach()[ids].clone().float()))
        self.domains[self.stage] = _domain_of(ctx.stage_dir) if ctx.stage_dir else self.stage

    def _row_prompts(self, prompt: torch.Tensor, b: int, picked: list[dict]) -> torch.Tensor:
        own = [prompt] * (b - len(picked))
        earlier = [self.prompts.get(e["stage"], prompt.detach().cpu()) for e in picked]
        return torch.stack(own + [t.to(prompt.device, prompt.dtype) for t in earlier])

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        mixed, picked = self.mix(batch)
        prompt = getattr(model, PROMPT, None)
        if prompt is None:
            out = lm_forward(model, self.ctx.unit_map, mixed)
        else:
            b, n = mixed["input_ids"].shape[0], prompt.shape[0]
            inputs = prompted_inputs(
                model,
                mixed["input_ids"],
                mixed["attention_mask"],
                self._row_prompts(prompt, b, picked),
            )
            hidden = model.base_model(**inputs).last_hidden_state[:, n:]
            out = lm_loss(model, self.ctx.unit_map, hidden, mixed["labels"])
        return out.loss, {"lm_loss": float(out.loss.detach()), "replayed": float(len(picked))}

    def finish(self, ctx: StageContext) -> None:
        super().finish(ctx)  # the replay memory
        prompt = getattr(ctx.model, PROMPT, None)
        tensors = {k: v.float().contiguous() for k, v in self.prompts.items()}
        if prompt is not None:
            tensors[self.stage] = prompt.detach().float().cpu().contiguous()
        if tensors:
            domains = {k: self.domains.get(k, k) for k in tensors}
            save_file(
                tensors,
                str(ctx.strategy_dir() / PROMPTS_FILE),
                metadata={"domains": json.dumps(domains), "format": "elle-prompts-1"},
            )
        write_json(ctx.strategy_dir() / GROWTH_FILE, self._growth)

    def growth(self) -> dict | None:
        return dict(self._growth)

    def final_model(self, model: nn.Module) -> nn.Module:
        if hasattr(model, PROMPT):
            delattr(model, PROMPT)  # the checkpoint is a plain model; the prompt ships beside
        return model


def load_prompts_index(path: Path) -> dict[str, str]:
    """Stage name -> domain name of a prompts file."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        return json.loads(fh.metadata()["domains"])
