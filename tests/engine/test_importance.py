"""Importance: proxy KL, gate-gradient averaging, normalisation, EMax, snapshots."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from das_engine.errors import ImportanceError
from das_engine.importance import (
    Importance,
    domain_importance,
    general_importance,
    layer_summary,
    normalize,
    proxy_kl_loss,
    raw_gate_gradients,
    standardize,
)
from das_engine.objective import Batcher
from das_engine.units import UNIT_KINDS, build_unit_map


def test_proxy_kl_is_exactly_zero_without_dropout_and_the_engine_refuses(roberta, batch):
    um = build_unit_map(roberta)
    roberta.eval()
    with torch.no_grad():
        assert float(proxy_kl_loss(roberta, um, batch)) == 0.0
    for m in roberta.modules():  # dropout "on" but with p = 0 must be refused too...
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    with pytest.raises(ImportanceError, match="dropout"):  # ...unless importance_dropout > 0
        general_importance(roberta, um, [batch], dropout=0.0)


def test_general_importance_with_dropout_is_finite_bounded_and_varied(roberta, batch):
    um = build_unit_map(roberta)
    torch.manual_seed(0)
    imp = general_importance(roberta, um, [batch, batch])
    for kind in UNIT_KINDS:
        v = imp.values[kind]
        assert v.shape == um.shapes()[kind]
        assert torch.isfinite(v).all()
        assert (v >= 0).all() and (v < 1).all()
        assert v.std() > 0.05, kind  # not constant: units differ


def test_gate_gradients_are_zeroed_between_batches(tokenizer, roberta, batch):
    """Averaging N copies of the same batch must equal that batch alone; a cumulative sum
    of never-zeroed gradients (research code defect 4) would give (N+1)/2 times it."""
    um = build_unit_map(roberta)
    roberta.eval()
    b = Batcher(tokenizer, "mlm")(batch["input_ids"], batch["attention_mask"], seed=1)
    from das_engine.importance import domain_loss

    one = raw_gate_gradients(roberta, um, [b], domain_loss)
    three = raw_gate_gradients(roberta, um, [b, b, b], domain_loss)
    for kind in UNIT_KINDS:
        assert torch.allclose(one[kind], three[kind], rtol=1e-5, atol=1e-8)
    # weights stay trainable afterwards
    assert all(p.requires_grad for p in roberta.parameters())


def test_domain_importance_ranks_units(tokenizer, roberta, batch):
    um = build_unit_map(roberta)
    b = Batcher(tokenizer, "mlm")(batch["input_ids"], batch["attention_mask"], seed=3)
    imp = domain_importance(roberta, um, [b])
    assert all((imp.values[k] < 1).all() and (imp.values[k] >= 0).all() for k in UNIT_KINDS)


rows = st.lists(
    st.lists(st.floats(0, 1e3, allow_nan=False, width=32), min_size=3, max_size=12),
    min_size=1,
    max_size=4,
).filter(lambda r: len({len(x) for x in r}) == 1)


@settings(max_examples=60, deadline=None)
@given(rows)
def test_normalisations_stay_in_unit_interval(data):
    raw = torch.tensor(data)
    for method in ("paper", "one_sided", "rank"):
        out = normalize({k: raw for k in UNIT_KINDS}, method).values["head"]
        assert out.shape == raw.shape
        assert ((out >= 0) & (out < 1)).all(), method


@settings(max_examples=60, deadline=None)
@given(rows)
def test_paper_rule_is_abs_tanh_of_layer_standardised_values(data):
    raw = torch.tensor(data, dtype=torch.float32)
    z = standardize(raw)
    paper = normalize({"head": raw}, "paper").values["head"]
    assert torch.allclose(paper, torch.tanh(z).abs().clamp(0, 1 - 1e-6), atol=1e-6)
    one_sided = normalize({"head": raw}, "one_sided").values["head"]
    assert (one_sided[z <= 0] == 0).all()  # below-average units get no protection


def test_paper_rule_rewards_below_average_units():
    """The spec's observation: with right-skewed raw importance, units well *below*
    average get more protection than average units under |tanh(z)|."""
    raw = torch.tensor([[0.1] * 10 + [1.0] * 20 + [6.0] * 2])
    z = standardize(raw)
    paper = normalize({"head": raw}, "paper").values["head"]
    below = z < -0.5
    average = z.abs() < 0.1
    assert below.any() and average.any()
    assert paper[below].min() > 0.5 > 0.1 > paper[average].max()
    assert (normalize({"head": raw}, "one_sided").values["head"][below] == 0).all()


def test_standardize_is_per_layer():
    raw = torch.tensor([[1.0, 2.0, 3.0], [100.0, 200.0, 300.0]])
    z = standardize(raw)
    assert torch.allclose(z[0], z[1])
    assert torch.allclose(z.mean(1), torch.zeros(2), atol=1e-6)
    assert torch.equal(standardize(torch.ones(1, 4)), torch.zeros(1, 4))


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_emax_is_elementwise_max_commutative_and_idempotent(seed):
    g = torch.Generator().manual_seed(seed)
    a = Importance({k: torch.rand(2, 5, generator=g) for k in UNIT_KINDS})
    b = Importance({k: torch.rand(2, 5, generator=g) for k in UNIT_KINDS})
    ab, ba = a.emax(b), b.emax(a)
    for k in UNIT_KINDS:
        assert torch.equal(ab.values[k], ba.values[k])
        assert (ab.values[k] >= a.values[k]).all() and (ab.values[k] >= b.values[k]).all()
        assert torch.equal(a.emax(a).values[k], a.values[k])


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0.01, 1.0), st.integers(1, 40))
def test_budget_keeps_the_top_share_of_each_layer_and_zeroes_the_rest(seed, share, n):
    g = torch.Generator().manual_seed(seed)
    imp = Importance({k: torch.rand(3, n, generator=g) for k in UNIT_KINDS})
    out = imp.budgeted(share)
    keep = max(1, math.ceil(share * n))
    for k in UNIT_KINDS:
        v, b = imp.values[k], out.values[k]
        assert b.shape == v.shape
        kept = b != 0
        assert (kept.sum(1) == min(keep, n)).all()  # rand() never gives exactly 0
        assert torch.equal(b[kept], v[kept])  # kept units keep their own importance
        for row in range(v.shape[0]):  # and every kept unit outranks every dropped one
            dropped = v[row][~kept[row]]
            if dropped.numel():
                assert v[row][kept[row]].min() >= dropped.max()
    assert imp.budgeted(1.0) is imp


def test_budget_is_validated():
    from das_engine.config import TrainingConfig
    from das_engine.errors import ConfigError

    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="protection_budget"):
            TrainingConfig(protection_budget=bad).validate()
    TrainingConfig(protection_budget=0.3).validate()


def test_permuted_control_keeps_each_layers_values_but_moves_them():
    g = torch.Generator().manual_seed(0)
    imp = Importance({k: torch.rand(3, 50, generator=g) for k in UNIT_KINDS})
    perm = imp.permuted(seed=1)
    for k in UNIT_KINDS:
        assert torch.equal(perm.values[k].sort(1).values, imp.values[k].sort(1).values)
        assert not torch.equal(perm.values[k], imp.values[k])


def test_snapshot_round_trip_keeps_kinds_and_shapes(tmp_path):
    from safetensors import safe_open

    imp = Importance(
        {"head": torch.rand(2, 4), "intermediate": torch.rand(2, 8), "output": torch.rand(2, 6)}
    )
    path = tmp_path / "imp" / "domain.safetensors"
    imp.save(path, "domain", {"normalization": "paper"})
    back = Importance.load(path)
    for k in UNIT_KINDS:
        assert torch.equal(back.values[k], imp.values[k])
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    assert meta["kind"] == "domain" and "head" in meta["shapes"]
    assert not list(tmp_path.glob("imp/.*tmp*"))  # the temp file is gone
    assert math.isclose(imp.stats()["head"]["mean"], float(imp.values["head"].mean()), rel_tol=1e-6)


def test_layer_summary_reads_a_snapshot_per_layer_and_unit_kind(tmp_path):
    values = {
        "head": torch.tensor([[0.9, 0.1, 0.6, 0.2], [0.0, 0.0, 0.0, 0.51]]),
        "intermediate": torch.tensor([[0.4] * 8, [0.7] * 8]),
        "output": torch.tensor([[1.0 - 1e-6] * 3, [0.5] * 3]),
    }
    Importance(values).save(tmp_path / "acc.safetensors", "accumulated")
    summary = layer_summary(tmp_path / "acc.safetensors")
    assert set(summary) == {"head", "intermediate", "output"}
    assert summary["head"]["layers"] == 2 and summary["head"]["units"] == 4
    assert summary["head"]["share_above_half"] == [0.5, 0.25]
    assert summary["head"]["mean"] == pytest.approx([0.45, 0.1275])
    assert summary["intermediate"]["share_above_half"] == [0.0, 1.0]
    assert summary["output"]["share_above_half"] == [1.0, 0.0]  # 0.5 itself is not above
