from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from das_engine.bases import build_tiny_model, bundled_tokenizer

LICENCES = Path("/usr/share/common-licenses")

# Real English text that ships with the tests (no download): two distinct "domains".
LEGAL = (
    "The licensee shall not distribute copies of the program without the notice. "
    "Any warranty is disclaimed to the extent permitted by applicable law. "
    "The contributor grants a perpetual, worldwide, royalty-free licence to the work. "
)
COOKING = (
    "Whisk the eggs with sugar until pale, then fold in the flour and melted butter. "
    "Bake the cake for forty minutes until a skewer comes out clean and golden. "
    "Season the soup with salt, pepper and a little lemon juice before serving. "
)


@pytest.fixture(scope="session")
def tokenizer():
    return bundled_tokenizer()


def tiny(tokenizer, arch: str = "roberta", seed: int = 0):
    return build_tiny_model(
        tokenizer,
        architecture=arch,
        hidden_size=32,
        layers=2,
        heads=4,
        intermediate_size=64,
        max_positions=128,
        seed=seed,
    )


@pytest.fixture
def roberta(tokenizer):
    return tiny(tokenizer, "roberta")


@pytest.fixture
def gpt2(tokenizer):
    return tiny(tokenizer, "gpt2")


@pytest.fixture
def llama(tokenizer):
    return tiny(tokenizer, "llama")


def make_batch(tokenizer, texts: list[str], length: int = 24) -> dict:
    enc = tokenizer(
        texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt"
    )
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@pytest.fixture
def batch(tokenizer):
    return make_batch(tokenizer, [LEGAL, COOKING, LEGAL[40:], COOKING[30:]])


def write_corpus(path: Path, text: str, docs: int = 40) -> Path:
    """A corpus of ``docs`` blank-line-separated documents, varied by rotation."""
    words = text.split()
    blocks = []
    for i in range(docs):
        k = (i * 7) % len(words)
        blocks.append(" ".join(words[k:] + words[:k]))
    path.write_text("\n\n".join(blocks) + "\n")
    return path


TINY_CONFIG = {
    "contrast_weight": 1.0,  # the paper's full DAS objective, so lineage tests exercise it
    "max_steps": 4,
    "batch_size": 4,
    "block_size": 32,
    "checkpoint_every": 2,
    "eval_max_batches": 2,
    "importance_max_batches": 2,
    "learning_rate": 1e-3,
}


@pytest.fixture
def corpora(tmp_path) -> tuple[Path, Path]:
    return write_corpus(tmp_path / "legal.txt", LEGAL), write_corpus(
        tmp_path / "cooking.txt", COOKING
    )


def params_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def interrupt(lineage, corpus: Path, name: str, after_steps: int = 5) -> None:
    """Start ``name``'s stage on ``lineage`` and cancel it after ``after_steps`` steps."""
    from das_engine.errors import Cancelled

    done: list[int] = []

    def progress(e) -> None:
        if e.phase == "training" and e.total:
            done.append(e.step)

    with pytest.raises(Cancelled):
        lineage.add_domain(
            corpus, name, progress=progress, should_cancel=lambda: len(done) >= after_steps
        )


def run_without_das_engine(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter without this worktree on its path (a user's)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=cwd, env=env
    )


@pytest.fixture(scope="module")
def stage_data(tmp_path_factory, tokenizer) -> Path:
    """A tokenized training split (block size 32) of the legal corpus, for trainers."""
    from das_engine.data import build_datasets

    root = tmp_path_factory.mktemp("stage")
    corpus = write_corpus(root / "legal.txt", LEGAL)
    build_datasets(
        corpus, tokenizer, root / "data", block_size=32, objective="mlm", eval_fraction=0.1, seed=0
    )
    return root / "data" / "train"
