"""The continual benchmark runner end to end on a tiny base and two small domains."""

from __future__ import annotations

import json
import random

from benchmarks.continual import run as bench
from benchmarks.continual.report import end_task_scalars, interpolate
from benchmarks.continual.variants import CONTROLS, expand
from das_engine.config import TrainingConfig

VOCAB = {
    "farm": "cow barn hay field tractor harvest milk wheat plough sheep fence seed".split(),
    "sea": "boat wave harbour sail anchor tide fish net lighthouse storm deck crew".split(),
    "general": "the a of and to in is was for on that with as by at from it this".split(),
}


def _corpus(path, words, docs, seed):
    rng = random.Random(seed)
    path.write_text(
        "\n\n".join(" ".join(rng.choice(words) for _ in range(30)) for _ in range(docs)) + "\n"
    )
    return path


def test_controls_are_always_added():
    names = [v.name for v in expand(["kd"])]
    assert names[0] == "kd"
    assert set(CONTROLS) <= set(names)
    assert {
        "das_permuted",
        "ncl",
        "ncl_lr0.5",
        "ncl_lr0.25",
        "ncl_lr0.1",
        "das_gradient",
        "das_one_sided",
        "das_rank",
    } <= set(names)
    assert [v.name for v in expand(["ncl", "ewc"], controls=False)] == ["ncl", "ewc"]
    # DAS variants pin the paper's objective and units whatever the engine's defaults are
    das = expand(["das"], controls=False)[0].config({}, seed=0)
    assert (das["contrast_weight"], das["mask_embeddings"], das["mask_layernorm"]) == (
        1.0,
        False,
        False,
    )
    emb = expand(["das_emb"], controls=False)[0].config({"contrast_weight": 0.0}, seed=0)
    assert (emb["contrast_weight"], emb["mask_embeddings"], emb["mask_layernorm"]) == (
        0.0,
        True,
        False,
    )
    lean = [v.name for v in expand(["das_emb_ln"], studies=False)]
    assert set(CONTROLS) <= set(lean) and not {"das_gradient", "das_rank"} & set(lean)
    # the current-practice baselines (issue 11), DAS + merge pinned like every DAS variant
    new = {v.name: v for v in expand(["replay_mix", "merge", "merge_ties", "das_merge", "elle"])}
    assert new["das_merge"].config({}, seed=0)["contrast_weight"] == 1.0
    assert new["merge_ties"].config({}, seed=0)["merge_method"] == "ties"
    for v in new.values():  # each one a valid config of a registered strategy
        TrainingConfig.from_dict(v.config({}, seed=0))
    adhoc = expand(["das:mask_mode=gradient,lr_scale=0.5"], controls=False)[0]
    assert adhoc.overrides == {"mask_mode": "gradient"} and adhoc.lr_scale == 0.5


def test_frontier_interpolation():
    pts = [(0.1, 0.05, "a"), (0.3, 0.2, "b"), (0.5, 0.5, "c")]
    y, extrapolated = interpolate(pts, 0.2)
    assert abs(y - 0.125) < 1e-9 and not extrapolated
    y, extrapolated = interpolate(pts, 0.6)
    assert extrapolated and abs(y - 0.65) < 1e-9


def test_tiny_two_domain_two_strategy_run(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i, (name, words) in enumerate(VOCAB.items()):
        _corpus(data / f"{name}.txt", words, 60, i)
    out = tmp_path / "bench"
    results = bench.main(
        [
            "--domains",
            "farm,sea",
            "--data-dir",
            str(data),
            "--base",
            "tiny-roberta",
            "--general",
            str(data / "general.txt"),
            "--strategies",
            "ncl,das",
            "--no-controls",
            "--seeds",
            "0,1",
            "--tokens-per-domain",
            "256",
            "--train-slack",
            "3",
            "--eval-tokens",
            "300",
            "--general-tokens",
            "300",
            "--set",
            "batch_size=4",
            "--set",
            "block_size=32",
            "--set",
            "eval_max_batches=2",
            "--set",
            "importance_max_batches=1",
            "--out",
            str(out),
        ]
    )
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["strategies"].keys() == results["strategies"].keys() == {"ncl", "das"}
    assert on_disk["setup"]["steps_per_domain"] == 2  # 256 tokens / (4 x 32)
    for name, s in on_disk["strategies"].items():
        assert s["seeds"] == [0, 1]
        assert len(s["loss_matrix"]) == 2 and all(len(r) == 2 for r in s["loss_matrix"])
        for key in (
            "forgetting_rate",
            "bwt",
            "fwt",
            "max_forgetting",
            "general_change",
            "wall_s",
            "tokens_per_s",
            "learning",
        ):
            assert set(s[key]) >= {"mean", "std", "values"}, (name, key)
            assert s[key]["n"] == 2, (name, key)
        assert s["bwt"]["mean"] == -s["forgetting_rate"]["mean"]
        assert len(s["runs"]) == 2
    for f in ("results.md", "forgetting_heatmaps.png", "loss_per_domain.png", "plane.png"):
        assert (out / f).stat().st_size > 0
    assert "| ncl |" in (out / "results.md").read_text()
    # same data for every run; finished runs are skipped on a second invocation
    assert (out / "data" / "farm.train.txt").exists()
    assert not (out / "runs" / "ncl" / "seed-0" / "lineage").exists()  # only metrics kept
    before = (out / "runs" / "das" / "seed-1" / "metrics.json").stat().st_mtime_ns
    bench.main(
        [
            "--domains",
            "farm,sea",
            "--data-dir",
            str(data),
            "--base",
            "tiny-roberta",
            "--strategies",
            "das",
            "--no-controls",
            "--seeds",
            "1",
            "--tokens-per-domain",
            "256",
            "--set",
            "batch_size=4",
            "--set",
            "block_size=32",
            "--out",
            str(out),
        ]
    )
    assert (out / "runs" / "das" / "seed-1" / "metrics.json").stat().st_mtime_ns == before


def _labelled(path, groups: dict[str, list[str]], per_class: int, seed: int):
    rng = random.Random(seed)
    rows = [
        {"text": " ".join(rng.choice(words) for _ in range(12)), "label": label}
        for label, words in groups.items()
        for _ in range(per_class)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_end_task_scalars_follow_their_definitions():
    # rows: base, after stage 1, after stage 2; columns: tasks a, b (domains a then b)
    et = {
        "rows": ["base", "a", "b"],
        "tasks": ["a", "b"],
        "accuracy": [[0.5, 0.4], [0.8, 0.45], [0.6, 0.9]],
        "summary": {"accuracy": {"forgetting_rate": 0.2, "final_mean": 0.75}},
    }
    got = end_task_scalars(et)
    # gain: own stage vs base, mean of (0.8 - 0.5) and (0.9 - 0.4)
    assert abs(got["end_task_gain"] - 0.4) < 1e-12
    assert got["end_task_fr"] == 0.2 and got["end_task_final"] == 0.75
    assert end_task_scalars(None) == {}


def test_runner_probes_every_stage_on_each_domains_task(tmp_path):
    data, tasks = tmp_path / "data", tmp_path / "tasks"
    data.mkdir()
    tasks.mkdir()
    for i, (name, words) in enumerate(VOCAB.items()):
        _corpus(data / f"{name}.txt", words, 40, i)
    half = {n: len(w) // 2 for n, w in VOCAB.items()}
    for name in ("farm", "sea"):
        words = VOCAB[name]
        groups = {"first": words[: half[name]], "second": words[half[name] :]}
        _labelled(tasks / f"{name}.jsonl", groups, 12, 0)
    out = tmp_path / "bench"
    args = "--domains farm,sea --base tiny-roberta --strategies ncl --no-controls --seeds 0"
    args += " --tokens-per-domain 128 --train-slack 3 --eval-tokens 300 --set batch_size=4"
    args += " --set block_size=32 --set eval_max_batches=1"
    bench.main(
        args.split() + ["--data-dir", str(data), "--end-tasks", str(tasks), "--out", str(out)]
    )
    res = json.loads((out / "results.json").read_text())
    assert res["setup"]["end_tasks"].keys() == {"farm", "sea"}
    s = res["strategies"]["ncl"]
    et = s["end_task"]
    assert et["rows"] == ["base", "farm", "sea"] and et["tasks"] == ["farm", "sea"]
    assert all(len(r) == 2 and all(0.0 <= x <= 1.0 for x in r) for r in et["accuracy"])
    assert s["end_task_fr"]["n"] == 1 and s["end_task_final"]["n"] == 1
    # final = mean of the last row; gain = own stage minus base, averaged over the domains
    A = et["accuracy"]
    assert abs(s["end_task_final"]["mean"] - (A[2][0] + A[2][1]) / 2) < 1e-9
    assert abs(s["end_task_gain"]["mean"] - ((A[1][0] - A[0][0]) + (A[2][1] - A[0][1])) / 2) < 1e-9
    row = next(ln for ln in (out / "results.md").read_text().splitlines() if "| ncl |" in ln)
    assert "–" not in row.split("|")[11]  # the end-task FR column is filled


def test_end_task_builder_balances_classes():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks" / "data"))
    from end_tasks import balanced

    pairs = [(f"text {i}", "a") for i in range(10)] + [(f"text {i}", "b") for i in range(3)]
    pairs += [(f"other {i}", "c") for i in range(6)] + [("text 1", "a")]  # a duplicate
    rows = balanced(pairs, per_class=5, seed=0)
    labels = [r["label"] for r in rows]
    assert sorted(set(labels)) == ["a", "c"]  # b has too few and is dropped
    assert labels.count("a") == labels.count("c") == 5
    assert len({r["text"] for r in rows}) == len(rows)
    assert balanced(pairs, per_class=5, seed=0) == rows  # seeded


def test_das_sweeps_start_from_the_engine_default():
    """The DAS learning-rate sweep rides with the controls; the budget variants and their
    random-unit controls are the engine's default DAS with ``protection_budget`` set."""
    names = [v.name for v in expand(["ncl"], studies=False)]
    assert {"das_emb_ln_lr2", "das_emb_ln_lr0.5"} <= set(names)
    common = {"learning_rate": 2e-4, "contrast_weight": 0.0}
    fast = expand(["das_emb_ln_lr2"], controls=False)[0].config(common, seed=1)
    assert fast["learning_rate"] == 4e-4 and fast["mask_embeddings"] and fast["mask_layernorm"]
    got = {
        v.name: v.config(common, seed=0)
        for v in expand(["das_emb_ln_budget0.25", "das_emb_ln_budget0.25_permuted"], controls=False)
    }
    budget, control = got["das_emb_ln_budget0.25"], got["das_emb_ln_budget0.25_permuted"]
    assert budget["protection_budget"] == control["protection_budget"] == 0.25
    assert budget.get("importance_control", "none") == "none"
    assert control["importance_control"] == "permuted"
    mixed = expand(["das_replay"], controls=False)[0].config(common, seed=0)
    assert mixed["strategy"] == "das_replay" and mixed["mask_embeddings"]
    for cfg in (fast, budget, control, mixed):
        TrainingConfig.from_dict(cfg).validate()


def test_saturation_table_lists_each_stage_and_kind():
    from benchmarks.continual.report import saturation_table

    per_stage = [
        {"head": {"share_above_half": 0.5, "mean": 0.4}},
        {"head": {"share_above_half": 0.875, "mean": 0.6}, "layernorm": {"share_above_half": 1}},
    ]
    lines = saturation_table({"das": {"importance": per_stage}, "ncl": {"importance": [{}, {}]}})
    rows = [line for line in lines if line.startswith("| das ")]
    assert rows == ["| das | 0.50 / – / – / – / – | 0.88 / – / – / – / 1.00 |"]
    assert not any(line.startswith("| ncl ") for line in lines)  # NCL measures no importance
    assert saturation_table({"ncl": {"importance": None}}) == []


def test_a_failed_run_is_reported_and_the_others_go_on(tmp_path, monkeypatch):
    """One run that raises (here LineageBusy, as when an orphaned worker still holds the
    lineage) is listed in results.json and results.md; every other run is reported."""
    from das_engine.errors import LineageBusyError

    data = tmp_path / "data"
    data.mkdir()
    for i, (name, words) in enumerate(VOCAB.items()):
        _corpus(data / f"{name}.txt", words, 60, i)
    real = bench.run_one

    def flaky(job: dict) -> dict:
        if job["variant"] == "ncl" and job["seed"] == 0:
            raise LineageBusyError("the lineage is being trained by another process")
        return real(job)

    monkeypatch.setattr(bench, "run_one", flaky)
    out = tmp_path / "bench"
    args = ["--domains", "farm,sea", "--data-dir", str(data), "--base", "tiny-roberta"]
    args += ["--strategies", "ncl", "--no-controls", "--seeds", "0,1"]
    args += ["--tokens-per-domain", "128", "--train-slack", "3", "--eval-tokens", "300"]
    args += ["--set", "batch_size=4", "--set", "block_size=32", "--set", "eval_max_batches=1"]
    results = bench.main([*args, "--out", str(out)])
    assert results["strategies"]["ncl"]["seeds"] == [1]  # the run that worked is reported
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["setup"]["failed"] == [
        {
            "variant": "ncl",
            "seed": 0,
            "error": "LineageBusyError: the lineage is being trained by another process",
        }
    ]
    assert "ncl seed 0: LineageBusyError" in (out / "results.md").read_text()
