"""Cost of the precision and training-loop options: time per DAS step for
``mixed_precision`` no / bf16 and ``gradient_checkpointing`` off / on, through the
engine's real ``Trainer`` on a small RoBERTa (device auto: cuda > cpu).

    python benchmarks/precision_cost.py [--hidden 256 --layers 4 --seq 128 --batch 16]

Prints seconds per step (CPU: process time, i.e. all threads' work, so a loaded machine
does not distort it; CUDA: wall time, synchronized), the ratio to the fp32 baseline and,
on CUDA, the peak memory of each variant.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from das_engine.bases import build_tiny_model, bundled_tokenizer
from das_engine.config import TrainingConfig
from das_engine.data import ChunkStore, write_rows
from das_engine.importance import Importance
from das_engine.objective import Batcher
from das_engine.preflight import resolve_device
from das_engine.strategies import StageContext, make_strategy
from das_engine.trainer import Trainer
from das_engine.units import build_unit_map


def one_run(args, store, tokenizer, device, mode: str, gc: bool) -> tuple[float, int]:
    cfg = TrainingConfig(
        batch_size=args.batch,
        block_size=args.seq,
        max_steps=args.steps,
        checkpoint_every=10**6,
        mixed_precision=mode,
        gradient_checkpointing=gc,
        contrast_weight=1.0,
    )
    model = build_tiny_model(
        tokenizer,
        hidden_size=args.hidden,
        layers=args.layers,
        heads=args.heads,
        intermediate_size=4 * args.hidden,
        max_positions=args.seq,
    ).to(device)
    um = build_unit_map(model)
    gen = torch.Generator().manual_seed(0)
    importance = Importance(
        {k: torch.rand(shape, generator=gen) for k, shape in um.shapes().items()}
    )
    strategy = make_strategy(cfg)
    strategy.prepare(StageContext(model, um, cfg, importance))
    batcher = Batcher(tokenizer, um.objective, cfg.mlm_probability)
    with tempfile.TemporaryDirectory() as ckpt:
        trainer = Trainer(model, strategy, cfg, store, batcher, Path(ckpt))
        trainer.save_checkpoint = lambda *a, **k: None  # time the steps, not the disk
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
        clock = time.perf_counter if device.type == "cuda" else time.process_time
        t0 = clock()
        trainer.run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = clock() - t0
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    return seconds / args.steps, peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    device = resolve_device(TrainingConfig())
    tokenizer = bundled_tokenizer()
    gen = torch.Generator().manual_seed(0)
    n = args.batch * args.steps
    ids = torch.randint(5, len(tokenizer), (n, args.seq), generator=gen)
    rows = ({"input_ids": r.tolist(), "attention_mask": [1] * args.seq} for r in ids)
    with tempfile.TemporaryDirectory() as tmp:
        write_rows(rows, Path(tmp) / "train")
        store = ChunkStore(Path(tmp) / "train")
        variants = [("no", False), ("bf16", False), ("no", True), ("bf16", True)]
        best = {v: (float("inf"), 0) for v in variants}
        for _ in range(args.rounds):
            for v in variants:
                s, peak = one_run(args, store, tokenizer, device, *v)
                best[v] = min(best[v], (s, peak))
    base = best[("no", False)][0]
    print(
        f"device {device}, hidden {args.hidden}, layers {args.layers}, seq {args.seq}, "
        f"batch {args.batch}, DAS with lambda = 1"
    )
    for (mode, gc), (s, peak) in best.items():
        mem = f"  peak {peak / 2**20:8.1f} MiB" if peak else ""
        print(
            f"mixed_precision={mode:<4} gradient_checkpointing={gc!s:<5} "
            f"{s:7.3f} s/step  x{s / base:5.2f}{mem}"
        )


if __name__ == "__main__":
    main()
