"""Unit maps and forward-hook gates on encoder and decoder families."""

import pytest
import torch
from transformers import DistilBertConfig, DistilBertForMaskedLM

from das_engine.errors import UnsupportedArchitectureError
from das_engine.units import build_unit_map, gates_attached, ones_gates

from .conftest import tiny


@pytest.mark.parametrize("arch", ["roberta", "gpt2", "llama"])
def test_unit_counts(tokenizer, arch):
    model = tiny(tokenizer, arch)
    um = build_unit_map(model)
    assert um.shapes() == {"head": (2, 4), "intermediate": (2, 64), "output": (2, 32)}
    assert um.objective == ("mlm" if arch == "roberta" else "clm")
    if arch == "llama":
        assert um.num_kv_heads == 2


@pytest.mark.parametrize("arch", ["roberta", "gpt2", "llama"])
def test_gates_of_one_change_nothing_and_zero_gates_do(tokenizer, batch, arch):
    model = tiny(tokenizer, arch).eval()
    um = build_unit_map(model)
    with torch.no_grad():
        ref = model.base_model(**batch).last_hidden_state
        with gates_attached(model, um, ones_gates(um)):
            same = model.base_model(**batch).last_hidden_state
        gates = ones_gates(um)
        gates["head"].data[0, 1] = 0.0
        with gates_attached(model, um, gates):
            changed = model.base_model(**batch).last_hidden_state
        after = model.base_model(**batch).last_hidden_state  # hooks removed
    assert torch.allclose(ref, same, atol=1e-6)
    assert not torch.allclose(ref, changed, atol=1e-4)
    assert torch.equal(ref, after)


@pytest.mark.parametrize("arch", ["roberta", "gpt2", "llama"])
def test_every_gate_gets_a_gradient(tokenizer, batch, arch):
    model = tiny(tokenizer, arch).eval()
    um = build_unit_map(model)
    gates = ones_gates(um)
    with gates_attached(model, um, gates):
        model.base_model(**batch).last_hidden_state.pow(2).mean().backward()
    for kind, g in gates.items():
        assert g.grad is not None, kind
        assert (g.grad != 0).float().mean() > 0.9, kind


def test_head_gate_zero_equals_zeroing_that_heads_context(tokenizer, batch):
    """Gating head h to 0 is the same as zeroing columns h*d:(h+1)*d of W_o's input."""
    model = tiny(tokenizer, "roberta").eval()
    um = build_unit_map(model)
    gates = ones_gates(um)
    gates["head"].data[1, 2] = 0.0
    with torch.no_grad(), gates_attached(model, um, gates):
        gated = model.base_model(**batch).last_hidden_state
    d = um.head_dim
    o = model.roberta.encoder.layer[1].attention.output.dense
    with torch.no_grad():
        o.weight[:, 2 * d : 3 * d] = 0.0
        zeroed = model.base_model(**batch).last_hidden_state
    assert torch.allclose(gated, zeroed, atol=1e-5)


def test_unsupported_architecture_names_the_supported_ones():
    model = DistilBertForMaskedLM(
        DistilBertConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2, hidden_dim=32)
    )
    with pytest.raises(UnsupportedArchitectureError) as err:
        build_unit_map(model)
    assert "distilbert" in str(err.value)
    for name in ("bert", "roberta", "gpt2", "llama"):
        assert name in str(err.value)
