"""Precision: fp32 master weights under autocast, stages of different precision in one
process, checkpoints in the base's dtype."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import das_engine.evaluate
import das_engine.importance
import das_engine.lineage as lineage_mod
import das_engine.strategies.das
from das_engine.bases import load_model, save_base
from das_engine.importance import Importance
from das_engine.lineage import Lineage
from das_engine.precision import Precision, resolve_mode
from das_engine.softmask import parameter_multipliers
from das_engine.trainer import Trainer, select_device
from das_engine.units import build_unit_map

from .conftest import TINY_CONFIG, tiny

MASKED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CFG = {**TINY_CONFIG, "max_steps": 2, "checkpoint_every": 10, "contrast_weight": 1.0}


@pytest.fixture(scope="module")
def bf16_llama(tmp_path_factory, tokenizer) -> Path:
    """A tiny Llama saved the way real decoder bases ship: torch_dtype bfloat16."""
    out = tmp_path_factory.mktemp("bases") / "llama-bf16"
    save_base(tiny(tokenizer, "llama").to(torch.bfloat16), tokenizer, out)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    return out


def _record_autocast(monkeypatch, seen: list) -> None:
    """Wrap the functions each phase computes its loss with; note the autocast state."""

    def wrap(module, name, phase):
        real = getattr(module, name)

        device = select_device().type  # the lineage's own device (cuda > cpu)

        def spy(*args, **kwargs):
            on = torch.is_autocast_enabled(device)
            seen.append((phase, torch.get_autocast_dtype(device) if on else torch.float32))
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)

    wrap(das_engine.strategies.das, "lm_forward", "training")
    wrap(das_engine.evaluate, "lm_forward", "evaluation")
    wrap(das_engine.importance, "proxy_kl_loss", "general importance")
    wrap(das_engine.importance, "domain_loss", "domain importance")


def test_bf16_then_fp32_then_bf16_stages_in_one_process(tmp_path, corpora):
    """Each stage owns its precision: no global state leaks into the next (accelerate's
    AcceleratorState made the second of these die); every pass runs under the stage's
    autocast, on fp32 master weights."""
    master_dtypes = []
    real_run = Trainer.run

    def spy_run(self):
        master_dtypes.append({p.dtype for p in self.model.parameters()})
        return real_run(self)

    for i, mode in enumerate(["bf16", "no", "bf16"]):
        seen: list = []
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(Trainer, "run", spy_run)
            _record_autocast(mp, seen)
            cfg = {**CFG, "mixed_precision": mode}
            lin = Lineage.create(tmp_path / f"l{i}", "tiny-roberta", cfg)
            result = lin.add_domain(corpora[i % 2], "legal")
        assert result.steps == 2 and lin.domains == ["legal"]
        want = torch.bfloat16 if mode == "bf16" else torch.float32
        phases = {p for p, _ in seen}
        assert phases == {"training", "evaluation", "general importance", "domain importance"}
        assert {d for _, d in seen} == {want}, (mode, seen)
    assert master_dtypes == [{torch.float32}] * 3


def _fraction_changed(after: dict, before: dict, mults: dict | None = None) -> dict[str, float]:
    """Share of each masked attention/FFN weight's entries that moved; with ``mults``,
    only entries whose soft-mask multiplier 1 - I is >= 1e-3 count (a unit protected to
    1 - 1e-6 moves by less than a float32 ulp: frozen by design, in any precision)."""
    out = {}
    for k in after:
        if k.endswith(".weight") and any(n in k for n in MASKED):
            moved = after[k].float().cpu() != before[k].float().cpu()
            if mults is not None:
                moved = moved[mults[k].cpu().expand_as(moved) >= 1e-3]  # vectors broadcast
            out[k] = float(moved.float().mean())
    return out


def _train_capturing(monkeypatch, lin: Lineage, corpus: Path) -> dict:
    """Run one stage; return the trainer's weights at the end of training (in memory)."""
    captured = {}
    real_run = Trainer.run

    def spy_run(self):
        out = real_run(self)
        captured.update({k: v.detach().clone() for k, v in self.model.state_dict().items()})
        return out

    monkeypatch.setattr(Trainer, "run", spy_run)
    lin.add_domain(corpus, "legal")
    return captured


def test_bf16_base_trains_on_fp32_masters_and_saves_bf16(tmp_path, corpora, bf16_llama):
    """Tiny DAS-masked updates survive on fp32 masters; bf16 masters (the old loading)
    round most of them away. The stage checkpoint is bf16 and loads with transformers."""
    from transformers import AutoModelForCausalLM

    base = load_model(bf16_llama).state_dict()  # bf16 -> fp32 is exact
    cfg = {**CFG, "max_steps": 3, "learning_rate": 1e-4, "contrast_weight": 0.0}
    cfg["mixed_precision"] = "bf16"

    with pytest.MonkeyPatch.context() as mp:
        lin = Lineage.create(tmp_path / "fp32", str(bf16_llama), cfg)
        trained = _train_capturing(mp, lin, corpora[0])
    general = Importance.load(lin.path / "importance" / "general.safetensors")  # I_acc(0)
    model = load_model(bf16_llama)
    mults = parameter_multipliers(build_unit_map(model), general)
    fp32 = _fraction_changed(trained, base, mults)
    # every weight the mask lets move moved (bar the odd entry whose 3 updates cancel)
    assert min(fp32.values()) >= 0.999, fp32

    with pytest.MonkeyPatch.context() as mp:  # control: the weights as the checkpoint has them
        real_load = lineage_mod.load_model
        mp.setattr(lineage_mod, "load_model", lambda p, dtype=None: real_load(p, dtype="auto"))
        control = Lineage.create(tmp_path / "bf16", str(bf16_llama), cfg)
        bf16 = _fraction_changed(_train_capturing(mp, control, corpora[0]), base)
    assert sum(bf16.values()) / len(bf16) < 0.8, bf16

    model_dir = lin.stages[0].model_dir
    assert json.loads((model_dir / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(model_dir / "model.safetensors"), "pt") as fh:
        assert {fh.get_slice(k).get_dtype() for k in fh.keys()} == {"BF16"}
    plain = AutoModelForCausalLM.from_pretrained(str(model_dir))
    assert plain.dtype == torch.bfloat16
    out = plain(input_ids=torch.tensor([[5, 6, 7, 8]]))
    assert torch.isfinite(out.logits).all()
    # the lineage's own base copy keeps the base's dtype too
    assert json.loads((lin.base_dir / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize(
    ("save_dtype", "want"), [("float32", "F32"), ("float16", "F16"), ("auto", "F32")]
)
def test_save_dtype_is_honoured(tmp_path, corpora, save_dtype, want):
    cfg = {**CFG, "strategy": "ncl", "save_dtype": save_dtype}
    lin = Lineage.create(tmp_path / "l", "tiny-roberta", cfg)  # an fp32 base: auto = F32
    lin.add_domain(corpora[0], "legal")
    path = lin.stages[0].model_dir / "model.safetensors"
    with safe_open(str(path), "pt") as fh:
        assert {fh.get_slice(k).get_dtype() for k in fh.keys()} == {want}


def test_bf16_master_loading_is_opt_in(bf16_llama):
    assert next(iter(load_model(bf16_llama).parameters())).dtype == torch.float32
    assert next(iter(load_model(bf16_llama, dtype="auto").parameters())).dtype == torch.bfloat16


def test_auto_precision_per_device(monkeypatch):
    from das_engine.config import TrainingConfig

    auto = TrainingConfig()
    assert resolve_mode(auto, torch.device("cpu")) == "no"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_mode(auto, torch.device("cuda")) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_mode(auto, torch.device("cuda")) == "fp16"
    assert Precision("fp16", torch.device("cpu")).grad_scaler() is not None
    assert Precision("bf16", torch.device("cpu")).grad_scaler() is None
    with Precision("bf16", torch.device("cpu")).autocast():
        assert torch.is_autocast_enabled("cpu")
    with Precision("no", torch.device("cpu")).autocast():
        assert not torch.is_autocast_enabled("cpu")
