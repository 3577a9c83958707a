"""ELLE: function-preserving growth (width exact, depth exact for pre-LN decoders), the
function-recovery warm-up, domain prompts, and a 2-domain lineage whose model grows."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, BertConfig, BertForMaskedLM

from das_engine import cli
from das_engine.bases import build_tiny_model, bundled_tokenizer, save_base
from das_engine.end_task import end_task_matrix
from das_engine.expansion import (
    deepen,
    logits,
    output_gap,
    parameter_count,
    recover_function,
    split_plan,
    widen_ffn,
)
from das_engine.families import FAMILIES, text_config
from das_engine.lineage import Lineage
from das_engine.strategies import make_strategy
from das_engine.strategies.elle import PROMPT, load_prompts, prompted_inputs
from das_engine.units import build_unit_map

from . import test_strategies_baselines as baselines

tiny_dir, corpora, engine_cache = baselines.tiny, baselines.corpora, baselines.engine_cache
#: one of each layout, and the newer decoders (q/k norms, sandwich norms, 1 + weight norms)
ARCHS = (
    "bert", "roberta", "gpt2", "gpt_neox", "llama", "qwen3", "olmo2", "gemma2", "phi3", "phi",
    "gemma3",
)  # fmt: skip
HIDDEN, WIDTH, LAYERS = 32, 64, 2
_MODELS: dict[str, torch.nn.Module] = {}


def model_of(arch: str) -> torch.nn.Module:
    """A tiny model (eval mode) with every weight, norms included, moved off its init."""
    if arch not in _MODELS:
        tok = bundled_tokenizer()
        if arch == "bert":
            torch.manual_seed(0)
            config = BertConfig(
                vocab_size=len(tok),
                hidden_size=HIDDEN,
                num_hidden_layers=LAYERS,
                num_attention_heads=4,
                intermediate_size=WIDTH,
                max_position_embeddings=64,
            )
            model = BertForMaskedLM(config)
        else:
            model = build_tiny_model(
                tok,
                architecture=arch,
                hidden_size=HIDDEN,
                layers=LAYERS,
                heads=4,
                intermediate_size=WIDTH,
                max_positions=64,
            )
        with torch.no_grad():
            gen = torch.Generator().manual_seed(1)
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        _MODELS[arch] = model.eval()
    return copy.deepcopy(_MODELS[arch])


def a_batch(seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 500, (3, 16), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0  # one padded row
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def gap(a, b, batch) -> float:
    return float((logits(a, batch) - logits(b, batch)).abs().max())


# -- width: exact ------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@settings(max_examples=12, deadline=None)
@given(growth=st.floats(0.0, 3.0), noise=st.sampled_from([0.0, 0.1, 1.0]), seed=st.integers(0, 99))
def test_ffn_widening_keeps_the_function(arch, growth, noise, seed):
    model = model_of(arch)
    wide = copy.deepcopy(model)
    new = round(WIDTH * (1 + growth))
    before = parameter_count(wide)
    widen_ffn(wide, new, noise=noise, seed=seed)
    unit_map = build_unit_map(wide)
    assert unit_map.intermediate_size == new
    text = text_config(wide.config)  # Gemma 3's language model settings
    assert (text.intermediate_size if arch != "gpt2" else text.n_inner) == new
    # per layer and new unit: its input rows (+ bias) in each input projection, its column
    fam, um = FAMILIES[arch], build_unit_map(model)
    biased = [um.module(0, p).bias is not None for p in fam.ffn_in]
    per_unit = sum(fam.ffn_in_stacked * (HIDDEN + b) for b in biased) + HIDDEN
    assert parameter_count(wide) - before == LAYERS * (new - WIDTH) * per_unit
    batch = a_batch(seed)
    assert gap(wide, model, batch) < 1e-5


def test_the_split_plan_copies_every_unit_once_before_any_twice():
    plan = split_plan(4, 11, torch.Generator().manual_seed(0))
    assert plan[:4].tolist() == [0, 1, 2, 3]
    assert sorted(plan[4:8].tolist()) == [0, 1, 2, 3]
    assert torch.bincount(plan).tolist() in ([3, 3, 3, 2], [3, 3, 2, 3], [3, 2, 3, 3], [2, 3, 3, 3])
    with pytest.raises(ValueError):
        split_plan(4, 3, torch.Generator())


def test_split_noise_breaks_the_copies_symmetry_but_not_the_function():
    model = model_of("llama")
    wide = copy.deepcopy(model)
    widen_ffn(wide, 2 * WIDTH, noise=0.5, seed=3)
    down = build_unit_map(wide).module(0, "mlp.down_proj").weight
    original = build_unit_map(model).module(0, "mlp.down_proj").weight
    plan = split_plan(WIDTH, 2 * WIDTH, torch.Generator().manual_seed(3))  # widen_ffn's draw
    assert not torch.allclose(down[:, :WIDTH], original / 2)  # the copies differ...
    summed = torch.zeros_like(original).index_add_(1, plan, down)
    torch.testing.assert_close(summed, original)  # ...and sum back to the original column
    assert gap(wide, model, a_batch()) < 1e-5


# -- depth ---------------------------------------------------------------------------------


DECODERS = [
    "gpt2", "gpt_neox", "llama", "qwen3", "olmo2", "gemma2", "gemma3_text", "gemma3", "smollm3",
    "phi3", "phi",
]  # fmt: skip


@pytest.mark.parametrize("arch", [*DECODERS, "granite"])
@pytest.mark.parametrize("new_layers", [1, 2, 3])
def test_depth_growth_is_exact_for_pre_ln_decoders(arch, new_layers, tmp_path):
    model = model_of(arch)
    deep = copy.deepcopy(model)
    assert deepen(deep, new_layers) == {"num_layers_before": LAYERS, "num_layers": 2 + new_layers}
    per_layer = sum(p.numel() for p in build_unit_map(model).layers[0].parameters())
    assert parameter_count(deep) - parameter_count(model) == new_layers * per_layer
    assert gap(deep, model, a_batch()) < 1e-5  # tolerance: float rounding only
    # the saved deeper model loads with plain transformers (per-layer config lists such as
    # layer_types and SmolLM3's no_rope_layers grew with it) and computes the same function
    deep.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert text_config(back.config).num_hidden_layers == 2 + new_layers
    assert gap(back, model, a_batch()) < 1e-5


def test_depth_growth_for_post_ln_encoders_is_exact_only_with_identity_norms():
    """BERT/RoBERTa: the inserted block re-normalises an already normalised stream; with
    LayerNorm weight 1, bias 0 (a fresh model) that is the identity up to 1e-4, with trained
    norms it is not (the warm-up recovers it: next test)."""
    fresh = build_tiny_model(
        bundled_tokenizer(), hidden_size=HIDDEN, layers=2, intermediate_size=WIDTH
    )
    fresh.eval()
    deep = copy.deepcopy(fresh)
    deepen(deep, 2)
    assert gap(deep, fresh, a_batch()) < 1e-4
    trained = model_of("roberta")
    deep = copy.deepcopy(trained)
    deepen(deep, 2)
    assert gap(deep, trained, a_batch()) > 1e-3


def test_grown_models_save_and_load_with_plain_transformers(tmp_path):
    model = model_of("roberta")
    grown = copy.deepcopy(model)
    widen_ffn(grown, 100, noise=0.1)
    deepen(grown, 1)
    grown.save_pretrained(tmp_path)
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    assert loaded.config.intermediate_size == 100 and loaded.config.num_hidden_layers == 3
    assert gap(loaded, grown, a_batch()) < 1e-6


# -- function recovery -----------------------------------------------------------------------


def test_the_warmup_reduces_the_gap_to_the_pre_expansion_model():
    teacher = model_of("roberta")
    student = copy.deepcopy(teacher)
    deepen(student, 2)  # approximate for post-LN with trained norms
    batches = [a_batch(s) for s in range(4)]
    held_out = a_batch(99)
    with torch.no_grad():
        before = float(output_gap(logits(student, held_out), logits(teacher, held_out), "kl"))
    gaps = recover_function(student, teacher, batches, steps=30, lr=3e-3, kind="kl")
    with torch.no_grad():
        after = float(output_gap(logits(student, held_out), logits(teacher, held_out), "kl"))
    assert len(gaps) == 30 and gaps[-1] < gaps[0] / 2
    assert after < before  # and a little on a batch it never saw (random tokens)


def test_the_warmup_leaves_an_exact_expansion_alone():
    teacher = model_of("gpt2")
    student = copy.deepcopy(teacher)
    widen_ffn(student, 2 * WIDTH, noise=0.1)
    frozen = copy.deepcopy(student)
    gaps = recover_function(student, teacher, [a_batch()], steps=10, lr=1e-2, kind="mse")
    assert len(gaps) == 1 and gaps[0] < 1e-6
    assert all(
        torch.equal(a, b) for a, b in zip(student.parameters(), frozen.parameters(), strict=True)
    )


# -- prompts ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["roberta", "gpt2", "llama"])
def test_prompted_inputs_prepend_vectors_and_widen_the_mask(arch):
    model = model_of(arch)
    batch = a_batch()
    prompt = torch.randn(5, HIDDEN, requires_grad=True)
    inputs = prompted_inputs(model, batch["input_ids"], batch["attention_mask"], prompt)
    assert inputs["inputs_embeds"].shape == (3, 21, HIDDEN)
    assert inputs["attention_mask"][:, :5].eq(1).all()
    assert torch.equal(inputs["attention_mask"][:, 5:], batch["attention_mask"])
    out = model(**inputs).logits[:, 5:]  # plain transformers: the real tokens' outputs
    out.sum().backward()
    assert prompt.grad is not None and prompt.grad.abs().sum() > 0


def test_elle_loss_trains_the_prompt_and_final_model_drops_it(tiny_dir, tmp_path, corpora):
    ctx = baselines.context(tiny_dir, tmp_path, corpora["farm"], strategy="elle")
    strategy = make_strategy(ctx.config)
    strategy.prepare(ctx)  # stage 1: no growth by default, a prompt
    prompt = getattr(ctx.model, PROMPT)
    assert prompt.shape == (8, ctx.unit_map.hidden_size)
    loss, logs = strategy.loss(ctx.model, baselines.a_batch(ctx))
    loss.backward()
    assert prompt.grad.abs().sum() > 0 and logs["replayed"] == 0
    strategy.finish(ctx)
    assert strategy.final_model(ctx.model) is ctx.model and not hasattr(ctx.model, PROMPT)
    assert list(load_prompts(ctx.stage_dir)) == ["001-d"]  # no stage.json here: the stage name


# -- the lineage -------------------------------------------------------------------------------


def test_elle_grows_the_model_between_stages_through_the_cli(engine_cache, tmp_path, corpora):
    out = tmp_path / "lin"
    args = ["run", "--base", "tiny-roberta", "--strategy", "elle", "--out", str(out)]
    args += ["--max-steps", "3", "--batch-size", "4", "--block-size", "32", "--quiet"]
    sets = ["eval_max_batches=2", "elle_ffn_growth=0.5", "elle_new_layers=1"]
    sets += ["elle_warmup_steps=3", "elle_prompt_tokens=4", "elle_replay_ratio=0.25"]
    for item in sets:
        args += ["--set", item]
    domains = [f"farm={corpora['farm']}", f"sea={corpora['sea']}", f"code.v2={corpora['code']}"]
    assert cli.main([*args, *domains]) == 0
    lin = Lineage.open(out)
    m = lin.metrics()
    assert m["strategy"] == "elle" and m["domains"] == ["farm", "sea", "code.v2"]
    assert all(x is not None for row in m["loss_matrix"] for x in row)
    sizes = []
    for stage in lin.stages:
        model = AutoModelForMaskedLM.from_pretrained(stage.model_dir)  # plain transformers
        sizes.append((model.config.intermediate_size, model.config.num_hidden_layers))
        growth = json.loads((stage.dir / "strategy" / "elle.json").read_text())
        assert growth["parameters"] == parameter_count(model)
        # the stage's result (what the service shows) carries the same growth record
        result = lin.stage_result(stage.position)
        assert result.parameters == parameter_count(model) and result.growth == growth
    assert [s["parameters"] for s in m["stages"]] == [
        s.parameters for s in map(lin.stage_result, (1, 2, 3))
    ]
    assert sizes == [(256, 2), (384, 3), (576, 4)]  # the demo base: 256 wide, 2 layers
    prompts = load_prompts(lin.stages[-1].dir)
    assert list(prompts) == ["farm", "sea", "code.v2"]
    assert all(p.shape == (4, model.config.hidden_size) for p in prompts.values())
    # earlier domains' prompts are carried unchanged
    assert torch.equal(load_prompts(lin.stages[0].dir)["farm"], prompts["farm"])
    # end-task probes load every stage, each with its own size
    words = baselines.WORDS
    task = tmp_path / "task.jsonl"
    rows = [
        {"text": " ".join(words[k][i % 12 :] + words[k][: i % 12]), "label": k}
        for k in ("farm", "sea")
        for i in range(24)
    ]
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    scores = end_task_matrix(lin, {"farm": task})
    assert len(scores["macro_f1"]) == 4 and all(r[0] is not None for r in scores["macro_f1"])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_elle_lineage_on_a_decoder_grows_and_loads(arch, engine_cache, tmp_path, corpora):
    """Causal LM: prompts before the tokens, labels on the real tokens; the grown stage is
    a plain, larger checkpoint whose logits the prompt changes."""
    tok = bundled_tokenizer(decoder=True)
    base = tmp_path / "base"
    model = build_tiny_model(tok, architecture=arch, hidden_size=32, layers=2, intermediate_size=64)
    save_base(model, tok, base)
    cfg = {**baselines.TINY, "strategy": "elle", "elle_new_layers": 2, "elle_ffn_growth": 1.0}
    lin = Lineage.create(tmp_path / "lin", str(base), cfg | {"elle_warmup_steps": 2})
    lin.add_domain(corpora["farm"], "farm")
    lin.add_domain(corpora["sea"], "sea")
    assert all(x is not None for row in lin.metrics()["loss_matrix"] for x in row)
    grown = AutoModelForCausalLM.from_pretrained(lin.stages[-1].model_dir).eval()
    key = "n_inner" if arch == "gpt2" else "intermediate_size"
    assert getattr(grown.config, key) == 128 and grown.config.num_hidden_layers == 4
    batch = a_batch()
    with torch.no_grad():
        plain = grown(**batch).logits
        inputs = prompted_inputs(grown, **batch, prompts=load_prompts(lin.stages[-1].dir)["sea"])
        prompted = grown(**inputs).logits[:, 8:]
    assert plain.shape == prompted.shape and not torch.allclose(plain, prompted)


def test_a_resumed_elle_stage_ends_like_an_uninterrupted_one(engine_cache, tmp_path, corpora):
    from das_engine.errors import Cancelled

    cfg = {**baselines.TINY, "strategy": "elle", "max_steps": 4, "checkpoint_every": 1}
    cfg |= {"elle_warmup_steps": 2, "elle_new_layers": 1, "elle_replay_ratio": 0.5}
    straight = Lineage.create(tmp_path / "a", "tiny-roberta", cfg)
    straight.add_domain(corpora["farm"], "farm")
    straight.add_domain(corpora["sea"], "sea")
    lin = Lineage.create(tmp_path / "b", "tiny-roberta", cfg)
    lin.add_domain(corpora["farm"], "farm")
    calls = []

    def cancel_at_step_2() -> bool:
        calls.append(1)
        return len(calls) == 3

    with pytest.raises(Cancelled):
        Lineage.open(lin.path).add_domain(corpora["sea"], "sea", should_cancel=cancel_at_step_2)
    assert Lineage.open(lin.path).add_domain(corpora["sea"], "sea").resumed_from_step == 2
    wa = baselines_weights(straight.stages[-1].model_dir)
    wb = baselines_weights(Lineage.open(lin.path).stages[-1].model_dir)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    pa, pb = load_prompts(straight.stages[-1].dir), load_prompts(lin.path / "stages" / "002-sea")
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def baselines_weights(model_dir):
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def test_prompts_longer_than_the_free_positions_are_refused(tiny_dir, tmp_path, corpora):
    from das_engine.errors import IncompatibleConfigError

    ctx = baselines.context(
        tiny_dir, tmp_path, corpora["farm"], strategy="elle", block_size=300, elle_prompt_tokens=256
    )  # the tiny RoBERTa has 512 positions (+2): 300 + 256 do not fit
    with pytest.raises(IncompatibleConfigError, match="elle_prompt_tokens"):
        make_strategy(ctx.config).prepare(ctx)


def test_growing_the_base_before_stage_one_warms_up_on_the_new_domain(tiny_dir, tmp_path, corpora):
    cfg = {"elle_expand_first_stage": True, "elle_new_layers": 1, "elle_warmup_steps": 3}
    ctx = baselines.context(tiny_dir, tmp_path, corpora["farm"], strategy="elle", **cfg)
    with torch.no_grad():  # trained norms: the inserted post-LN block is not the identity
        for name, p in ctx.model.named_parameters():
            if "LayerNorm" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.2)
    strategy = make_strategy(ctx.config)
    strategy.prepare(ctx)  # nothing to replay yet: the warm-up reads the stage's own chunks
    growth = strategy.growth()
    assert growth["expanded"] and growth["num_layers"] == 3 and growth["warmup_steps"] == 3
    assert growth["parameters"] > growth["parameters_before"]
    first, last = growth["warmup_gap"]
    assert last < first and ctx.unit_map.num_layers == 3
