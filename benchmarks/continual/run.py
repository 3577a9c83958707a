"""Run every strategy on the same domain sequence, seeds and token budget.

    python -m benchmarks.continual.run \\
        --domains scripture,postgres,computing,python --data-dir benchmarks/data/out \\
        --base ~/.cache/das-engine/bench-base/model \\
        --general ~/.cache/das-engine/bench-base/general_eval.txt \\
        --strategies kd,ewc,replay,adapter --seeds 0,1,2 --tokens-per-domain 200000 \\
        --out benchmarks/out/continual

Current-practice baselines (variants.py): ``replay_mix`` (with ``ncl_rewarm``, its control
without replay), ``merge``, ``merge_ties``, ``das_rewarm``, ``das_merge`` (and
``das_merge_permuted``), e.g. ``--strategies replay_mix,ncl_rewarm,merge,das_merge``.

The controls are always added (``--no-controls`` drops them, for smoke tests only): DAS
with importance permuted onto random units and NCL at learning rate x1, x0.5, x0.25, x0.1;
unless ``--no-studies``, also DAS with gradient masking and the one-sided / rank
normalisations.

Data: each domain file is cut once, by document, into a training slice of about
``--tokens-per-domain`` x ``--train-slack`` tokens and a disjoint held-out slice of about
``--eval-tokens`` tokens (``<out>/data/``); every run of every variant reads these files.
Each (variant, seed) is a lineage under ``<out>/runs/<variant>/seed-<k>/``; a finished run
writes ``metrics.json`` there and is skipped when the command is run again (resume).
Results: ``<out>/results.json``, ``<out>/results.md`` and PNG plots (see report.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from benchmarks.continual.report import write_report
from benchmarks.continual.variants import Variant, expand

COMMON_DEFAULTS = {
    "learning_rate": 1e-4,
    "batch_size": 16,
    "block_size": 128,
    "warmup_ratio": 0.0,
    "eval_max_batches": 16,
    "importance_max_batches": 16,
    "checkpoint_every": 10**6,  # a benchmark run is restarted per lineage, not per step
    "mixed_precision": "no",
}


# -- data ------------------------------------------------------------------------------------


def _domain_path(spec: str, data_dir: Path) -> tuple[str, Path]:
    name, sep, path = spec.partition("=")
    if sep:
        return name, Path(path)
    return name, data_dir / f"{name}.txt"


def slice_domain(
    src: Path, out_dir: Path, name: str, tokenizer, train_tokens: int, eval_tokens: int, seed: int
) -> dict:
    """A seeded, document-level train/eval cut of a corpus, sized in tokens (written once)."""
    from das_engine.data import iter_documents

    train_path, eval_path = out_dir / f"{name}.train.txt", out_dir / f"{name}.eval.txt"
    meta_path = out_dir / f"{name}.json"
    if meta_path.exists() and train_path.exists() and eval_path.exists():
        return json.loads(meta_path.read_text())
    docs = list(iter_documents(src))
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    counts = {"eval": 0, "train": 0}
    picked: dict[str, list[str]] = {"eval": [], "train": []}
    for i in order:
        split = "eval" if counts["eval"] < eval_tokens else "train"
        if split == "train" and counts["train"] >= train_tokens:
            break
        n = len(tokenizer(docs[i], add_special_tokens=False)["input_ids"]) + 1
        picked[split].append(docs[i])
        counts[split] += n
    out_dir.mkdir(parents=True, exist_ok=True)
    train_path.write_text("\n\n".join(picked["train"]) + "\n", encoding="utf-8")
    eval_path.write_text("\n\n".join(picked["eval"]) + "\n", encoding="utf-8")
    meta = {
        "name": name,
        "source": str(src),
        "documents": len(docs),
        "train": str(train_path),
        "eval": str(eval_path),
        "train_documents": len(picked["train"]),
        "eval_documents": len(picked["eval"]),
        "train_tokens": counts["train"],
        "eval_tokens": counts["eval"],
    }
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def slice_general(src: Path, out_dir: Path, tokenizer, tokens: int) -> Path:
    """The first documents of the general corpus up to ``tokens`` tokens (eval only)."""
    from das_engine.data import iter_documents

    path = out_dir / "general.eval.txt"
    if path.exists():
        return path
    picked, count = [], 0
    for doc in iter_documents(src):
        picked.append(doc)
        count += len(tokenizer(doc, add_special_tokens=False)["input_ids"]) + 1
        if count >= tokens:
            break
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(picked) + "\n", encoding="utf-8")
    return path


# -- one run ----------------------------------------------------------------------------------


def run_one(job: dict) -> dict:
    """Train one lineage (one variant, one seed) through every domain; return its metrics."""
    import torch

    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    from das_engine.lineage import Lineage

    run_dir = Path(job["run_dir"])
    done = run_dir / "metrics.json"
    if done.exists():
        return json.loads(done.read_text())
    lin_dir = run_dir / "lineage"
    if Lineage.exists(lin_dir):
        lin = Lineage.open(lin_dir)
    else:
        if lin_dir.exists():
            shutil.rmtree(lin_dir)
        lin = Lineage.create(lin_dir, job["base"], job["config"], general_corpus=job["general"])
    rates: dict[str, float] = {}
    started = time.perf_counter()
    for d in job["domains"]:
        if d["name"] in lin.domains:
            continue
        last: dict = {}

        def progress(ev, last=last):
            if ev.phase == "training" and ev.tokens_per_s:
                last["rate"] = ev.tokens_per_s

        lin.add_domain(Path(d["train"]), d["name"], eval_corpus=Path(d["eval"]), progress=progress)
        rates[d["name"]] = last.get("rate", math.nan)
    m = lin.metrics()
    m["variant"] = job["variant"]
    m["seed"] = job["seed"]
    m["wall_s"] = sum(s["seconds"] or 0.0 for s in m["stages"])
    m["run_s"] = time.perf_counter() - started
    m["train_tokens"] = sum(s["trained_tokens"] or 0 for s in m["stages"])
    m["tokens_per_s"] = _nanmean(list(rates.values()))
    m["train_tokens_per_s_by_domain"] = rates
    m["importance"] = [s.meta.get("importance") for s in lin.stages]  # DAS: I(t), I_acc(t) stats
    if job.get("end_tasks"):
        m["end_task"] = end_task_scores(lin, job["end_tasks"], job.get("end_task_max_length", 64))
    run_dir.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(m, indent=2) + "\n")
    if not job.get("keep_lineage"):
        shutil.rmtree(lin_dir, ignore_errors=True)
    return m


def end_task_scores(lin, tasks: dict[str, str], max_length: int = 64) -> dict:
    """Linear probes (seed 0) of the base and every stage on each domain's labelled task:
    accuracy and macro-F1 matrices (rows: base, after stage t) and their FR/BWT/FWT."""
    from das_engine.end_task import end_task_matrix

    started = time.perf_counter()
    res = end_task_matrix(lin, {k: Path(v) for k, v in tasks.items()}, max_length=max_length)
    keep = ("rows", "tasks", "accuracy", "macro_f1", "summary", "settings")
    return {**{k: res[k] for k in keep}, "seconds": time.perf_counter() - started}


def _nanmean(xs: list[float]) -> float | None:
    vals = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(vals) / len(vals) if vals else None


# -- the command ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--domains",
        required=True,
        help="comma-separated domain names (files <data-dir>/<name>.txt) or name=path",
    )
    ap.add_argument("--data-dir", type=Path, default=Path("benchmarks/data/out"))
    ap.add_argument("--base", required=True, help="base model: a local HF directory or an id")
    ap.add_argument("--general", type=Path, default=None, help="general reference corpus")
    ap.add_argument(
        "--strategies",
        default="das,ncl",
        help="comma-separated variants (see variants.py) or strategy:key=value,...",
    )
    ap.add_argument(
        "--no-studies",
        action="store_true",
        help="add only the required controls (das, das_permuted, NCL's learning-rate sweep), "
        "not the mask-mode and normalisation studies (a costly base)",
    )
    ap.add_argument(
        "--no-controls",
        action="store_true",
        help="do not add the mandatory controls (smoke tests only)",
    )
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument(
        "--tokens-per-domain",
        type=int,
        required=True,
        help="training budget per domain, in chunk tokens, the same for everyone",
    )
    ap.add_argument("--eval-tokens", type=int, default=40_000)
    ap.add_argument("--general-tokens", type=int, default=40_000)
    ap.add_argument(
        "--train-slack",
        type=float,
        default=1.1,
        help="training slice size / budget (>1: no chunk is seen twice)",
    )
    ap.add_argument("--data-seed", type=int, default=1234)
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a common TrainingConfig field for every variant",
    )
    ap.add_argument(
        "--end-tasks",
        type=Path,
        default=None,
        help="folder of <domain>.jsonl labelled tasks (benchmarks/data/end_tasks.py): after"
        " the last stage, linear-probe the base and every stage on each",
    )
    ap.add_argument(
        "--end-task-max-length",
        type=int,
        default=64,
        help="tokens per labelled example the probe reads (the probes' cost is linear in it)",
    )
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per run (0: default)")
    ap.add_argument("--keep-lineages", action="store_true")
    ap.add_argument("--out", type=Path, required=True)
    return ap.parse_args(argv)


def common_config(args: argparse.Namespace) -> dict:
    from benchmarks.continual.variants import _value

    cfg = dict(COMMON_DEFAULTS)
    for item in args.set:
        key, _, raw = item.partition("=")
        cfg[key] = _value(raw)
    per_step = cfg["batch_size"] * cfg.get("grad_accum", 1) * cfg["block_size"]
    cfg["max_steps"] = max(1, math.ceil(args.tokens_per_domain / per_step))
    return cfg


def main(argv: list[str] | None = None) -> dict:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    from das_engine.bases import load_tokenizer, resolve_base
    from das_engine.config import TrainingConfig

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    base_info = resolve_base(args.base)
    tokenizer = load_tokenizer(base_info.path)
    common = common_config(args)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    variants = expand(
        [s for s in args.strategies.split(",") if s.strip()],
        not args.no_controls,
        not args.no_studies,
    )
    for v in variants:  # fail fast on a bad field, before hours of training
        TrainingConfig.from_dict(v.config(common, seeds[0]))

    budget = common["max_steps"] * common["batch_size"] * common.get("grad_accum", 1)
    chunk_tokens = budget * common["block_size"]
    domains = []
    for spec in [s for s in args.domains.split(",") if s.strip()]:
        name, path = _domain_path(spec, args.data_dir)
        meta = slice_domain(
            path,
            out / "data",
            name,
            tokenizer,
            int(chunk_tokens * args.train_slack),
            args.eval_tokens,
            args.data_seed,
        )
        domains.append(meta)
    general = (
        str(slice_general(args.general, out / "data", tokenizer, args.general_tokens))
        if args.general
        else None
    )
    end_tasks = {
        d["name"]: str(args.end_tasks / f"{d['name']}.jsonl")
        for d in domains
        if args.end_tasks and (args.end_tasks / f"{d['name']}.jsonl").exists()
    }
    if args.end_tasks and not end_tasks:
        raise SystemExit(f"--end-tasks {args.end_tasks}: no <domain>.jsonl for these domains")
    setup = {
        "command": "python -m benchmarks.continual.run "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "base": base_info.to_dict(),
        "domains": domains,
        "general": general,
        "end_tasks": end_tasks,
        "seeds": seeds,
        "tokens_per_domain": args.tokens_per_domain,
        "steps_per_domain": common["max_steps"],
        "common_config": common,
        "variants": {v.name: v.to_dict() for v in variants},
        "jobs": args.jobs,
        "threads": args.threads,
    }
    jobs = [
        {
            "variant": v.name,
            "seed": seed,
            "config": v.config(common, seed),
            "base": base_info.path,
            "general": general,
            "domains": [{k: d[k] for k in ("name", "train", "eval")} for d in domains],
            "run_dir": str(out / "runs" / v.name / f"seed-{seed}"),
            "end_tasks": end_tasks,
            "end_task_max_length": args.end_task_max_length,
            "threads": args.threads,
            "keep_lineage": args.keep_lineages,
        }
        for seed in seeds  # seed-major: a cut-short benchmark still has every variant
        for v in variants
    ]
    started = time.perf_counter()
    runs: list[dict] = []

    last_draw = [0.0]

    def record(m: dict) -> dict:
        runs.append(m)
        setup["wall_s"] = time.perf_counter() - started
        print(
            f"[{len(runs)}/{len(jobs)}] {m['variant']} seed {m['seed']}: "
            f"FR {m['forgetting_rate']} wall {m['wall_s']:.0f}s",
            flush=True,
        )
        # plots at most once a minute while running (resumed runs come back at once)
        draw = len(runs) == len(jobs) or time.perf_counter() - last_draw[0] > 60
        if draw:
            last_draw[0] = time.perf_counter()
        return write_report(out, setup, variants, runs, draw=draw)

    failed: list[dict] = []
    setup["failed"] = failed

    def fail(job: dict, exc: BaseException) -> None:
        """One run that raised: reported, listed in the results, the others go on."""
        failed.append(
            {
                "variant": job["variant"],
                "seed": job["seed"],
                "error": f"{type(exc).__name__}: {exc}",
            }
        )
        print(f"[failed] {job['variant']} seed {job['seed']}: {failed[-1]['error']}", flush=True)

    results: dict = {}
    if args.jobs <= 1:
        for job in jobs:
            try:
                m = run_one(job)
            except Exception as exc:  # noqa: BLE001 - one failed run must not stop the rest
                fail(job, exc)
            else:
                results = record(m)
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(run_one, job): job for job in jobs}
            for fut in as_completed(futures):
                try:
                    m = fut.result()
                except Exception as exc:  # noqa: BLE001
                    fail(futures[fut], exc)
                else:
                    results = record(m)
    if failed:
        results = write_report(out, setup, variants, runs, draw=bool(runs))
        print(f"{len(failed)} of {len(jobs)} runs failed (listed in results.md)", flush=True)
    return results


def variants_of(results: dict) -> list[Variant]:
    return [Variant(n, **v) for n, v in results["setup"]["variants"].items()]


if __name__ == "__main__":
    sys.exit(1 if main()["setup"].get("failed") else 0)
