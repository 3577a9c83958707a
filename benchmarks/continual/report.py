"""Aggregate benchmark runs over seeds; write results.json, results.md and the PNG plots.

Definitions (L[t][i]: held-out MLM loss on domain i after stage t; base[i]: the base's):
- forgetting_rate (FR): mean over i < T-1 of L[T-1][i] - L[i][i] (loss increase, lower is
  better); bwt = -FR; fwt and max_forgetting as in das_engine.metrics;
- learning: mean over i of base[i] - L[i][i], how far below the base's loss a domain gets
  right after its own stage (the new-domain learning axis of the plane);
- plasticity: mean over i of (loss at the start of stage i) - L[i][i];
- general_change: general-corpus loss after the last stage minus the base's;
- frontier_fr: NCL's learning-rate frontier (piecewise linear through the NCL sweep's mean
  points, learning -> FR) evaluated at the variant's learning; ``fr_vs_frontier`` = FR /
  frontier_fr (< 1: less forgetting than NCL at the same learning);
- ``fr_vs_control``: FR / FR of the variant's permuted-importance control;
- end tasks (``--end-tasks``; A[t][j]: linear-probe accuracy on domain j's labelled task
  after stage t, row 0 the base): ``end_task_fr`` = mean over j < T-1 of A[j][j] - A[T-1][j]
  (accuracy lost on earlier domains' tasks, lower is better), ``end_task_gain`` = mean over
  j of A[j][j] - base[j] (what a domain's own stage added), ``end_task_final`` = mean of the
  last row.

Python -m benchmarks.continual.report <out> re-draws everything from <out>/runs/.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

SCALARS = (
    "forgetting_rate",
    "max_forgetting",
    "bwt",
    "fwt",
    "learning",
    "plasticity",
    "general_change",
    "end_task_fr",
    "end_task_gain",
    "end_task_final",
    "wall_s",
    "tokens_per_s",
)


def _ok(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def derived(m: dict) -> dict:
    """Per-run scalars the plane needs, from the stored loss matrix."""
    L, base = m["loss_matrix"], m.get("base_losses") or []
    T = len(L)
    learn, plast = [], []
    for i in range(T):
        if i < len(base) and _ok(base[i]) and _ok(L[i][i]):
            learn.append(base[i] - L[i][i])
        start = base[i] if i == 0 else L[i - 1][i]
        if i < len(base) and _ok(start) and _ok(L[i][i]):
            plast.append(start - L[i][i])
    gen = m.get("general") or {}
    return {
        **end_task_scalars(m.get("end_task")),
        "learning": statistics.fmean(learn) if learn else None,
        "plasticity": statistics.fmean(plast) if plast else None,
        "general_change": gen.get("change"),
        "general_losses": gen.get("losses"),
        "general_base_loss": gen.get("base_loss"),
    }


def end_task_scalars(et: dict | None) -> dict:
    """Accuracy forgetting, gain and final mean from a run's end-task matrices."""
    if not et:
        return {}
    acc, tasks, doms = et["accuracy"], et["tasks"], et["rows"][1:]
    base, stages = acc[0], acc[1:]
    gain = [
        stages[i][tasks.index(d)] - base[tasks.index(d)]
        for i, d in enumerate(doms)
        if d in tasks and _ok(stages[i][tasks.index(d)]) and _ok(base[tasks.index(d)])
    ]
    summ = et["summary"]["accuracy"]
    return {
        "end_task_fr": summ.get("forgetting_rate"),
        "end_task_gain": statistics.fmean(gain) if gain else None,
        "end_task_final": summ.get("final_mean"),
        "end_task_accuracy": acc,
        "end_task_rows": et["rows"],
        "end_task_tasks": tasks,
    }


def summary(values: list) -> dict:
    vals = [v for v in values if _ok(v)]
    if not vals:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0, "values": values}
    return {
        "mean": statistics.fmean(vals),
        "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        "min": min(vals),
        "max": max(vals),
        "n": len(vals),
        "values": values,
    }


def mean_matrix(mats: list[list[list[float | None]]]) -> tuple[list, list]:
    T = len(mats[0])
    mean = [[None] * T for _ in range(T)]
    std = [[None] * T for _ in range(T)]
    for t in range(T):
        for i in range(T):
            s = summary([m[t][i] for m in mats])
            mean[t][i], std[t][i] = s["mean"], s["std"]
    return mean, std


def aggregate(runs: list[dict]) -> dict:
    out = {}
    by_variant: dict[str, list[dict]] = {}
    for r in runs:
        by_variant.setdefault(r["variant"], []).append({**r, **derived(r)})
    for name, rs in by_variant.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        mats = [r["loss_matrix"] for r in rs]
        mean, std = mean_matrix(mats)
        base_mean, _ = mean_matrix([[r["base_losses"]] * len(r["base_losses"]) for r in rs])
        entry = {
            "seeds": [r["seed"] for r in rs],
            "domains": rs[0]["domains"],
            "loss_matrix": mean,
            "loss_matrix_std": std,
            "base_losses": base_mean[0],
            "general_losses": [
                summary([r["general_losses"][t] if r["general_losses"] else None for r in rs])[
                    "mean"
                ]
                for t in range(len(mats[0]))
            ],
            "general_base_loss": rs[0]["general_base_loss"],
            "runs": [
                {
                    k: r.get(k)
                    for k in (
                        "seed",
                        "loss_matrix",
                        "stages",
                        "train_tokens",
                        "train_tokens_per_s_by_domain",
                        "end_task_accuracy",
                        *SCALARS,
                    )
                }
                for r in rs
            ],
        }
        for k in SCALARS:
            entry[k] = summary([r.get(k) for r in rs])
        if all(r.get("end_task_accuracy") for r in rs):
            accs = [r["end_task_accuracy"] for r in rs]
            entry["end_task"] = {
                "rows": rs[0]["end_task_rows"],
                "tasks": rs[0]["end_task_tasks"],
                "accuracy": [
                    [summary([a[t][j] for a in accs])["mean"] for j in range(len(accs[0][t]))]
                    for t in range(len(accs[0]))
                ],
            }
        entry["importance"] = importance_summary(rs)
        out[name] = entry
    return out


def importance_summary(rs: list[dict]) -> list[dict] | None:
    """Per stage, per unit kind: mean over seeds of I_acc's mean and share above 0.5."""
    if not all(r.get("importance") for r in rs) or not rs:
        return None
    out = []
    for t in range(len(rs[0]["importance"])):
        stage = {}
        for kind in ("head", "intermediate", "output", "embedding", "layernorm"):
            acc = [((r["importance"][t] or {}).get("accumulated") or {}).get(kind) for r in rs]
            acc = [a for a in acc if a]
            if acc:
                stage[kind] = {
                    "mean": statistics.fmean(a["mean"] for a in acc),
                    "share_above_half": statistics.fmean(a["share_above_half"] for a in acc),
                }
        out.append(stage)
    return out


def frontier(strategies: dict) -> list[tuple[float, float, str]]:
    """NCL's learning-rate sweep as (learning, FR, name) points sorted by learning."""
    pts = []
    for name, s in strategies.items():
        v = s.get("variant", {})
        if v.get("strategy") == "ncl" and not v.get("overrides") and name.startswith("ncl"):
            x, y = s["learning"]["mean"], s["forgetting_rate"]["mean"]
            if _ok(x) and _ok(y):
                pts.append((x, y, name))
    return sorted(pts)


def interpolate(pts: list[tuple[float, float, str]], x: float) -> tuple[float | None, bool]:
    """Piecewise-linear y(x) through the points; linear extrapolation outside (flagged)."""
    if len(pts) < 2 or not _ok(x):
        return None, False
    xs = [p[0] for p in pts]
    j = 1
    while j < len(pts) - 1 and x > xs[j]:
        j += 1
    (x0, y0, _), (x1, y1, _) = pts[j - 1], pts[j]
    y = y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return y, not (xs[0] <= x <= xs[-1])


def compare(strategies: dict) -> None:
    pts = frontier(strategies)
    ncl = strategies.get("ncl")
    for name, s in strategies.items():
        fr, learn = s["forgetting_rate"]["mean"], s["learning"]["mean"]
        y, extrapolated = interpolate(pts, learn)
        s["frontier_fr"] = y
        s["frontier_extrapolated"] = extrapolated
        s["fr_vs_frontier"] = fr / y if _ok(fr) and _ok(y) and y > 0 else None
        control = strategies.get(f"{name}_permuted")
        cfr = control["forgetting_rate"]["mean"] if control else None
        s["control"] = f"{name}_permuted" if control else None
        s["fr_vs_control"] = fr / cfr if _ok(fr) and _ok(cfr) and cfr > 0 else None
        if ncl is not None:
            nfr, nlearn = ncl["forgetting_rate"]["mean"], ncl["learning"]["mean"]
            s["fr_vs_ncl"] = fr / nfr if _ok(fr) and _ok(nfr) and nfr > 0 else None
            s["learning_vs_ncl"] = learn / nlearn if _ok(learn) and _ok(nlearn) and nlearn else None
            ng, g = ncl["general_change"]["mean"], s["general_change"]["mean"]
            s["general_change_vs_ncl"] = g / ng if _ok(g) and _ok(ng) and ng > 0 else None


# -- outputs ------------------------------------------------------------------------------------


def _pm(s: dict, digits: int = 3) -> str:
    if not _ok(s.get("mean")):
        return "–"
    if s.get("n", 0) > 1:
        return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"
    return f"{s['mean']:.{digits}f}"


def _num(x, digits: int = 2) -> str:
    return f"{x:.{digits}f}" if _ok(x) else "–"


def markdown(results: dict) -> str:
    setup, strategies = results["setup"], results["strategies"]
    lines = [
        "| variant | seeds | FR (forgetting) ↓ | max-forgetting ↓ | learning ↑ | general Δ ↓ "
        "| FR / NCL | FR / NCL frontier | FR / permuted | FWT | end-task FR ↓ | end-task gain ↑ "
        "| end-task final ↑ | wall s | train tok/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in strategies.items():
        lines.append(
            f"| {name} | {len(s['seeds'])} | {_pm(s['forgetting_rate'])} "
            f"| {_pm(s['max_forgetting'])} | {_pm(s['learning'])} | {_pm(s['general_change'])} "
            f"| {_num(s.get('fr_vs_ncl'))} "
            f"| {_num(s.get('fr_vs_frontier'))}{'*' if s.get('frontier_extrapolated') else ''} "
            f"| {_num(s.get('fr_vs_control'))} | {_pm(s['fwt'])} "
            f"| {_pm(s['end_task_fr'])} | {_pm(s['end_task_gain'])} | {_pm(s['end_task_final'])} "
            f"| {_pm(s['wall_s'], 0)} | {_pm(s['tokens_per_s'], 0)} |"
        )
    lines += saturation_table(strategies)
    doms = " → ".join(d["name"] for d in setup["domains"])
    head = [
        f"Domains: {doms}; {setup['tokens_per_domain']} tokens "
        f"({setup['steps_per_domain']} steps) per domain; seeds {setup['seeds']}.",
        "",
        "FR: mean increase of held-out loss on earlier domains after the last stage. learning:"
        " mean (base loss − loss right after the domain's own stage). general Δ: general-corpus"
        " loss change, last stage vs base. FR / NCL frontier: FR divided by the FR of NCL's"
        " learning-rate frontier at the same learning (* = extrapolated beyond the sweep)."
        " end-task: linear-probe accuracy on each domain's labelled task (FR: accuracy lost on"
        " earlier domains' tasks after the last stage; gain: own stage vs base; final: mean"
        " of the last row; – when the run had no --end-tasks). mean ± std over seeds.",
        "",
    ]
    failed = setup.get("failed") or []
    if failed:  # left out of the table above; re-running the command retries them
        lines += ["", f"{len(failed)} run(s) failed and are not in the table:", ""]
        lines += [f"- {f['variant']} seed {f['seed']}: {f['error']}" for f in failed]
    return "\n".join(head + lines) + "\n"


SATURATION_KINDS = ("head", "intermediate", "output", "embedding", "layernorm")


def saturation_table(strategies: dict) -> list[str]:
    """Importance saturation: per variant and stage, the share of units whose accumulated
    importance I_acc is above 0.5, per unit kind (mean over seeds)."""
    rows = {n: s["importance"] for n, s in strategies.items() if any(s.get("importance") or [])}
    if not rows:
        return []
    stages = max(len(v) for v in rows.values())
    out = [
        "",
        "Importance saturation: share of units with accumulated importance I_acc > 0.5 after"
        " each stage, per unit kind (head / FFN neuron / FFN output / embedding row / norm"
        " element; – where the variant does not measure that kind). A protection budget b"
        " masks only the top b of each layer, so such a variant protects at most b.",
        "",
        "| variant | " + " | ".join(f"after stage {t + 1}" for t in range(stages)) + " |",
        "|---|" + "---|" * stages,
    ]
    for name, per_stage in rows.items():
        cells = []
        for stage in per_stage:
            shares = [stage.get(k, {}).get("share_above_half") for k in SATURATION_KINDS]
            cells.append(" / ".join(_num(x) for x in shares))
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return out


def plots(results: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strategies = results["strategies"]
    names = list(strategies)
    files = []
    domains = [d["name"] for d in results["setup"]["domains"]]
    T = len(domains)

    # 1. forgetting heatmap per strategy: L[t][i] - L[i][i] for t >= i
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.9 * rows), squeeze=False)
    mats = {}
    vmax = 1e-9
    for n in names:
        L = strategies[n]["loss_matrix"]
        F = [
            [
                (L[t][i] - L[i][i]) if t >= i and _ok(L[t][i]) and _ok(L[i][i]) else math.nan
                for i in range(T)
            ]
            for t in range(T)
        ]
        mats[n] = F
        vmax = max(vmax, max((abs(x) for r in F for x in r if _ok(x)), default=0.0))
    for k, n in enumerate(names):
        ax = axes[k // cols][k % cols]
        im = ax.imshow(mats[n], cmap="RdBu_r", vmin=-vmax, vmax=vmax)
        ax.set_title(n, fontsize=9)
        ax.set_xticks(range(T), [d[:6] for d in domains], fontsize=7, rotation=45)
        ax.set_yticks(range(T), [f"after {t + 1}" for t in range(T)], fontsize=7)
        for t in range(T):
            for i in range(T):
                if _ok(mats[n][t][i]):
                    ax.text(i, t, f"{mats[n][t][i]:.2f}", ha="center", va="center", fontsize=6)
    for k in range(len(names), rows * cols):
        axes[k // cols][k % cols].axis("off")
    fig.colorbar(im, ax=axes, shrink=0.6, label="loss increase since own stage")
    fig.suptitle("Forgetting: held-out loss increase on domain i (column) after stage t (row)")
    files.append(_save(fig, out / "forgetting_heatmaps.png"))

    # 2. held-out loss per domain over stages (stage 0 = base), plus the general corpus
    panels = T + (1 if any(strategies[n]["general_losses"][0] is not None for n in names) else 0)
    fig, axes = plt.subplots(1, panels, figsize=(3.4 * panels, 3.4), squeeze=False)
    cmap = plt.get_cmap("tab20")
    for k, n in enumerate(names):
        s = strategies[n]
        style = {"color": cmap(k % 20), "lw": 1.2, "marker": ".", "label": n}
        for i in range(T):
            ys = [s["base_losses"][i]] + [s["loss_matrix"][t][i] for t in range(T)]
            axes[0][i].plot(range(T + 1), ys, **style)
        if panels > T:
            ys = [s["general_base_loss"]] + s["general_losses"]
            axes[0][T].plot(range(T + 1), ys, **style)
    for i in range(panels):
        ax = axes[0][i]
        ax.set_title(domains[i] if i < T else "general corpus", fontsize=9)
        ax.set_xlabel("after stage (0 = base)", fontsize=8)
        ax.axvline(i + 1, color="grey", lw=0.5, ls=":") if i < T else None
    axes[0][0].set_ylabel("held-out MLM loss")
    axes[0][-1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    files.append(_save(fig, out / "loss_per_domain.png"))

    # 3. the plane: forgetting vs new-domain learning, NCL's learning-rate frontier
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    pts = frontier(strategies)
    for ax, key, label in (
        (axes[0], "forgetting_rate", "forgetting rate (earlier domains) ↓"),
        (axes[1], "general_change", "general-corpus loss change ↓"),
    ):
        if pts:
            fx = [strategies[p[2]]["learning"]["mean"] for p in pts]
            fy = [strategies[p[2]][key]["mean"] for p in pts]
            ax.plot(fx, fy, "-", color="black", lw=1, label="NCL learning-rate sweep")
        for k, n in enumerate(names):
            s = strategies[n]
            x, y = s["learning"], s[key]
            if not (_ok(x["mean"]) and _ok(y["mean"])):
                continue
            marker = "s" if n.startswith("ncl") else ("x" if "permuted" in n else "o")
            ax.errorbar(
                x["mean"],
                y["mean"],
                xerr=x["std"] or 0,
                yerr=y["std"] or 0,
                fmt=marker,
                color=cmap(k % 20),
                ms=6,
                capsize=2,
                lw=0.8,
            )
            ax.annotate(
                n, (x["mean"], y["mean"]), fontsize=6, xytext=(3, 3), textcoords="offset points"
            )
        ax.set_xlabel("new-domain learning (base loss − loss after own stage) →")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if pts:
        axes[0].legend(fontsize=7)
    fig.suptitle(
        "Forgetting vs learning: better is down and right; "
        "DAS counts only beyond NCL's frontier and its permuted control"
    )
    files.append(_save(fig, out / "plane.png"))
    return files


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def write_report(out: Path, setup: dict, variants, runs: list[dict], draw: bool = True) -> dict:
    strategies = aggregate(runs)
    order = [v.name for v in variants if v.name in strategies]
    strategies = {n: strategies[n] for n in order}
    for v in variants:
        if v.name in strategies:
            strategies[v.name]["variant"] = v.to_dict()
    compare(strategies)
    results = {"setup": setup, "strategies": strategies}
    out = Path(out)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results))
    if draw:
        plots(results, out)
    return results


def main(argv: list[str] | None = None) -> None:
    from benchmarks.continual.run import variants_of

    out = Path((argv or sys.argv[1:])[0])
    old = json.loads((out / "results.json").read_text())
    runs = [json.loads(p.read_text()) for p in sorted(out.glob("runs/*/seed-*/metrics.json"))]
    write_report(out, old["setup"], variants_of(old), runs)


if __name__ == "__main__":
    main()
