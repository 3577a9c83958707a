"""``das-engine``: the engine's command line (no web service, no database).

das-engine init-base --out base/ --from-corpus general.txt
das-engine run --base base/ --strategy das --out lineage/ domain1.txt domain2.jsonl
das-engine add --lineage lineage/ domain3.txt
das-engine metrics --lineage lineage/ [--json]
das-engine eval --lineage lineage/ --task legal=legal.jsonl --task cooking=cooking.jsonl [--json]
das-engine fork --lineage lineage/ --stage 1 --out branch/
das-engine bases [--models-dir DIR]

Several GPUs (DDP, one process each): torchrun --nproc_per_node 4 -m das_engine.cli run ...
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from das_engine import distributed
from das_engine.errors import CorpusError, DasError, LineageError
from das_engine.families import supported_model_types
from das_engine.names import domain_name_problem
from das_engine.strategy_registry import strategy_names

# flags that map onto TrainingConfig fields (None = not given, keep the default)
CONFIG_FLAGS: dict[str, tuple[str, type]] = {
    "--max-steps": ("max_steps", int),
    "--epochs": ("epochs", float),
    "--batch-size": ("batch_size", int),
    "--grad-accum": ("grad_accum", int),
    "--block-size": ("block_size", int),
    "--lr": ("learning_rate", float),
    "--weight-decay": ("weight_decay", float),
    "--seed": ("seed", int),
    "--mask-mode": ("mask_mode", str),
    "--normalization": ("normalization", str),
    "--contrast-weight": ("contrast_weight", float),
    "--checkpoint-every": ("checkpoint_every", int),
    "--device": ("device", str),
}


def _parse_value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def _config_overrides(args: argparse.Namespace) -> dict:
    out = {}
    for flag, (field, _typ) in CONFIG_FLAGS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            out[field] = value
    for item in args.set or []:
        if "=" not in item:
            raise DasError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = _parse_value(value)
    return out


def _domain_args(items: list[str]) -> list[tuple[str, Path]]:
    """``path`` or ``name=path``; the default name is the file name without extensions."""
    out = []
    for item in items:
        if "=" in item and not Path(item).exists():
            name, path = item.split("=", 1)
        else:
            path = item
            name = Path(item).name.split(".")[0]
        out.append((name, Path(path)))
    return out


def _check_names(names: list[str]) -> None:
    for name in names:
        problem = domain_name_problem(name)
        if problem:
            raise LineageError(f"{name!r}: {problem} (name a corpus with NAME=PATH)")


class ProgressPrinter:
    """A tqdm bar per training phase; other phases print one line each."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.bar = None

    def __call__(self, event) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        if event.phase == "training" and event.total:
            if self.bar is None or self.bar.total != event.total:
                self.close()
                self.bar = tqdm(total=event.total, desc="training", unit="step", file=sys.stderr)
                self.bar.n = event.step - 1
            self.bar.update(event.step - self.bar.n)
            post = {}
            if event.loss is not None:
                post["loss"] = f"{event.loss:.3f}"
            if event.tokens_per_s:
                post["tok/s"] = f"{event.tokens_per_s:.0f}"
            self.bar.set_postfix(post, refresh=False)
            if event.step >= event.total:
                self.close()
        elif event.message:
            self.close()
            print(f"[{event.phase}] {event.message}", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _fmt(x) -> str:
    return "   -   " if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:7.4f}"


def format_metrics(m: dict) -> str:
    lines = ["held-out LM loss (row = after stage, column = domain):"]
    width = max([len(d) for d in m["domains"]] + [8])
    lines.append(" " * (width + 2) + " ".join(f"{d[:7]:>7}" for d in m["domains"]))
    if m.get("base_losses"):
        lines.append(f"{'base':<{width}}  " + " ".join(_fmt(x) for x in m["base_losses"]))
    for name, row in zip(m["domains"], m["loss_matrix"], strict=True):
        lines.append(f"{name:<{width}}  " + " ".join(_fmt(x) for x in row))
    lines.append(
        f"forgetting rate {_fmt(m['forgetting_rate'])}   bwt {_fmt(m['bwt'])}   "
        f"fwt {_fmt(m['fwt'])}   max-forgetting {_fmt(m['max_forgetting'])}"
    )
    g = m.get("general") or {}
    if g.get("base_loss") is not None:
        lines.append(f"general corpus: base {_fmt(g['base_loss'])}  change {_fmt(g.get('change'))}")
    return "\n".join(lines)


def _finish(lineage, args) -> None:
    from das_engine.storage import write_json

    if not distributed.is_main():  # rank 0 reports for the whole job
        return
    metrics = lineage.metrics()
    print(format_metrics(metrics))
    if getattr(args, "json", False):
        write_json(lineage.path / "metrics.json", metrics)
        print(f"metrics written to {lineage.path / 'metrics.json'}")


def _say(line: str) -> None:
    if distributed.is_main():
        print(line, file=sys.stderr)


def cmd_run(args) -> None:
    from das_engine.lineage import Lineage

    config = _config_overrides(args)
    config["strategy"] = args.strategy
    domains = _domain_args(args.corpora)
    missing = [str(p) for _, p in domains if not p.is_file()]
    if missing:
        raise CorpusError(f"corpus file(s) not found: {', '.join(missing)}")
    _check_names([name for name, _ in domains])  # before the lineage is created
    lineage = distributed.run_on_main(
        lambda: Lineage.create(
            Path(args.out),
            args.base,
            config,
            general_corpus=Path(args.general_corpus) if args.general_corpus else None,
            models_dir=Path(args.models_dir) if args.models_dir else None,
            allow_hub=args.allow_hub,
        )
    )
    if lineage is None:  # under torchrun: the other ranks open what rank 0 created
        lineage = Lineage.open(Path(args.out))
    printer = ProgressPrinter(args.quiet or not distributed.is_main())
    for name, path in domains:
        _say(f"== stage {len(lineage.stages) + 1}: {name} ({path})")
        lineage.add_domain(path, name, progress=printer)
        printer.close()
    _finish(lineage, args)


def cmd_add(args) -> None:
    from das_engine.lineage import Lineage

    lineage = Lineage.open(Path(args.lineage))
    printer = ProgressPrinter(args.quiet or not distributed.is_main())
    domains = _domain_args(args.corpora)
    if args.name:
        if len(domains) != 1:
            raise DasError("--name applies to a single corpus")
        domains = [(args.name, domains[0][1])]
    for name, path in domains:
        _say(f"== stage {len(lineage.stages) + 1}: {name} ({path})")
        lineage.add_domain(
            path,
            name,
            progress=printer,
            eval_corpus=Path(args.eval_corpus) if args.eval_corpus else None,
        )
        printer.close()
    _finish(lineage, args)


def cmd_metrics(args) -> None:
    from das_engine.end_task import stored_matrix
    from das_engine.lineage import Lineage

    lineage = Lineage.open(Path(args.lineage))
    _finish(lineage, args)
    end_task = stored_matrix(lineage)
    if end_task is not None:
        print("\nend-task results as of the last `das-engine eval`:")
        print(format_end_task(end_task))


def format_end_task(r: dict) -> str:
    """Accuracy and macro-F1 matrices (row = base / after stage, column = task) + summary."""
    width = max([len(x) for x in r["rows"]] + [8])
    lines = []
    for key, title in (("accuracy", "accuracy"), ("macro_f1", "macro-F1")):
        how = "linear probe" if r["settings"].get("mode") == "linear" else "fine-tuned"
        lines.append(f"end-task {title} ({how}; row = after stage, column = task):")
        lines.append(" " * (width + 2) + " ".join(f"{t[:7]:>7}" for t in r["tasks"]))
        for name, row in zip(r["rows"], r[key], strict=True):
            lines.append(f"{name:<{width}}  " + " ".join(_fmt(x) for x in row))
        s = r["summary"][key]
        lines.append(
            f"forgetting rate {_fmt(s['forgetting_rate'])}   bwt {_fmt(s['bwt'])}   "
            f"fwt {_fmt(s['fwt'])}   max-forgetting {_fmt(s['max_forgetting'])}"
        )
    aligned = r["summary"]["accuracy"]["aligned_tasks"]
    if len(aligned) < len(r["tasks"]):
        lines.append(
            "tasks not named after a domain of the lineage are left out of forgetting/transfer"
        )
    return "\n".join(lines)


def cmd_eval(args) -> None:
    from das_engine.end_task import end_task_matrix
    from das_engine.lineage import Lineage

    lineage = Lineage.open(Path(args.lineage))
    tasks: dict[str, Path] = {}
    for name, path in _domain_args(args.task):
        if name in tasks:
            raise DasError(f"task {name!r} given twice")
        tasks[name] = path
    result = end_task_matrix(
        lineage,
        tasks,
        progress=None if args.quiet else _say,
        seed=args.seed,
        test_fraction=args.test_fraction,
        mode=args.mode,
        **({"epochs": args.epochs, "lr": args.lr} if args.mode == "finetune" else {}),
    )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_end_task(result))
        _say(f"{result['computed']} new cell(s); stored in {lineage.path / 'end_task'}")


def cmd_fork(args) -> None:
    from das_engine.lineage import Lineage

    new = Lineage.open(Path(args.lineage)).fork(Path(args.out), args.stage)
    print(f"forked {args.lineage} at stage {args.stage} into {new.path}")


def cmd_bases(args) -> None:
    from das_engine.bases import list_offline_bases

    for info in list_offline_bases(Path(args.models_dir) if args.models_dir else None):
        print(json.dumps(info.to_dict()))


def cmd_init_base(args) -> None:
    from das_engine.bases import DECODER_ARCHITECTURES, build_tiny_model, save_base, train_tokenizer
    from das_engine.errors import ConfigError

    if not 0.0 <= args.dropout <= 0.9:
        raise ConfigError(f"--dropout must be in [0, 0.9], got {args.dropout}")
    files = [Path(f) for f in args.from_corpus]
    tokenizer = train_tokenizer(
        files,
        vocab_size=args.vocab_size,
        max_length=args.max_positions,
        decoder=args.arch in DECODER_ARCHITECTURES,
    )
    model = build_tiny_model(
        tokenizer,
        architecture=args.arch,
        hidden_size=args.hidden_size,
        layers=args.layers,
        heads=args.heads,
        intermediate_size=args.intermediate_size,
        max_positions=args.max_positions,
        seed=args.seed,
        dropout=args.dropout,
    )
    out = Path(args.out)
    save_base(model, tokenizer, out)
    if args.pretrain_steps > 0:
        _pretrain(out, files, args)
    n = sum(p.numel() for p in model.parameters())
    print(f"base model written to {out} ({args.arch}, {n:,} parameters, vocab {len(tokenizer)})")


def _pretrain(out: Path, files: list[Path], args) -> None:
    """Plain LM training of the fresh base on its own corpus, so it knows *something*: the
    engine's training loop (``das_engine.pretraining``), as a one-stage NCL lineage would."""
    import shutil
    import tempfile

    from das_engine.bases import load_model, load_tokenizer
    from das_engine.config import TrainingConfig
    from das_engine.data import ChunkStore, build_datasets
    from das_engine.evaluate import heldout_loss
    from das_engine.jsonsafe import finite
    from das_engine.objective import Batcher
    from das_engine.precision import Precision, save_dtype_for, save_pretrained_as
    from das_engine.preflight import preflight
    from das_engine.pretraining import pretrain
    from das_engine.units import build_unit_map

    cfg = TrainingConfig.from_dict(
        {
            "strategy": "ncl",
            "max_steps": args.pretrain_steps,
            "learning_rate": 5e-4,
            "batch_size": 16,
            "block_size": 128,
            "seed": args.seed,
        }
    )
    device = preflight(cfg, out)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "pretrain.txt"
        with open(corpus, "w") as fh:
            for f in files:
                fh.write(Path(f).read_text(errors="replace").strip() + "\n\n")
        tokenizer = load_tokenizer(out)
        model = load_model(out).to(device)
        unit_map = build_unit_map(model)
        data = Path(tmp) / "data"
        build_datasets(
            corpus,
            tokenizer,
            data,
            block_size=cfg.block_size,
            objective=unit_map.objective,
            eval_fraction=cfg.eval_fraction,
            seed=cfg.seed,
        )
        printer = ProgressPrinter(False)
        pretrain(
            model, tokenizer, ChunkStore(data / "train"), cfg, Path(tmp) / "ckpt", progress=printer
        )
        printer.close()
        loss = heldout_loss(
            model,
            unit_map,
            ChunkStore(data / "eval"),
            Batcher(tokenizer, unit_map.objective, cfg.mlm_probability),
            batch_size=cfg.batch_size,
            max_batches=cfg.eval_max_batches,
            precision=Precision.for_stage(cfg, device),
        )
        losses = {"pretrain": finite(loss)}
        print(f"pre-trained {args.pretrain_steps} steps: held-out loss {losses}")
        save_pretrained_as(model, tokenizer, Path(tmp) / "model", save_dtype_for(cfg, out))
        shutil.rmtree(out)
        shutil.copytree(Path(tmp) / "model", out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="das-engine", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def config_flags(sp):
        for flag, (_field, typ) in CONFIG_FLAGS.items():
            sp.add_argument(flag, type=typ, default=None)
        sp.add_argument(
            "--set",
            action="append",
            metavar="KEY=VALUE",
            help="any TrainingConfig field or strategy parameter, e.g. --set "
            "contrast_weight=0.5 or --set replay_ratio=0.1",
        )

    run = sub.add_parser("run", help="create a lineage and train it on domains in order")
    run.add_argument("--base", required=True, help="base id (tiny-roberta), local dir or hub name")
    run.add_argument(
        "--strategy",
        default="das",
        choices=strategy_names(),
        help="the continual-learning method (default das; docs/engine.md, Strategies)",
    )
    run.add_argument("--out", required=True, help="the lineage directory to create")
    run.add_argument("--general-corpus", help="a general reference corpus to track")
    run.add_argument("--models-dir", help="folder of local HF model directories")
    run.add_argument("--allow-hub", action="store_true", help="allow downloading the base")
    run.add_argument("--json", action="store_true", help="write <out>/metrics.json")
    run.add_argument("--quiet", action="store_true")
    run.add_argument("corpora", nargs="+", help="corpus files (.txt/.jsonl[.gz]) or name=path")
    config_flags(run)
    run.set_defaults(func=cmd_run)

    add = sub.add_parser("add", help="continue a lineage with new domain(s)")
    add.add_argument("--lineage", required=True)
    add.add_argument("--name", help="domain name (default: the file name)")
    add.add_argument("--eval-corpus", help="held-out corpus for this domain")
    add.add_argument("--json", action="store_true")
    add.add_argument("--quiet", action="store_true")
    add.add_argument("corpora", nargs="+")
    add.set_defaults(func=cmd_add)

    met = sub.add_parser("metrics", help="print the loss matrix and forgetting figures")
    met.add_argument("--lineage", required=True)
    met.add_argument("--json", action="store_true")
    met.set_defaults(func=cmd_metrics)

    ev = sub.add_parser("eval", help="end-task accuracy/macro-F1 of every stage (linear probe)")
    ev.add_argument("--lineage", required=True)
    ev.add_argument(
        "--task",
        action="append",
        required=True,
        metavar="NAME=FILE.jsonl",
        help='labelled JSONL, one {"text": ..., "label": ...} a line; name it after a domain',
    )
    ev.add_argument("--seed", type=int, default=0, help="split and classifier seed")
    ev.add_argument("--test-fraction", type=float, default=0.3)
    ev.add_argument(
        "--mode",
        choices=["linear", "finetune"],
        default="linear",
        help="linear probe on frozen features (default) or fine-tuning with a linear head",
    )
    ev.add_argument("--epochs", type=int, default=3, help="finetune mode: epochs")
    ev.add_argument("--lr", type=float, default=1e-4, help="finetune mode: AdamW learning rate")
    ev.add_argument("--json", action="store_true", help="print the result as JSON")
    ev.add_argument("--quiet", action="store_true")
    ev.set_defaults(func=cmd_eval)

    fork = sub.add_parser("fork", help="branch a lineage after a given stage")
    fork.add_argument("--lineage", required=True)
    fork.add_argument("--stage", type=int, required=True)
    fork.add_argument("--out", required=True)
    fork.set_defaults(func=cmd_fork)

    bases = sub.add_parser("bases", help="list the base models loadable offline")
    bases.add_argument("--models-dir")
    bases.set_defaults(func=cmd_bases)

    ib = sub.add_parser("init-base", help="build a small base model + tokenizer locally")
    ib.add_argument("--out", required=True)
    ib.add_argument("--from-corpus", nargs="+", required=True, help="text to train the tokenizer")
    ib.add_argument(
        "--arch",
        "--family",
        dest="arch",
        default="roberta",
        choices=supported_model_types(),
        help="the model type of the new base (any supported family)",
    )
    ib.add_argument("--vocab-size", type=int, default=4000)
    ib.add_argument("--hidden-size", type=int, default=64)
    ib.add_argument("--layers", type=int, default=2)
    ib.add_argument("--heads", type=int, default=4)
    ib.add_argument("--intermediate-size", type=int, default=256)
    ib.add_argument("--max-positions", type=int, default=512)
    ib.add_argument("--pretrain-steps", type=int, default=0)
    ib.add_argument("--seed", type=int, default=0)
    ib.add_argument(
        "--dropout",
        type=float,
        default=0.1,
        help="every dropout of the model config (0 like real Llama: DAS then adds "
        "importance_dropout to its two-view objectives only)",
    )
    ib.set_defaults(func=cmd_init_base)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.func in (cmd_run, cmd_add):  # every rank trains (data parallel)
            args.func(args)
        else:  # under torchrun, one rank does the rest
            distributed.run_on_main(lambda: args.func(args))
    except DasError as exc:
        print(f"das-engine: error [{exc.code}]: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("das-engine: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
