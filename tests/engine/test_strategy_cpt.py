"""CPT (CL-plugins with HAT task masks): the widened export is the plugin model, claimed
neurons and the backbone never change, the mask tends to binary, state carries across
stages and resumes exactly, and a lineage runs through the CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

from das_engine.bases import load_model
from das_engine.config import TrainingConfig
from das_engine.errors import IncompatibleConfigError
from das_engine.families import text_config
from das_engine.lineage import Lineage
from das_engine.strategies import StageContext, make_strategy
from das_engine.strategies.cpt import (
    ATTR,
    META,
    anneal,
    binary_mask,
    domain_model,
    load_state,
    soft_mask,
)
from das_engine.units import build_unit_map

from .conftest import (
    COOKING,
    LEGAL,
    TINY_CONFIG,
    interrupt,
    run_without_das_engine,
    tiny,
    write_corpus,
)

CPT = {**TINY_CONFIG, "strategy": "cpt", "cpt_plugin_size": 16, "max_steps": 6}
AUTO = {
    "roberta": AutoModelForMaskedLM,
    "gpt2": AutoModelForCausalLM,
    "llama": AutoModelForCausalLM,
    "gpt_neox": AutoModelForCausalLM,
    "qwen3": AutoModelForCausalLM,
    "gemma2": AutoModelForCausalLM,  # its own activation key (hidden_activation)
    "phi3": AutoModelForCausalLM,  # gate and up stacked in one projection
    "gemma3": AutoModelForCausalLM,  # the language model beside a vision tower
}


def weights(model_dir) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def intermediate(config) -> int:
    text = text_config(config)  # Gemma 3's language model settings
    return text.n_inner or 4 * text.n_embd if text.model_type == "gpt2" else text.intermediate_size


@pytest.mark.parametrize("arch", list(AUTO))
def test_widened_export_is_the_plugin_model_under_the_mask(tokenizer, batch, tmp_path, arch):
    model, base = tiny(tokenizer, arch, seed=1).eval(), tiny(tokenizer, arch, seed=1).eval()
    config = TrainingConfig.from_dict(CPT)
    strategy = make_strategy(config)
    strategy.prepare(StageContext(model, build_unit_map(model), config, None))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(ATTR + ".") for n in trainable)  # backbone frozen
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        # the plugin's output projection starts at zero: the model is the base
        torch.testing.assert_close(model(**inputs).logits, base(**inputs).logits)
        gen = torch.Generator().manual_seed(0)
        plugin = getattr(model, ATTR)
        for lp in plugin.layers:
            lp.out.weight.copy_(0.5 * torch.randn(lp.out.weight.shape, generator=gen))
        plugin.embedding.copy_(torch.randn(plugin.embedding.shape, generator=gen))
        mask = binary_mask(plugin.embedding)
        plugin.fixed = mask
        with_plugin = model(**inputs).logits
    assert not torch.allclose(with_plugin, base(**inputs).logits)
    widened = strategy.final_model(model)
    assert widened is model and not hasattr(model, ATTR)
    assert not any(k.startswith(ATTR) for k in model.state_dict())
    extra = int(mask.sum(1).max())
    assert 0 < extra < 16
    assert intermediate(model.config) == intermediate(base.config) + extra
    with torch.no_grad():
        # exact up to float32 summation order
        torch.testing.assert_close(model(**inputs).logits, with_plugin, rtol=1e-4, atol=1e-5)
    model.save_pretrained(tmp_path / "export")
    plain = AUTO[arch].from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(**inputs).logits, with_plugin, rtol=1e-4, atol=1e-5)
    # the backbone is the base: its FFN units come first (in each part of a stacked
    # [gate | up] projection), unchanged, every other weight equal
    inter = intermediate(base.config)
    got = plain.state_dict()
    for name, w in base.state_dict().items():
        if got[name].shape != w.shape:
            axis = next(a for a in range(w.dim()) if got[name].shape[a] != w.shape[a])
            parts = w.shape[axis] // inter  # 2 for a stacked projection
            assert got[name].shape[axis] == parts * (inter + extra), name
            for new_part, old_part in zip(
                got[name].chunk(parts, axis), w.chunk(parts, axis), strict=True
            ):
                assert torch.equal(new_part.narrow(axis, 0, inter), old_part), name
        else:
            assert torch.equal(got[name], w), name


@settings(max_examples=200, deadline=None)
@given(
    e=st.floats(-6, 6).filter(lambda x: abs(x) >= 1e-3),
    s1=st.floats(1.0, 1e4),
    factor=st.floats(1.0, 100.0),
)
def test_the_mask_approaches_binary_as_s_grows(e, s1, factor):
    e_t = torch.tensor([e], dtype=torch.float64)
    target = binary_mask(e_t)
    far = [float((soft_mask(e_t, s) - target).abs()) for s in (s1, s1 * factor)]
    assert far[1] <= far[0] + 1e-15  # never further from binary at a larger scale
    bound = 1 / (1 + math.exp(min(700.0, s1 * factor * abs(e))))  # sigmoid(-s|e|)
    assert far[1] <= bound * (1 + 1e-6) + 1e-14  # float64: 1 - sigmoid cancels near 1


@given(total=st.integers(1, 10_000), s_max=st.floats(1.0, 1e4))
def test_the_scale_anneals_from_one_over_s_max_to_s_max(total, s_max):
    s = [anneal(k, total, s_max) for k in (0, total // 2, total - 1)]
    assert s[0] == pytest.approx(1 / s_max)
    assert s[0] <= s[1] <= s[2]
    if total > 1:
        assert s[2] == pytest.approx(s_max)


@pytest.fixture
def domains(tmp_path):
    return write_corpus(tmp_path / "legal.txt", LEGAL), write_corpus(
        tmp_path / "cooking.txt", COOKING
    )


def test_claimed_neurons_and_the_backbone_never_change(tmp_path, domains):
    # weight decay on: the optimizer would move claimed weights without the restore
    lin = Lineage.create(tmp_path / "lin", "tiny-roberta", {**CPT, "weight_decay": 0.5})
    lin.add_domain(domains[0], "legal")
    lin.add_domain(domains[1], "cooking")
    first, second = lin.stages
    (t1, _), (t2, meta) = load_state(first.dir), load_state(second.dir)
    assert meta["stages"] == [first.dir.name, second.dir.name]
    assert torch.equal(t2["embeddings"][0], t1["embeddings"][0])
    claimed = t1["embeddings"][0] > 0  # [layers, neurons]
    assert 0 < int(claimed.sum()) < claimed.numel()
    assert meta["mask_neurons"][0] == claimed.sum(1).tolist()
    assert meta["plugin_parameters"] == sum(w.numel() for k, w in t2.items() if k != "embeddings")
    inter = json.loads((lin.base_dir / "config.json").read_text())["intermediate_size"]
    exported = json.loads((second.model_dir / "config.json").read_text())["intermediate_size"]
    assert exported == inter + meta["export_units"] == inter + max(meta["mask_neurons"][1])
    growth = lin.stage_result(2).growth  # what the stage's result (and the service) shows
    assert growth["mask_neurons"] == meta["mask_neurons"] and "stages" not in growth
    assert growth["plugin_parameters"] == meta["plugin_parameters"]
    exported_params = sum(w.numel() for w in load_model(second.model_dir).parameters())
    assert lin.stage_result(2).parameters == exported_params
    base_params = sum(w.numel() for w in load_model(lin.base_dir).parameters())
    assert lin.stage_result(1).parameters > base_params  # the export adds the claimed units
    changed_free = False
    for key, w in t1.items():
        if key == "embeddings":
            continue
        layer = int(key.split(".")[0])
        axis = 1 if ".out." in key else 0  # the axis of the neurons
        sel = claimed[layer]
        assert torch.equal(
            w.index_select(axis, sel.nonzero()[:, 0]),
            t2[key].index_select(axis, sel.nonzero()[:, 0]),
        ), key
        free = (~sel).nonzero()[:, 0]
        changed_free |= not torch.equal(
            w.index_select(axis, free), t2[key].index_select(axis, free)
        )
    assert changed_free  # domain 2 trained the neurons domain 1 left free
    # domain 1's model rebuilt from stage 2's state is stage 1's model, bit for bit; and
    # stage 2's export is its own domain's mask applied to the same base
    for index, stage in enumerate((first, second)):
        rebuilt = domain_model(load_model(lin.base_dir), second.dir, index).state_dict()
        saved = weights(stage.model_dir)
        assert all(torch.equal(rebuilt[k], saved[k]) for k in saved), stage.name
    base = weights(lin.base_dir)
    for name, w in weights(second.model_dir).items():
        axis = 1 if name.endswith("output.dense.weight") and ".layer." in name else 0
        assert torch.equal(w.narrow(axis, 0, base[name].shape[axis]), base[name]), name


def test_plugin_size_cannot_change_between_stages(tmp_path, domains):
    lin = Lineage.create(tmp_path / "lin", "tiny-roberta", CPT)
    lin.add_domain(domains[0], "legal")
    model = load_model(lin.base_dir)
    config = TrainingConfig.from_dict({**CPT, "cpt_plugin_size": 8})
    ctx = StageContext(
        model,
        build_unit_map(model),
        config,
        None,
        stage_dir=tmp_path / "next",
        previous_stage_dirs=[lin.stages[0].dir],
    )
    with pytest.raises(IncompatibleConfigError, match="cpt_plugin_size"):
        make_strategy(config).prepare(ctx)


def test_the_sparsity_weight_shrinks_the_domains_mask(tmp_path, domains):
    claimed = {}
    for weight in (0.0, 20.0):
        cfg = {**CPT, "cpt_sparsity": weight, "learning_rate": 0.05, "max_steps": 8}
        lin = Lineage.create(tmp_path / f"w{weight}", "tiny-roberta", cfg)
        lin.add_domain(domains[0], "legal")
        claimed[weight] = sum(
            json.loads((lin.stages[0].dir / "strategy" / META).read_text())["claimed_neurons"]
        )
    assert claimed[20.0] < claimed[0.0]


def test_a_cpt_stage_resumes_exactly_from_a_step_checkpoint(tmp_path, domains):
    cfg = {**CPT, "checkpoint_every": 2}
    straight = Lineage.create(tmp_path / "straight", "tiny-roberta", cfg)
    broken = Lineage.create(tmp_path / "broken", "tiny-roberta", cfg)
    for lin in (straight, broken):
        lin.add_domain(domains[0], "legal")
    straight.add_domain(domains[1], "cooking")
    interrupt(broken, domains[1], "cooking")
    partial = next((broken.path / "stages").glob("002-*.partial"))
    saved = load_file(str(partial / "checkpoints" / "step-00000004" / "model.safetensors"))
    assert int(saved[f"{ATTR}.step"]) == 4  # the annealing resumes where it stopped
    assert broken.add_domain(domains[1], "cooking").resumed_from_step == 4
    for sub in ("model/model.safetensors", "strategy/cpt.safetensors"):
        a = load_file(str(straight.stages[1].dir / sub))
        b = load_file(str(broken.stages[1].dir / sub))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub


def test_cli_runs_a_cpt_lineage_whose_checkpoint_loads_without_das_engine(tmp_path, domains):
    out = tmp_path / "lineage"
    cli = [sys.executable, "-m", "das_engine.cli", "run", "--base", "tiny-roberta"]
    flags = ["--strategy", "cpt", "--out", str(out), "--json", "--max-steps", "3"]
    flags += ["--batch-size", "4", "--block-size", "32", "--set", "eval_max_batches=2"]
    flags += ["--set", "cpt_plugin_size=8", "--set", "cpt_export_mask=union"]
    r = subprocess.run(
        cli + flags + [str(d) for d in domains], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["strategy"] == "cpt" and metrics["domains"] == ["legal", "cooking"]
    assert all(math.isfinite(x) for row in metrics["loss_matrix"] for x in row)
    model_dir = next((out / "stages").glob("002-*")) / "model"
    probe = textwrap.dedent(f"""
        import sys
        from transformers import AutoModelForMaskedLM, AutoTokenizer
        m = AutoModelForMaskedLM.from_pretrained({str(model_dir)!r})
        t = AutoTokenizer.from_pretrained({str(model_dir)!r})
        out = m(**t("Bake the <mask> until golden.", return_tensors="pt"))
        assert out.logits.shape[-1] == len(t)
        assert not any(k.startswith("das_engine") for k in sys.modules)
        print("loaded", m.config.intermediate_size)
    """)
    p = run_without_das_engine(probe, tmp_path)
    assert p.returncode == 0, p.stderr
    meta = json.loads((model_dir.parent / "strategy" / META).read_text())
    # the union export: the widest layer's union of both domains' neurons
    inter = json.loads((out / "base" / "config.json").read_text())["intermediate_size"]
    assert p.stdout.split() == ["loaded", str(inter + max(meta["claimed_neurons"]))]
