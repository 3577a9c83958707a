"""DAS vs NCL: time per training step on the same model, batch and machine.

Both strategies run through the engine's real ``Trainer`` (soft-mask, contrastive views,
optimizer, clipping) in one process, interleaved over several rounds; the median step
time of each is compared. Prints seconds/step, tokens/s, peak memory and the ratio.

    python benchmarks/step_cost.py                 # CPU-sized defaults
    python benchmarks/step_cost.py --hidden 768 --layers 12 --heads 12 --seq 164 --batch 16
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from das_engine.bases import build_tiny_model, bundled_tokenizer
from das_engine.config import TrainingConfig
from das_engine.data import ChunkStore, write_rows
from das_engine.importance import Importance
from das_engine.objective import Batcher
from das_engine.strategies import StageContext, make_strategy
from das_engine.trainer import Trainer, select_device
from das_engine.units import build_unit_map


class PeakRSS:
    """Samples the process's resident memory while a block runs (CPU peak memory)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * self._page

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def __enter__(self):
        self.base = self._rss()
        self.peak = self.base
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def run_strategy(name, args, store, tokenizer, device, importance) -> tuple[float, float, int]:
    cfg = TrainingConfig(
        strategy=name,
        batch_size=args.batch,
        block_size=args.seq,
        max_steps=args.steps,
        checkpoint_every=10**6,
        seed=0,
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
    strategy = make_strategy(cfg)
    strategy.prepare(StageContext(model, um, cfg, importance if name == "das" else None))
    batcher = Batcher(tokenizer, um.objective, cfg.mlm_probability)
    with tempfile.TemporaryDirectory() as ckpt:
        trainer = Trainer(model, strategy, cfg, store, batcher, Path(ckpt))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            summary = trainer.run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else mem.peak - mem.base
    return seconds / args.steps, summary.trained_tokens / seconds, peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    torch.manual_seed(0)
    device = select_device()
    tokenizer = bundled_tokenizer()
    n_chunks = args.batch * args.steps
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, len(tokenizer), (n_chunks, args.seq), generator=g)
    rows = [{"input_ids": r.tolist(), "attention_mask": [1] * args.seq} for r in ids]
    with tempfile.TemporaryDirectory() as tmp:
        write_rows(rows, Path(tmp) / "train")
        store = ChunkStore(Path(tmp) / "train")
        probe = build_tiny_model(
            tokenizer,
            hidden_size=args.hidden,
            layers=args.layers,
            heads=args.heads,
            intermediate_size=4 * args.hidden,
        )
        shapes = build_unit_map(probe).shapes()
        importance = Importance({k: torch.rand(s, generator=g) for k, s in shapes.items()})
        results: dict[str, list[tuple[float, float, int]]] = {"ncl": [], "das": []}
        run_strategy("ncl", args, store, tokenizer, device, importance)  # warm-up
        for _ in range(args.rounds):
            for name in ("ncl", "das"):
                results[name].append(run_strategy(name, args, store, tokenizer, device, importance))
    print(
        f"device={device.type} threads={torch.get_num_threads()} hidden={args.hidden} "
        f"layers={args.layers} seq={args.seq} batch={args.batch} steps={args.steps} "
        f"rounds={args.rounds}"
    )
    med = {}
    for name, runs in results.items():
        step = statistics.median(r[0] for r in runs)
        tps = statistics.median(r[1] for r in runs)
        peak = max(r[2] for r in runs)
        med[name] = step
        print(
            f"{name:>4}: {step * 1000:8.1f} ms/step  {tps:9.0f} tokens/s  "
            f"peak memory {peak / 2**20:8.1f} MiB"
        )
    print(
        f"DAS / NCL time per step: {med['das'] / med['ncl']:.2f}x "
        f"(target <= 2.5x; spec floor ~2.3x)"
    )


if __name__ == "__main__":
    main()
