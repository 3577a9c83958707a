"""The engine on a GPU with bf16 Llama-style decoders: a correctness pass, then throughput.

Written for a lent CUDA machine (it refuses to run without one). Two parts:

1. ``check``: a lineage end to end on a bf16 decoder checkpoint with dropout 0 (init
   base -> general importance -> two DAS stages), under ``mixed_precision`` bf16 and fp16,
   with gradient checkpointing on for the second; asserts that the stage checkpoints are
   written in bfloat16, load with plain ``transformers``, give finite losses, and that the
   units DAS fully protects (I_acc = 1) did not move on the GPU.
2. ``speed``: time per step, tokens/s and peak GPU memory of NCL, DAS (engine default,
   lambda = 0) and DAS (paper, lambda = 1) through the engine's real ``Trainer`` on Llama
   shapes of ~160M, ~1.1B and ~3B parameters (fp32 master weights, bf16 autocast), plus
   the per-stage importance pass. Model FLOP utilisation uses 6 N tokens per step.

    python benchmarks/gpu_decoder.py check [--family qwen3]
    python benchmarks/gpu_decoder.py speed [--sizes 160m,1b,3b --seq 1024 --batch 8]
        [--family llama|qwen3|gemma2|phi3|...]   (the same shapes in that family's config)

Figures of a run are in docs/benchmark.md ("On a GPU").
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from das_engine.config import TrainingConfig
from das_engine.data import ChunkStore, write_rows
from das_engine.families import FAMILIES
from das_engine.importance import Importance, domain_importance
from das_engine.objective import Batcher
from das_engine.strategies import StageContext, make_strategy
from das_engine.trainer import Trainer
from das_engine.units import build_unit_map

# name: (hidden, layers, heads, kv_heads, intermediate, vocab)
SHAPES = {
    "160m": (768, 12, 12, 4, 2048, 32000),
    "1b": (2048, 22, 32, 4, 5632, 32000),  # TinyLlama-1.1B's shape
    "3b": (3072, 28, 24, 8, 8192, 128256),  # Llama-3.2-3B's shape
    "8b": (4096, 32, 32, 8, 14336, 128256),  # Llama-3-8B's shape
    "tiny": (64, 2, 4, 2, 128, 1000),  # a smoke run of this script on a CPU
}
REPO = Path(__file__).resolve().parents[1]


def llama(shape: str, device: torch.device, max_positions: int, family: str = "llama"):
    """A decoder of ``shape`` in ``family``'s own config class (Llama's by default; any
    family with grouped K/V heads: Qwen3, Gemma 2, Phi-3, ...), dropout 0, fp32."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hidden, layers, heads, kv, inter, vocab = SHAPES[shape]
    cfg = AutoConfig.for_model(
        family,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=hidden // heads,
        intermediate_size=inter,
        vocab_size=vocab,
        max_position_embeddings=max_positions,
        attention_dropout=0.0,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    with torch.device(device):  # initialised on the GPU: seconds, not minutes
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


class _Tok:
    """Just what ``Batcher`` reads for a causal objective (random token ids need no text)."""

    def __init__(self, vocab: int) -> None:
        self.pad_token_id, self.mask_token_id, self.all_special_ids = 0, None, [0, 1, 2]
        self._vocab = vocab

    def __len__(self) -> int:
        return self._vocab


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak() -> int:
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0


def speed(args) -> list[dict]:
    device = _device()
    rows_out = []
    for shape in args.sizes.split(","):
        vocab = SHAPES[shape][-1]
        g = torch.Generator().manual_seed(0)
        n_chunks = args.batch * (args.steps + 2)
        ids = torch.randint(3, vocab, (n_chunks, args.seq), generator=g)
        with tempfile.TemporaryDirectory() as tmp:
            write_rows(
                ({"input_ids": r.tolist(), "attention_mask": [1] * args.seq} for r in ids),
                Path(tmp) / "train",
            )
            store = ChunkStore(Path(tmp) / "train")
            tok = _Tok(vocab)
            batcher = Batcher(tok, "clm")
            variants = args.variants.split(",")
            if shape in ("3b", "8b"):
                variants = [v for v in variants if v != "das1"]
            for name in variants:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                model = llama(shape, device, args.seq, args.family)
                n_params = sum(p.numel() for p in model.parameters())
                um = build_unit_map(model)
                strategy_name = "ncl" if name == "ncl" else "das"
                cfg = TrainingConfig(
                    strategy=strategy_name,
                    contrast_weight=1.0 if name == "das1" else 0.0,
                    batch_size=args.batch,
                    block_size=args.seq,
                    max_steps=args.steps + 2,
                    checkpoint_every=10**6,
                    mixed_precision="bf16",
                    gradient_checkpointing=args.gc,
                    importance_dropout=0.1,
                    seed=0,
                )
                acc = None
                imp_s = None
                if strategy_name == "das":
                    batches = [
                        {
                            k: v.to(device)
                            for k, v in batcher(
                                **store.rows([j % len(store) for j in (2 * i, 2 * i + 1)]), seed=i
                            ).items()
                        }
                        for i in range(4)
                    ]
                    _sync()
                    t0 = time.perf_counter()
                    with torch.autocast(device.type, dtype=torch.bfloat16):
                        acc = domain_importance(model, um, batches, "paper", cfg.extra_unit_kinds())
                    _sync()
                    imp_s = (time.perf_counter() - t0) / len(batches)
                    acc = Importance({k: torch.rand_like(v) for k, v in acc.values.items()})
                strategy = make_strategy(cfg)
                strategy.prepare(StageContext(model, um, cfg, acc))
                times: list[float] = []
                last = [time.perf_counter()]

                def on_progress(event, times=times, last=last):
                    if event.phase == "training":
                        _sync()
                        now = time.perf_counter()
                        times.append(now - last[0])
                        last[0] = now

                with tempfile.TemporaryDirectory() as ckpt:
                    trainer = Trainer(
                        model, strategy, cfg, store, batcher, Path(ckpt), progress=on_progress
                    )
                    # the final fp32 + optimizer checkpoint (tens of GB at 3B) is not a step
                    trainer.save_checkpoint = lambda *a, **k: None
                    _sync()
                    t0 = time.perf_counter()
                    last[0] = t0
                    summary = trainer.run()
                    _sync()
                    wall = time.perf_counter() - t0
                steady = times[2:] if len(times) > 3 else times
                step_s = statistics.median(steady) if steady else wall / (args.steps + 2)
                tokens = args.batch * args.seq
                row = {
                    "shape": shape,
                    "family": args.family,
                    "params_M": round(n_params / 1e6, 1),
                    "variant": name,
                    "ms_per_step": round(step_s * 1000, 1),
                    "tokens_per_s": round(tokens / step_s),
                    "mfu_6N": round(6 * n_params * tokens / step_s / 989e12, 3),
                    "peak_GiB": round(_peak() / 2**30, 2),
                    "bytes_per_param": round(_peak() / n_params, 1),
                    "importance_s_per_batch": None if imp_s is None else round(imp_s, 3),
                    "final_loss": summary.final_loss,
                    "progress_events": len(times),
                }
                rows_out.append(row)
                print(json.dumps(row), flush=True)
                del trainer, model, strategy, um, acc
    ratio = {}
    for shape in {r["shape"] for r in rows_out}:
        by = {r["variant"]: r["ms_per_step"] for r in rows_out if r["shape"] == shape}
        if "ncl" in by:
            ratio[shape] = {k: round(v / by["ncl"], 2) for k, v in by.items()}
    print("time per step / NCL:", json.dumps(ratio))
    return rows_out


def _corpus(path: Path, sources: list[Path], repeat: int = 3) -> Path:
    text = "\n\n".join(p.read_text(errors="ignore") for p in sources)
    path.write_text((text + "\n\n") * repeat)
    return path


def _masked_run(device: torch.device, importance: Importance | None, mode: str) -> dict:
    """Four DAS steps on a small Llama (random tokens) on ``device``; the final weights."""
    torch.manual_seed(0)
    model = llama("tiny", torch.device("cpu"), 64).to(device)  # the same start everywhere
    um = build_unit_map(model)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 1000, (16, 64), generator=g)
    with tempfile.TemporaryDirectory() as tmp:
        write_rows(
            ({"input_ids": r.tolist(), "attention_mask": [1] * 64} for r in ids),
            Path(tmp) / "train",
        )
        store = ChunkStore(Path(tmp) / "train")
        cfg = TrainingConfig(
            strategy="das",
            batch_size=4,
            block_size=64,
            max_steps=4,
            checkpoint_every=10**6,
            mixed_precision=mode,
            learning_rate=1e-2,
            importance_dropout=0.1,
            seed=0,
        )
        strategy = make_strategy(cfg)
        acc = importance
        if acc is None:  # half the units fully protected (I = 1), the rest random in [0, 1)
            shapes = um.shapes()
            acc = Importance(
                {
                    k: torch.where(
                        torch.rand(s, generator=g) < 0.5, 1.0, torch.rand(s, generator=g)
                    )
                    for k, s in shapes.items()
                }
            )
        strategy.prepare(StageContext(model, um, cfg, acc))
        Trainer(model, strategy, cfg, store, Batcher(_Tok(1000), "clm"), Path(tmp) / "c").run()
    return {
        "weights": {k: v.detach().float().cpu() for k, v in model.state_dict().items()},
        "importance": acc,
        "unit_map": um,
    }


def check_masks() -> dict:
    """The soft-mask on the GPU: elements with multiplier 0 (I = 1) keep their exact initial
    value under fp32 and bf16 autocast, and the CUDA run matches the CPU run (fp32)."""
    from das_engine.softmask import parameter_multipliers

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    init = llama("tiny", torch.device("cpu"), 64).state_dict()
    cpu = _masked_run(torch.device("cpu"), None, "no")
    out = {}
    for mode in ("no", "bf16"):
        run = _masked_run(_device(), cpu["importance"], mode)
        mults = parameter_multipliers(
            run["unit_map"], cpu["importance"], tuple(cpu["importance"].values)
        )
        frozen = moved = 0
        for name, m in mults.items():
            m = m.float().cpu().expand_as(init[name])
            zero = m == 0
            same = run["weights"][name][zero] == init[name].float()[zero]
            frozen += int(zero.sum())
            moved += int((~same).sum())
        rel = max(
            float((run["weights"][k] - cpu["weights"][k]).norm() / cpu["weights"][k].norm())
            for k in cpu["weights"]
            if cpu["weights"][k].norm() > 0
        )
        out[mode] = {
            "protected_elements": frozen,
            "protected_moved": moved,
            "max_rel_diff_vs_cpu_fp32": rel,
        }
        assert frozen > 0 and moved == 0, out
    print(json.dumps({"masks": out}), flush=True)
    return out


def check(args) -> dict:
    """A real user's run on a GPU: bf16 decoder base, dropout 0, two DAS stages."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from das_engine.bases import build_tiny_model, save_base, train_tokenizer
    from das_engine.lineage import Lineage

    out: dict = {"masks": check_masks()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        docs = sorted((REPO / "docs").glob("*.md"))
        code = sorted((REPO / "das_engine").rglob("*.py"))
        general = _corpus(tmp / "general.txt", [REPO / "README.md"], 2)
        dom_a = _corpus(tmp / "docs.txt", docs, 2)
        dom_b = _corpus(tmp / "code.txt", code, 2)
        tok = train_tokenizer([general, dom_a, dom_b], vocab_size=4000, decoder=True)
        h, n = args.check_hidden, args.check_layers
        base = build_tiny_model(
            tok,
            architecture=args.family,
            hidden_size=h,
            layers=n,
            heads=8,
            intermediate_size=h * 8 // 3 // 8 * 8,
            max_positions=512,
            dropout=0.0,
        )
        base.to(torch.bfloat16)
        save_base(base, tok, tmp / "base")
        modes = (
            (("bf16", False), ("fp16", True)) if torch.cuda.is_available() else (("bf16", True),)
        )
        for mode, gc in modes:
            cfg = {
                "strategy": "das",
                "batch_size": 8,
                "block_size": 256,
                "max_steps": args.check_steps,
                "learning_rate": 3e-4,
                "mixed_precision": mode,
                "gradient_checkpointing": gc,
                "checkpoint_every": 10,
                "importance_dropout": 0.1,
            }
            lin = Lineage.create(
                tmp / f"lin-{mode}", str(tmp / "base"), cfg, general_corpus=general
            )
            t0 = time.perf_counter()
            r1 = lin.add_domain(dom_a, "docs")
            t1 = time.perf_counter()
            r2 = lin.add_domain(dom_b, "code")
            t2 = time.perf_counter()
            stages = lin.stages
            w1 = load_file(str(stages[0].model_dir / "model.safetensors"))
            w2 = load_file(str(stages[1].model_dir / "model.safetensors"))
            dtypes = sorted({str(t.dtype) for t in w2.values()})
            reloaded = AutoModelForCausalLM.from_pretrained(str(stages[1].model_dir))
            names, matrix, _general = lin.loss_matrix()
            finite = all(v is not None for row in matrix for v in row if row)
            # I_acc = 1 units: the rows of the intermediate FFN the accumulated importance
            # fully protects must be bit-identical between stage 1 and stage 2
            acc_files = sorted(stages[1].importance_dir.glob("*.safetensors"))
            out[mode] = {
                "stage_seconds": [round(t1 - t0, 1), round(t2 - t1, 1)],
                "eval_losses": [r1.eval_losses, r2.eval_losses],
                "checkpoint_dtypes": dtypes,
                "reload_dtype": str(next(reloaded.parameters()).dtype),
                "loss_matrix": matrix,
                "finite": finite,
                "importance_files": [p.name for p in acc_files],
                "changed_tensors": sum(1 for k in w1 if not torch.equal(w1[k], w2[k])),
                "metrics": {k: v for k, v in lin.metrics().items() if k != "matrix"},
            }
            assert dtypes == ["torch.bfloat16"], dtypes
            assert finite, matrix
            print(json.dumps({mode: out[mode]}, default=str), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("part", choices=["check", "speed"])
    p.add_argument("--sizes", default="160m,1b,3b")
    p.add_argument(
        "--family",
        default="llama",
        choices=[t for t, f in FAMILIES.items() if f.llama_config_keys],
        help="the decoder family (its own config class) for both parts",
    )
    p.add_argument("--variants", default="ncl,das0,das1")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--gc", action="store_true", help="gradient checkpointing")
    p.add_argument("--check-hidden", type=int, default=512)
    p.add_argument("--check-layers", type=int, default=8)
    p.add_argument("--check-steps", type=int, default=30)
    p.add_argument("--allow-cpu", action="store_true", help="smoke-test this script on a CPU")
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args()
    if not torch.cuda.is_available() and not args.allow_cpu:
        raise SystemExit("gpu_decoder.py needs a CUDA device (or --allow-cpu for a smoke run)")
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"device: {name} torch {torch.__version__}", flush=True)
    result = check(args) if args.part == "check" else speed(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
