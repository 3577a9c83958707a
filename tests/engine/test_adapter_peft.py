"""The adapter strategy on ``peft``: which projections get LoRA, the merge per family
(GPT-2's transposed Conv1D included), the saved adapter, and exact resume."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from das_engine.config import TrainingConfig
from das_engine.errors import Cancelled
from das_engine.lineage import Lineage
from das_engine.objective import lm_forward
from das_engine.strategies import StageContext, make_strategy
from das_engine.strategies.adapter import DIR
from das_engine.units import build_unit_map

from .conftest import TINY_CONFIG, tiny

ADAPTER = {**TINY_CONFIG, "strategy": "adapter", "adapter_rank": 2, "adapter_alpha": 6.0}


def prepared(model, tmp_path, **cfg):
    config = TrainingConfig.from_dict({**ADAPTER, **cfg})
    ctx = StageContext(model, build_unit_map(model), config, None, stage_dir=tmp_path / "stage")
    strategy = make_strategy(config)
    strategy.prepare(ctx)
    return ctx, strategy


def projections(model) -> set[str]:
    """Every 2-D weight inside the transformer layers, by the model's own names."""
    unit_map = build_unit_map(model)
    inside = {id(m) for layer in unit_map.layers for m in layer.modules()}
    return {
        name
        for name, m in model.named_modules()
        if id(m) in inside
        and not isinstance(m, nn.Embedding)
        and isinstance(getattr(m, "weight", None), nn.Parameter)
        and m.weight.dim() == 2
    }


@pytest.mark.parametrize("arch", ["roberta", "gpt2", "llama"])
def test_lora_on_every_projection_and_the_merge_is_exact(tokenizer, batch, tmp_path, arch):
    model = tiny(tokenizer, arch, seed=1)
    expected = projections(model)
    _, strategy = prepared(model, tmp_path)
    assert set(strategy.targets) == expected and len(expected) >= 4 * 2
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * len(expected)
    # B starts at zero: the adapted model is the base; then give B values and compare the
    # adapted forward (side path) with the merged weights
    unit_map = build_unit_map(tiny(tokenizer, arch, seed=1))
    model.eval()
    batch = {**batch, "labels": batch["input_ids"].clone()}
    with torch.no_grad():
        base_loss = lm_forward(tiny(tokenizer, arch, seed=1).eval(), unit_map, batch).loss
        torch.testing.assert_close(lm_forward(model, unit_map, batch).loss, base_loss)
        gen = torch.Generator().manual_seed(0)
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
        adapted = lm_forward(model, unit_map, batch)
    assert not torch.allclose(adapted.loss, base_loss)
    merged = strategy.final_model(model)
    assert merged is model and not hasattr(model, "peft_config")
    assert not any("lora" in k or "base_layer" in k for k in model.state_dict())
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        again = lm_forward(model, unit_map, batch)
    # exact up to float32 rounding: (W + sBA)x and Wx + sB(Ax) sum in another order
    torch.testing.assert_close(again.hidden, adapted.hidden, rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_adapter_artifact_loads_with_peft_and_matches_the_merged_checkpoint(tmp_path, corpora):
    from peft import PeftModel
    from transformers import AutoModelForMaskedLM

    lin = Lineage.create(tmp_path / "lin", "tiny-roberta", ADAPTER)
    lin.add_domain(corpora[0], "legal")
    stage = lin.stages[0]
    adapter_dir = stage.dir / DIR
    assert sorted(p.name for p in adapter_dir.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    conf = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert conf["r"] == 2 and conf["lora_alpha"] == 6.0 and conf["peft_type"] == "LORA"
    plain = AutoModelForMaskedLM.from_pretrained(str(stage.model_dir)).eval()
    stage_keys = load_file(str(stage.model_dir / "model.safetensors")).keys()
    assert not any("lora" in k or "base_layer" in k for k in stage_keys)
    base = AutoModelForMaskedLM.from_pretrained(str(lin.base_dir))
    with_adapter = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    ids = torch.randint(5, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = with_adapter(input_ids=ids).logits
        b = plain(input_ids=ids).logits
        c = AutoModelForMaskedLM.from_pretrained(str(lin.base_dir)).eval()(input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(b, c)  # the domain's adapter changed the model


def test_adapter_stage_resumes_exactly_from_a_step_checkpoint(tmp_path, corpora):
    cfg = {**ADAPTER, "max_steps": 6, "checkpoint_every": 2}
    straight = Lineage.create(tmp_path / "straight", "tiny-roberta", cfg)
    broken = Lineage.create(tmp_path / "broken", "tiny-roberta", cfg)
    straight.add_domain(corpora[0], "legal")
    done = []

    def progress(e):
        if e.phase == "training" and e.total:
            done.append(e.step)

    with pytest.raises(Cancelled):
        broken.add_domain(
            corpora[0], "legal", progress=progress, should_cancel=lambda: len(done) >= 5
        )
    partial = next((broken.path / "stages").glob("001-*.partial"))
    saved = load_file(str(partial / "checkpoints" / "step-00000004" / "model.safetensors"))
    assert any(".lora_A." in k for k in saved) and any(".base_layer." in k for k in saved)
    result = broken.add_domain(corpora[0], "legal")
    assert result.resumed_from_step == 4
    for sub in ("model/model.safetensors", f"{DIR}/adapter_model.safetensors"):
        a = load_file(str(straight.stages[0].dir / sub))
        b = load_file(str(broken.stages[0].dir / sub))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
