"""The baseline strategies (kd, ewc, replay, adapter): each one's defining property, and
each running a 2-stage lineage on the tiny model."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from das_engine.bases import build_tiny_model, bundled_tokenizer, save_base
from das_engine.config import TrainingConfig
from das_engine.data import ChunkStore, build_datasets
from das_engine.lineage import Lineage
from das_engine.objective import Batcher, lm_forward
from das_engine.strategies import StageContext, make_strategy
from das_engine.strategies.adapter import DIR as ADAPTER_DIR
from das_engine.strategies.ewc import ewc_penalty, load_state
from das_engine.strategies.kd import KD
from das_engine.strategies.replay import FILE as REPLAY_FILE
from das_engine.units import build_unit_map

WORDS = {
    "farm": "cow barn hay field tractor harvest milk wheat plough sheep fence seed".split(),
    "sea": "boat wave harbour sail anchor tide fish net lighthouse storm deck crew".split(),
    "code": "function loop variable compile error branch commit test array string".split(),
}
TINY = {
    "batch_size": 4,
    "block_size": 32,
    "max_steps": 3,
    "eval_max_batches": 2,
    "learning_rate": 1e-3,
    "checkpoint_every": 1000,
    "ewc_fisher_samples": 4,
    "replay_buffer_size": 6,
    "adapter_rank": 2,
    "seed": 3,
}


def write_corpus(path, words, docs=40, seed=0):
    rng = random.Random(seed)
    text = "\n\n".join(
        " ".join(rng.choice(words) for _ in range(rng.randint(20, 40))) + "." for _ in range(docs)
    )
    path.write_text(text + "\n")
    return path


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpora")
    return {n: write_corpus(root / f"{n}.txt", w, seed=i) for i, (n, w) in enumerate(WORDS.items())}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny RoBERTa saved as an HF directory, its tokenizer and unit map."""
    tok = bundled_tokenizer()
    model = build_tiny_model(tok, hidden_size=32, layers=2, heads=4, intermediate_size=64, seed=0)
    path = tmp_path_factory.mktemp("tiny") / "base"
    save_base(model, tok, path)
    return path, tok


@pytest.fixture()
def engine_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DAS_ENGINE_CACHE", str(tmp_path / "cache"))


def context(tiny_base, tmp_path, corpus, **cfg):
    from das_engine.bases import load_model

    path, tok = tiny_base
    config = TrainingConfig.from_dict({**TINY, **cfg})
    model = load_model(path)
    unit_map = build_unit_map(model)
    build_datasets(
        corpus, tok, tmp_path / "data", block_size=32, objective="mlm", eval_fraction=0.1, seed=0
    )
    stage = tmp_path / "stages" / "001-d.partial"
    stage.mkdir(parents=True)
    return StageContext(
        model,
        unit_map,
        config,
        None,
        stage_dir=stage,
        base_dir=path,
        train_store=ChunkStore(tmp_path / "data" / "train"),
        batcher=Batcher(tok, "mlm"),
    )


def a_batch(ctx, seed=0):
    rows = ctx.train_store.rows(range(4))
    return ctx.batcher(rows["input_ids"], rows["attention_mask"], seed=seed)


# -- EWC ---------------------------------------------------------------------------------


def test_ewc_penalty_is_zero_at_the_anchor_and_quadratic():
    gen = torch.Generator().manual_seed(0)
    anchor = {"a": torch.randn(5, 3, generator=gen), "b": torch.randn(7, generator=gen)}
    fisher = {k: torch.rand(v.shape, generator=gen) for k, v in anchor.items()}
    direction = {k: torch.randn(v.shape, generator=gen) for k, v in anchor.items()}

    def at(t):
        return ewc_penalty({k: anchor[k] + t * direction[k] for k in anchor}, fisher, anchor)

    assert float(at(0.0)) == 0.0
    p1, p2, p3 = float(at(1.0)), float(at(2.0)), float(at(-3.0))
    assert p1 > 0
    assert p2 == pytest.approx(4 * p1, rel=1e-5)
    assert p3 == pytest.approx(9 * p1, rel=1e-5)
    # a zero Fisher entry does not constrain its parameter
    fisher["a"].zero_()
    moved = {"a": anchor["a"] + 10, "b": anchor["b"]}
    assert float(ewc_penalty(moved, fisher, anchor)) == 0.0


def test_ewc_fisher_is_saved_and_accumulated_online(tiny, tmp_path, corpora):
    ctx = context(tiny, tmp_path, corpora["farm"], strategy="ewc", ewc_gamma=0.5)
    ewc = make_strategy(ctx.config)
    ewc.prepare(ctx)
    assert ewc.fisher == {}  # nothing to protect at the first stage
    ewc.finish(ctx)
    fisher, anchor = load_state(ctx.stage_dir)
    params = dict(ctx.model.named_parameters())
    assert set(fisher) == set(anchor) == {n for n, p in params.items() if p.requires_grad}
    assert all(bool((f >= 0).all()) for f in fisher.values())
    assert sum(float(f.sum()) for f in fisher.values()) > 0
    assert all(torch.equal(anchor[n], params[n].detach()) for n in anchor)
    # online accumulation: F <- gamma * F_old + F_new (same model, same chunks: F_new = F_old)
    nxt = tmp_path / "stages" / "002-e.partial"
    ctx2 = StageContext(
        ctx.model,
        ctx.unit_map,
        ctx.config,
        None,
        stage_dir=nxt,
        previous_stage_dirs=[ctx.stage_dir],
        train_store=ctx.train_store,
        batcher=ctx.batcher,
    )
    ewc2 = make_strategy(ctx.config)
    ewc2.prepare(ctx2)
    assert float(ewc2.penalty(ctx.model).detach()) == 0.0  # at the anchor
    ewc2.finish(ctx2)
    fisher2, _ = load_state(nxt)
    for n in fisher:
        torch.testing.assert_close(fisher2[n], 1.5 * fisher[n], rtol=1e-4, atol=1e-12)


# -- KD ----------------------------------------------------------------------------------


def test_kd_loss_is_zero_against_itself(tiny, tmp_path, corpora):
    ctx = context(tiny, tmp_path, corpora["farm"], strategy="kd")
    kd = make_strategy(ctx.config)
    assert isinstance(kd, KD)
    kd.prepare(ctx)  # teacher = the base, which is also the student's start
    ctx.model.eval()  # same weights, no dropout: identical hidden states
    batch = a_batch(ctx)
    out = lm_forward(ctx.model, ctx.unit_map, batch)
    assert float(kd.distill(out.hidden, batch).detach()) == 0.0
    total, logs = kd.loss(ctx.model, batch)
    assert logs["kd"] == 0.0
    assert float(total) == pytest.approx(logs["lm_loss"])
    # moving the student away makes the term positive, and the teacher stays frozen
    with torch.no_grad():
        ctx.model.base_model.embeddings.word_embeddings.weight.add_(0.05)
    _, logs = kd.loss(ctx.model, batch)
    assert logs["kd"] > 0
    assert not any(p.requires_grad for p in kd.teacher.parameters())


# -- replay --------------------------------------------------------------------------------


def test_replay_buffer_is_bounded_balanced_and_holds_ids_not_text(engine_cache, tmp_path, corpora):
    lin = Lineage.create(tmp_path / "lin", "tiny-roberta", {**TINY, "strategy": "replay"})
    for name in ("farm", "sea"):
        lin.add_domain(corpora[name], name)
    stages = lin.stages
    for k, stage in enumerate(stages, start=1):
        path = stage.dir / "strategy" / REPLAY_FILE
        with safe_open(str(path), "pt") as fh:
            entries = json.loads(fh.metadata()["entries"])
            keys = set(fh.keys())
        assert keys == {"hidden"}  # outputs only: no token ids, no text
        assert 0 < len(entries) <= TINY["replay_buffer_size"]
        assert all(set(e) == {"stage", "chunk", "mask_seed"} for e in entries)
        assert all(isinstance(e["chunk"], int) for e in entries)
        per_stage = {}
        for e in entries:
            per_stage[e["stage"]] = per_stage.get(e["stage"], 0) + 1
        assert len(per_stage) == k  # every domain so far is represented
        assert max(per_stage.values()) - min(per_stage.values()) <= 1 + (
            TINY["replay_buffer_size"] % k
        )
        hidden = load_file(str(path))["hidden"]
        assert hidden.shape[0] == len(entries) and hidden.dtype == torch.float16
        assert path.stat().st_size < 64 * 1024
    # the ids point at the stages' own tokenized chunks
    names = {s.dir.name for s in stages}
    assert {e["stage"] for e in entries} <= names


# -- adapter -------------------------------------------------------------------------------


def test_adapter_changes_the_backbone_only_through_the_merge(engine_cache, tmp_path, corpora):
    from transformers import AutoModelForMaskedLM

    cfg = {**TINY, "strategy": "adapter", "max_steps": 4}
    lin = Lineage.create(tmp_path / "lin", "tiny-roberta", cfg)
    lin.add_domain(corpora["farm"], "farm")
    lin.add_domain(corpora["sea"], "sea")
    base = AutoModelForMaskedLM.from_pretrained(str(lin.base_dir)).state_dict()
    for stage in lin.stages:
        model = AutoModelForMaskedLM.from_pretrained(str(stage.model_dir))  # no adapter library
        state = model.state_dict()
        assert set(state) == set(base)  # a plain checkpoint: no adapter keys
        # the adapter saved beside the checkpoint (peft format): W_merged = W + s * B A
        adapter = load_file(str(stage.dir / ADAPTER_DIR / "adapter_model.safetensors"))
        merged = {}
        for key in adapter:
            if key.endswith(".lora_A.weight"):
                name = key[: -len(".lora_A.weight")]
                pname = name.removeprefix("base_model.model.") + ".weight"
                scale = cfg.get("adapter_alpha", 16.0) / cfg["adapter_rank"]
                delta = scale * adapter[f"{name}.lora_B.weight"] @ adapter[key]
                torch.testing.assert_close(state[pname], base[pname] + delta, rtol=1e-5, atol=1e-6)
                merged[pname] = float(delta.abs().max())
        assert merged and max(merged.values()) > 0  # the adapter learned something
        for pname, value in state.items():
            if pname not in merged:  # embeddings, LayerNorms, biases, head: the base's
                assert torch.equal(value, base[pname]), pname


# -- every baseline runs a 2-stage lineage ---------------------------------------------------


# (replay and adapter run their 2-stage lineages in the tests above)
@pytest.mark.parametrize("strategy", ["kd", "ewc"])
def test_baseline_runs_a_two_stage_lineage(strategy, engine_cache, tmp_path, corpora):
    lin = Lineage.create(tmp_path / "lin", "tiny-roberta", {**TINY, "strategy": strategy})
    lin.add_domain(corpora["farm"], "farm")
    lin.add_domain(corpora["sea"], "sea")
    m = lin.metrics()
    assert m["strategy"] == strategy
    assert len(m["loss_matrix"]) == 2 and all(len(r) == 2 for r in m["loss_matrix"])
    assert all(x is not None for row in m["loss_matrix"] for x in row)
    assert m["forgetting_rate"] is not None
    assert [s["steps"] for s in m["stages"]] == [TINY["max_steps"]] * 2


def test_plain_adamw_is_fused_only_when_every_parameter_is_on_cuda():
    """Fused AdamW on CUDA (no temporary the size of all moments: the 8B OOM); the CPU
    keeps torch's foreach path."""
    from das_engine.strategies.base import _all_on_cuda

    cpu = [torch.nn.Parameter(torch.zeros(3))]
    assert not _all_on_cuda(cpu) and not _all_on_cuda([{"params": cpu}]) and not _all_on_cuda([])
    opt = make_strategy(TrainingConfig(strategy="ncl")).build_optimizer(cpu, lr=1e-3)
    assert not opt.param_groups[0]["fused"]
    if torch.cuda.is_available():
        gpu = [torch.nn.Parameter(torch.zeros(3, device="cuda"))]
        assert (
            make_strategy(TrainingConfig(strategy="ncl"))
            .build_optimizer(gpu, lr=1e-3)
            .param_groups[0]["fused"]
        )
