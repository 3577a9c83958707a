"""The continual benchmark runner end to end on a tiny base and two small domains."""

from __future__ import annotations

import json
import random

from benchmarks.continual import run as bench
from benchmarks.continual.report import interpolate
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
