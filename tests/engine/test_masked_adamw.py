"""The memory-lean soft mask (broadcast factors, masking inside the AdamW step) equals the
dense reference it replaced: a full-shape multiplier per parameter and a copy of the
weights around a plain AdamW step. The reference lives here only, not in the library."""

from __future__ import annotations

import copy
import functools
from dataclasses import replace

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from das_engine.bases import bundled_tokenizer
from das_engine.importance import Importance
from das_engine.masked_adamw import MaskedAdamW
from das_engine.softmask import SoftMask, parameter_factors
from das_engine.units import EXTRA_KINDS, UNIT_KINDS, ParamSlice, build_unit_map

from .conftest import tiny


@functools.cache
def _model(arch: str):
    return tiny(bundled_tokenizer(), arch)


def _dense_multipliers(um, imp, kinds) -> dict[str, torch.Tensor]:
    """The old implementation: 1 - I expanded to every masked parameter's full shape."""
    out: dict[str, torch.Tensor] = {}
    for s in um.slices_of(tuple(k for k in kinds if k in imp.values)):
        unit_imp = imp.values[s.kind][s.layer].float()
        if s.group > 1:
            unit_imp = unit_imp.view(-1, s.group).amax(dim=1)
        view = [1] * s.param.dim()
        view[s.axis] = -1
        mult = (1.0 - unit_imp[s.unit_index]).view(view).expand_as(s.param).to(s.param.dtype)
        out[s.name] = out[s.name] * mult if s.name in out else mult.contiguous()
    return out


def _groups(model, wd: float) -> list[dict]:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}]


def _importance(um, seed: int, discrete: bool) -> Importance:
    g = torch.Generator().manual_seed(seed)
    shapes = {**um.shapes(), **um.extra_shapes()}
    if discrete:  # exactly 0, 0.5 or 1
        return Importance(
            {k: torch.randint(0, 3, s, generator=g).float() / 2 for k, s in shapes.items()}
        )
    return Importance({k: torch.rand(s, generator=g) for k, s in shapes.items()})


def _with_second_axis(um):
    """A unit map where W_o of layer 0 is also written on its rows by output units, so the
    parameter is masked on two axes (no shipped family does that; the code must cope)."""
    o = next(s for s in um.slices if s.kind == "head" and s.axis == 1 and s.layer == 0)
    extra = ParamSlice(o.name, o.param, "output", 0, 0, torch.arange(o.param.shape[0]))
    return replace(um, slices=[*um.slices, extra])


def _grads(model, seed: int, step: int) -> None:
    g = torch.Generator().manual_seed(seed * 1000 + step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g) * 0.1


def _run_reference(model, um, imp, kinds, mode, steps, seed, lr, wd):
    mults = _dense_multipliers(um, imp, kinds)
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW(_groups(model, wd), lr=lr)
    for step in range(steps):
        _grads(model, seed, step)
        with torch.no_grad():
            if mode == "gradient":
                for name, m in mults.items():
                    params[name].grad.mul_(m)
            before = {n: params[n].detach().clone() for n in mults}
            opt.step()
            if mode == "update":
                for name, m in mults.items():
                    w = params[name]
                    w.copy_(before[name] + m * (w - before[name]))
    return opt


def _run_new(model, um, imp, kinds, mode, steps, seed, lr, wd, bucket):
    mask = SoftMask(um, imp, mode, kinds)
    extra = {"bucket_elements": bucket} if mode == "update" else {}
    opt = mask.optimizer(_groups(model, wd), lr=lr, **extra)
    for step in range(steps):
        _grads(model, seed, step)
        mask.after_backward()
        opt.step()
    return opt


@settings(max_examples=20, deadline=None)
@given(
    arch=st.sampled_from(["roberta", "gpt2", "llama"]),
    mode=st.sampled_from(["update", "gradient"]),
    extras=st.booleans(),
    two_axes=st.booleans(),
    discrete=st.booleans(),
    seed=st.integers(0, 10_000),
    steps=st.integers(1, 4),
    lr=st.floats(1e-4, 0.1),
    wd=st.sampled_from([0.0, 0.01, 0.5]),
    bucket=st.sampled_from([1 << 24, 4096, 500]),
)
# a bucket holding only blocks of a two-axis parameter, with weight decay (found once)
@example("roberta", "update", False, True, False, 0, 2, 0.01, 0.5, 500)
def test_lean_mask_equals_the_dense_reference(
    arch, mode, extras, two_axes, discrete, seed, steps, lr, wd, bucket
):
    base = _model(arch)
    kinds = UNIT_KINDS + (EXTRA_KINDS if extras else ())
    runs = []
    for runner in ("reference", "new"):
        model = copy.deepcopy(base)
        um = build_unit_map(model)
        if two_axes:
            um = _with_second_axis(um)
        imp = _importance(um, seed, discrete)
        if runner == "reference":
            opt = _run_reference(model, um, imp, kinds, mode, steps, seed, lr, wd)
        else:
            opt = _run_new(model, um, imp, kinds, mode, steps, seed, lr, wd, bucket)
        runs.append((model, opt))
    (ref, ref_opt), (new, new_opt) = runs
    start = dict(base.named_parameters())
    mults = _dense_multipliers(um, imp, kinds)
    for (name, p_ref), p_new in zip(ref.named_parameters(), new.parameters(), strict=True):
        assert torch.allclose(p_new, p_ref, rtol=1e-5, atol=1e-6), name
        if mode == "update" and name in mults:  # I = 1: bit-identical to the start
            frozen = mults[name] == 0
            assert torch.equal(p_new.detach()[frozen], start[name].detach()[frozen]), name
        # the moments come from the unmasked gradient in update mode, as in the reference
        s_ref, s_new = ref_opt.state[p_ref], new_opt.state[p_new]
        assert set(s_new) == set(s_ref)
        assert float(s_new["step"]) == float(s_ref["step"]) == steps
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(s_new[key], s_ref[key], rtol=1e-5, atol=1e-9), (name, key)


def test_factors_are_vectors_one_per_written_axis(tokenizer):
    for arch in ("roberta", "gpt2", "llama"):
        um = build_unit_map(tiny(tokenizer, arch))
        imp = _importance(um, 0, False)
        factors = parameter_factors(um, imp, UNIT_KINDS + EXTRA_KINDS)
        assert factors
        for name, fs in factors.items():
            assert len(fs) == 1, name  # every shipped family writes one axis per parameter
            (f,) = fs
            assert f.numel() == max(f.shape), f"{name}: {tuple(f.shape)} is not a vector"
        two = parameter_factors(_with_second_axis(um), imp)
        o = next(s for s in um.slices if s.kind == "head" and s.axis == 1 and s.layer == 0)
        rows, cols = o.param.shape
        assert [tuple(f.shape) for f in two[o.name]] == [(rows, 1), (1, cols)]


def test_masked_optimizer_keeps_only_adamw_state_and_resumes_exactly(tokenizer):
    """No weight copy in the state, and a state_dict round trip continues bit-identically."""
    model = tiny(tokenizer)
    um = build_unit_map(model)
    mask = SoftMask(um, _importance(um, 1, False), "update", UNIT_KINDS + EXTRA_KINDS)
    opt = mask.optimizer(_groups(model, 0.1), lr=0.01)
    assert isinstance(opt, MaskedAdamW)
    for step in range(2):
        _grads(model, 3, step)
        opt.step()
    assert all(set(s) == {"step", "exp_avg", "exp_avg_sq"} for s in opt.state.values())
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _grads(model, 3, 2)
    opt.step()
    expected = copy.deepcopy(model.state_dict())
    model.load_state_dict(saved_model)
    fresh = SoftMask(um, _importance(um, 1, False), "update", UNIT_KINDS + EXTRA_KINDS)
    opt2 = fresh.optimizer(_groups(model, 0.1), lr=0.01)
    opt2.load_state_dict(saved_opt)
    _grads(model, 3, 2)
    opt2.step()
    for name, value in model.state_dict().items():
        assert torch.equal(value, expected[name]), name
