"""Decoder bases: BOS-only tokenizers from ``init-base``, and DAS end to end on models with
no dropout of their own (a Llama config with attention_dropout = 0, GPT-2 and RoBERTa
configs with every dropout at 0)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from das_engine.bases import (
    build_tiny_model,
    bundled_tokenizer,
    load_tokenizer,
    save_base,
    train_tokenizer,
)
from das_engine.cli import main as cli_main
from das_engine.data import Chunker
from das_engine.importance import Importance
from das_engine.lineage import Lineage
from das_engine.units import UNIT_KINDS

from .conftest import COOKING, LEGAL, TINY_CONFIG, write_corpus


@pytest.fixture(scope="module")
def general(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("general") / "general.txt", LEGAL + COOKING, 80)


def _ids(tok, text="hello world"):
    return tok(text)["input_ids"]


def test_decoder_tokenizer_has_bos_only_and_the_encoder_keeps_its_pair(general, tmp_path):
    dec = train_tokenizer([general], vocab_size=400, decoder=True)
    enc = train_tokenizer([general], vocab_size=400)
    body = enc("hello world", add_special_tokens=False)["input_ids"]
    assert dec("hello world", add_special_tokens=False)["input_ids"] == body  # one vocabulary
    assert _ids(enc) == [enc.convert_tokens_to_ids("<s>"), *body, enc.convert_tokens_to_ids("</s>")]
    assert _ids(dec) == [dec.bos_token_id, *body]  # BOS first, no </s> at the end
    assert dec.sep_token_id is None and dec.cls_token_id is None and dec.mask_token_id is None
    assert dec.eos_token_id == enc.convert_tokens_to_ids("</s>")
    assert enc.mask_token_id is not None and enc.sep_token_id == enc.eos_token_id
    # the saved base reloads with the same behaviour
    model = build_tiny_model(dec, architecture="llama", hidden_size=32, layers=1, heads=2)
    save_base(model, dec, tmp_path / "llama")
    back = load_tokenizer(tmp_path / "llama")
    assert _ids(back) == _ids(dec) and back.sep_token_id is None
    assert _ids(back, "a b c")[-1] != back.eos_token_id


def test_bundled_encoder_tokenizer_is_unchanged():
    enc, dec = bundled_tokenizer(), bundled_tokenizer(decoder=True)
    ids = _ids(enc)
    assert ids[0] == enc.cls_token_id == enc.bos_token_id and ids[-1] == enc.sep_token_id
    assert _ids(dec) == ids[:-1]  # the decoder variant drops only the trailing </s>
    assert _ids(enc) == ids  # wrapping a decoder copy did not touch the encoder's processor


def test_decoder_chunks_join_documents_with_eos_only():
    dec = bundled_tokenizer(decoder=True)
    chunker = Chunker(dec, 64, "clm")
    docs = ["the licence is granted", "bake the cake", "season the soup"]
    for d in docs:
        chunker.add(dec(d, add_special_tokens=False)["input_ids"])
    blocks = [b for b in [chunker.take()] if b is not None] + list(chunker.finish())
    ids = [
        t
        for b in blocks
        for row, mask in zip(b.input_ids.tolist(), b.attention_mask.tolist(), strict=True)
        for t, m in zip(row, mask, strict=True)
        if m
    ]
    assert ids.count(dec.eos_token_id) >= len(docs) - 1  # EOS between documents
    assert dec.bos_token_id not in ids  # no <s> ... </s> wrapping per document or chunk


def _no_dropout_base(tmp_path, arch: str):
    tok = bundled_tokenizer(decoder=arch != "roberta")
    model = build_tiny_model(
        tok,
        architecture=arch,
        hidden_size=32,
        layers=2,
        heads=4,
        intermediate_size=64,
        max_positions=128,
        dropout=0.0,
    )
    out = tmp_path / f"{arch}-base"
    save_base(model, tok, out)
    return out


def _loader(arch: str):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    return AutoModelForMaskedLM if arch == "roberta" else AutoModelForCausalLM


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gpt2", "roberta"])
def test_das_end_to_end_on_a_base_without_dropout(arch, tmp_path, corpora):
    base = _no_dropout_base(tmp_path, arch)
    config = json.loads((base / "config.json").read_text())
    drop_keys = [k for k in config if "drop" in k and isinstance(config[k], int | float)]
    assert drop_keys and all(config[k] == 0 for k in drop_keys)
    lin = Lineage.create(tmp_path / "lineage", str(base), TINY_CONFIG)  # contrast_weight 1
    r1 = lin.add_domain(corpora[0], "legal")
    r2 = lin.add_domain(corpora[1], "cooking")
    general = Importance.load(lin.path / "importance" / "general.safetensors")
    for kind in UNIT_KINDS:
        v = general.values[kind]
        assert torch.isfinite(v).all() and v.std() > 0.05, kind
    dom = Importance.load(r2.importance_dir / "domain.safetensors")
    assert all(torch.isfinite(dom.values[k]).all() for k in UNIT_KINDS)
    m = lin.metrics()
    assert all(math.isfinite(x) for row in m["loss_matrix"] for x in row)
    assert r1.steps == r2.steps == TINY_CONFIG["max_steps"]
    # soft-masking let training move the weights, and the checkpoint is a plain HF model
    before, after = (
        load_file(str(base / "model.safetensors")),
        load_file(str(r2.model_dir / "model.safetensors")),
    )
    assert any(not torch.equal(before[k], after[k]) for k in before)
    model = _loader(arch).from_pretrained(str(r2.model_dir))
    saved = model.config.to_dict()
    assert all(saved[k] == 0 for k in drop_keys)  # training never switched dropout on
    if arch != "roberta":
        assert load_tokenizer(r2.model_dir)("hi")["input_ids"][0] == model.config.bos_token_id


@pytest.mark.slow
def test_cli_init_base_llama_without_dropout_then_run(tmp_path, general, corpora, capsys):
    base = tmp_path / "llama"
    args = ["init-base", "--family", "llama", "--dropout", "0", "--out", str(base)]
    args += ["--from-corpus", str(general), "--vocab-size", "400", "--hidden-size", "32"]
    args += ["--intermediate-size", "64", "--max-positions", "128"]
    assert cli_main(args) == 0
    assert json.loads((base / "config.json").read_text())["attention_dropout"] == 0
    tok = load_tokenizer(base)
    assert _ids(tok)[0] == tok.bos_token_id and _ids(tok)[-1] != tok.eos_token_id
    out = tmp_path / "lineage"
    run = ["run", "--base", str(base), "--out", str(out), "--quiet", "--json"]
    run += ["--max-steps", "3", "--batch-size", "4", "--block-size", "32"]
    run += ["--set", "eval_max_batches=2", "--set", "importance_max_batches=2"]
    run += ["--contrast-weight", "1", str(corpora[0]), str(corpora[1])]
    assert cli_main(run) == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["loss_matrix"]) == 2
    assert cli_main(["init-base", "--out", str(tmp_path / "x"), "--from-corpus", str(general),
                     "--dropout", "1.5"]) == 2  # fmt: skip
