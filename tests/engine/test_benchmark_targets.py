"""The targets table: ratios per seed against that seed's NCL, NCL frontier, replay_mix
and own permuted control, then mean ± std."""

from __future__ import annotations

import json

from benchmarks.continual import targets


def _run(folder, variant: str, seed: int, fr: float, learning: float, general: float) -> None:
    path = folder / "runs" / variant / f"seed-{seed}" / "metrics.json"
    path.parent.mkdir(parents=True)
    metrics = {"variant": variant, "seed": seed, "forgetting_rate": fr, "learning": learning}
    path.write_text(json.dumps({**metrics, "general_change": general, "end_task_fr": 0.0}))


def test_ratios_are_per_seed_against_that_seeds_references(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"  # two folders of one setup
    for seed, k in ((0, 1.0), (1, 2.0)):  # seed 1: every reference doubled
        _run(a, "ncl", seed, 1.0 * k, 1.0, 0.8 * k)
        _run(a, "ncl_lr0.5", seed, 0.5 * k, 0.5, 0.4 * k)
        _run(a, "replay_mix", seed, 0.4 * k, 0.9, 0.5 * k)
        _run(b, "das_emb_ln", seed, 0.3 * k, 0.75, 0.4 * k)
        _run(b, "das_emb_ln_permuted", seed, 0.6 * k, 0.8, 0.4 * k)
    table = targets.rows(targets.load_runs([a, b]))
    das = {k: [round(x, 9) for x in v] for k, v in table["das_emb_ln"].items()}
    assert das["FR / NCL"] == [0.3, 0.3]  # the same ratio on both seeds: no spread
    assert das["learning / NCL"] == [0.75, 0.75]
    assert das["general Δ / NCL"] == [0.5, 0.5]
    assert das["FR / replay_mix"] == [0.75, 0.75]
    assert das["FR / own permuted"] == [0.5, 0.5]
    # the frontier through (0.5, 0.5k) and (1.0, 1.0k), at learning 0.75: 0.75k
    assert das["FR / NCL frontier"] == [0.4, 0.4]
    assert table["ncl"]["FR / own permuted"] == [None, None]
    text = targets.markdown(table)
    assert "| das_emb_ln | 2 | 0.45 ± 0.21 |" in text  # FR: 0.3 and 0.6
    assert "| 0.30 ± 0.00 | 0.40 ± 0.00 | 0.75 ± 0.00 | 0.50 ± 0.00 | 0.50 ± 0.00 |" in text
    assert list(table)[:3] == ["ncl", "ncl_lr0.5", "das_emb_ln"]  # ORDER first
