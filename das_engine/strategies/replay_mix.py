"""Replay mixing with LR re-warming and re-decay (Ibrahim et al. 2024, "Simple and Scalable
Strategies to Continually Pre-train Large Language Models"): the recipe practitioners use
for continued pre-training, matching full re-training with 1-25% replay.

Data: a bounded, uniform sample of every earlier domain's training chunks (a reservoir of
``replay_mix_buffer_size`` chunk ids, each chunk seen so far equally likely to be kept, so
domains are represented by their size) is mixed into every micro-batch: about
``replay_ratio`` of its rows (exactly ``replay_ratio * batch_size`` when that is a whole
number, else rounded up or down at random so the mean is right) are replaced by buffer
chunks, masked like any chunk. No outputs or text are stored, only ids; the reservoir is
saved after each stage as ``strategy/replay_mix.json`` and read back by the next stage (on
resume and on a reopened lineage alike). Stage 1 has nothing to replay.

LR: every stage warms up again, linearly over ``rewarm_ratio`` of its steps, then decays by
a cosine to ``min_lr_ratio * learning_rate`` (the paper's re-warming and re-decaying).
``lr_rewarm: false`` uses the config's ``lr_scheduler`` and ``warmup_ratio`` instead (which
already restart every stage: ``das`` with ``lr_scheduler: cosine, warmup_ratio > 0`` is
DAS with re-warming, no code of its own).

``das_replay`` composes the two: DAS (importance, soft-masked updates, the optional
contrastive term) trained on replay_mix's mixed batches with its LR re-warming, so each
earlier domain is both protected by the mask and rehearsed by the data.
"""

from __future__ import annotations

import math
import random
import zlib
from dataclasses import dataclass

import torch
from torch import nn

from das_engine.data import ChunkStore
from das_engine.objective import lm_forward
from das_engine.storage import read_json, write_json
from das_engine.strategies.base import StageContext, Strategy
from das_engine.strategies.das import DAS
from das_engine.strategies.replay import stage_name
from das_engine.strategy_params import StrategyParams, param

FILE = "replay_mix.json"


@dataclass
class ReplayMixParams(StrategyParams):
    replay_ratio: float = param(
        0.05,
        "Strategy `replay_mix`: share of each batch's examples drawn from earlier domains "
        "(0.05 = 5%).",
        minimum=0.0,
        maximum=0.9,
    )
    replay_mix_buffer_size: int = param(
        4096,
        "Strategy `replay_mix`: earlier-domain chunk ids kept (a uniform reservoir sample).",
        minimum=1,
        maximum=10**7,
    )
    lr_rewarm: bool = param(
        True,
        "Strategy `replay_mix`: re-warm then cosine re-decay the LR every stage; false: the "
        "config's `lr_scheduler` and `warmup_ratio`.",
    )
    rewarm_ratio: float = param(
        0.05,
        "Strategy `replay_mix`: share of each stage's steps warming the LR up linearly.",
        minimum=0.0,
        maximum=0.5,
    )
    min_lr_ratio: float = param(
        0.1,
        "Strategy `replay_mix`: the LR the cosine re-decay ends at, as a share of `learning_rate`.",
        minimum=0.0,
        maximum=1.0,
    )


def rewarm_cosine(step: int, total: int, warmup: int, floor: float) -> float:
    """LR factor at ``step`` (0-based) of a ``total``-step stage: (s+1)/warmup up to 1 over
    ``warmup`` steps, then a cosine from 1 down to ``floor`` at the stage's last step."""
    if step < warmup:
        return (step + 1) / warmup
    peak = max(warmup - 1, 0)  # the step at factor 1
    progress = min(1.0, (step - peak) / max(1, total - 1 - peak))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def reservoir_add(state: dict, stage: str, n_chunks: int, size: int, rng: random.Random) -> dict:
    """Algorithm R over the stream of all chunks seen: after it, each of the ``seen``
    chunks is in ``entries`` with probability ``size / seen``."""
    entries = [dict(e) for e in state["entries"]]
    seen = state["seen"]
    for chunk in range(n_chunks):
        if len(entries) < size:
            entries.append({"stage": stage, "chunk": chunk})
        else:
            j = rng.randint(0, seen)  # inclusive: seen + 1 chunks so far
            if j < size:
                entries[j] = {"stage": stage, "chunk": chunk}
        seen += 1
    return {"seen": seen, "entries": entries}


def load_buffer(stage_dir) -> dict:
    path = stage_dir / "strategy" / FILE
    return read_json(path) if path.exists() else {"seen": 0, "entries": []}


class ReplayMix(Strategy):
    name = "replay_mix"
    params = ReplayMixParams

    @property
    def replay_ratio(self) -> float:
        """Share of each batch replayed (a subclass reusing the buffer names its own)."""
        return self.params.replay_ratio

    @property
    def buffer_size(self) -> int:
        return self.params.replay_mix_buffer_size

    def prepare(self, ctx: StageContext) -> None:
        super().prepare(ctx)
        previous = ctx.previous_stage_dirs
        self.buffer = load_buffer(previous[-1]) if previous else {"seen": 0, "entries": []}
        self.dirs = {stage_name(d): d for d in previous}
        self.stores: dict[str, ChunkStore] = {}

    def _rows(self, entries: list[dict]) -> dict:
        ids, masks = [], []
        for e in entries:
            if e["stage"] not in self.stores:
                self.stores[e["stage"]] = ChunkStore(self.dirs[e["stage"]] / "data" / "train")
            rows = self.stores[e["stage"]].rows([e["chunk"]])
            ids.append(rows["input_ids"])
            masks.append(rows["attention_mask"])
        return {"input_ids": torch.cat(ids), "attention_mask": torch.cat(masks)}

    def mix(self, batch: dict) -> tuple[dict, list[dict]]:
        """``batch`` with its last rows replaced by buffer chunks; and those chunks' ids.
        The draw is seeded by the batch's own tokens, so a resumed run replays the same."""
        entries = self.buffer["entries"]
        b = batch["input_ids"].shape[0]
        if not entries or self.replay_ratio == 0:
            return batch, []
        digest = zlib.crc32(batch["input_ids"].cpu().numpy().tobytes())
        rng = random.Random(self.config.seed * 1_000_003 + digest)
        want = self.replay_ratio * b
        k = min(b, int(want) + (rng.random() < want - int(want)))
        if k == 0:
            return batch, []
        picked = [entries[rng.randrange(len(entries))] for _ in range(k)]
        rows = self._rows(picked)
        replay = self.ctx.batcher(
            rows["input_ids"], rows["attention_mask"], seed=rng.randrange(2**31)
        )
        device = batch["input_ids"].device
        mixed = {key: torch.cat([v[: b - k], replay[key].to(device)]) for key, v in batch.items()}
        return mixed, picked

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        mixed, picked = self.mix(batch)
        out = lm_forward(model, self.ctx.unit_map, mixed)
        return out.loss, {"lm_loss": float(out.loss.detach()), "replayed": float(len(picked))}

    def build_scheduler(self, optimizer, config, total: int):
        p = self.params
        if not p.lr_rewarm:
            return super().build_scheduler(optimizer, config, total)
        warmup = int(p.rewarm_ratio * total)
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: rewarm_cosine(s, total, warmup, p.min_lr_ratio)
        )

    def finish(self, ctx: StageContext) -> None:
        if ctx.train_store is None or ctx.stage_dir is None:
            raise ValueError("replay_mix needs the stage's training chunks")
        rng = random.Random(self.config.seed * 7_919 + len(ctx.previous_stage_dirs))
        self.buffer = reservoir_add(
            self.buffer,
            stage_name(ctx.stage_dir),
            len(ctx.train_store),
            self.buffer_size,
            rng,
        )
        write_json(ctx.strategy_dir() / FILE, self.buffer)


class DASReplay(DAS, ReplayMix):
    """DAS on mixed batches. By the MRO, DAS's importance, mask and optimizer come first;
    replay_mix's buffer (``prepare``/``finish``) and LR schedule fill in what DAS leaves."""

    name = "das_replay"
    params = ReplayMixParams

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        mixed, picked = self.mix(batch)
        loss, logs = DAS.loss(self, model, mixed)
        return loss, {**logs, "replayed": float(len(picked))}
