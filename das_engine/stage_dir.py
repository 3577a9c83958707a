"""A stage directory's life: ``stages/NNN-<slug>.partial`` while it trains, renamed to
``stages/NNN-<slug>`` once complete.

    open      the partial directory of the next stage: an earlier attempt at the same
              domain and corpus is resumed (its tokenized data and step checkpoints kept),
              any other attempt at that position removed
    tokenize  the corpus into ``data/{train,eval}`` (once; kept across resumes)
    commit    ``stage.json`` marked complete, then one atomic rename

Only rank 0 writes (the lineage orders the ranks around ``open``/``tokenize``); a stage
exists for readers only once renamed (``Lineage.stages``).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from das_engine import distributed
from das_engine.config import TrainingConfig
from das_engine.data import ChunkStore, build_datasets, build_single_split
from das_engine.layout import CHECKPOINTS_DIR, PARTIAL_SUFFIX, STAGE_FILE
from das_engine.progress import ProgressEvent, ProgressFn
from das_engine.storage import atomic_dir, read_json, write_json

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def slug(name: str) -> str:
    """The file-system part of a stage directory's name (ASCII; the name is in stage.json)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")[:40] or "domain"


@dataclass
class PartialStage:
    """A stage being trained: its directory, where it will be committed, its ``stage.json``."""

    position: int
    name: str
    dir: Path  # <lineage>/stages/NNN-<slug>.partial
    final_dir: Path  # <lineage>/stages/NNN-<slug>
    state: dict  # the stage.json being built

    @classmethod
    def open(cls, stages_root: Path, position: int, name: str, corpus: Path) -> PartialStage:
        stages_root.mkdir(exist_ok=True)
        final_dir = stages_root / f"{position:03d}-{slug(name)}"
        partial = final_dir.with_name(final_dir.name + PARTIAL_SUFFIX)
        sha = sha256_file(corpus)
        for other in stages_root.glob(f"{position:03d}-*{PARTIAL_SUFFIX}"):
            if other != partial:  # an abandoned attempt at another domain
                shutil.rmtree(other)
        state_file = partial / STAGE_FILE
        state = read_json(state_file) if state_file.exists() else None
        if state and (state.get("corpus_sha256") != sha or state.get("name") != name):
            shutil.rmtree(partial)  # the same name, another corpus: start afresh
            state = None
        partial.mkdir(parents=True, exist_ok=True)
        stage = cls(position, name, partial, final_dir, state or {})
        if state is None:
            stage.state = {
                "position": position,
                "name": name,
                "corpus_sha256": sha,
                "corpus": str(corpus),
                "status": "partial",
            }
            stage.save_state()
        return stage

    # -- layout ------------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    @property
    def eval_dir(self) -> Path:
        return self.data_dir / "eval"

    @property
    def checkpoints_dir(self) -> Path:
        return self.dir / CHECKPOINTS_DIR

    @property
    def model_dir(self) -> Path:
        return self.dir / "model"

    def train_store(self) -> ChunkStore:
        return ChunkStore(self.data_dir / "train")

    def save_state(self) -> None:
        write_json(self.dir / STAGE_FILE, self.state)

    # -- life --------------------------------------------------------------------------
    def tokenize(
        self,
        corpus: Path,
        eval_corpus: Path | None,
        tokenizer: PreTrainedTokenizerBase,
        config: TrainingConfig,
        objective: str,
        progress: ProgressFn,
    ) -> None:
        """Tokenized train/eval splits (an ``eval_corpus`` replaces the held-out split),
        written once: a resumed stage keeps them."""
        if (self.data_dir / "train").exists() and self.eval_dir.exists():
            return
        progress(ProgressEvent("training", 0, 0, message="tokenizing the corpus"))
        with atomic_dir(self.data_dir) as tmp:
            counts = build_datasets(
                corpus,
                tokenizer,
                tmp,
                block_size=config.block_size,
                objective=objective,
                eval_fraction=config.eval_fraction,
                seed=config.seed,
            )
            if eval_corpus is not None:
                counts.update(
                    build_single_split(
                        Path(eval_corpus),
                        tokenizer,
                        tmp / "eval",
                        block_size=config.block_size,
                        objective=objective,
                    )
                )
        self.state["counts"] = counts
        self.save_state()

    def commit(self, updates: dict) -> Path:
        """Mark the stage complete and rename it into place (rank 0); every rank then
        waits for the committed stage. Returns the final directory."""
        self.state.update({"status": "complete", **updates})
        if distributed.is_main():
            shutil.rmtree(self.checkpoints_dir, ignore_errors=True)
            self.save_state()
            os.replace(self.dir, self.final_dir)
        distributed.barrier()  # the next stage, on any rank, starts from the committed one
        return self.final_dir
