"""Configs checked against the model and the device before any work or directory."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import BertConfig, GPT2Config, LlamaConfig, RobertaConfig

from das_engine.config import TrainingConfig
from das_engine.errors import ConfigError, IncompatibleConfigError
from das_engine.lineage import Lineage
from das_engine.preflight import check_config_against_model, max_block_size, resolve_device

from .conftest import TINY_CONFIG

CPU = torch.device("cpu")


def _fields(exc: pytest.ExceptionInfo) -> list[str]:
    return [d["field"] for d in exc.value.details]


def test_position_limits_per_family():
    assert max_block_size(RobertaConfig(max_position_embeddings=514, pad_token_id=1)) == 512
    assert max_block_size(BertConfig(max_position_embeddings=512)) == 512
    assert max_block_size(GPT2Config(n_positions=1024)) == 1024
    assert max_block_size(LlamaConfig(max_position_embeddings=2048)) == 2048


@settings(max_examples=60, deadline=None)
@given(
    family=st.sampled_from(["roberta", "bert", "gpt2", "llama"]),
    positions=st.integers(16, 4096),
    block=st.integers(8, 8192),
)
def test_block_size_is_refused_exactly_past_the_limit(family, positions, block):
    model_config = {
        "roberta": lambda: RobertaConfig(max_position_embeddings=positions + 2, pad_token_id=1),
        "bert": lambda: BertConfig(max_position_embeddings=positions),
        "gpt2": lambda: GPT2Config(n_positions=positions),
        "llama": lambda: LlamaConfig(max_position_embeddings=positions),
    }[family]()
    cfg = TrainingConfig(block_size=block)
    if block <= positions:
        check_config_against_model(cfg, model_config, CPU)
    else:
        with pytest.raises(IncompatibleConfigError) as exc:
            check_config_against_model(cfg, model_config, CPU)
        assert _fields(exc) == ["block_size"] and str(positions) in exc.value.message
        assert isinstance(exc.value, ConfigError)


def test_precision_must_exist_on_the_device(monkeypatch):
    model_config = RobertaConfig()
    with pytest.raises(IncompatibleConfigError) as exc:
        check_config_against_model(TrainingConfig(mixed_precision="fp16"), model_config, CPU)
    assert _fields(exc) == ["mixed_precision"] and "CUDA" in exc.value.message
    check_config_against_model(TrainingConfig(mixed_precision="bf16"), model_config, CPU)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    cuda = torch.device("cuda")
    with pytest.raises(IncompatibleConfigError) as exc:
        check_config_against_model(TrainingConfig(mixed_precision="bf16"), model_config, cuda)
    assert _fields(exc) == ["mixed_precision"]
    for ok in ("fp16", "auto", "no"):
        check_config_against_model(TrainingConfig(mixed_precision=ok), model_config, cuda)
    # without a device only the model is checked (what an API server without GPU can do)
    check_config_against_model(TrainingConfig(mixed_precision="fp16"), model_config, None)


def test_every_problem_is_named_at_once():
    cfg = TrainingConfig(block_size=600, mixed_precision="fp16")
    with pytest.raises(IncompatibleConfigError) as exc:
        check_config_against_model(cfg, RobertaConfig(max_position_embeddings=514), CPU)
    assert _fields(exc) == ["block_size", "mixed_precision"]


def test_device_must_exist(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(IncompatibleConfigError) as exc:
        resolve_device(TrainingConfig(device="cuda"))
    assert _fields(exc) == ["device"]
    with pytest.raises(IncompatibleConfigError) as exc:
        resolve_device(TrainingConfig(device="not-a-device"))
    assert _fields(exc) == ["device"]
    assert resolve_device(TrainingConfig(device="auto")) == CPU


def test_create_fails_before_writing_anything(tmp_path):
    target = tmp_path / "lineage"
    for bad, field in (({"block_size": 600}, "block_size"), ({"mixed_precision": "fp16"}, None)):
        cfg = {**TINY_CONFIG, **bad}
        if field is None and torch.cuda.is_available():
            continue  # fp16 is fine on a GPU machine
        with pytest.raises(IncompatibleConfigError) as exc:
            Lineage.create(target, "tiny-roberta", cfg)
        assert _fields(exc) == [field or "mixed_precision"]
        assert not target.exists()


def test_add_domain_fails_before_any_stage_directory(tmp_path, corpora):
    """A lineage whose config this machine cannot run (e.g. made on a GPU box with fp16,
    or a block longer than the positions) fails at add_domain with nothing created."""
    lin = Lineage.create(tmp_path / "l", "tiny-roberta", TINY_CONFIG)
    meta_path = lin.path / "lineage.json"
    meta = json.loads(meta_path.read_text())
    meta["config"]["block_size"] = 513
    meta_path.write_text(json.dumps(meta))
    before = sorted(p.name for p in lin.path.iterdir())
    with pytest.raises(IncompatibleConfigError) as exc:
        Lineage.open(lin.path).add_domain(corpora[0], "legal")
    assert _fields(exc) == ["block_size"] and "512" in exc.value.message
    assert sorted(p.name for p in lin.path.iterdir()) == before  # no stages/, no .lock
    meta["config"]["block_size"] = 512  # exactly the limit trains (chunks of 512 tokens)
    meta["config"].update(max_steps=1, strategy="ncl", eval_max_batches=1)
    meta_path.write_text(json.dumps(meta))
    assert Lineage.open(lin.path).add_domain(corpora[0], "legal").steps == 1


def test_gradient_checkpointing_needs_model_support(tmp_path, monkeypatch):
    from transformers import RobertaForMaskedLM

    monkeypatch.setattr(RobertaForMaskedLM, "supports_gradient_checkpointing", False)
    target = tmp_path / "l"
    with pytest.raises(IncompatibleConfigError) as exc:
        Lineage.create(target, "tiny-roberta", {**TINY_CONFIG, "gradient_checkpointing": True})
    assert _fields(exc) == ["gradient_checkpointing"] and not target.exists()


def test_cli_reports_the_field_and_creates_nothing(tmp_path, corpora):
    out = tmp_path / "lineage"
    r = subprocess.run(
        [sys.executable, "-m", "das_engine.cli", "run", "--base", "tiny-roberta"]
        + ["--out", str(out), "--block-size", "1000", "--quiet", str(corpora[0])],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2, r.stderr
    assert "incompatible_hyperparameters" in r.stderr and "block_size" in r.stderr
    assert "512" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()
