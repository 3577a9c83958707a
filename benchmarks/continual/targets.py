"""Issue 11's targets, per variant, over one or more benchmark folders of the same setup.

Each ratio is taken per seed against the same seed's reference run (NCL; NCL's
learning-rate frontier interpolated at the variant's own learning; ``replay_mix``; the
variant's ``_permuted`` control), then shown as mean ± std over seeds, so the spread is
the spread of the ratio, not of its parts.

    python -m benchmarks.continual.targets benchmarks/out/continual-llama \\
        benchmarks/out/continual-llama-das-replay --report docs/benchmark/llama

``--report DEST`` also writes one report (table, saturation, plots) over all the folders'
runs into DEST, variants in ``ORDER`` (the setup is the first folder's).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from benchmarks.continual.report import derived, interpolate, write_report
from benchmarks.continual.variants import expand

FRONTIER = ("ncl", "ncl_lr0.5", "ncl_lr0.25", "ncl_lr0.1")
ORDER = (
    *FRONTIER,
    "das_emb_ln",
    "das_emb_ln_permuted",
    "das_emb_ln_lr2",
    "das_emb_ln_lr0.5",
    "replay_mix",
    "das_replay",
    "das_replay_permuted",
    "das_replay_lr2",
    "das_merge",
    "ncl_rewarm",
    "das_emb_ln_budget0.5",
    "das_emb_ln_budget0.5_permuted",
    "das_emb_ln_budget0.25",
    "das_emb_ln_budget0.25_permuted",
    "das_emb_ln_one_sided",
    "das_emb_ln_one_sided_permuted",
    "das_emb_ln_rank",
    "das_emb_ln_rank_permuted",
    "das",
    "das_permuted",
)
COLUMNS = (
    "FR",
    "learning",
    "general Δ",
    "learning / NCL",
    "FR / NCL",
    "FR / NCL frontier",
    "FR / replay_mix",
    "general Δ / NCL",
    "FR / own permuted",
    "end-task FR",
)


def load_runs(folders: list[Path]) -> dict[str, dict[int, dict]]:
    """variant -> seed -> that run's metrics.json."""
    out: dict[str, dict[int, dict]] = {}
    for folder in folders:
        for path in sorted(folder.glob("runs/*/seed-*/metrics.json")):
            run = json.loads(path.read_text())
            if "loss_matrix" in run:  # a run's own file: learning etc. come from its matrix
                run = {**run, **derived(run)}
            out.setdefault(run["variant"], {})[run["seed"]] = run
    return out


def _pm(xs: list[float]) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "–"
    mean = statistics.fmean(xs)
    return f"{mean:.2f}" + (f" ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else "")


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def rows(runs: dict[str, dict[int, dict]]) -> dict[str, dict[str, list[float | None]]]:
    """variant -> column -> per-seed values."""
    out = {}
    for name in [n for n in ORDER if n in runs] + sorted(set(runs) - set(ORDER)):
        cols: dict[str, list[float | None]] = {c: [] for c in COLUMNS}
        for seed, r in sorted(runs[name].items()):
            fr, learn, gen = r["forgetting_rate"], r["learning"], r["general_change"]
            cols["FR"].append(fr)
            cols["learning"].append(learn)
            cols["general Δ"].append(gen)
            cols["end-task FR"].append(r.get("end_task_fr"))
            ncl = runs.get("ncl", {}).get(seed)
            if ncl:
                cols["learning / NCL"].append(_ratio(learn, ncl["learning"]))
                cols["FR / NCL"].append(_ratio(fr, ncl["forgetting_rate"]))
                cols["general Δ / NCL"].append(_ratio(gen, ncl["general_change"]))
            pts = sorted(
                (runs[n][seed]["learning"], runs[n][seed]["forgetting_rate"], n)
                for n in FRONTIER
                if seed in runs.get(n, {})
            )
            cols["FR / NCL frontier"].append(_ratio(fr, interpolate(pts, learn)[0]))
            replay = runs.get("replay_mix", {}).get(seed)
            cols["FR / replay_mix"].append(_ratio(fr, replay and replay["forgetting_rate"]))
            control = runs.get(f"{name}_permuted", {}).get(seed)
            cols["FR / own permuted"].append(_ratio(fr, control and control["forgetting_rate"]))
        out[name] = cols
    return out


def markdown(table: dict[str, dict[str, list[float | None]]]) -> str:
    lines = [
        "| variant | seeds | " + " | ".join(COLUMNS) + " |",
        "|---|---|" + "---|" * len(COLUMNS),
    ]
    for name, cols in table.items():
        cells = " | ".join(_pm(cols[c]) for c in COLUMNS)
        lines.append(f"| {name} | {len(cols['FR'])} | {cells} |")
    return "\n".join(lines) + "\n"


def merged_report(dest: Path, folders: list[Path]) -> dict:
    setup = json.loads((folders[0] / "results.json").read_text())["setup"]
    runs = [
        json.loads(p.read_text()) for f in folders for p in f.glob("runs/*/seed-*/metrics.json")
    ]
    present = {r["variant"] for r in runs}
    names = [n for n in ORDER if n in present] + sorted(present - set(ORDER))
    variants = expand(names, controls=False)
    setup["variants"] = {v.name: v.to_dict() for v in variants}
    setup["seeds"] = sorted({r["seed"] for r in runs})
    dest.mkdir(parents=True, exist_ok=True)
    return write_report(dest, setup, variants, runs)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", type=Path, nargs="+")
    ap.add_argument("--report", type=Path, default=None, help="also write a merged report here")
    args = ap.parse_args(argv)
    text = markdown(rows(load_runs(args.folders)))
    if args.report:
        merged_report(args.report, args.folders)
        (args.report / "targets.md").write_text(text)
    print(text, end="")
    return text


if __name__ == "__main__":
    main()
