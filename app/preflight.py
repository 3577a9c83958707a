"""Pre-flight checks in the request, so that a job the worker would fail on is never queued.

- the hyper-parameters against the chosen base: ``block_size`` within the base's position
  embeddings (read from its config, no weights loaded), mixed precision the worker's device
  class can run (``DAS_WORKER_DEVICE``);
- a domain's corpus against the lineage: tokenized with the base's tokenizer at the
  lineage's ``block_size``, it must fill at least two chunks (the engine holds out at least
  one to evaluate and trains on the rest); a separate evaluation or general corpus at least
  one. Reading stops as soon as that is known, so a large corpus costs no more than a
  small one; for an epochs-based job (no ``max_steps``) it reads on to ``SAMPLE_CHARS``
  characters, whose tokens per character estimate the corpus's tokens (for the token quota).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.problems import Problem
from das_engine.errors import IncompatibleConfigError
from das_engine.families import max_positions  # the engine's rule (a torch-free module)
from das_engine.preflight import check_config_against_model  # imports no torch
from service_core.settings import Settings

SAMPLE_CHARS = 64_000
_tokenizers: dict[str, tuple[Any, threading.Lock]] = {}
_tokenizers_lock = threading.Lock()


def base_config(path: str, *, allow_hub: bool) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, local_files_only=not allow_hub)


def check_against_base(settings: Settings, config: Any, base_model: str, base: Any) -> None:
    """422 for hyper-parameters the base or the worker's device cannot run: the engine's
    own checks against the base's config (``das_engine.preflight``: block size, gradient
    checkpointing), then this server's device class."""
    try:
        check_config_against_model(config, base)
    except IncompatibleConfigError as exc:
        errors = [
            {"field": f"hyperparameters.{d['field']}", "message": f"{d['field']} {d['message']}"}
            for d in exc.details
        ]
        extra = {}
        if any(d["field"] == "block_size" for d in exc.details):
            extra = {"limit": max_positions(base), "value": config.block_size}
        message = f"base model {base_model!r}: " + "; ".join(e["message"] for e in errors)
        raise Problem(422, "invalid_hyperparameters", message, errors=errors, **extra) from None
    if config.mixed_precision == "fp16" and settings.worker_device == "cpu":
        message = (
            "mixed_precision fp16 needs a GPU and this server's workers train on CPU "
            "(DAS_WORKER_DEVICE=cpu): use auto, no or bf16"
        )
        raise Problem(
            422,
            "invalid_hyperparameters",
            message,
            errors=[{"field": "hyperparameters.mixed_precision", "message": message}],
        )


def tokenizer_for(path: str) -> tuple[Any, threading.Lock]:
    """The base's tokenizer (loaded once per base) and a lock: a fast tokenizer's padding
    and truncation state is not safe to share between threads."""
    with _tokenizers_lock:
        found = _tokenizers.get(path)
        if found is None:
            from das_engine.bases import load_tokenizer

            found = (load_tokenizer(path), threading.Lock())
            if len(_tokenizers) >= 8:
                _tokenizers.pop(next(iter(_tokenizers)))
            _tokenizers[path] = found
        return found


def epochs_job_tokens(config: Any, measure: CorpusMeasure, total_characters: int) -> int:
    """Tokens an epochs-based job (no ``max_steps``) would process, estimated from the
    corpus: the trainer's step count over the corpus's chunks, times the tokens a step takes."""
    chunks = math.ceil(measure.estimated_tokens(total_characters) / max(1, measure.body))
    per_step = config.batch_size * config.grad_accum
    steps = max(1, math.ceil(config.epochs * chunks / per_step))
    return steps * per_step * config.block_size


@dataclass
class CorpusMeasure:
    """What reading (the start of) a corpus found at one block size."""

    chunks: int  # chunks the text read fills (the last one possibly partial)
    tokens: int  # tokens read, separators included
    characters: int  # characters of the documents read
    complete: bool  # the whole corpus was read
    body: int  # tokens of text per chunk (the block size less the MLM's two specials)

    def estimated_tokens(self, total_characters: int) -> int:
        if self.complete or not self.characters:
            return self.tokens
        return math.ceil(self.tokens * total_characters / self.characters)


def measure_corpus(
    path: Path,
    tokenizer: Any,
    lock: threading.Lock,
    *,
    block_size: int,
    objective: str,
    need: int,
    split: tuple[int, float] | None = None,
    sample_chars: int = SAMPLE_CHARS,
) -> CorpusMeasure:
    """Chunk the corpus as the engine does (``das_engine.data.Chunker``) until ``need``
    chunks and ``sample_chars`` characters were seen, or the corpus ends. With ``split``
    (the lineage's seed and eval_fraction), a corpus of fewer chunks still counts as
    ``need`` = 2 when the engine's document-level split gives both sides a chunk."""
    import numpy as np

    from das_engine.data import Chunker, iter_documents

    chunker = Chunker(tokenizer, block_size, objective)
    full = characters = 0
    complete = True
    with lock:
        for doc in iter_documents(path):
            characters += len(doc)
            full += _feed(chunker, tokenizer, doc)
            if full >= need and characters >= sample_chars:
                complete = False
                break
        block = chunker.take()  # the full chunks only
        full += len(block) if block is not None else 0
        rest = np.concatenate([chunker.carry, *chunker.pending])
        tokens = full * chunker.body + len(rest)
        # the engine's last, partial chunk: what is left unless it is only separators
        chunks = full + int(complete and bool((rest != chunker.sep).any()))
        if chunks < need == 2 and split is not None:  # a tiny corpus: read it again
            if _both_splits_fill(path, tokenizer, block_size, objective, *split):
                chunks = need
    return CorpusMeasure(chunks, tokens, characters, complete, chunker.body)


def _feed(chunker: Any, tokenizer: Any, doc: str) -> int:
    """One document into the engine's chunker; how many full chunks it completed."""
    chunker.add(tokenizer(doc, add_special_tokens=False)["input_ids"])
    block = chunker.take()
    return len(block) if block is not None else 0


def _both_splits_fill(
    path: Path, tokenizer: Any, block_size: int, objective: str, seed: int, fraction: float
) -> bool:
    """The engine's first try (das_engine.data.build_datasets): documents held out by a hash
    of (seed, number); it succeeds when the train and the eval side each fill a chunk."""
    from das_engine.data import Chunker, _held_out, iter_documents

    sides = {side: Chunker(tokenizer, block_size, objective) for side in ("train", "eval")}
    filled = dict.fromkeys(sides, 0)
    for i, doc in enumerate(iter_documents(path)):
        side = "eval" if _held_out(seed, i, fraction) else "train"
        filled[side] += _feed(sides[side], tokenizer, doc)
    for side, chunker in sides.items():
        filled[side] += sum(len(block) for block in chunker.finish())
    return all(filled.values())


def corpus_problem(
    measure: CorpusMeasure, *, what: str, field: str, block_size: int, need: int
) -> Problem | None:
    """The 422 for a corpus too small at this block size, or None."""
    if measure.chunks >= need:
        return None
    want = measure.body * (need - 1) + 1
    what = (
        "at least 2 chunks (one to train on, one held out to evaluate)"
        if need == 2
        else "at least 1 chunk"
    )
    message = (
        f"{what} is too small: with the base model's tokenizer it holds "
        f"{measure.tokens} token(s), {measure.chunks} chunk(s) of block_size {block_size}; it "
        f"needs {what}, that is more than {want - 1} tokens"
    )
    return Problem(
        422,
        "corpus_too_small",
        message,
        errors=[{"field": field, "message": message}],
        tokens=measure.tokens,
        chunks=measure.chunks,
        required_chunks=need,
        required_tokens=want,
        block_size=block_size,
    )
