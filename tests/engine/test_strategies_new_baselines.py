"""The current-practice baselines (replay_mix, merge, das_merge): each one's defining
property, and each running a 2-domain lineage through the CLI and ``make_strategy``."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from das_engine import cli
from das_engine.config import TrainingConfig
from das_engine.data import ChunkStore
from das_engine.errors import Cancelled
from das_engine.lineage import Lineage
from das_engine.strategies import StageContext, make_strategy
from das_engine.strategies.das import DAS
from das_engine.strategies.merge import MergeParams, merged_tensor, ties_merge, trim_top
from das_engine.strategies.replay_mix import FILE as MIX_FILE
from das_engine.strategies.replay_mix import ReplayMix, reservoir_add, rewarm_cosine

from . import test_strategies_baselines as baselines

TINY, context = baselines.TINY, baselines.context
# the baselines' fixtures: a tiny RoBERTa directory, three word-list corpora, a cache dir
tiny, corpora, engine_cache = baselines.tiny, baselines.corpora, baselines.engine_cache


def weights(model_dir) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def two_stage(tmp_path, corpora, name="lin", **cfg) -> Lineage:
    lin = Lineage.create(tmp_path / name, "tiny-roberta", {**TINY, **cfg})
    lin.add_domain(corpora["farm"], "farm")
    lin.add_domain(corpora["sea"], "sea")
    return lin


# -- replay_mix ------------------------------------------------------------------------------


def _second_stage(tiny, tmp_path, corpora, **cfg):
    """A replay_mix strategy prepared for stage 2, its stage-1 buffer written by ``finish``."""
    first_ctx = context(tiny, tmp_path / "one", corpora["farm"], strategy="replay_mix", **cfg)
    # a stage keeps its chunks in its own directory, where later stages read them
    shutil.move(tmp_path / "one" / "data", first_ctx.stage_dir / "data")
    first_ctx.train_store = ChunkStore(first_ctx.stage_dir / "data" / "train")
    first = make_strategy(first_ctx.config)
    first.prepare(first_ctx)
    first.finish(first_ctx)
    ctx = context(tiny, tmp_path / "two", corpora["sea"], strategy="replay_mix", **cfg)
    ctx.previous_stage_dirs = [first_ctx.stage_dir]
    strategy = make_strategy(ctx.config)
    strategy.prepare(ctx)
    return strategy, ctx, first_ctx


def test_replay_mix_batches_hold_the_configured_share_of_earlier_chunks(tiny, tmp_path, corpora):
    strategy, ctx, first_ctx = _second_stage(tiny, tmp_path, corpora, replay_ratio=0.25)
    assert isinstance(strategy, ReplayMix) and strategy.buffer["entries"]
    earlier = ChunkStore(first_ctx.stage_dir / "data" / "train")
    b = 8
    for seed in range(5):
        rows = ctx.train_store.rows(range(seed, seed + b))
        batch = ctx.batcher(rows["input_ids"], rows["attention_mask"], seed=seed)
        mixed, picked = strategy.mix(batch)
        assert len(picked) == 2  # 25% of 8, exactly
        assert {e["stage"] for e in picked} == {first_ctx.stage_dir.name.removesuffix(".partial")}
        for key in batch:  # the first rows are the batch's own, the last the earlier chunks
            assert mixed[key].shape == batch[key].shape
            assert torch.equal(mixed[key][: b - 2], batch[key][: b - 2])
        own = earlier.rows([e["chunk"] for e in picked])["attention_mask"]
        assert torch.equal(mixed["attention_mask"][b - 2 :], own)
        assert mixed["input_ids"][b - 2 :].ne(batch["input_ids"][b - 2 :]).any()
        again, picked_again = strategy.mix(batch)  # seeded by the batch: the same draw
        assert picked_again == picked and torch.equal(again["input_ids"], mixed["input_ids"])


def test_replay_mix_share_is_right_on_average_when_not_a_whole_row(tiny, tmp_path, corpora):
    strategy, ctx, _ = _second_stage(tiny, tmp_path, corpora, replay_ratio=0.05)
    counts = []
    for seed in range(200):
        rows = ctx.train_store.rows(
            [seed % len(ctx.train_store), (seed + 1) % len(ctx.train_store)]
        )
        batch = ctx.batcher(rows["input_ids"], rows["attention_mask"], seed=seed)
        counts.append(len(strategy.mix(batch)[1]))
    assert set(counts) <= {0, 1}
    assert 0.025 < sum(counts) / (2 * len(counts)) < 0.1  # 5% of the rows, on average


def test_replay_mix_buffer_is_bounded_and_survives_resume_and_reopen(
    engine_cache,
    tmp_path,
    corpora,
):
    cfg = {"strategy": "replay_mix", "replay_mix_buffer_size": 5, "replay_ratio": 0.5}
    cfg |= {"max_steps": 4, "checkpoint_every": 1}
    straight = two_stage(tmp_path, corpora, "straight", **cfg)
    # the same lineage, reopened between the stages and stopped inside stage 2, then resumed
    lin = Lineage.create(tmp_path / "resumed", "tiny-roberta", {**TINY, **cfg})
    lin.add_domain(corpora["farm"], "farm")
    calls = []

    def cancel_at_step_2() -> bool:
        calls.append(1)
        return len(calls) == 3

    with pytest.raises(Cancelled):
        Lineage.open(lin.path).add_domain(corpora["sea"], "sea", should_cancel=cancel_at_step_2)
    result = Lineage.open(lin.path).add_domain(corpora["sea"], "sea")
    assert result.resumed_from_step == 2
    n_chunks = 0
    for a, b in zip(straight.stages, Lineage.open(lin.path).stages, strict=True):
        n_chunks += len(ChunkStore(a.dir / "data" / "train"))
        buf = json.loads((a.dir / "strategy" / MIX_FILE).read_text())
        assert buf == json.loads((b.dir / "strategy" / MIX_FILE).read_text())
        assert len(buf["entries"]) == 5 and buf["seen"] == n_chunks  # bounded, all seen
        assert len({(e["stage"], e["chunk"]) for e in buf["entries"]}) == 5
        for e in buf["entries"]:
            assert (
                0
                <= e["chunk"]
                < len(ChunkStore(tmp_path / "straight" / "stages" / e["stage"] / "data" / "train"))
            )
        wa, wb = weights(a.model_dir), weights(b.model_dir)  # the mixing replayed exactly
        assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_replay_mix_rewarms_then_redecays_the_lr_every_stage(
    engine_cache,
    tmp_path,
    corpora,
    monkeypatch,
):
    seen: list[list[float]] = []
    build = ReplayMix.build_scheduler

    def spy(self, optimizer, config, total):
        seen.append([])
        self.spy = (optimizer, seen[-1])
        return build(self, optimizer, config, total)

    monkeypatch.setattr(ReplayMix, "build_scheduler", spy)
    monkeypatch.setattr(
        ReplayMix, "before_step", lambda self: self.spy[1].append(self.spy[0].param_groups[0]["lr"])
    )
    two_stage(tmp_path, corpora, strategy="replay_mix", max_steps=10, rewarm_ratio=0.3)
    lr = TINY["learning_rate"]
    assert len(seen) == 2
    for stage in seen:
        assert len(stage) == 10
        peak = stage.index(max(stage))
        assert peak == 2 and stage[peak] == pytest.approx(lr)  # up over 3 steps
        assert all(a < b for a, b in zip(stage[:peak], stage[1 : peak + 1], strict=False))
        assert all(a > b for a, b in zip(stage[peak:], stage[peak + 1 :], strict=False))
        assert stage[-1] == pytest.approx(0.1 * lr)  # the floor (min_lr_ratio 0.1) at the end
    assert seen[1][0] < seen[1][2] and seen[0][-1] < seen[1][2]  # stage 2 warms up again


def test_rewarm_cosine_reaches_its_floor_at_the_end():
    factors = [rewarm_cosine(s, 101, 0, 0.1) for s in range(101)]
    assert factors[0] == 1.0 and factors[100] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(factors, factors[1:], strict=False))
    assert [rewarm_cosine(s, 10, 4, 0.0) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 60), min_size=1, max_size=4),
    size=st.integers(1, 40),
    seed=st.integers(0, 2**16),
)
def test_the_reservoir_is_bounded_and_holds_distinct_seen_chunks(sizes, size, seed):
    state = {"seen": 0, "entries": []}
    rng = random.Random(seed)
    for k, n in enumerate(sizes):
        state = reservoir_add(state, f"{k:03d}-d", n, size, rng)
    assert state["seen"] == sum(sizes)
    assert len(state["entries"]) == min(size, sum(sizes))
    keys = [(e["stage"], e["chunk"]) for e in state["entries"]]
    assert len(set(keys)) == len(keys)
    assert all(0 <= c < sizes[int(stage[:3])] for stage, c in keys)


def test_the_reservoir_keeps_each_chunk_equally_likely():
    """Two domains of 30 and 90 chunks, a buffer of 12: about 3 and 9 kept on average."""
    first = []
    for seed in range(400):
        state = reservoir_add({"seen": 0, "entries": []}, "a", 30, 12, random.Random(seed))
        state = reservoir_add(state, "b", 90, 12, random.Random(seed + 10**6))
        first.append(sum(e["stage"] == "a" for e in state["entries"]))
    assert 2.7 < sum(first) / len(first) < 3.3


def test_replay_mix_without_rewarm_uses_the_configs_schedule():
    cfg = TrainingConfig.from_dict({"strategy": "replay_mix", "lr_rewarm": False})
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_strategy(cfg).build_scheduler(opt, cfg, 10)
    for _ in range(5):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == 1.0  # "constant", no warm-up: the engine default


# -- merge -----------------------------------------------------------------------------------


def test_merge_alpha_0_keeps_the_previous_weights_and_1_the_trained(
    engine_cache,
    tmp_path,
    corpora,
):
    keep = two_stage(tmp_path, corpora, "keep", strategy="merge", merge_alpha=0.0)
    base = weights(keep.base_dir)
    for stage in keep.stages:  # never moves: every stage is the base, bit for bit
        w = weights(stage.model_dir)
        assert all(torch.equal(w[k], base[k]) for k in base)
    take = two_stage(tmp_path, corpora, "take", strategy="merge", merge_alpha=1.0)
    ncl = two_stage(tmp_path, corpora, "ncl", strategy="ncl")
    for a, b in zip(take.stages, ncl.stages, strict=True):  # alpha 1 = the trained weights
        wa, wb = weights(a.model_dir), weights(b.model_dir)
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(weights(ncl.stages[0].model_dir)[k], base[k]) for k in base)


def test_merge_with_the_base_and_ties_runs_and_stays_between(
    engine_cache,
    tmp_path,
    corpora,
):
    cfg = {"strategy": "merge", "merge_method": "ties", "merge_with": "base"}
    lin = two_stage(tmp_path, corpora, **cfg, merge_alpha=1.0, merge_density=0.3)
    base = weights(lin.base_dir)
    for stage in lin.stages:
        w = weights(stage.model_dir)
        for k in base:
            changed = int((w[k] != base[k]).sum())
            assert changed <= round(0.3 * base[k].numel())  # at most the kept share moved


def test_ties_trims_the_configured_share_and_keeps_signs():
    gen = torch.Generator().manual_seed(0)
    ref, new = torch.randn(40, 25, generator=gen), torch.randn(40, 25, generator=gen)
    params = MergeParams(merge_method="ties", merge_alpha=0.7, merge_density=0.2)
    delta = merged_tensor(ref, new, params) - ref
    kept = delta != 0
    assert int(kept.sum()) == 200  # 20% of 1000
    tau = new - ref
    assert torch.equal(torch.sign(delta[kept]), torch.sign(tau[kept]))
    torch.testing.assert_close(delta[kept], 0.7 * tau[kept])
    assert tau[kept].abs().min() >= tau[~kept].abs().max()  # the largest changes


def test_ties_elects_the_sign_with_more_mass_and_averages_the_agreeing():
    taus = [torch.tensor([3.0, -1.0, 1.0]), torch.tensor([-1.0, 2.0, -1.0])]
    taus.append(torch.tensor([-1.0, 2.0, 0.0]))
    # coordinate 0: sum +1 -> only 3 agrees; 1: sum +3 -> mean(2, 2); 2: sum 0 -> nothing
    assert torch.equal(ties_merge(taus, 1.0), torch.tensor([3.0, 2.0, 0.0]))
    one = torch.tensor([0.5, -4.0, 2.0, -0.1])
    assert torch.equal(ties_merge([one], 0.5), trim_top(one, 0.5))  # one vector: trimming


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(1, 300),
    density=st.floats(0.01, 1.0),
)
def test_trimming_keeps_exactly_the_share(seed, n, density):
    tau = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    kept = trim_top(tau, density)
    assert int((kept != 0).sum()) == round(density * n)
    assert torch.equal(kept[kept != 0], tau[kept != 0])


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    alpha=st.floats(0.0, 4.0),
    method=st.sampled_from(["task_arithmetic", "ties"]),
)
def test_merge_is_linear_in_alpha(seed, alpha, method):
    gen = torch.Generator().manual_seed(seed)
    ref, new = torch.randn(7, 9, generator=gen).double(), torch.randn(7, 9, generator=gen).double()
    full = merged_tensor(ref, new, MergeParams(method, 1.0, "previous", 0.4)) - ref
    part = merged_tensor(ref, new, MergeParams(method, alpha, "previous", 0.4)) - ref
    torch.testing.assert_close(part, alpha * full)
    if method == "task_arithmetic":
        torch.testing.assert_close(full, new - ref)


# -- every new strategy: a 2-domain lineage through the CLI and through make_strategy ----------


@pytest.mark.parametrize(
    ("strategy", "sets"),
    [
        ("replay_mix", ["replay_ratio=0.25", "replay_mix_buffer_size=8"]),
        ("merge", ["merge_method=ties", "merge_density=0.5"]),
        ("das_merge", ["merge_alpha=0.8", "importance_max_batches=2"]),
        ("das_replay", ["replay_ratio=0.5", "importance_max_batches=2"]),
    ],
)
def test_new_strategy_runs_two_domains_from_the_cli(
    strategy,
    sets,
    engine_cache,
    tmp_path,
    corpora,
    capsys,
):
    out = tmp_path / "lin"
    args = ["run", "--base", "tiny-roberta", "--strategy", strategy, "--out", str(out)]
    args += ["--max-steps", "3", "--batch-size", "4", "--block-size", "32", "--quiet"]
    for item in ["eval_max_batches=2", *sets]:
        args += ["--set", item]
    assert cli.main([*args, f"farm={corpora['farm']}", f"sea={corpora['sea']}"]) == 0
    lin = Lineage.open(out)
    m = lin.metrics()
    assert m["strategy"] == strategy and m["domains"] == ["farm", "sea"]
    assert all(x is not None for row in m["loss_matrix"] for x in row)
    stored = json.loads((out / "lineage.json").read_text())["config"]
    key, value = sets[0].split("=")
    assert str(stored[key]) == value  # a strategy parameter, stored flat
    assert type(make_strategy(lin.config)).name == strategy


def test_das_merge_is_das_training_then_a_merge(tiny, tmp_path, corpora):
    ctx = context(tiny, tmp_path, corpora["farm"], strategy="das_merge", merge_alpha=0.0)
    strategy = make_strategy(ctx.config)
    assert isinstance(strategy, DAS) and isinstance(ctx, StageContext)  # importance hooks
    strategy.prepare(ctx)
    before = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    with torch.no_grad():
        for p in ctx.model.parameters():
            p.add_(1.0)  # "training"
    merged = strategy.final_model(ctx.model)  # alpha 0: back to the base
    state = merged.state_dict()
    assert all(torch.equal(state[k], before[k]) for k in before)


# -- das_replay ------------------------------------------------------------------------------


def test_das_replay_masks_like_das_and_replays_like_replay_mix(
    engine_cache, tmp_path, corpora, monkeypatch
):
    """Stage 2 of das_replay: every batch carries earlier-domain chunks (replay_mix's
    buffer, written by stage 1) and heads at I_acc = 1 keep their weights (DAS's mask),
    while the unprotected FFN neurons train."""
    from das_engine.importance import Importance
    from das_engine.strategies.replay_mix import DASReplay

    cfg = {**TINY, "strategy": "das_replay", "replay_ratio": 0.5, "importance_max_batches": 2}
    lin = Lineage.create(tmp_path / "dr", "tiny-roberta", cfg)
    lin.add_domain(corpora["farm"], "farm")
    s1 = lin.stages[0]
    assert json.loads((s1.dir / "strategy" / MIX_FILE).read_text())["entries"]
    acc_path = s1.importance_dir / "accumulated.safetensors"
    acc = Importance.load(acc_path)
    acc.values["head"][:] = 1.0
    acc.values["intermediate"][:] = 0.0
    acc.save(acc_path, "accumulated")
    replayed: list[float] = []
    real = DASReplay.loss

    def spy(self, model, batch):  # noqa: ANN001, ANN202
        loss, logs = real(self, model, batch)
        replayed.append(logs["replayed"])
        return loss, logs

    monkeypatch.setattr(DASReplay, "loss", spy)
    lin.add_domain(corpora["sea"], "sea")
    assert replayed and all(r == 2 for r in replayed)  # 50% of 4 rows, every batch
    w1, w2 = weights(s1.model_dir), weights(lin.stages[1].model_dir)
    queries = [k for k in w1 if k.endswith("attention.self.query.weight")]
    ffn = [k for k in w1 if k.endswith("intermediate.dense.weight")]
    assert queries and all(torch.equal(w1[k], w2[k]) for k in queries)
    assert ffn and all(not torch.equal(w1[k], w2[k]) for k in ffn)
