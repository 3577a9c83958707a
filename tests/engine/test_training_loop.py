"""Training-loop table stakes: LR schedules re-warmed per stage, clipping, gradient
checkpointing (with the DAS gate hooks), the final-step checkpoint, pickle-free
optimizer state, the fp16 loss-scaler path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import das_engine.lineage as lineage_mod
import das_engine.strategies.das_importance as das_importance_mod
import das_engine.trainer as trainer_mod
from das_engine.config import TrainingConfig
from das_engine.data import ChunkStore
from das_engine.errors import Cancelled, ConfigError
from das_engine.lineage import Lineage
from das_engine.objective import Batcher
from das_engine.precision import Precision
from das_engine.strategies import StageContext, make_strategy
from das_engine.trainer import Trainer, gradient_checkpointing_active, make_scheduler
from das_engine.units import build_unit_map

from .conftest import TINY_CONFIG, params_equal, tiny

CFG = {**TINY_CONFIG, "max_steps": 4, "checkpoint_every": 10}


# -- schedules ------------------------------------------------------------------------------


def _factors(config: TrainingConfig, total: int) -> list[float]:
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler(opt, config, total)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@settings(max_examples=40, deadline=None)
@given(total=st.integers(1, 200), ratio=st.floats(0.0, 0.5))
def test_constant_is_the_original_schedule(total, ratio):
    """The default keeps existing results: (s+1)/warmup during warm-up, then 1."""
    w = int(ratio * total)
    want = [min(1.0, (s + 1) / w) if w and s < w else 1.0 for s in range(total)]
    assert _factors(TrainingConfig(warmup_ratio=ratio), total) == want


def test_decaying_schedules():
    lin = _factors(TrainingConfig(lr_scheduler="linear", warmup_ratio=0.2), 10)
    assert lin[:3] == [0.0, 0.5, 1.0] and lin[-1] == pytest.approx(0.125)
    assert all(a >= b for a, b in zip(lin[2:], lin[3:], strict=False))
    cos = _factors(TrainingConfig(lr_scheduler="cosine"), 10)
    assert cos[0] == 1.0 and cos[5] == pytest.approx(0.5) and cos[-1] < 0.03
    cww = _factors(TrainingConfig(lr_scheduler="constant_with_warmup", warmup_ratio=0.2), 10)
    assert cww == [0.0, 0.5] + [1.0] * 8
    with pytest.raises(ConfigError):
        TrainingConfig(lr_scheduler="exponential")


def test_warmup_restarts_at_every_stage(tmp_path, corpora, monkeypatch):
    """Re-warming per stage: stage 2 repeats stage 1's schedule from its first step."""
    lrs: list[float] = []
    real = Trainer._micro_batch

    def spy(self, step, micro):
        if micro == 0:
            lrs.append(self.optimizer.param_groups[0]["lr"])
        return real(self, step, micro)

    monkeypatch.setattr(Trainer, "_micro_batch", spy)
    cfg = {**CFG, "strategy": "ncl", "lr_scheduler": "linear", "warmup_ratio": 0.5}
    lin = Lineage.create(tmp_path / "l", "tiny-roberta", cfg)
    lin.add_domain(corpora[0], "legal")
    lin.add_domain(corpora[1], "cooking")
    lr = cfg["learning_rate"]
    assert lrs == pytest.approx([0.0, lr / 2, lr, lr / 2] * 2)


# -- a trainer on its own (no lineage) -------------------------------------------------------


def _trainer(tokenizer, train_dir: Path, ckpt: Path, precision=None, **overrides) -> Trainer:
    cfg = TrainingConfig.from_dict({**CFG, "strategy": "ncl", **overrides})
    model = tiny(tokenizer, "roberta")
    unit_map = build_unit_map(model)
    batcher = Batcher(tokenizer, "mlm", cfg.mlm_probability)
    store = ChunkStore(train_dir)
    strategy = make_strategy(cfg)
    strategy.prepare(StageContext(model, unit_map, cfg, None, train_store=store, batcher=batcher))
    return Trainer(model, strategy, cfg, store, batcher, ckpt, precision=precision)


@pytest.mark.parametrize("max_norm", [0.5, 0, None])
def test_max_grad_norm(tokenizer, stage_data, tmp_path, monkeypatch, max_norm):
    norms = []
    real = trainer_mod.clip_grad_norm_

    def spy(params, max_norm_, *a, **k):
        params = list(params)
        before = real(params, max_norm_, *a, **k)
        after = torch.linalg.vector_norm(
            torch.stack([p.grad.norm() for p in params if p.grad is not None])
        )
        norms.append((max_norm_, float(before), float(after)))
        return before

    monkeypatch.setattr(trainer_mod, "clip_grad_norm_", spy)
    _trainer(tokenizer, stage_data, tmp_path / "c", max_grad_norm=max_norm).run()
    if not max_norm:
        assert norms == []  # 0 / null: no clipping
        return
    assert len(norms) == 4 and all(m == max_norm for m, _, _ in norms)
    for _, before, after in norms:
        assert after == pytest.approx(min(before, max_norm), rel=1e-4)
    assert any(before > max_norm for _, before, _ in norms)  # it did clip


def test_fp16_loss_scaler_path_resumes_exactly(tokenizer, stage_data, tmp_path):
    """The GradScaler path (fp16 autocast, CPU here): trains, keeps its scale in the step
    checkpoint (JSON), and a resumed run ends bit-identical to a straight one."""
    fp16 = Precision("fp16", torch.device("cpu"))
    straight = _trainer(tokenizer, stage_data, tmp_path / "a", precision=fp16)
    straight.run()
    assert straight.scaler is not None
    meta = (tmp_path / "a" / "step-00000004" / "optimizer.json").read_text()
    assert '"scale"' in meta
    broken = _trainer(tokenizer, stage_data, tmp_path / "b", precision=fp16, checkpoint_every=2)
    broken.should_cancel = lambda: bool(broken._checkpoints())  # stop once step 2 is saved
    with pytest.raises(Cancelled):
        broken.run()
    resumed = _trainer(tokenizer, stage_data, tmp_path / "b", precision=fp16, checkpoint_every=2)
    summary = resumed.run()
    assert summary.resumed_from == 2
    assert resumed.scaler.get_scale() == straight.scaler.get_scale()
    assert params_equal(resumed.model, straight.model)


def test_optimizer_state_is_not_a_pickle(tokenizer, stage_data, tmp_path, monkeypatch):
    t = _trainer(tokenizer, stage_data, tmp_path / "c", checkpoint_every=2, max_steps=2)
    t.run()
    ckpt = tmp_path / "c" / "step-00000002"
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "model.safetensors",
        "optimizer.json",
        "optimizer.safetensors",
        "trainer.json",
    ]
    assert any(k.endswith("exp_avg_sq") for k in load_file(str(ckpt / "optimizer.safetensors")))

    def no_pickles(*a, **k):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", no_pickles)
    again = _trainer(tokenizer, stage_data, tmp_path / "c", checkpoint_every=2, max_steps=2)
    step, _, loss = again.load_latest()
    assert step == 2 and loss is not None
    a, b = t.optimizer.state_dict(), again.optimizer.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i in a["state"]:
        for key, v in a["state"][i].items():
            assert torch.equal(v, b["state"][i][key])


def test_previous_format_checkpoints_still_resume(tokenizer, stage_data, tmp_path, monkeypatch):
    """A partial stage written before this change (optimizer.pt) resumes, weights_only."""
    t = _trainer(tokenizer, stage_data, tmp_path / "c", checkpoint_every=2, max_steps=2)
    t.run()
    ckpt = tmp_path / "c" / "step-00000002"
    torch.save(
        {"optimizer": t.optimizer.state_dict(), "scheduler": t.scheduler.state_dict()},
        ckpt / "optimizer.pt",
    )
    (ckpt / "optimizer.json").unlink()
    (ckpt / "optimizer.safetensors").unlink()
    calls = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real(*a, **k))
    again = _trainer(tokenizer, stage_data, tmp_path / "c", checkpoint_every=2, max_steps=2)
    assert again.load_latest()[0] == 2
    assert [k.get("weights_only") for k in calls] == [True]


# -- lineage level ---------------------------------------------------------------------------


def _weights(model_dir: Path) -> dict:
    return load_file(str(model_dir / "model.safetensors"))


def test_gradient_checkpointing_with_das_gates(tmp_path, corpora, monkeypatch):
    """A DAS stage (soft-mask, gate hooks for the previous-knowledge view, contrast)
    with gradient checkpointing on ends where the same stage without it ends."""
    active = []
    real = Trainer._micro_batch

    def spy(self, step, micro):
        active.append(gradient_checkpointing_active(self.unwrapped_model))
        return real(self, step, micro)

    monkeypatch.setattr(Trainer, "_micro_batch", spy)
    results = {}
    for on in (False, True):
        cfg = {**CFG, "max_steps": 3, "gradient_checkpointing": on}
        lin = Lineage.create(tmp_path / f"gc-{on}", "tiny-roberta", cfg)
        lin.add_domain(corpora[0], "legal")
        results[on] = _weights(lin.stages[0].model_dir)
    assert active == [False] * 3 + [True] * 3
    base = _weights(Lineage.open(tmp_path / "gc-True").base_dir)
    assert any(not torch.equal(results[True][k], base[k]) for k in base)  # it trained
    for k in results[False]:
        torch.testing.assert_close(results[True][k], results[False][k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fails", ["domain_importance", "heldout_loss"])
def test_crash_after_training_resumes_without_retraining(tmp_path, corpora, monkeypatch, fails):
    """The last step is checkpointed: a crash in the post-training importance or the
    evaluation resumes from the final step (no training step runs again)."""
    straight = Lineage.create(tmp_path / "straight", "tiny-roberta", CFG)
    straight.add_domain(corpora[0], "legal")

    lin = Lineage.create(tmp_path / "broken", "tiny-roberta", CFG)
    module = das_importance_mod if fails == "domain_importance" else lineage_mod
    real = getattr(module, fails)
    calls = {"n": 0}

    def crash(*a, **k):
        calls["n"] += 1
        # heldout_loss: the first call scores the base column; crash in the row's scoring
        if fails == "domain_importance" or calls["n"] == 2:
            raise RuntimeError("simulated crash after training")
        return real(*a, **k)

    monkeypatch.setattr(module, fails, crash)
    with pytest.raises(RuntimeError, match="simulated"):
        lin.add_domain(corpora[0], "legal")
    partial = next((lin.path / "stages").glob("*.partial"))
    assert (partial / "checkpoints" / "step-00000004" / "trainer.json").exists()
    monkeypatch.undo()

    steps = []
    real_mb = Trainer._micro_batch
    monkeypatch.setattr(
        Trainer, "_micro_batch", lambda self, s, m: steps.append(s) or real_mb(self, s, m)
    )
    result = lin.add_domain(corpora[0], "legal")
    assert steps == [] and result.resumed_from_step == 4
    assert lin.stages[0].meta["final_train_loss"] == straight.stages[0].meta["final_train_loss"]
    assert lin.stages[0].meta["trained_tokens"] == straight.stages[0].meta["trained_tokens"]
    a, b = _weights(straight.stages[0].model_dir), _weights(lin.stages[0].model_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (lin.stages[0].dir / "checkpoints").exists()  # cleaned once complete
