"""A strategy's per-stage hooks: the lineage calls them in order with a filled context, and
DAS keeps one I_acc (the permuted control shuffles only the mask's copy)."""

import pytest
import torch

import das_engine.lineage as lineage_mod
from das_engine.config import TrainingConfig
from das_engine.errors import LineageError
from das_engine.importance import Importance
from das_engine.lineage import Lineage
from das_engine.strategies import StageContext, Strategy
from das_engine.strategies.das import DAS
from das_engine.strategies.ncl import NCL
from das_engine.units import UNIT_KINDS, build_unit_map

from .conftest import TINY_CONFIG, tiny


def test_base_strategy_hooks_do_nothing(tokenizer):
    model = tiny(tokenizer)
    ctx = StageContext(model, build_unit_map(model), TrainingConfig(strategy="ncl"), None)
    strategy = Strategy(ctx.config)
    assert strategy.begin_stage(ctx) is None and ctx.accumulated is None
    assert strategy.end_stage(ctx, model) == {}


def test_permuted_control_leaves_the_accumulated_importance_alone(tokenizer):
    model = tiny(tokenizer)
    um = build_unit_map(model)
    gen = torch.Generator().manual_seed(0)
    imp = Importance({k: torch.rand(s, generator=gen) for k, s in um.shapes().items()})
    config = TrainingConfig(importance_control="permuted", seed=5)
    ctx = StageContext(model, um, config, imp)
    das = DAS(config)
    das.prepare(ctx)
    assert ctx.accumulated is imp  # the one I_acc, as loaded
    shuffled = imp.permuted(5)
    for k in UNIT_KINDS:
        assert torch.equal(das.prev_gates[k], shuffled.values[k])
        assert not torch.equal(das.prev_gates[k], imp.values[k])


def test_the_lineage_calls_the_stage_hooks_in_order(tmp_path, corpora, monkeypatch):
    calls = []

    class Recording(NCL):
        def begin_stage(self, ctx):
            assert ctx.lineage_dir == lin.path and ctx.domain == "legal-1"
            assert ctx.from_base and ctx.stage_dir.name.endswith(".partial")
            assert ctx.precision is not None and ctx.train_store is not None
            calls.append("begin")

        def prepare(self, ctx):
            calls.append("prepare")
            super().prepare(ctx)

        def end_stage(self, ctx, model):
            calls.append("end")
            return {"recorded": {"calls": list(calls)}}

    lin = Lineage.create(tmp_path / "l", "tiny-roberta", {**TINY_CONFIG, "strategy": "ncl"})
    monkeypatch.setattr(lineage_mod, "make_strategy", lambda cfg: Recording(cfg))
    result = lin.add_domain(corpora[0], "legal-1")
    assert calls == ["begin", "prepare", "end"]
    assert lin.stages[0].meta["recorded"] == {"calls": ["begin", "prepare", "end"]}
    assert result == lin.stage_result(1)


def test_artifacts_name_the_checkpoint_and_importance_with_their_stats(das_pair):
    das, ncl = das_pair
    arts = das.artifacts(2)
    assert [a.kind for a in arts] == ["checkpoint", "general", "accumulated", "domain"]
    assert arts[0].path == das.stages[1].model_dir and (arts[0].path / "config.json").exists()
    assert all(a.path.is_file() for a in arts[1:])
    stats = das.stages[1].meta["importance"]
    assert arts[2].stats == stats["accumulated"] and arts[3].stats == stats["domain"]
    assert [a.kind for a in ncl.artifacts(1)] == ["checkpoint"]
    with pytest.raises(LineageError):
        das.artifacts(3)


def test_stage_result_reads_back_what_add_domain_returned(das_pair, corpora):
    das, _ = das_pair
    result = das.stage_result(2)
    assert result.name == "cooking" and result.position == 2
    assert result.eval_losses == das.stages[1].meta["eval"]
    assert result.column == das.stages[1].meta["column"] and result.steps == 4


@pytest.fixture
def das_pair(tmp_path, corpora):
    das = Lineage.create(tmp_path / "das", "tiny-roberta", TINY_CONFIG)
    das.add_domain(corpora[0], "legal")
    das.add_domain(corpora[1], "cooking")
    ncl = Lineage.create(tmp_path / "ncl", "tiny-roberta", {**TINY_CONFIG, "strategy": "ncl"})
    ncl.add_domain(corpora[0], "legal")
    return das, ncl
