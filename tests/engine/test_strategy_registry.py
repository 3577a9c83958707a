"""The strategy registry: strategies found from their files, each declaring its own
parameters; adding one is one file; the flat keys of older configs keep their meaning."""

from __future__ import annotations

import dataclasses
import importlib
import shutil
import textwrap

import pytest

from das_engine import strategy_registry
from das_engine.cli import build_parser
from das_engine.config import TrainingConfig
from das_engine.errors import ConfigError
from das_engine.strategies import STRATEGIES, make_strategy

# a das lineage's config as lineage.json stored it before strategies declared their own
# parameters: every baseline's field flat, beside the general ones
STORED = {
    "strategy": "das",
    "learning_rate": 0.0001,
    "kd_weight": 2.0,
    "ewc_lambda": 500.0,
    "ewc_gamma": 0.8,
    "ewc_fisher_samples": 16,
    "replay_buffer_size": 128,
    "replay_alpha": 0.25,
    "replay_beta": 0.75,
    "adapter_rank": 4,
    "adapter_alpha": 8.0,
}


def _fields(cls) -> list[tuple]:
    return [(f.name, f.default, dict(f.metadata)) for f in dataclasses.fields(cls)]


def test_the_files_declarations_are_the_imported_classes():
    declared = strategy_registry.declared()
    assert list(declared) == list(STRATEGIES) and list(declared)[0] == "das"
    assert {"das", "ncl", "one", "kd", "ewc", "replay", "adapter"} <= set(declared)
    assert {"replay_mix", "merge", "das_merge"} <= set(declared)
    for name, d in declared.items():
        cls = STRATEGIES[name]
        assert cls.name == name and cls.__name__ == d.class_name
        module = importlib.import_module(f"das_engine.strategies.{d.module}")
        assert cls.__module__ == module.__name__
        if d.params is None:
            assert cls.params is None and TrainingConfig(strategy=name).strategy_params() is None
        else:  # the file's own dataclass, field for field
            assert cls.params is d.params
            assert _fields(getattr(module, d.params.__name__)) == _fields(d.params)
            assert isinstance(make_strategy(TrainingConfig(strategy=name)).params, d.params)


def test_strategy_parameters_do_not_collide_with_general_fields():
    general = {f.name for f in dataclasses.fields(TrainingConfig)}
    assert not general & set(strategy_registry.flat_fields())
    names = TrainingConfig.field_names()
    assert len(names) == len(set(names)) and "params" not in names


def test_a_stored_config_with_flat_keys_loads_with_the_same_meaning():
    cfg = TrainingConfig.from_dict(STORED)
    assert cfg.ewc_lambda == 500.0 and cfg.adapter_rank == 4 and cfg.kd_weight == 2.0
    assert cfg.strategy_params("ewc").ewc_gamma == 0.8
    assert cfg.strategy_params("replay").replay_alpha == 0.25
    out = cfg.to_dict()
    assert {k: out[k] for k in STORED} == STORED  # flat, as stored
    assert TrainingConfig.from_dict(out) == cfg
    assert cfg.replace(ewc_lambda=1.0).ewc_lambda == 1.0 and cfg.ewc_lambda == 500.0
    assert make_strategy(cfg.replace(strategy="ewc")).params.ewc_lambda == 500.0


def test_bad_and_unknown_keys_are_named():
    with pytest.raises(ConfigError) as exc:
        TrainingConfig.from_dict({"ewc_lambda": -1, "adapter_rank": True, "merge_method": "x"})
    fields = {d["field"] for d in exc.value.details}
    assert fields == {"ewc_lambda", "adapter_rank", "merge_method"}
    with pytest.raises(ConfigError) as exc:
        TrainingConfig.from_dict({"ewc_lamda": 1, "params": {}})
    assert [d["field"] for d in exc.value.details] == ["ewc_lamda", "params"]
    with pytest.raises(ConfigError) as exc:
        TrainingConfig.from_dict({"strategy": "nope"})
    assert exc.value.details[0]["field"] == "strategy"


TOY = '''
"""A toy strategy: NCL with a weight."""

from dataclasses import dataclass

from das_engine.strategies.base import Strategy
from das_engine.strategy_params import StrategyParams, param


@dataclass
class ToyParams(StrategyParams):
    toy_weight: float = param(1.0, "Strategy `toy`: a weight.", minimum=0.0, maximum=2.0)

    def check(self):
        return [] if self.toy_weight != 1.5 else [{"field": "toy_weight", "message": "not 1.5"}]


class Toy(Strategy):
    name = "toy"
    params = ToyParams
'''


@pytest.fixture()
def package_with_toy(tmp_path, monkeypatch):
    """A copy of the strategies package plus one new file, as the registry's source."""
    package = tmp_path / "strategies"
    shutil.copytree(strategy_registry.PACKAGE, package)
    (package / "toy.py").write_text(textwrap.dedent(TOY))
    caches = (
        strategy_registry.declared,
        strategy_registry.params_classes,
        strategy_registry.flat_fields,
    )
    monkeypatch.setattr(strategy_registry, "PACKAGE", package)
    for cache in caches:
        cache.cache_clear()
    yield package
    monkeypatch.undo()
    for cache in caches:
        cache.cache_clear()


def test_adding_a_strategy_is_one_file(package_with_toy):
    assert "toy" in strategy_registry.strategy_names()
    cfg = TrainingConfig.from_dict({"strategy": "toy", "toy_weight": 0.5})
    assert cfg.toy_weight == 0.5 and cfg.to_dict()["toy_weight"] == 0.5
    assert TrainingConfig().to_dict()["toy_weight"] == 1.0  # every config knows it
    for bad, why in ((3.0, "must be in [0.0, 2.0], got 3.0"), (1.5, "not 1.5")):
        with pytest.raises(ConfigError) as exc:
            TrainingConfig.from_dict({"toy_weight": bad})
        assert exc.value.details == [{"field": "toy_weight", "message": why}]
    args = build_parser().parse_args(["run", "--base", "b", "--out", "o", "--strategy", "toy", "x"])
    assert args.strategy == "toy"  # the CLI's choices
