"""Soft-masking: update vs gradient mode under AdamW, and the exact parameter slices."""

import copy

import pytest
import torch

from das_engine.importance import Importance
from das_engine.objective import Batcher, lm_forward
from das_engine.softmask import SoftMask
from das_engine.units import UNIT_KINDS, build_unit_map

from .conftest import tiny


def _importance(um, fill: float | None = None, seed: int = 0) -> Importance:
    g = torch.Generator().manual_seed(seed)
    vals = {}
    for kind, shape in um.shapes().items():
        if fill is None:  # each unit at 0, 0.5 or 1
            vals[kind] = torch.randint(0, 3, shape, generator=g).float() / 2
        else:
            vals[kind] = torch.full(shape, fill)
    return Importance(vals)


def _optimizer(model, mask: SoftMask | None, **kw):
    """The mask's optimizer (update mode masks inside the AdamW step), or plain AdamW."""
    return (
        mask.optimizer(model.parameters(), **kw)
        if mask
        else torch.optim.AdamW(model.parameters(), **kw)
    )


def _step(model, um, batch, mask: SoftMask | None, lr=0.05, wd=0.1, eps=1e-8):
    opt = _optimizer(model, mask, lr=lr, weight_decay=wd, eps=eps)
    for _ in range(2):  # two steps: Adam's moments are non-trivial on the second
        opt.zero_grad()
        lm_forward(model, um, batch).loss.backward()
        if mask:
            mask.after_backward()
        opt.step()


@pytest.fixture
def mlm_batch(tokenizer, batch):
    return Batcher(tokenizer, "mlm", 0.3)(batch["input_ids"], batch["attention_mask"], seed=0)


def test_update_mode_scales_the_whole_adamw_change_by_one_minus_importance(tokenizer, mlm_batch):
    torch.manual_seed(0)
    model = tiny(tokenizer).eval()  # eval: no dropout, so both runs see the same forward
    um = build_unit_map(model)
    imp = _importance(um)
    start = copy.deepcopy(model)
    # one AdamW step each: masked, and the unmasked reference
    model = copy.deepcopy(start)
    um = build_unit_map(model)
    ref = copy.deepcopy(start)
    ref_um = build_unit_map(ref)
    for m, u, mask in ((model, um, SoftMask(um, imp, "update")), (ref, ref_um, None)):
        opt = _optimizer(m, mask, lr=0.05, weight_decay=0.1)
        lm_forward(m, u, mlm_batch).loss.backward()
        opt.step()
    before = dict(start.named_parameters())
    after, unmasked = dict(model.named_parameters()), dict(ref.named_parameters())
    masked_names = set()
    for s in um.slices:
        masked_names.add(s.name)
        unit_imp = imp.values[s.kind][s.layer]
        if s.group > 1:
            unit_imp = unit_imp.view(-1, s.group).amax(1)
        per_pos = unit_imp[s.unit_index]
        view = [1] * s.param.dim()
        view[s.axis] = -1
        keep = (1 - per_pos).view(view).expand_as(s.param)
        delta = after[s.name] - before[s.name]
        ref_delta = unmasked[s.name] - before[s.name]
        assert torch.allclose(delta, keep * ref_delta, atol=1e-6), s.name
        protected = keep == 0
        assert torch.equal(after[s.name][protected], before[s.name][protected]), s.name
        free_units = keep == 1
        assert torch.allclose(after[s.name][free_units], unmasked[s.name][free_units], atol=1e-6)
    # embeddings and LayerNorms are not masked: they move exactly like the unmasked run
    for name in before:
        if name not in masked_names:
            assert torch.allclose(after[name], unmasked[name], atol=1e-6), name


def test_update_mode_with_full_importance_freezes_weight_decay_too(tokenizer, mlm_batch):
    model = tiny(tokenizer).eval()
    um = build_unit_map(model)
    start = copy.deepcopy(model)
    _step(model, um, mlm_batch, SoftMask(um, _importance(um, fill=1.0), "update"), wd=0.5)
    before, after = dict(start.named_parameters()), dict(model.named_parameters())
    for s in um.slices:
        assert torch.equal(before[s.name], after[s.name]), s.name


def test_gradient_mode_is_the_papers_rule_and_adam_cancels_it(tokenizer, mlm_batch):
    model = tiny(tokenizer).eval()
    um = build_unit_map(model)
    imp = _importance(um)
    lm_forward(model, um, mlm_batch).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    SoftMask(um, imp, "gradient").after_backward()
    mults = __import__("das_engine.softmask", fromlist=["x"]).parameter_multipliers(um, imp)
    for name, p in model.named_parameters():
        expected = grads[name] * mults[name] if name in mults else grads[name]
        assert torch.equal(p.grad, expected), name
    # Under Adam, a constant gradient scale of 0.5 leaves the update (almost) unchanged:
    # why the engine defaults to update masking.
    a, b = tiny(tokenizer).eval(), tiny(tokenizer).eval()
    ua, ub = build_unit_map(a), build_unit_map(b)
    start = copy.deepcopy(a)
    # (eps tiny, so Adam's normalisation is exact even where gradients are ~1e-8)
    _step(a, ua, mlm_batch, SoftMask(ua, _importance(ua, fill=0.5), "gradient"), wd=0.0, eps=1e-20)
    _step(b, ub, mlm_batch, None, wd=0.0, eps=1e-20)
    s0 = dict(start.named_parameters())
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    for s in ua.slices:
        if "key.bias" in s.name:  # softmax is shift-invariant: its gradient is pure noise
            continue
        da, db = pa[s.name] - s0[s.name], pb[s.name] - s0[s.name]
        assert (da - db).norm() < 1e-3 * db.norm(), s.name
    # ... whereas update masking at 0.5 really halves the change
    c = tiny(tokenizer).eval()
    uc = build_unit_map(c)
    _step(c, uc, mlm_batch, SoftMask(uc, _importance(uc, fill=0.5), "update"), wd=0.0, eps=1e-20)
    pc = dict(c.named_parameters())
    s = uc.slices[0]
    dc, db = pc[s.name] - s0[s.name], pb[s.name] - s0[s.name]
    assert 0.3 < float(dc.norm() / db.norm()) < 0.7


def _expected_head_positions(arch, name, shape, layer, heads, d, D):
    """Index arithmetic, independent of the unit map, of what head(s) ``heads`` write."""
    m = torch.zeros(shape, dtype=torch.bool)
    if f".{layer}." not in name:
        return m
    rows = torch.cat([torch.arange(h * d, (h + 1) * d) for h in heads])
    if arch == "roberta":
        if any(k in name for k in ("query", "key", "value")):
            m[rows] = True
        elif "attention.output.dense.weight" in name:
            m[:, rows] = True
    elif arch == "gpt2":
        if "attn.c_attn" in name:
            cols = torch.cat([rows + j * D for j in range(3)])
            m[..., cols] = True
        elif "attn.c_proj.weight" in name:
            m[rows] = True
    elif arch == "llama":
        if "q_proj" in name:
            m[rows] = True
        elif "k_proj" in name or "v_proj" in name:
            kv = sorted({h // 2 for h in heads})
            m[torch.cat([torch.arange(k * d, (k + 1) * d) for k in kv])] = True
        elif "o_proj" in name:
            m[:, rows] = True
    return m


@pytest.mark.parametrize("arch", ["roberta", "gpt2", "llama"])
def test_masking_one_head_touches_only_its_slices(tokenizer, batch, arch):
    model = tiny(tokenizer, arch).eval()
    um = build_unit_map(model)
    objective = um.objective
    b = Batcher(tokenizer, objective, 0.3)(batch["input_ids"], batch["attention_mask"], seed=0)
    layer = 1
    heads = [2, 3] if arch == "llama" else [2]  # llama: both query heads of KV head 1
    imp = _importance(um, fill=1.0)
    for h in heads:
        imp.values["head"][layer, h] = 0.0
    start = copy.deepcopy(model)
    _step(model, um, b, SoftMask(um, imp, "update"))
    before, after = dict(start.named_parameters()), dict(model.named_parameters())
    d, D = um.head_dim, um.hidden_size
    for name in {s.name for s in um.slices}:
        changed = after[name] != before[name]
        expected = _expected_head_positions(arch, name, before[name].shape, layer, heads, d, D)
        assert not (changed & ~expected).any(), f"{name}: changed outside head {heads}"
        if expected.any():
            assert changed[expected].float().mean() > 0.9, f"{name}: head {heads} did not train"


def test_kv_head_shared_by_a_protected_query_head_stays_protected(tokenizer, batch):
    model = tiny(tokenizer, "llama").eval()
    um = build_unit_map(model)
    imp = _importance(um, fill=1.0)
    imp.values["head"][0, 2] = 0.0  # query head 2 free, its KV partner (head 3) protected
    mask = SoftMask(um, imp, "update")
    mults = dict(zip(mask.names, mask.multipliers, strict=True))
    k_name = next(s.name for s in um.slices if "layers.0.self_attn.k_proj" in s.name)
    q_name = next(s.name for s in um.slices if "layers.0.self_attn.q_proj" in s.name)
    assert (mults[k_name] == 0).all()
    d = um.head_dim
    assert (mults[q_name][2 * d : 3 * d] == 1).all() and (mults[q_name][: 2 * d] == 0).all()


def test_all_unit_kinds_have_slices(tokenizer):
    um = build_unit_map(tiny(tokenizer))
    assert {s.kind for s in um.slices} == set(UNIT_KINDS)
