"""Pre-training with the engine's one loop (das_engine.pretraining): the LR decay and the
head-only warm-up the benchmark's base builder needs, a graceful early stop, resume."""

from __future__ import annotations

from pathlib import Path

import pytest

from das_engine.config import TrainingConfig
from das_engine.data import ChunkStore
from das_engine.pretraining import pretrain
from das_engine.trainer import Trainer, warmup_linear_decay

from .conftest import params_equal, tiny

CFG = {"strategy": "ncl", "max_steps": 4, "batch_size": 4, "block_size": 32}


@pytest.fixture
def train(stage_data) -> ChunkStore:
    return ChunkStore(stage_data)


def _state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_warmup_then_linear_decay_to_a_floor():
    f = warmup_linear_decay(10, 2, floor=0.05)
    assert [f(s) for s in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert f(9) == pytest.approx(1 / 8)
    values = [f(s) for s in range(2, 10)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    assert warmup_linear_decay(40, 2, floor=0.05)(39) == 0.05
    assert warmup_linear_decay(5, 0)(0) == 1.0  # no warm-up asked: full LR at once


def test_the_lr_multiplier_replaces_the_configs_schedule(tokenizer, train, tmp_path, monkeypatch):
    lrs = []
    real = Trainer._micro_batch

    def spy(self, step, micro):
        lrs.append(self.optimizer.param_groups[0]["lr"])
        return real(self, step, micro)

    monkeypatch.setattr(Trainer, "_micro_batch", spy)
    cfg = TrainingConfig.from_dict({**CFG, "learning_rate": 1e-3})
    pretrain(
        tiny(tokenizer), tokenizer, train, cfg, tmp_path / "c", lr_lambda=lambda s: 1 / (s + 1)
    )
    assert lrs == pytest.approx([1e-3, 1e-3 / 2, 1e-3 / 3, 1e-3 / 4])


def test_head_only_steps_hold_the_body_still(tokenizer, train, tmp_path):
    cfg = TrainingConfig.from_dict({**CFG, "max_steps": 2})
    model = tiny(tokenizer)
    before = _state(model)
    pretrain(model, tokenizer, train, cfg, tmp_path / "a", head_only_steps=2)
    after = model.state_dict()
    layers = [k for k in after if ".encoder.layer." in k]
    assert layers and all(after[k].equal(before[k]) for k in layers)
    assert not after["lm_head.dense.weight"].equal(before["lm_head.dense.weight"])
    assert all(p.requires_grad for p in model.parameters())  # everything trains again
    # one head-only step, then all: the body moves in the second step
    model = tiny(tokenizer)
    pretrain(model, tokenizer, train, cfg, tmp_path / "b", head_only_steps=1)
    assert any(not model.state_dict()[k].equal(before[k]) for k in layers)


def test_an_early_stop_is_checkpointed_and_resumes_bit_identical(tokenizer, train, tmp_path):
    cfg = TrainingConfig.from_dict(CFG)
    straight = tiny(tokenizer)
    pretrain(straight, tokenizer, train, cfg, tmp_path / "straight")

    calls = []
    stopped = tiny(tokenizer)
    ckpt: Path = tmp_path / "stopped"
    summary = pretrain(
        stopped,
        tokenizer,
        train,
        cfg,
        ckpt,
        should_stop=lambda: calls.append(1) or len(calls) >= 2,
        keep_checkpoints=True,
    )
    assert summary.steps == 2 and (ckpt / "step-00000002" / "trainer.json").exists()
    assert not params_equal(stopped, straight)

    resumed = tiny(tokenizer)
    summary = pretrain(resumed, tokenizer, train, cfg, ckpt)
    assert summary.resumed_from == 2 and summary.steps == 4
    assert params_equal(resumed, straight)
    assert not ckpt.exists()  # removed once done
