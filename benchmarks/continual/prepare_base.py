"""Build the benchmark's pretrained base once, cached outside git.

A small RoBERTa (byte-level BPE tokenizer trained on the general corpus) pre-trained with
MLM on the general corpus until its held-out loss is far below the unigram level, so that
"forgetting general knowledge" measures something; or, with ``--architecture llama`` or
``gpt2``, a small decoder pre-trained with next-token prediction the same way. The general
corpus is split by document: a held-out part (never trained on) is written beside the model as
``general_eval.txt`` and is the lineages' general reference corpus.

    python -m benchmarks.continual.prepare_base --general benchmarks/data/out/general.txt

Writes ``<out>/model`` (HF directory, loads with plain transformers), ``<out>/general_eval.txt``
and ``<out>/base.json`` (sizes, losses, unigram entropy, wall time).

Training is the engine's loop (``das_engine.pretraining.pretrain``: ``Trainer`` with a
warm-up then linear decay to 5 % of ``--lr``, ``--head-steps`` head-only steps first, the
``--minutes`` budget as a graceful stop, step checkpoints under ``<out>/checkpoints`` while
it runs). Bases built before it used a loop of their own (another data order and MLM
masks, weight decay on every parameter): a rebuilt base is as good, not byte-identical.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import time
from collections import Counter
from pathlib import Path

import torch

from das_engine.bases import (
    DECODER_ARCHITECTURES,
    build_tiny_model,
    cache_dir,
    save_base,
    train_tokenizer,
)
from das_engine.config import TrainingConfig
from das_engine.data import ChunkStore, build_single_split, iter_documents
from das_engine.evaluate import heldout_loss
from das_engine.families import supported_model_types
from das_engine.objective import Batcher
from das_engine.pretraining import pretrain
from das_engine.progress import ProgressEvent
from das_engine.trainer import warmup_linear_decay
from das_engine.units import build_unit_map


def default_out() -> Path:
    return cache_dir() / "bench-base"


def split_general(general: Path, out: Path, eval_fraction: float) -> tuple[Path, Path]:
    """Document-level split of the general corpus (deterministic hash of the doc number)."""
    train, held = out / "general_train.txt", out / "general_eval.txt"
    with open(train, "w", encoding="utf-8") as ft, open(held, "w", encoding="utf-8") as fe:
        for i, doc in enumerate(iter_documents(general)):
            h = int.from_bytes(hashlib.sha256(f"general:{i}".encode()).digest()[:8], "big")
            (fe if h / 2**64 < eval_fraction else ft).write(doc + "\n\n")
    return train, held


def unigram_entropy(store: ChunkStore, special: set[int]) -> float:
    """Entropy (nats) of the token unigram distribution: the loss of a model that knows
    only token frequencies."""
    counts: Counter[int] = Counter()
    for start in range(0, len(store), 1024):
        ids = store.rows(range(start, min(start + 1024, len(store))))["input_ids"]
        counts.update(t for t in ids.flatten().tolist() if t not in special)
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values())


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--general", type=Path, default=Path("benchmarks/data/out/general.txt"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--max-steps", type=int, default=4000)
    ap.add_argument("--minutes", type=float, default=25.0, help="wall-time budget for training")
    ap.add_argument("--eval-fraction", type=float, default=0.03)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument(
        "--architecture",
        choices=supported_model_types(),
        default="roberta",
        help="the new model's family: an MLM encoder or a causal decoder (ignored with --init)",
    )
    ap.add_argument(
        "--dropout",
        type=float,
        default=0.1,
        help="every dropout of the new model's config (real Llama checkpoints have 0)",
    )
    ap.add_argument(
        "--init",
        default=None,
        help="continue pre-training this model: a directory (tokenizer included) "
        "or a built-in base id such as all-minilm-l6-v2",
    )
    ap.add_argument(
        "--head-steps",
        type=int,
        default=0,
        help="train only the LM head (encoder frozen) for the first N steps: a "
        "pretrained encoder with a freshly initialised MLM head",
    )
    ap.add_argument(
        "--eval-batches",
        type=int,
        default=32,
        help="held-out batches (of 32 chunks) per evaluation",
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or default_out()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    train_txt, eval_txt = split_general(args.general, out, args.eval_fraction)
    previous = None
    if args.init is not None:  # a second round: same tokenizer, same split, more steps
        from das_engine.bases import load_model, load_tokenizer, resolve_base

        init = Path(resolve_base(str(args.init)).path)
        tokenizer, model = load_tokenizer(init), load_model(init)
        prev_report = init.parent / "base.json"
        if prev_report.exists() and init.parent.resolve() == out.resolve():
            previous = json.loads(prev_report.read_text())
        cfg = model.config
        args.hidden, args.layers = cfg.hidden_size, cfg.num_hidden_layers
        args.heads, args.intermediate = cfg.num_attention_heads, cfg.intermediate_size
    else:
        tokenizer = train_tokenizer(
            [train_txt],
            vocab_size=args.vocab,
            max_length=args.block_size,
            decoder=args.architecture in DECODER_ARCHITECTURES,  # BOS only, as init-base
        )
        model = build_tiny_model(
            tokenizer,
            architecture=args.architecture,
            dropout=args.dropout,
            hidden_size=args.hidden,
            layers=args.layers,
            heads=args.heads,
            intermediate_size=args.intermediate,
            max_positions=args.block_size,
            seed=args.seed,
        )
    objective = build_unit_map(model).objective  # "mlm" or "clm": what the engine trains
    data = out / "tokenized"
    try:  # reuse the tokenized split of a first round (same tokenizer, same split)
        if previous is None:
            raise FileNotFoundError
        ChunkStore(data / "train"), ChunkStore(data / "eval")
    except (FileNotFoundError, OSError, ValueError):
        shutil.rmtree(data, ignore_errors=True)
        build_single_split(
            train_txt,
            tokenizer,
            data / "train",
            block_size=args.block_size,
            objective=objective,
            split="train",
        )
        build_single_split(
            eval_txt, tokenizer, data / "eval", block_size=args.block_size, objective=objective
        )
    train, held = ChunkStore(data / "train"), ChunkStore(data / "eval")
    unit_map = build_unit_map(model)
    batcher = Batcher(tokenizer, objective)
    special = set(tokenizer.all_special_ids)

    def evaluate() -> float:
        return heldout_loss(
            model, unit_map, held, batcher, batch_size=32, max_batches=args.eval_batches
        )

    initial = evaluate()
    print(f"initial held-out loss {initial:.3f}", flush=True)
    head_names = {n for n, _ in unit_map.head_module(model).named_parameters()}
    config = TrainingConfig(
        strategy="ncl",
        learning_rate=args.lr,
        weight_decay=0.01,
        batch_size=args.batch_size,
        block_size=args.block_size,
        max_steps=args.max_steps,
        seed=args.seed,
        checkpoint_every=500,
        max_grad_norm=1.0,
        mixed_precision="no",
    )
    deadline = started + args.minutes * 60
    log: list[dict] = []

    def every_100_steps(event: ProgressEvent) -> None:
        if event.phase == "training" and event.step and event.step % 100 == 0:
            ev = evaluate()
            log.append({"step": event.step, "train_loss": event.loss, "eval_loss": ev})
            print(
                f"step {event.step} train {event.loss:.3f} eval {ev:.3f} "
                f"{event.tokens_per_s or 0:.0f} tok/s",
                flush=True,
            )

    summary = pretrain(
        model,
        tokenizer,
        train,
        config,
        out / "checkpoints",  # a crashed round resumes from its last step checkpoint
        lr_lambda=warmup_linear_decay(args.max_steps, args.max_steps // 20, floor=0.05),
        head_only_steps=args.head_steps,
        should_stop=lambda: time.perf_counter() >= deadline,
        progress=every_100_steps,
    )
    step, tokens = summary.steps, summary.trained_tokens
    final = evaluate()
    save_base(model, tokenizer, out / "model")
    if previous is not None:  # totals over both rounds
        step += previous["steps"]
        tokens += previous["trained_tokens"]
        log = previous["log"] + [{**e, "step": e["step"] + previous["steps"]} for e in log]
        initial = previous["initial_eval_loss"]
    report = {
        "model": str(out / "model"),
        "general_eval": str(eval_txt),
        "architecture": model.config.model_type,
        # over all rounds: where the first round started, how many head-only steps in all
        "init": (previous or {}).get("init", str(args.init) if args.init else None),
        "head_steps": args.head_steps + (previous or {}).get("head_steps", 0),
        "round_summaries": (previous or {}).get("round_summaries", [])
        + [
            {
                "init": str(args.init) if args.init else None,
                "lr": args.lr,
                "head_steps": args.head_steps,
                "steps": step - (previous or {}).get("steps", 0),
                "final_eval_loss": final,
            }
        ],
        "head_parameters": sorted(head_names),
        "hidden": args.hidden,
        "layers": args.layers,
        "heads": args.heads,
        "intermediate": args.intermediate,
        "vocab": len(tokenizer),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "steps": step,
        "trained_tokens": tokens,
        "train_chunks": len(train),
        "eval_chunks": len(held),
        "initial_eval_loss": initial,
        "final_eval_loss": final,
        "unigram_entropy": unigram_entropy(held, special),
        "seconds": time.perf_counter() - started + (previous or {}).get("seconds", 0.0),
        "rounds": 1 + (previous or {}).get("rounds", 1) if previous else 1,
        "log": log,
    }
    (out / "base.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "log"}, indent=2))
    return report


if __name__ == "__main__":
    main()
