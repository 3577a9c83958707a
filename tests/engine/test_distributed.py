"""Data parallelism (DDP over gloo, two CPU processes launched with torchrun).

What must hold: a 2-process DAS stage ends with the same weights on both ranks, and they
match a 1-process run of the same global batches; importance is all-reduced, identical on
both ranks and equal to the 1-process importance on the union of the batches.

Dropout: each rank draws its own dropout masks (per process RNG), so a 2-process run can
equal a 1-process run only without dropout. The stage's base therefore has dropout 0
(data order, MLM masks and the token-weighted loss are then the whole computation), and
its general importance is written beforehand (the proxy KL needs dropout). The importance
part keeps dropout 0.1: each importance batch reseeds the RNG from its index, so the
proxy-KL views do not depend on the rank that computes them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from das_engine import distributed
from das_engine.bases import bundled_tokenizer, load_model, save_base
from das_engine.errors import ConfigError
from das_engine.importance import Importance, domain_importance, general_importance
from das_engine.lineage import Lineage
from das_engine.units import build_unit_map

from .conftest import LEGAL, tiny, write_corpus
from .ddp_job import importance_batches, importance_model

ROOT = Path(__file__).resolve().parents[2]
JOB = Path(__file__).with_name("ddp_job.py")
EXTRA = ("embedding", "layernorm")

STAGE_CONFIG = {
    "strategy": "das",
    "max_steps": 3,
    "batch_size": 5,  # odd: the ranks hold 3 and 2 rows of each micro-batch
    "grad_accum": 2,
    "block_size": 32,
    "checkpoint_every": 2,
    "eval_max_batches": 3,
    "importance_max_batches": 3,
    "learning_rate": 1e-3,
    "seed": 7,
}


def _base_without_dropout(path: Path) -> Path:
    tok = bundled_tokenizer()
    save_base(tiny(tok, seed=1), tok, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def _lineage(path: Path, base: Path) -> Lineage:
    """A lineage whose general importance is given (random, fixed): no dropout needed."""
    lin = Lineage.create(path, str(base), STAGE_CONFIG)
    um = build_unit_map(load_model(lin.base_dir))
    gen = torch.Generator().manual_seed(0)
    shapes = {**um.shapes(), **um.extra_shapes()}
    values = {k: torch.rand(s, generator=gen) * 0.9 for k, s in shapes.items()}
    Importance(values).save(lin.path / "importance" / "general.safetensors", "general")
    return lin


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """Both lineages, one trained in this process, one by a 2-process torchrun job."""
    tmp = tmp_path_factory.mktemp("ddp")
    base = _base_without_dropout(tmp / "base")
    corpus = write_corpus(tmp / "legal.txt", LEGAL, docs=60)
    single, multi = _lineage(tmp / "single", base), _lineage(tmp / "multi", base)
    work = tmp / "work"
    work.mkdir()
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(JOB), str(work), str(multi.path), str(corpus)],
        env=env, capture_output=True, text=True, timeout=240, cwd=ROOT,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr[-4000:]
    single_result = single.add_domain(corpus, "legal")
    return {
        "single": single,
        "multi": Lineage.open(multi.path),
        "work": work,
        "single_result": single_result,
        "seconds": seconds,
    }


@pytest.mark.slow
def test_two_process_das_stage_matches_one_process(two_process_run):
    run = two_process_run
    work = run["work"]
    r0 = load_file(str(work / "weights-rank0.safetensors"))
    r1 = load_file(str(work / "weights-rank1.safetensors"))
    assert r0.keys() == r1.keys()
    assert all(torch.equal(r0[k], r1[k]) for k in r0), "ranks diverged"

    single, multi = run["single"], run["multi"]
    (s1,), (s2,) = single.stages, multi.stages
    w1 = load_file(str(s1.model_dir / "model.safetensors"))
    w2 = load_file(str(s2.model_dir / "model.safetensors"))
    base = load_file(str(single.base_dir / "model.safetensors"))
    assert w1.keys() == w2.keys()
    moved = max(float((w1[k] - base[k]).abs().max()) for k in w1)
    assert moved > 1e-3  # training did change the weights, so the match below means something
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=2e-5, rtol=1e-4), k
        assert torch.equal(w2[k], r0[k]), k  # rank 0 saved the weights it trained

    assert s2.meta["resumed_from_step"] == 2  # cancelled by rank 0, resumed by both
    # the same global batches: same token count, loss, held-out evaluation and importance
    assert s1.meta["trained_tokens"] == s2.meta["trained_tokens"]
    assert s2.meta["final_train_loss"] == pytest.approx(s1.meta["final_train_loss"], rel=1e-4)
    for table in ("eval", "column"):
        for key, value in s1.meta[table].items():
            assert s2.meta[table][key] == pytest.approx(value, rel=1e-4), (table, key)
    for name in ("domain", "accumulated"):
        a = Importance.load(s1.importance_dir / f"{name}.safetensors").values
        b = Importance.load(s2.importance_dir / f"{name}.safetensors").values
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-4), (name, k)
    # rank 0 wrote the same files a single process writes, and nothing else
    assert _files(single.path) == _files(multi.path)
    assert (work / "done-rank1").read_text() == str(run["single_result"].trained_tokens)
    # the cancel flag of one rank reaches all; rank 0's failure is raised on rank 1 too
    assert (work / "collective-rank0").read_text() == "True LineageError"
    assert (work / "collective-rank1").read_text() == "True RankFailed"


@pytest.mark.slow
def test_importance_all_reduce_equals_one_process_on_the_union(two_process_run):
    got = [
        load_file(str(two_process_run["work"] / f"importance-rank{r}.safetensors")) for r in (0, 1)
    ]  # noqa: E501
    assert got[0].keys() == got[1].keys()
    assert all(torch.equal(got[0][k], got[1][k]) for k in got[0]), "ranks mask different units"

    model, um = importance_model()
    batches = importance_batches()
    torch.manual_seed(123)
    general = general_importance(model, um, batches, "paper", EXTRA)
    domain = domain_importance(model, um, batches, "paper", EXTRA)
    for prefix, imp in (("general", general), ("domain", domain)):
        for k, v in imp.values.items():
            assert torch.allclose(got[0][f"{prefix}.{k}"], v, atol=1e-5), (prefix, k)
    # a half of the batches alone gives other values: the reduction is what made them equal
    half = domain_importance(model, um, batches[::2], "paper", EXTRA)
    assert not torch.allclose(half.values["head"], domain.values["head"], atol=1e-3)


def test_single_process_is_the_default_and_shards_nothing(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    top = distributed.topology()
    assert (top.rank, top.world_size, distributed.seed_offset()) == (0, 1, 0)
    assert distributed.sum_over_ranks([1.5, 2.0]) == [1.5, 2.0]
    assert [b["i"] for b in distributed.shard_batches([{"i": 0}, {"i": 1}])] == [0, 1]


def test_rank_slices_cover_the_global_batch_with_token_weights(monkeypatch):
    """Rank r's rows, over all ranks, are the global micro-batch; weights average to 1."""
    monkeypatch.setenv("WORLD_SIZE", "3")
    rows = 7
    labels = torch.full((rows, 5), -100)
    labels[:, 0] = 1
    labels[0, 1:] = 2  # row 0 predicts 5 tokens, the others 1
    batch = {"input_ids": torch.arange(rows * 5).view(rows, 5), "labels": labels}
    frozen = torch.nn.Linear(1, 1).requires_grad_(False)
    parts, weights = [], []
    for r in range(3):
        monkeypatch.setenv("RANK", str(r))
        dp = distributed.DataParallel(frozen, None, "mlm")  # nothing to train: no DDP
        local, w = dp.shard(batch)
        parts.append(local["input_ids"])
        weights.append(w)
    assert torch.equal(torch.cat(parts), batch["input_ids"])
    assert [len(p) for p in parts] == [3, 2, 2]
    assert sum(weights) / 3 == pytest.approx(1.0)
    assert weights[0] == pytest.approx(3 * 7 / 11)  # rank 0 holds 7 of the 11 predicted tokens
    monkeypatch.setenv("RANK", "0")
    dp = distributed.DataParallel(frozen, None, "mlm")
    with pytest.raises(ConfigError, match="at least the number of processes"):
        dp.shard({k: v[:2] for k, v in batch.items()})


def test_the_no_buffer_sync_flag_is_one_this_torch_accepts():
    """torch 2.13 renamed DDP's ``broadcast_buffers`` to ``forward_sync_buffers``; passing
    the new name to an older torch (2.11 on a GPU machine) killed every DDP stage."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    from das_engine.distributed import _no_buffer_sync

    flag = _no_buffer_sync()
    assert flag in ({"forward_sync_buffers": False}, {"broadcast_buffers": False})
    assert next(iter(flag)) in inspect.signature(DistributedDataParallel.__init__).parameters
