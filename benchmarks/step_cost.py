"""DAS vs NCL: time per training step on the same model, batch and machine.

Both strategies run through the engine's real ``Trainer`` (soft-mask, contrastive views,
optimizer, clipping) in one process, interleaved over several rounds; the median step
time of each is compared. Prints seconds/step, tokens/s, peak memory and the ratio.

    python benchmarks/step_cost.py                 # CPU-sized defaults
    python benchmarks/step_cost.py --hidden 768 --layers 12 --heads 12 --seq 164 --batch 16
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
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


def peak_memory_cpu(name: str, args) -> int:
    """Peak resident memory of a fresh process that runs ``name`` alone (bytes).

    In-process RSS deltas are meaningless once the allocator has grown for the other
    strategy, so each strategy's peak is taken in its own process.
    """
    cmd = [
        sys.executable,
        __file__,
        "--memory-probe",
        name,
        "--hidden",
        str(args.hidden),
        "--layers",
        str(args.layers),
        "--heads",
        str(args.heads),
        "--seq",
        str(args.seq),
        "--batch",
        str(args.batch),
        "--steps",
        "2",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return int(out.strip().splitlines()[-1])


def run_strategy(name, args, store, tokenizer, device, importance) -> tuple[float, float, int]:
    # "das": the paper's full objective (lambda = 1); "das0": the engine's default (lambda = 0)
    strategy_name = "das" if name.startswith("das") else name
    cfg = TrainingConfig(
        strategy=strategy_name,
        contrast_weight=1.0 if name == "das" else 0.0,
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
    accumulated = importance if strategy_name == "das" else None
    strategy.prepare(StageContext(model, um, cfg, accumulated))
    batcher = Batcher(tokenizer, um.objective, cfg.mlm_probability)
    with tempfile.TemporaryDirectory() as ckpt:
        trainer = Trainer(model, strategy, cfg, store, batcher, Path(ckpt))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        summary = trainer.run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
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
    p.add_argument("--memory-probe", choices=["ncl", "das", "das0"], help=argparse.SUPPRESS)
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
        if args.memory_probe:  # child process: run one strategy, print peak RSS in bytes
            run_strategy(args.memory_probe, args, store, tokenizer, device, importance)
            # VmHWM, not ru_maxrss: the latter keeps the parent's peak across fork + exec
            status = Path("/proc/self/status").read_text()
            print(int(status.split("VmHWM:")[1].split()[0]) * 1024)
            return
        results: dict[str, list[tuple[float, float, int]]] = {"ncl": [], "das": [], "das0": []}
        run_strategy("ncl", args, store, tokenizer, device, importance)  # warm-up
        for _ in range(args.rounds):
            for name in results:
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
        peak = max(r[2] for r in runs) if device.type == "cuda" else peak_memory_cpu(name, args)
        med[name] = step
        print(
            f"{name:>4}: {step * 1000:8.1f} ms/step  {tps:9.0f} tokens/s  "
            f"peak memory {peak / 2**20:8.1f} MiB"
        )
    print(
        f"DAS (paper, lambda=1) / NCL time per step: {med['das'] / med['ncl']:.2f}x "
        "(target <= 2.5x; spec floor ~2.3x)"
    )
    print(f"DAS0 (engine default, lambda=0) / NCL time per step: {med['das0'] / med['ncl']:.2f}x")


if __name__ == "__main__":
    main()
