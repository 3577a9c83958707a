"""Importance-time dropout: DAS's two-view objectives on models with no dropout of their own
(Llama-style decoders, or any config with every dropout at 0)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from das_engine.bases import build_tiny_model, bundled_tokenizer
from das_engine.config import TrainingConfig
from das_engine.errors import ConfigError, ImportanceError
from das_engine.importance import Importance, general_importance, proxy_kl_loss
from das_engine.objective import Batcher, lm_forward
from das_engine.strategies import StageContext
from das_engine.strategies.das import DAS
from das_engine.units import UNIT_KINDS, build_unit_map
from das_engine.view_dropout import injected_dropout, native_dropout, view_dropout

from .conftest import COOKING, LEGAL, make_batch

ARCHS = ("llama", "gpt2", "roberta")


@pytest.fixture(scope="session")
def decoder_tokenizer():
    return bundled_tokenizer(decoder=True)


def no_dropout(tokenizer, arch: str, seed: int = 0):
    return build_tiny_model(
        tokenizer,
        architecture=arch,
        hidden_size=32,
        layers=2,
        heads=4,
        intermediate_size=64,
        max_positions=128,
        seed=seed,
        dropout=0.0,
    )


def _tok(arch, tokenizer, decoder_tokenizer):
    return tokenizer if arch == "roberta" else decoder_tokenizer


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("arch", ARCHS)
def test_configs_with_every_dropout_at_zero_have_no_native_dropout(arch, tokenizer):
    model = no_dropout(tokenizer, arch)
    assert native_dropout(model) == 0.0
    assert injected_dropout(model, 0.1) == 0.1
    usual = build_tiny_model(tokenizer, architecture=arch, hidden_size=32, layers=1, heads=4)
    assert native_dropout(usual) == pytest.approx(0.1)
    assert injected_dropout(usual, 0.3) == 0.0  # a model with its own dropout keeps it


@pytest.mark.parametrize("arch", ARCHS)
def test_general_importance_on_a_no_dropout_model_is_non_trivial(
    arch, tokenizer, decoder_tokenizer
):
    tok = _tok(arch, tokenizer, decoder_tokenizer)
    model = no_dropout(tok, arch)
    um = build_unit_map(model)
    batch = make_batch(tok, [LEGAL, COOKING, LEGAL[40:], COOKING[30:]])
    model.train()
    with torch.no_grad():
        assert float(proxy_kl_loss(model, um, batch)) == 0.0  # train mode alone: no views
        torch.manual_seed(0)
        with view_dropout(model, um, 0.1):
            kl = float(proxy_kl_loss(model, um, batch))
    assert kl > 0 and torch.isfinite(torch.tensor(kl))
    torch.manual_seed(0)
    imp = general_importance(model, um, [batch, batch], extra_kinds=("embedding", "layernorm"))
    for kind, v in imp.values.items():
        assert torch.isfinite(v).all() and (v >= 0).all() and (v < 1).all(), kind
    for kind in UNIT_KINDS:
        assert imp.values[kind].std() > 0.05, kind  # varied across units


@pytest.mark.parametrize("arch", ARCHS)
def test_general_importance_leaves_the_model_exactly_as_it_was(arch, tokenizer, decoder_tokenizer):
    tok = _tok(arch, tokenizer, decoder_tokenizer)
    model = no_dropout(tok, arch)
    um = build_unit_map(model)
    batch = make_batch(tok, [LEGAL, COOKING])
    model.eval()
    config_before = model.config.to_dict()
    modules_before = [(n, type(m).__name__) for n, m in model.named_modules()]
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    hooks_before = _hooks(model)
    with torch.no_grad():
        logits_before = model(**batch).logits
    general_importance(model, um, [batch])
    assert not model.training  # mode restored
    assert _hooks(model) == hooks_before
    assert model.config.to_dict() == config_before
    assert [(n, type(m).__name__) for n, m in model.named_modules()] == modules_before
    assert all(torch.equal(v, state_before[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, logits_before)  # bit-identical
    model.train()  # and training mode is the model's own (dropout-free) forward, too
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, logits_before)


@pytest.mark.parametrize("arch", ARCHS)
def test_importance_dropout_zero_on_a_no_dropout_model_is_refused(
    arch, tokenizer, decoder_tokenizer
):
    tok = _tok(arch, tokenizer, decoder_tokenizer)
    model = no_dropout(tok, arch)
    batch = make_batch(tok, [LEGAL, COOKING])
    with pytest.raises(ImportanceError, match="importance_dropout is 0"):
        general_importance(model, build_unit_map(model), [batch], dropout=0.0)


def test_a_model_with_its_own_dropout_ignores_importance_dropout(llama, tokenizer):
    """The rule: native dropout (here Llama's attention_dropout = 0.1) is used as it is;
    the same seed gives the same importance whatever importance_dropout says."""
    um = build_unit_map(llama)
    batch = make_batch(tokenizer, [LEGAL, COOKING])
    results = []
    for p in (0.0, 0.1, 0.5):
        torch.manual_seed(3)
        results.append(general_importance(llama, um, [batch], dropout=p))
    for kind in UNIT_KINDS:
        assert torch.equal(results[0].values[kind], results[1].values[kind])
        assert torch.equal(results[0].values[kind], results[2].values[kind])


_LLAMA0: dict = {}


def _shared_llama(tok):
    if "m" not in _LLAMA0:
        _LLAMA0["m"] = no_dropout(tok, "llama")
    return _LLAMA0["m"]


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 3), st.floats(0.05, 0.9), st.integers(0, 2**16))
def test_view_dropout_spares_the_first_rows_and_cleans_up(first_row, p, seed):
    tok = bundled_tokenizer(decoder=True)
    model = _shared_llama(tok)
    um = build_unit_map(model)
    batch = make_batch(tok, [LEGAL, COOKING, LEGAL[20:], COOKING[10:]], length=16)
    model.train()
    with torch.no_grad():
        plain = model.base_model(**batch).last_hidden_state
        torch.manual_seed(seed)
        with view_dropout(model, um, p, first_row=first_row):
            dropped = model.base_model(**batch).last_hidden_state
        again = model.base_model(**batch).last_hidden_state
    assert torch.equal(dropped[:first_row], plain[:first_row])
    assert not torch.allclose(dropped[first_row:], plain[first_row:])
    assert torch.equal(again, plain)  # hooks gone


def test_view_dropout_removes_its_hooks_when_the_block_raises(decoder_tokenizer):
    model = no_dropout(decoder_tokenizer, "llama")
    um = build_unit_map(model)
    own = _hooks(model)
    with pytest.raises(RuntimeError), view_dropout(model, um, 0.2):
        assert _hooks(model) == own + 1 + 2 * um.num_layers  # embeddings + 2 per layer
        raise RuntimeError("boom")
    assert _hooks(model) == own


def _das(model, config: TrainingConfig) -> DAS:
    um = build_unit_map(model)
    imp = Importance({k: torch.full(s, 0.5) for k, s in um.shapes().items()})
    das = DAS(config)
    das.prepare(StageContext(model, um, config, imp))
    return das


def test_contrastive_positive_gets_dropout_on_a_no_dropout_model(decoder_tokenizer):
    model = no_dropout(decoder_tokenizer, "llama")
    raw = make_batch(decoder_tokenizer, [LEGAL, COOKING, LEGAL[40:], COOKING[30:]])
    b = Batcher(decoder_tokenizer, "clm")(raw["input_ids"], raw["attention_mask"], seed=0)
    das = _das(model, TrainingConfig(contrast_weight=1.0))
    assert das.positive_dropout == 0.1
    model.train()
    torch.manual_seed(0)
    lm_loss, anchor, positive, _ = das.views(model, b)
    assert not torch.allclose(anchor, positive)  # two different views...
    sims = (
        torch.nn.functional.normalize(anchor, dim=-1)
        @ torch.nn.functional.normalize(positive, dim=-1).T
    )
    assert (sims.argmax(1) == torch.arange(anchor.shape[0])).all()  # ...of the same x_i
    with torch.no_grad():  # the LM loss is the model's own, dropout-free one
        own = lm_forward(model, das.ctx.unit_map, b).loss
    assert torch.allclose(lm_loss, own, atol=1e-6)
    total, logs = das.loss(model, b)
    assert logs["contrast"] > 0 and torch.isfinite(total)
    model.eval()  # eval mode: no injected dropout, the views coincide
    _, anchor, positive, _ = das.views(model, b)
    assert torch.allclose(anchor, positive, atol=1e-6)


def test_contrast_without_any_dropout_fails_before_training(decoder_tokenizer, llama):
    model = no_dropout(decoder_tokenizer, "llama")
    with pytest.raises(ConfigError, match="importance_dropout"):
        _das(model, TrainingConfig(contrast_weight=1.0, importance_dropout=0.0))
    _das(model, TrainingConfig(contrast_weight=0.0, importance_dropout=0.0))  # LM only: fine
    _das(llama, TrainingConfig(contrast_weight=1.0, importance_dropout=0.0))  # own dropout


@pytest.mark.parametrize("value", [-0.1, 0.95, float("nan"), True])
def test_importance_dropout_is_validated(value):
    with pytest.raises(ConfigError, match="importance_dropout"):
        TrainingConfig(importance_dropout=value)
    assert TrainingConfig(importance_dropout=0.9).importance_dropout == 0.9


@pytest.mark.parametrize("config_name", ["MistralConfig", "Qwen2Config"])
def test_other_dropout_free_decoder_families_get_non_trivial_importance(
    config_name, decoder_tokenizer
):
    import transformers

    config = getattr(transformers, config_name)(
        vocab_size=len(decoder_tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=decoder_tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    assert native_dropout(model) == 0.0  # as shipped: no dropout anywhere
    um = build_unit_map(model)
    batch = make_batch(decoder_tokenizer, [LEGAL, COOKING, LEGAL[40:], COOKING[30:]])
    torch.manual_seed(0)
    imp = general_importance(model, um, [batch])
    for kind in UNIT_KINDS:
        assert torch.isfinite(imp.values[kind]).all() and imp.values[kind].std() > 0.05, kind
