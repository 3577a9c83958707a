"""Replay (DER++ style): a bounded buffer of earlier chunks, replayed with every batch.

The buffer never holds text or token ids: an entry is (stage directory name, chunk index
in that stage's tokenized training split, mask seed), plus the model's *stored output* for
it, the last hidden states at every ``STRIDE``-th position (float16), taken at the end of
the entry's own stage with that fixed MLM mask. While training a later domain each step
adds, on ``batch_size`` entries drawn from the buffer:
    replay_beta * L_LM(replayed chunk) + replay_alpha * MSE(h(chunk), stored h)
(Buzzega et al. 2020, DER++, with hidden states in place of logits to keep it small).

The buffer is class-balanced: after stage t it holds about ``replay_buffer_size / t``
entries of each domain seen so far (a seeded random subset), and is saved in full in the
stage's ``strategy/replay.safetensors`` (ids as JSON metadata, outputs as a tensor).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from das_engine.data import ChunkStore
from das_engine.objective import lm_forward
from das_engine.storage import atomic_path
from das_engine.strategies.base import StageContext, Strategy
from das_engine.strategy_params import StrategyParams, param

FILE = "replay.safetensors"
STRIDE = 4  # store the hidden state of every 4th position


@dataclass
class ReplayParams(StrategyParams):
    replay_buffer_size: int = param(
        256,
        "Strategy `replay`: chunks kept in the buffer (ids and stored outputs).",
        minimum=1,
        maximum=10**6,
    )
    replay_alpha: float = param(
        0.5,
        "Strategy `replay` (DER++): weight of the stored-output matching.",
        minimum=0.0,
        maximum=1e4,
    )
    replay_beta: float = param(
        0.5,
        "Strategy `replay` (DER++): weight of the LM loss on replayed chunks.",
        minimum=0.0,
        maximum=1e4,
    )


def stage_name(stage_dir: Path) -> str:
    return stage_dir.name.removesuffix(".partial")


def load_buffer(stage_dir: Path) -> tuple[list[dict], torch.Tensor | None]:
    path = stage_dir / "strategy" / FILE
    if not path.exists():
        return [], None
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        entries = json.loads(fh.metadata()["entries"])
    return entries, load_file(str(path))["hidden"]


def balanced_keep(entries: list[dict], quota: int, seed: int) -> list[int]:
    """Indices of at most ``quota`` entries per stage (a seeded random subset of each)."""
    by_stage: dict[str, list[int]] = {}
    for i, e in enumerate(entries):
        by_stage.setdefault(e["stage"], []).append(i)
    keep: list[int] = []
    gen = torch.Generator().manual_seed(seed)
    for stage in sorted(by_stage):
        idx = by_stage[stage]
        order = torch.randperm(len(idx), generator=gen).tolist()
        keep.extend(sorted(idx[j] for j in order[:quota]))
    return sorted(keep)


class Replay(Strategy):
    name = "replay"
    params = ReplayParams

    def prepare(self, ctx: StageContext) -> None:
        super().prepare(ctx)
        self.entries: list[dict] = []
        self.hidden: torch.Tensor | None = None
        if ctx.previous_stage_dirs:
            self.entries, self.hidden = load_buffer(ctx.previous_stage_dirs[-1])
        self.dirs = {stage_name(d): d for d in ctx.previous_stage_dirs}
        self.stores: dict[str, ChunkStore] = {}
        self.calls = 0

    def _store(self, stage: str) -> ChunkStore:
        if stage not in self.stores:
            self.stores[stage] = ChunkStore(self.dirs[stage] / "data" / "train")
        return self.stores[stage]

    def _batch(self, picks: list[int]) -> dict:
        ids, masks, seeds = [], [], []
        for i in picks:
            e = self.entries[i]
            rows = self._store(e["stage"]).rows([e["chunk"]])
            ids.append(rows["input_ids"])
            masks.append(rows["attention_mask"])
            seeds.append(e["mask_seed"])
        # one fixed mask per entry: the same masked input its output was stored for
        parts = [self.ctx.batcher(i, m, seed=s) for i, m, s in zip(ids, masks, seeds, strict=True)]
        return {k: torch.cat([p[k] for p in parts]).to(self.ctx.device) for k in parts[0]}

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        out = lm_forward(model, self.ctx.unit_map, batch)
        if not self.entries:
            return out.loss, {"lm_loss": float(out.loss.detach())}
        cfg = self.config
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_033 + self.calls)
        self.calls += 1
        picks = torch.randint(len(self.entries), (cfg.batch_size,), generator=gen).tolist()
        rb = self._batch(picks)
        rout = lm_forward(model, self.ctx.unit_map, rb)
        stored = self.hidden[picks].to(self.ctx.device, torch.float32)
        mask = rb["attention_mask"][:, ::STRIDE].to(torch.float32)
        diff = (rout.hidden[:, ::STRIDE].float() - stored).pow(2).mean(-1)
        match = (diff * mask).sum() / mask.sum().clamp_min(1.0)
        total = out.loss + self.params.replay_beta * rout.loss + self.params.replay_alpha * match
        return total, {
            "lm_loss": float(out.loss.detach()),
            "replay_lm": float(rout.loss.detach()),
            "replay_match": float(match.detach()),
        }

    @torch.no_grad()
    def _outputs(self, ctx: StageContext, entries: list[dict]) -> torch.Tensor:
        model = ctx.model
        was_training = model.training
        model.eval()
        outs = []
        try:
            for start in range(0, len(entries), self.config.batch_size):
                picks = list(range(start, min(start + self.config.batch_size, len(entries))))
                b = self._batch(picks)
                hidden = model.base_model(
                    input_ids=b["input_ids"], attention_mask=b["attention_mask"]
                ).last_hidden_state
                outs.append(hidden[:, ::STRIDE].to(torch.float16).cpu())
        finally:
            model.train(was_training)
        return torch.cat(outs)

    def finish(self, ctx: StageContext) -> None:
        if ctx.train_store is None or ctx.batcher is None or ctx.stage_dir is None:
            raise ValueError("replay needs the stage's training chunks")
        cfg = self.config
        name = stage_name(ctx.stage_dir)
        n_domains = len({e["stage"] for e in self.entries}) + 1
        quota = max(1, self.params.replay_buffer_size // n_domains)
        keep = balanced_keep(self.entries, quota, cfg.seed)
        kept_entries = [self.entries[i] for i in keep]
        kept_hidden = self.hidden[keep] if self.hidden is not None and keep else None
        room = self.params.replay_buffer_size - len(kept_entries)
        gen = torch.Generator().manual_seed(cfg.seed * 31 + len(ctx.previous_stage_dirs))
        chosen = torch.randperm(len(ctx.train_store), generator=gen)[:room].tolist()
        new = [
            {"stage": name, "chunk": int(c), "mask_seed": int(cfg.seed * 100_003 + c)}
            for c in sorted(chosen)
        ]
        # the new entries' outputs come from the model as it ends this stage
        self.entries = new
        self.dirs[name] = ctx.stage_dir
        self.stores.pop(name, None)
        new_hidden = self._outputs(ctx, new)
        entries = kept_entries + new
        hidden = new_hidden if kept_hidden is None else torch.cat([kept_hidden, new_hidden])
        self.entries, self.hidden = entries, hidden
        with atomic_path(ctx.strategy_dir() / FILE) as tmp:
            save_file(
                {"hidden": hidden.contiguous()},
                str(tmp),
                {"entries": json.dumps(entries), "stride": str(STRIDE)},
            )
