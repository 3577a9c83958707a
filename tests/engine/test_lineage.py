"""Lineages end to end on a tiny model: stages, matrix, strategies, resume, fork."""

import math

import pytest
import torch
from safetensors.torch import load_file

from das_engine.bases import build_tiny_model, save_base
from das_engine.errors import Cancelled, DomainExistsError, LineageError
from das_engine.importance import Importance
from das_engine.lineage import Lineage
from das_engine.units import UNIT_KINDS

from .conftest import TINY_CONFIG


def _weights(stage_model_dir):
    return load_file(str(stage_model_dir / "model.safetensors"))


def _same_weights(a, b) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture
def das_lineage(tmp_path, corpora):
    lin = Lineage.create(tmp_path / "das", "tiny-roberta", TINY_CONFIG)
    events = []
    lin.add_domain(corpora[0], "legal", progress=events.append)
    lin.add_domain(corpora[1], "cooking", progress=events.append)
    return lin, events


def test_das_two_stages_full_matrix_and_snapshots(das_lineage):
    lin, events = das_lineage
    assert lin.domains == ["legal", "cooking"]
    m = lin.metrics()
    assert len(m["loss_matrix"]) == 2 and all(len(r) == 2 for r in m["loss_matrix"])
    assert all(math.isfinite(x) for row in m["loss_matrix"] for x in row)
    assert all(math.isfinite(x) for x in m["base_losses"])
    for key in ("forgetting_rate", "bwt", "fwt", "max_forgetting"):
        assert math.isfinite(m[key]), key
    assert {e.phase for e in events} == {"importance", "training", "evaluating"}
    steps = [e.step for e in events if e.phase == "training" and e.total]
    assert steps[:4] == [1, 2, 3, 4]
    # I_acc(2) = EMax(I_acc(1), I(2)) and I_acc(1) = EMax(I_general, I(1))
    general = Importance.load(lin.path / "importance" / "general.safetensors")
    s1, s2 = lin.stages
    acc1 = Importance.load(s1.importance_dir / "accumulated.safetensors")
    dom1 = Importance.load(s1.importance_dir / "domain.safetensors")
    acc2 = Importance.load(s2.importance_dir / "accumulated.safetensors")
    dom2 = Importance.load(s2.importance_dir / "domain.safetensors")
    for k in UNIT_KINDS:
        assert torch.equal(acc1.values[k], torch.maximum(general.values[k], dom1.values[k]))
        assert torch.equal(acc2.values[k], torch.maximum(acc1.values[k], dom2.values[k]))
    # the checkpoint directory of a stage is a complete HF model directory
    assert (s2.model_dir / "config.json").exists() and (s2.model_dir / "tokenizer.json").exists()
    assert not list((lin.path / "stages").glob("*.partial"))


def test_protected_units_really_do_not_move(tmp_path, corpora):
    """DAS with update masking: a unit with I_acc = 1 keeps its weights through stage 2."""
    lin = Lineage.create(tmp_path / "p", "tiny-roberta", TINY_CONFIG)
    lin.add_domain(corpora[0], "legal")
    s1 = lin.stages[0]
    acc_path = s1.importance_dir / "accumulated.safetensors"
    acc = Importance.load(acc_path)
    acc.values["head"][:] = 1.0  # protect every head fully
    acc.save(acc_path, "accumulated")
    lin.add_domain(corpora[1], "cooking")
    w1, w2 = _weights(s1.model_dir), _weights(lin.stages[1].model_dir)
    for name in w1:
        if "attention.self.query.weight" in name or "attention.output.dense.weight" in name:
            assert torch.equal(w1[name], w2[name]), name
        if "intermediate.dense.weight" in name:
            assert not torch.equal(w1[name], w2[name]), name


def test_resume_after_interruption_gives_identical_weights(tmp_path, corpora):
    cfg = {**TINY_CONFIG, "max_steps": 6, "checkpoint_every": 2}
    straight = Lineage.create(tmp_path / "straight", "tiny-roberta", cfg)
    broken = Lineage.create(tmp_path / "broken", "tiny-roberta", cfg)
    for lin in (straight, broken):
        lin.add_domain(corpora[0], "legal")
    straight.add_domain(corpora[1], "cooking")
    done = []

    def progress(e):
        if e.phase == "training" and e.total:
            done.append(e.step)

    with pytest.raises(Cancelled):
        broken.add_domain(
            corpora[1], "cooking", progress=progress, should_cancel=lambda: len(done) >= 5
        )
    partial = next((broken.path / "stages").glob("002-*.partial"))
    assert (partial / "checkpoints" / "step-00000004" / "trainer.json").exists()
    assert broken.domains == ["legal"]  # nothing half-written became a stage
    result = broken.add_domain(corpora[1], "cooking")
    assert result.resumed_from_step == 4
    assert _same_weights(straight.stages[1].model_dir, broken.stages[1].model_dir)


def test_one_trains_every_domain_from_the_base(tmp_path, corpora):
    cfg = {**TINY_CONFIG, "strategy": "one"}
    one = Lineage.create(tmp_path / "one", "tiny-roberta", cfg)
    one.add_domain(corpora[0], "legal")
    one.add_domain(corpora[1], "cooking")
    alone = Lineage.create(tmp_path / "alone", "tiny-roberta", cfg)
    alone.add_domain(corpora[1], "cooking")
    assert _same_weights(one.stages[1].model_dir, alone.stages[0].model_dir)


def test_ncl_continues_from_the_previous_stage(tmp_path, corpora):
    cfg = {**TINY_CONFIG, "strategy": "ncl"}
    ncl = Lineage.create(tmp_path / "ncl", "tiny-roberta", cfg)
    ncl.add_domain(corpora[0], "legal")
    ncl.add_domain(corpora[1], "cooking")
    one = Lineage.create(tmp_path / "one", "tiny-roberta", {**cfg, "strategy": "one"})
    one.add_domain(corpora[1], "cooking")
    assert not _same_weights(ncl.stages[1].model_dir, one.stages[0].model_dir)
    assert not (ncl.stages[0].importance_dir / "accumulated.safetensors").exists()
    names, L, base = ncl.loss_matrix()
    assert L[0][1] == ncl.stages[1].meta["column"]["1"]  # stage-1 model on domain 2


def test_domain_names_fork_and_errors(das_lineage, tmp_path, corpora):
    lin, _ = das_lineage
    with pytest.raises(DomainExistsError):
        lin.add_domain(corpora[0], "legal")
    with pytest.raises(LineageError):
        lin.add_domain(corpora[0], "../../etc")
    with pytest.raises(LineageError):
        Lineage.create(lin.path, "tiny-roberta")
    fork = lin.fork(tmp_path / "fork", 1)
    assert fork.domains == ["legal"]
    fork.add_domain(corpora[1], "cooking-again")
    assert fork.domains == ["legal", "cooking-again"] and lin.domains == ["legal", "cooking"]
    with pytest.raises(LineageError):
        Lineage.open(tmp_path / "nowhere")


def test_general_corpus_is_tracked(tmp_path, corpora):
    lin = Lineage.create(tmp_path / "g", "tiny-roberta", TINY_CONFIG, general_corpus=corpora[1])
    lin.add_domain(corpora[0], "legal")
    g = lin.metrics()["general"]
    assert math.isfinite(g["base_loss"]) and len(g["losses"]) == 1
    assert g["change"] == pytest.approx(g["losses"][0] - g["base_loss"])


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_decoder_lineage_with_das(tmp_path, corpora, tokenizer, arch):
    base = tmp_path / f"{arch}-base"
    save_base(
        build_tiny_model(
            tokenizer,
            architecture=arch,
            hidden_size=32,
            layers=2,
            heads=4,
            intermediate_size=64,
            max_positions=64,
        ),
        tokenizer,
        base,
    )
    lin = Lineage.create(tmp_path / arch, str(base), TINY_CONFIG)
    assert lin.meta["objective"] == "clm"
    lin.add_domain(corpora[0], "legal")
    lin.add_domain(corpora[1], "cooking")
    m = lin.metrics()
    assert all(math.isfinite(x) for row in m["loss_matrix"] for x in row)


def test_a_second_writer_gets_lineage_busy(tmp_path, corpora):
    import fcntl

    from das_engine.errors import LineageBusyError

    lin = Lineage.create(tmp_path / "busy", "tiny-roberta", TINY_CONFIG)
    with open(lin.path / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as another worker would
        with pytest.raises(LineageBusyError) as err:
            lin.add_domain(corpora[0], "legal")
    assert err.value.code == "lineage_busy"
    assert lin.add_domain(corpora[0], "legal").position == 1  # free again


def test_server_mode_refuses_paths_as_base_models(tmp_path):
    from das_engine.bases import builtin_tiny_dir, resolve_base
    from das_engine.errors import BaseModelError

    path = str(builtin_tiny_dir())
    assert resolve_base(path).architecture == "roberta"
    with pytest.raises(BaseModelError):
        resolve_base(path, allow_paths=False)


def test_protection_budget_protects_only_the_most_important_share(tmp_path, corpora):
    """Every head at I_acc = 1 and a budget of half the heads: in each layer exactly half
    the heads keep their query rows through stage 2, the other half train."""
    config = {**TINY_CONFIG, "protection_budget": 0.5}
    lin = Lineage.create(tmp_path / "b", "tiny-roberta", config)
    lin.add_domain(corpora[0], "legal")
    s1 = lin.stages[0]
    acc_path = s1.importance_dir / "accumulated.safetensors"
    acc = Importance.load(acc_path)
    acc.values["head"][:] = 1.0
    acc.save(acc_path, "accumulated")
    lin.add_domain(corpora[1], "cooking")
    w1, w2 = _weights(s1.model_dir), _weights(lin.stages[1].model_dir)
    heads = acc.values["head"].shape[1]
    names = [n for n in w1 if n.endswith("attention.self.query.weight")]
    assert names
    for name in names:
        rows = w1[name].shape[0] // heads
        kept = [
            torch.equal(w1[name][h * rows : (h + 1) * rows], w2[name][h * rows : (h + 1) * rows])
            for h in range(heads)
        ]
        assert sum(kept) == heads // 2, (name, kept)
