"""Every model family in ``families.FAMILIES``, built tiny from its own config class: its
unit map covers every head and neuron, the gates act on the units, the LM loss is the one
the task model itself computes (Granite's logit division, Gemma 2's soft-cap included),
norm-element importance matches a real gate on the norm's output (Gemma's 1 + weight), and
a bf16 lineage trains and saves a checkpoint ``transformers`` loads.

A new ``Family`` entry is picked up by these tests with no edit here."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, BertConfig, GPT2Config

from das_engine.bases import DECODER_ARCHITECTURES, build_tiny_model, bundled_tokenizer
from das_engine.cli import main as cli_main
from das_engine.families import (
    FAMILIES,
    logits_transform,
    max_positions,
    supported_model_types,
    text_config,
)
from das_engine.importance import Importance, domain_loss, raw_gate_gradients
from das_engine.objective import IGNORE, lm_forward
from das_engine.softmask import SoftMask
from das_engine.units import UNIT_KINDS, _is_norm, build_unit_map, gates_attached, ones_gates

from .conftest import COOKING, LEGAL, write_corpus

H, LAYERS, HEADS, INTER = 32, 2, 4, 64


#: decoders whose heads are wider than hidden / heads, as in Qwen3-0.6B (16 x 128 over
#: 1024) and Gemma 2 (8 x 256 over 2304): "<family>:wide"
WIDE = ["qwen3:wide", "gemma2:wide", "phi3:wide"]


def _tiny(arch: str, seed: int = 0):
    arch, _, wide = arch.partition(":")
    tok = bundled_tokenizer(decoder=arch in DECODER_ARCHITECTURES)
    model = build_tiny_model(
        tok,
        architecture=arch,
        hidden_size=H,
        layers=LAYERS,
        heads=HEADS,
        intermediate_size=INTER,
        max_positions=64,
        seed=seed,
        dropout=0.0,
        head_dim=2 * H // HEADS if wide else None,
    )
    return model.eval(), tok


def _batch(tok, objective: str, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, len(tok), (2, 12), generator=gen)
    labels = ids.clone()
    if objective == "mlm":
        labels[:, ::2] = IGNORE
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


@pytest.fixture(scope="module", params=supported_model_types() + WIDE)
def family_model(request):
    model, tok = _tiny(request.param)
    return request.param, model, tok


def test_unit_map_counts_every_head_and_neuron(family_model):
    arch, model, _ = family_model
    um = build_unit_map(model)
    assert um.objective == FAMILIES[arch.partition(":")[0]].objective
    assert um.shapes() == {
        "head": (LAYERS, HEADS),
        "intermediate": (LAYERS, INTER),
        "output": (LAYERS, H),
    }
    for s in um.slices:  # every slice's index covers its parameter's axis with valid units
        assert len(s.unit_index) == s.param.shape[s.axis]
        assert int(s.unit_index.max()) < um.shapes()[s.kind][1]
    # every unit of every kind writes some parameter
    for kind, (rows, cols) in um.shapes().items():
        for layer in range(rows):
            mine = [s.unit_index for s in um.slices if s.kind == kind and s.layer == layer]
            owned = set(torch.cat(mine).tolist()) - {-1}  # -1: a position another slice owns
            assert owned == set(range(cols)), (arch, kind, layer)
    assert any(s.kind == "embedding" for s in um.extra_slices)


def test_gates_of_one_change_nothing_zero_gates_do_and_all_get_gradients(family_model):
    arch, model, tok = family_model
    um = build_unit_map(model)
    batch = _batch(tok, um.objective)
    with torch.no_grad():
        plain = lm_forward(model, um, batch)
    gates = ones_gates(um)
    with gates_attached(model, um, gates):
        gated = lm_forward(model, um, batch)
        gated.loss.backward()
    assert torch.allclose(plain.hidden, gated.hidden.detach(), atol=1e-5)
    for kind, g in gates.items():
        per_layer = g.grad.abs().sum(dim=1)
        assert (per_layer > 0).all(), (arch, kind)  # every layer's units reach the loss
    zero = {k: torch.zeros_like(v) for k, v in gates.items()}
    with torch.no_grad():
        for kind in zero:  # each kind's gates at 0 change the hidden states
            one_kind = {**{k: torch.ones_like(v) for k, v in gates.items()}, kind: zero[kind]}
            with gates_attached(model, um, one_kind):
                off = lm_forward(model, um, batch).hidden
            assert not torch.allclose(plain.hidden, off, atol=1e-4), (arch, kind)


def _owned(s, kv: int, heads: list[int]) -> torch.Tensor:
    """The positions of slice ``s`` that belong to K/V group ``kv`` (query heads ``heads``)."""
    return s.unit_index == kv if s.group > 1 else torch.isin(s.unit_index, torch.tensor(heads))


@pytest.mark.parametrize("arch", supported_model_types() + WIDE)
def test_protecting_one_kv_group_freezes_exactly_its_rows(arch):
    """Soft-masking with I = 1 on one K/V group's heads of layer 0 (0 elsewhere): three
    masked AdamW steps leave every q/k/v row and output-projection column of those heads
    bit-identical and move the other heads' (fused [q | k | v] with grouped K/V included)."""
    model, tok = _tiny(arch, seed=4)
    model.train()
    um = build_unit_map(model)
    group = um.num_heads // um.num_kv_heads
    kv = um.num_kv_heads - 1
    heads = list(range(kv * group, (kv + 1) * group))
    values = {k: torch.zeros(shape) for k, shape in um.shapes().items()}
    values["head"][0, heads] = 1.0
    mask = SoftMask(um, Importance(values), "update", UNIT_KINDS)
    opt = mask.optimizer(model.parameters(), lr=1e-2, weight_decay=0.0)
    layer0 = [s for s in um.slices if s.kind == "head" and s.layer == 0]
    before = {s.name: s.param.detach().clone() for s in layer0}
    for step in range(3):
        loss = lm_forward(model, um, _batch(tok, um.objective, seed=10 + step)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    for s in layer0:
        owned = _owned(s, kv, heads)
        diff = (s.param.detach() != before[s.name]).movedim(s.axis, 0)
        changed = diff.reshape(diff.shape[0], -1).any(1)  # per position along the unit axis
        assert not changed[owned].any(), (arch, s.name)  # protected: bit-identical
        others = (s.unit_index >= 0) & ~owned
        if others.any():
            assert changed[others].any(), (arch, s.name)  # the other heads trained


#: config attributes that change a task model's logits after its head, set where the
#: config has them (whether or not the family declares them: a missing declaration fails)
LOGIT_KNOBS = {"logits_scaling": 8.0, "final_logit_softcapping": 2.0, "logit_scale": 0.25}


@pytest.mark.parametrize("arch", supported_model_types() + WIDE)
def test_the_rows_a_head_owns_are_the_ones_that_write_its_context(arch):
    """Zero the q/k/v rows (and biases) the unit map gives one K/V group's heads in layer 0:
    those heads' context (the attention output projection's input) is then exactly 0, since
    q = k = 0 attends uniformly over v = 0. A wrong layout ([q|k|v] read as per-head, or
    the reverse) leaves parts of their q/k/v alive."""
    model, tok = _tiny(arch, seed=3)
    um = build_unit_map(model)
    fam = um.family
    group = um.num_heads // um.num_kv_heads
    batch = _batch(tok, um.objective, seed=3)
    seen: list[torch.Tensor] = []
    hook = um.module(0, fam.attn_out).register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].detach().clone())
    )
    try:
        for kv in (0, um.num_kv_heads - 1):
            heads = list(range(kv * group, (kv + 1) * group))
            cut = copy.deepcopy(model)
            cut_map = build_unit_map(cut)
            with torch.no_grad():
                for s in cut_map.slices:
                    if s.kind != "head" or s.layer != 0 or fam.attn_out in s.name:
                        continue
                    owned = (
                        s.unit_index == kv
                        if s.group > 1
                        else torch.isin(s.unit_index, torch.tensor(heads))
                    )
                    s.param.index_fill_(s.axis, torch.nonzero(owned).flatten(), 0.0)
            seen.clear()
            with torch.no_grad():
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            plain = seen[-1]
            cut_hook = cut_map.module(0, fam.attn_out).register_forward_pre_hook(
                lambda _m, args: seen.append(args[0].detach().clone())
            )
            with torch.no_grad():
                cut(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            cut_hook.remove()
            ctx = seen[-1].view(*seen[-1].shape[:-1], um.num_heads, um.head_dim)
            ref = plain.view_as(ctx)
            assert ref[..., heads, :].abs().max() > 1e-4  # the heads were alive
            assert ctx[..., heads, :].abs().max() < 1e-6, (arch, kv)
    finally:
        hook.remove()


def _bite(model) -> None:
    """Large logits, and every logit transform the config knows of set to change the loss."""
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40.0)  # tied or not, the logits grow
    config = text_config(model.config)  # Gemma 3's are in its text_config
    for key, value in LOGIT_KNOBS.items():
        if getattr(config, key, None) is not None or key in config.to_dict():
            setattr(config, key, value)


@pytest.mark.parametrize("arch", supported_model_types())
def test_lm_loss_is_the_task_models_own_loss(arch):
    model, tok = _tiny(arch, seed=1)
    _bite(model)
    um = build_unit_map(model)
    batch = _batch(tok, um.objective, seed=1)
    with torch.no_grad():
        ours = lm_forward(model, um, batch).loss
        theirs = model(**batch).loss
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-4), (arch, float(ours), float(theirs))
    divisor, cap = logits_transform(FAMILIES[arch], model.config)
    if divisor or cap:  # the transform matters here: the bare head's loss is another one
        with torch.no_grad():
            hidden = model.base_model(input_ids=batch["input_ids"]).last_hidden_state
            bare = um.head_module(model)(hidden[:, :-1]).flatten(0, 1)
            bare_loss = torch.nn.functional.cross_entropy(bare, batch["labels"][:, 1:].flatten())
        assert not torch.allclose(bare_loss, theirs, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("arch", ["gemma2", "llama"])
def test_norm_element_importance_is_the_gradient_of_a_gate_on_the_norm(arch):
    """The weight-gradient formula equals |dL/dg| of a real per-element gate on each norm's
    output, with Gemma's (1 + weight) scaling (its norm weights start at 0, so without the
    offset every norm element would get importance 0)."""
    model, tok = _tiny(arch, seed=2)
    um = build_unit_map(model)
    with torch.no_grad():
        for m in model.modules():
            if _is_norm(m, um.hidden_size):
                m.weight.normal_(0.0, 0.5)
    batch = _batch(tok, "clm", seed=2)
    got = raw_gate_gradients(model, um, [batch], domain_loss, extra_kinds=("layernorm",))
    norms = [m for m in model.modules() if _is_norm(m, um.hidden_size)]
    gates = [torch.ones(um.hidden_size, requires_grad=True) for _ in norms]
    handles = [
        n.register_forward_hook(lambda _m, _a, out, g=g: out * g)
        for n, g in zip(norms, gates, strict=True)
    ]
    try:
        loss = domain_loss(model, um, batch)
        grads = torch.autograd.grad(loss, gates)
    finally:
        for h in handles:
            h.remove()
    want = torch.stack([g.abs() for g in grads])
    assert got["layernorm"].shape == want.shape
    assert torch.allclose(got["layernorm"], want, rtol=1e-3, atol=1e-6)


def test_max_positions_is_one_rule_for_the_engine_and_the_api():
    from app.preflight import max_positions as api_rule
    from das_engine.preflight import max_block_size

    assert api_rule is max_positions
    roberta = AutoConfig.for_model("roberta", max_position_embeddings=514, pad_token_id=1)
    assert max_positions(roberta) == max_block_size(roberta) == 512
    no_pad = AutoConfig.for_model("xlm-roberta", max_position_embeddings=514, pad_token_id=None)
    assert max_positions(no_pad) == 512  # RoBERTa's padding index (1) when none is set
    assert max_positions(BertConfig(max_position_embeddings=512)) == 512
    assert max_positions(GPT2Config(n_positions=1024)) == 1024
    for arch in ("llama", "qwen3", "gemma3_text", "granite"):
        config = AutoConfig.for_model(arch, max_position_embeddings=4096)
        assert max_positions(config) == 4096, arch
    assert max_positions(object()) is None


def test_every_family_builds_with_init_base_choices():
    """The CLI offers every family, and an unknown one is refused naming them."""
    from das_engine.cli import build_parser
    from das_engine.errors import UnsupportedArchitectureError

    tok = bundled_tokenizer(decoder=True)
    with pytest.raises(UnsupportedArchitectureError, match="qwen3"):
        build_tiny_model(tok, architecture="mamba")
    assert set(DECODER_ARCHITECTURES) == {t for t, f in FAMILIES.items() if f.objective == "clm"}
    assert {"gpt2", "qwen3", "gemma3", "phi3"} <= set(DECODER_ARCHITECTURES)
    assert not {"bert", "roberta"} & set(DECODER_ARCHITECTURES)  # they keep <s> ... </s>
    for arch in FAMILIES:  # init-base --arch accepts every family, and nothing else
        assert build_parser().parse_args(["init-base", "--out", "x", "--from-corpus", "c",
                                          "--arch", arch]).arch == arch  # fmt: skip
    with pytest.raises(SystemExit):
        build_parser().parse_args(
            ["init-base", "--out", "x", "--from-corpus", "c", "--arch", "mamba"]
        )


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen3", "gemma3_text", "gemma3", "gpt_neox", "phi3"])
def test_bf16_lineage_on_a_new_family_from_init_base(arch, tmp_path, capsys):
    """What a user runs: ``init-base --arch <family> --dropout 0``, then two domains in bf16
    autocast with bf16 checkpoints; DAS's views use importance_dropout (no native dropout)."""
    legal = write_corpus(tmp_path / "legal.txt", LEGAL)
    cooking = write_corpus(tmp_path / "cooking.txt", COOKING)
    base = tmp_path / arch
    args = ["init-base", "--arch", arch, "--dropout", "0", "--out", str(base)]
    args += ["--from-corpus", str(legal), str(cooking), "--vocab-size", "400"]
    args += ["--hidden-size", "32", "--intermediate-size", "64", "--max-positions", "64"]
    assert cli_main(args) == 0, capsys.readouterr().err
    config = json.loads((base / "config.json").read_text())
    text = config.get("text_config") or config  # Gemma 3: the language model's settings
    assert config["model_type"] == arch and text["attention_dropout"] == 0
    out = tmp_path / "lineage"
    run = ["run", "--base", str(base), "--out", str(out), "--quiet", "--json"]
    run += ["--max-steps", "3", "--batch-size", "4", "--block-size", "32"]
    run += ["--set", "mixed_precision=bf16", "--set", "save_dtype=bfloat16"]
    run += ["--set", "eval_max_batches=2", "--set", "importance_max_batches=2"]
    run += ["--contrast-weight", "1", str(legal), str(cooking)]
    assert cli_main(run) == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["loss_matrix"]) == 2
    assert all(x is not None for row in metrics["loss_matrix"] for x in row)
    stage2 = sorted((out / "stages").glob("002-*"))[0] / "model"
    model = AutoModelForCausalLM.from_pretrained(str(stage2))
    assert model.config.model_type == arch
    assert json.loads((stage2 / "config.json").read_text())["dtype"] == "bfloat16"
    base_model = AutoModelForCausalLM.from_pretrained(str(base))
    moved = [
        n
        for n, p in model.named_parameters()
        if not torch.equal(p.float(), base_model.get_parameter(n).float())
    ]
    assert moved  # it trained


def test_a_family_entry_is_all_a_new_model_type_needs(monkeypatch, tmp_path, capsys):
    """Helium (a Llama-layout model type transformers ships and we do not list): one entry
    in FAMILIES, and init-base builds it, the CLI offers it, a lineage trains it and both
    pre-flights know its position limit, with no other change."""
    from app.preflight import max_positions as api_rule

    assert "helium" not in FAMILIES
    monkeypatch.setitem(FAMILIES, "helium", FAMILIES["llama"])
    legal = write_corpus(tmp_path / "legal.txt", LEGAL)
    base = tmp_path / "helium"
    args = ["init-base", "--arch", "helium", "--dropout", "0", "--out", str(base)]
    args += ["--from-corpus", str(legal), "--vocab-size", "300", "--hidden-size", "32"]
    args += ["--intermediate-size", "64", "--max-positions", "64"]
    assert cli_main(args) == 0, capsys.readouterr().err
    assert json.loads((base / "config.json").read_text())["model_type"] == "helium"
    assert api_rule(AutoConfig.from_pretrained(base)) == 64
    run = ["run", "--base", str(base), "--out", str(tmp_path / "lin"), "--quiet"]
    run += ["--max-steps", "2", "--batch-size", "2", "--block-size", "32", str(legal)]
    assert cli_main(run) == 0, capsys.readouterr().err
    from das_engine.lineage import Lineage

    assert Lineage.open(tmp_path / "lin").domains == ["legal"]
