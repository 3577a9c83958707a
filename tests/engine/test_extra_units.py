"""Embedding rows and norm elements as DAS units (config mask_embeddings / mask_layernorm).

Their importance is the gradient of a virtual gate that scales every parameter entry the
unit owns; the tests compare it with such a gate built explicitly through
``torch.func.functional_call`` (tied weights follow the substitution).
"""

import copy

import pytest
import torch

from das_engine.config import TrainingConfig
from das_engine.errors import ConfigError
from das_engine.importance import Importance, domain_loss, raw_gate_gradients
from das_engine.lineage import Lineage
from das_engine.objective import Batcher, lm_forward
from das_engine.softmask import SoftMask, parameter_multipliers
from das_engine.units import EXTRA_KINDS, UNIT_KINDS, build_unit_map

from .conftest import TINY_CONFIG, tiny


@pytest.fixture
def mlm_batch(tokenizer, batch):
    return Batcher(tokenizer, "mlm", 0.3)(batch["input_ids"], batch["attention_mask"], seed=0)


def _finite_difference_gate(model, um, batch, kind: str, layer: int, unit: int) -> float:
    """(L(g_u = 1 + e) - L(g_u = 1 - e)) / 2e, scaling every entry unit u owns."""
    eps = 1e-2  # the loss is computed in float32: a tiny step would be rounding noise
    losses = []
    for sign in (1, -1):
        m = copy.deepcopy(model)
        named = dict(m.named_parameters())
        with torch.no_grad():
            for s in um.extra_slices:
                if s.kind == kind and s.layer == layer:
                    idx = (s.unit_index == unit).nonzero().flatten()
                    named[s.name].index_fill_(s.axis, idx, 0.0)
                    orig = dict(model.named_parameters())[s.name].index_select(s.axis, idx)
                    named[s.name].index_add_(s.axis, idx, orig * (1 + sign * eps))
            losses.append(float(lm_forward(m, build_unit_map(m), batch).loss))
    return (losses[0] - losses[1]) / (2 * eps)


@pytest.mark.parametrize("arch", ["roberta", "gpt2", "llama"])
def test_extra_units_cover_embedding_rows_and_every_norm(tokenizer, arch):
    model = tiny(tokenizer, arch)
    um = build_unit_map(model)
    shapes = um.extra_shapes()
    vocab = model.get_input_embeddings().weight.shape[0]
    assert shapes["embedding"] == (1, vocab)
    norms = [m for m in model.modules() if type(m).__name__.endswith("Norm")]
    assert shapes["layernorm"] == (len(norms), um.hidden_size)
    names = {s.name for s in um.extra_slices}
    assert len(names) == len(um.extra_slices)  # a tied parameter is listed once
    assert not names & {s.name for s in um.slices}  # disjoint from the paper's units


@pytest.mark.parametrize("kind", EXTRA_KINDS)
def test_param_gate_importance_equals_the_gate_finite_difference(tokenizer, mlm_batch, kind):
    torch.manual_seed(0)
    model = tiny(tokenizer).eval().double()
    um = build_unit_map(model)
    raw = raw_gate_gradients(model, um, [mlm_batch], domain_loss, (kind,))
    assert raw[kind].shape == um.extra_shapes()[kind]
    flat = raw[kind].flatten()
    top = flat.argsort(descending=True)[:3].tolist()
    width = raw[kind].shape[1]
    for idx in top + [int(flat.argmin())]:
        layer, unit = divmod(idx, width)
        fd = _finite_difference_gate(model, um, mlm_batch, kind, layer, unit)
        assert abs(abs(fd) - float(raw[kind][layer, unit])) <= 2e-4 + 2e-2 * abs(fd), idx
    assert flat.max() > 0
    # the paper's kinds are unchanged by asking for extra ones
    plain = raw_gate_gradients(model, um, [mlm_batch], domain_loss)
    assert set(plain) == set(UNIT_KINDS)
    for k in UNIT_KINDS:
        assert torch.allclose(plain[k], raw[k], rtol=1e-5, atol=1e-8)
    assert all(p.requires_grad for p in model.parameters())  # restored


def _imp_with_extras(um, seed=0) -> Importance:
    g = torch.Generator().manual_seed(seed)
    vals = {k: torch.zeros(s) for k, s in um.shapes().items()}
    for k, s in um.extra_shapes().items():
        vals[k] = torch.randint(0, 3, s, generator=g).float() / 2  # 0, 0.5 or 1
    return Importance(vals)


def test_update_mask_on_embedding_rows_and_norms_is_exact(tokenizer, mlm_batch):
    torch.manual_seed(0)
    model = tiny(tokenizer).eval()
    um = build_unit_map(model)
    imp = _imp_with_extras(um)
    start = copy.deepcopy(model)
    free = copy.deepcopy(model)

    def step(m, mask):
        kw = {"lr": 0.05, "weight_decay": 0.1}
        opt = (
            mask.optimizer(m.parameters(), **kw)
            if mask
            else torch.optim.AdamW(m.parameters(), **kw)
        )
        for _ in range(2):
            opt.zero_grad()
            lm_forward(m, build_unit_map(m), mlm_batch).loss.backward()
            opt.step()

    mask = SoftMask(um, imp, "update", UNIT_KINDS + EXTRA_KINDS)
    step(model, mask)
    step(free, None)
    emb = "roberta.embeddings.word_embeddings.weight"
    w0, w, wf = (dict(x.named_parameters())[emb].detach() for x in (start, model, free))
    rows = imp.values["embedding"][0]
    full, none = rows == 1, rows == 0
    assert full.any() and none.any()
    assert torch.equal(w[full], w0[full])  # I = 1: bit-identical rows
    for kind in EXTRA_KINDS:
        for s in um.extra_slices:
            if s.kind != kind:
                continue
            p0 = dict(start.named_parameters())[s.name].detach()
            p = dict(model.named_parameters())[s.name].detach()
            units = imp.values[kind][s.layer][s.unit_index]
            keep = units == 1
            assert torch.equal(p[keep], p0[keep]), s.name
    moved = ~torch.isclose(w[none], w0[none]).all(dim=1)
    assert moved.any()  # unprotected rows learn
    assert not torch.equal(wf[full], w0[full])  # and NCL moves the protected ones


def test_extra_kinds_are_masked_only_when_asked(tokenizer):
    model = tiny(tokenizer)
    um = build_unit_map(model)
    imp = _imp_with_extras(um)
    plain = parameter_multipliers(um, imp)
    assert {s.name for s in um.slices} == set(plain)
    both = parameter_multipliers(um, imp, UNIT_KINDS + EXTRA_KINDS)
    assert set(both) == set(plain) | {s.name for s in um.extra_slices}
    # asking for a kind the importance lacks masks nothing extra (an older snapshot)
    old = Importance({k: imp.values[k] for k in UNIT_KINDS})
    assert set(parameter_multipliers(um, old, UNIT_KINDS + EXTRA_KINDS)) == set(plain)


def test_snapshot_round_trip_emax_union_and_permutation_keep_extra_kinds(tmp_path, tokenizer):
    um = build_unit_map(tiny(tokenizer))
    a, b = _imp_with_extras(um, 0), _imp_with_extras(um, 1)
    a.save(tmp_path / "a.safetensors", "domain")
    back = Importance.load(tmp_path / "a.safetensors")
    assert back.kinds == set(UNIT_KINDS) | set(EXTRA_KINDS)
    assert all(torch.equal(back.values[k], a.values[k]) for k in back.kinds)
    only_base = Importance({k: b.values[k] for k in UNIT_KINDS})
    m = only_base.emax(a)
    assert torch.equal(m.values["embedding"], a.values["embedding"])  # one side: kept
    assert torch.equal(
        a.emax(b).values["layernorm"], torch.maximum(a.values["layernorm"], b.values["layernorm"])
    )
    p = a.permuted(3)
    for k in EXTRA_KINDS:
        assert torch.equal(p.values[k].sort(dim=1).values, a.values[k].sort(dim=1).values)
        assert not torch.equal(p.values[k], a.values[k])


def test_config_rejects_non_boolean_switches():
    with pytest.raises(ConfigError, match="mask_embeddings"):
        TrainingConfig(mask_embeddings="yes")  # type: ignore[arg-type]
    assert TrainingConfig(mask_embeddings=True, mask_layernorm=True).extra_unit_kinds() == (
        "embedding",
        "layernorm",
    )
    assert TrainingConfig().extra_unit_kinds() == ("embedding", "layernorm")  # the default
    paper = TrainingConfig(mask_embeddings=False, mask_layernorm=False)
    assert paper.extra_unit_kinds() == ()


def test_lineage_measures_and_protects_extra_kinds(tmp_path, corpora):
    """Stage 1 without extra kinds, stage 2 with: the general importance is re-measured
    with them, and the embedding rows protected most move least in stage 2."""
    paper = {**TINY_CONFIG, "mask_embeddings": False, "mask_layernorm": False}
    lin = Lineage.create(tmp_path / "x", "tiny-roberta", paper)
    lin.add_domain(corpora[0], "legal")
    s1 = lin.stages[0]
    assert Importance.load(s1.importance_dir / "accumulated.safetensors").kinds == set(UNIT_KINDS)
    before = lin.stages[0].model_dir
    from safetensors.torch import load_file

    w1 = load_file(str(before / "model.safetensors"))["roberta.embeddings.word_embeddings.weight"]
    cfg = {**TINY_CONFIG, "mask_embeddings": True, "mask_layernorm": True, "contrast_weight": 0.0}
    lin.config = TrainingConfig.from_dict(cfg)  # a lineage whose config gained the switches
    lin.add_domain(corpora[1], "cooking")
    general = Importance.load(lin.path / "importance" / "general.safetensors")
    assert set(EXTRA_KINDS) <= general.kinds
    s2 = lin.stages[1]
    acc2 = Importance.load(s2.importance_dir / "accumulated.safetensors")
    dom2 = Importance.load(s2.importance_dir / "domain.safetensors")
    for k in EXTRA_KINDS:
        v = acc2.values[k]
        assert torch.isfinite(v).all() and (v >= 0).all() and (v < 1).all()
        assert v.std() > 0
        assert torch.equal(v, torch.maximum(acc2.values[k], dom2.values[k]))
    # the stage-2 mask used EMax(general, I(1)); rows it protected most moved least
    acc1 = general.emax(Importance.load(s1.importance_dir / "domain.safetensors"))
    for k in EXTRA_KINDS:  # I_acc(2) = EMax(EMax(I_general, I(1)), I(2)), exactly
        assert torch.equal(acc2.values[k], torch.maximum(acc1.values[k], dom2.values[k]))
    w2 = load_file(str(s2.model_dir / "model.safetensors"))[
        "roberta.embeddings.word_embeddings.weight"
    ]
    imp_rows = acc1.values["embedding"][0]
    change = (w2 - w1).norm(dim=1)
    hi, lo = imp_rows > imp_rows.quantile(0.9), imp_rows < imp_rows.quantile(0.1)
    assert change[hi].mean() < change[lo].mean()
