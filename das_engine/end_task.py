"""End-task evaluation: how well each stage's model serves a labelled task of each domain.

The DAS paper judges a continual pre-training method by end-task results, not LM loss:
after post-training through domain t, a classifier is trained on each domain's labelled
task and scored. Here the classifier is a *linear probe*: the model is frozen, a text's
feature is the mean of its last hidden states over non-pad tokens, and a seeded
logistic regression is fitted on a stratified train split and scored on the rest
(accuracy and macro-F1). Cheap, deterministic and comparable across stages.
``mode="finetune"`` trains a copy of the model with a linear head instead (AdamW, seeded).

A labelled task file is JSONL, one ``{"text": str, "label": str | int}`` per line.

For a lineage, ``end_task_matrix`` probes the base and every stage on every task and
stores ``<lineage>/end_task/matrix.json``; cells are keyed by stage directory, task file
sha256 and probe settings, so a re-run computes only the missing cells. Forgetting and
transfer reuse ``das_engine.metrics`` on the *negated* accuracy matrix (those functions
treat lower as better), so forgetting on accuracy is ``A[i][i] - A[T-1][i]``.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from das_engine import metrics as cl_metrics
from das_engine.errors import ConfigError, DasError
from das_engine.storage import read_json, write_json

FORMAT_VERSION = 1
MIN_EXAMPLES = 8
MIN_PER_CLASS = 2
MATRIX_FILE = Path("end_task") / "matrix.json"


class EndTaskError(DasError):
    """A labelled end-task set cannot be used."""

    code = "invalid_end_task"


class TaskFormatError(EndTaskError):
    """A line of the labelled JSONL is not ``{"text": str, "label": str | int}``."""

    code = "invalid_end_task_format"


class TooFewClassesError(EndTaskError):
    """A classification task needs at least two distinct labels."""

    code = "end_task_too_few_classes"


class TooFewExamplesError(EndTaskError):
    """Not enough examples (overall or per class) to train and score a probe."""

    code = "end_task_too_few_examples"


@dataclass(frozen=True)
class Example:
    text: str
    label: str | int


# -- labelled sets ---------------------------------------------------------------------------


def parse_examples(lines: Sequence[str], source: str = "<input>") -> list[Example]:
    """Parse JSONL lines; blank lines are skipped, every other line must be valid."""
    out = []
    for no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{source} line {no}"
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise TaskFormatError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise TaskFormatError(f"{where}: expected an object with 'text' and 'label'")
        missing = [k for k in ("text", "label") if k not in obj]
        if missing:
            raise TaskFormatError(f"{where}: missing field(s) {', '.join(missing)}")
        text, label = obj["text"], obj["label"]
        if not isinstance(text, str) or not text.strip():
            raise TaskFormatError(f"{where}: 'text' must be a non-empty string")
        if isinstance(label, bool) or not isinstance(label, str | int):
            raise TaskFormatError(f"{where}: 'label' must be a string or an integer")
        out.append(Example(text, label))
    return out


def validate_examples(
    examples: Sequence[Example],
    *,
    source: str = "<input>",
    min_examples: int = MIN_EXAMPLES,
    min_per_class: int = MIN_PER_CLASS,
) -> None:
    """At least two classes, ``min_examples`` in all, ``min_per_class`` of each class."""
    counts: dict[str, int] = {}
    for ex in examples:
        counts[str(ex.label)] = counts.get(str(ex.label), 0) + 1
    if len(examples) < min_examples:
        raise TooFewExamplesError(
            f"{source}: {len(examples)} example(s), at least {min_examples} are needed"
        )
    if len(counts) < 2:
        raise TooFewClassesError(
            f"{source}: {len(counts)} distinct label(s), a classification task needs at least 2"
        )
    small = sorted(k for k, n in counts.items() if n < min_per_class)
    if small:
        raise TooFewExamplesError(
            f"{source}: label(s) {', '.join(small)} have fewer than {min_per_class} examples "
            "(one is needed for training and one for testing)"
        )


def load_task(path: Path, **limits: int) -> list[Example]:
    """Read and validate a labelled JSONL file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EndTaskError(f"labelled task file not found: {path}") from None
    except UnicodeDecodeError as exc:
        raise TaskFormatError(f"{path}: not UTF-8 ({exc.reason})") from None
    examples = parse_examples(text.splitlines(), str(path))
    validate_examples(examples, source=str(path), **limits)
    return examples


def split_examples(
    examples: Sequence[Example], *, test_fraction: float = 0.3, seed: int = 0
) -> tuple[list[Example], list[Example]]:
    """Seeded, stratified split: each class keeps >= 1 train and >= 1 test example."""
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction}")
    by_class: dict[str, list[int]] = {}
    for idx, ex in enumerate(examples):
        by_class.setdefault(str(ex.label), []).append(idx)
    rng = random.Random(seed)
    test_idx: set[int] = set()
    for key in sorted(by_class):
        idxs = list(by_class[key])
        rng.shuffle(idxs)
        n_test = min(max(1, round(len(idxs) * test_fraction)), len(idxs) - 1)
        test_idx.update(idxs[:n_test])
    train = [ex for i, ex in enumerate(examples) if i not in test_idx]
    test = [ex for i, ex in enumerate(examples) if i in test_idx]
    return train, test


# -- features and the probe ------------------------------------------------------------------


def _batch(tokenizer, texts: Sequence[str], max_length: int, device) -> tuple:
    """Right-padded ids and mask (pad = pad, else eos, else 0: the mask says what is real)."""
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for r, x in enumerate(ids):
        input_ids[r, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[r, : len(x)] = 1
    return input_ids.to(device), mask.to(device)


def _pooled(model: torch.nn.Module, input_ids, mask) -> torch.Tensor:
    """Mean of the last hidden states over non-pad tokens."""
    out = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
    hidden = out.hidden_states[-1].float()
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


@torch.no_grad()
def features(
    model: torch.nn.Module,
    tokenizer,
    texts: Sequence[str],
    *,
    batch_size: int = 32,
    max_length: int = 128,
) -> np.ndarray:
    """Mean-pooled last hidden states, one float32 row per text (model in eval mode)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rows = []
    try:
        for start in range(0, len(texts), batch_size):
            ids, mask = _batch(tokenizer, texts[start : start + batch_size], max_length, device)
            rows.append(_pooled(model, ids, mask).cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(rows, axis=0).astype(np.float32)


def _finetune_predict(
    model: torch.nn.Module,
    tokenizer,
    train: Sequence[tuple[str, int]],
    test_texts: Sequence[str],
    n_classes: int,
    *,
    seed: int,
    epochs: int,
    lr: float,
    batch_size: int,
    max_length: int,
) -> np.ndarray:
    """Fine-tune a copy of the model + a linear head on mean-pooled states (AdamW, seeded)."""
    import copy

    device = next(model.parameters()).device
    torch.manual_seed(seed)
    net = copy.deepcopy(model)
    hidden = net.config.hidden_size
    head = torch.nn.Linear(hidden, n_classes).to(device)
    params = [p for p in net.parameters()] + list(head.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(train), generator=gen).tolist()
        for start in range(0, len(order), batch_size):
            chunk = [train[k] for k in order[start : start + batch_size]]
            ids, mask = _batch(tokenizer, [t for t, _ in chunk], max_length, device)
            y = torch.tensor([c for _, c in chunk], device=device)
            loss = torch.nn.functional.cross_entropy(head(_pooled(net, ids, mask)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    net.eval()
    preds = []
    with torch.no_grad():
        for start in range(0, len(test_texts), batch_size):
            ids, mask = _batch(
                tokenizer, test_texts[start : start + batch_size], max_length, device
            )
            preds.append(head(_pooled(net, ids, mask)).argmax(-1).cpu().numpy())
    del net
    return np.concatenate(preds)


def probe(
    model_or_dir: torch.nn.Module | str | Path,
    tokenizer,
    examples: Sequence[Example],
    *,
    mode: str = "linear",
    seed: int = 0,
    test_fraction: float = 0.3,
    batch_size: int = 32,
    max_length: int = 128,
    max_iter: int = 1000,
    C: float = 1.0,
    epochs: int = 3,
    lr: float = 1e-4,
    device: str = "auto",
) -> dict:
    """Train a classifier on a stratified train split; score the held-out rest.

    ``mode="linear"`` (default): logistic regression on frozen mean-pooled features.
    ``mode="finetune"``: a copy of the model + a linear head trained ``epochs`` epochs with
    AdamW at ``lr`` (seeded; the caller's model is left untouched).

    ``model_or_dir``: a loaded model (used on its current device) or an HF checkpoint
    directory (loaded on ``device``, cuda > cpu; ``tokenizer=None`` loads its tokenizer).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if mode not in ("linear", "finetune"):
        raise ConfigError(f"end-task mode must be 'linear' or 'finetune', got {mode!r}")
    validate_examples(examples)
    train, test = split_examples(examples, test_fraction=test_fraction, seed=seed)
    if isinstance(model_or_dir, torch.nn.Module):
        model = model_or_dir
    else:
        from das_engine.bases import load_model, load_tokenizer
        from das_engine.distributed import device as pick_device

        model = load_model(model_or_dir).to(pick_device(device))
        if tokenizer is None:
            tokenizer = load_tokenizer(model_or_dir)
    if tokenizer is None:
        raise ConfigError("a tokenizer is needed to probe a loaded model")
    classes = sorted({str(ex.label) for ex in examples})
    index = {c: k for k, c in enumerate(classes)}
    y_test = np.array([index[str(ex.label)] for ex in test])
    if mode == "finetune":
        pred = _finetune_predict(
            model,
            tokenizer,
            [(ex.text, index[str(ex.label)]) for ex in train],
            [ex.text for ex in test],
            len(classes),
            seed=seed,
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            max_length=max_length,
        )
    else:
        kw = {"batch_size": batch_size, "max_length": max_length}
        x_train = features(model, tokenizer, [ex.text for ex in train], **kw)
        x_test = features(model, tokenizer, [ex.text for ex in test], **kw)
        y_train = np.array([index[str(ex.label)] for ex in train])
        clf = make_pipeline(
            StandardScaler(), LogisticRegression(C=C, max_iter=max_iter, random_state=seed)
        )
        clf.fit(x_train, y_train)
        pred = clf.predict(x_test)
    return {
        "accuracy": float(accuracy_score(y_test, pred)),
        "macro_f1": float(
            f1_score(
                y_test, pred, average="macro", labels=list(range(len(classes))), zero_division=0
            )
        ),
        "n_train": len(train),
        "n_test": len(test),
        "n_classes": len(classes),
        "mode": mode,
    }


# -- the lineage's end-task matrix -----------------------------------------------------------


def _neg(M: list[list[float | None]]) -> list[list[float | None]]:
    return [[None if x is None else -x for x in row] for row in M]


def summarize_scores(
    domains: list[str],
    task_names: list[str],
    base_row: list[float | None],
    stage_rows: list[list[float | None]],
) -> dict:
    """FR/BWT/FWT/max-forgetting of a higher-is-better score matrix.

    Column i of the square matrix is the task named like stage i's domain (None when no
    such task was given). The metrics functions treat lower as better, so they get the
    negated matrix: forgetting = A[i][i] - A[T-1][i], bwt = -forgetting, fwt =
    A[i-1][i] - base[i] (positive = earlier stages already helped).
    """
    col = {name: k for k, name in enumerate(task_names)}
    square = [[row[col[d]] if d in col else None for d in domains] for row in stage_rows]
    base = [base_row[col[d]] if d in col else None for d in domains]
    neg = _neg(square)
    neg_base = [None if x is None else -x for x in base]
    fr = cl_metrics.forgetting_rate(neg)
    return {
        "aligned_tasks": [d for d in domains if d in col],
        "forgetting_rate": fr,
        "bwt": cl_metrics.backward_transfer(neg),
        "fwt": cl_metrics.forward_transfer(neg, neg_base),
        "max_forgetting": cl_metrics.max_forgetting(neg),
        "final_mean": _mean_ok(stage_rows[-1]) if stage_rows else None,
    }


def _mean_ok(xs: Sequence[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return sum(vals) / len(vals) if vals else None


def _settings_key(settings: dict) -> str:
    blob = json.dumps(settings, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def end_task_matrix(
    lineage,
    tasks: dict[str, Path],
    *,
    progress: Callable[[str], None] | None = None,
    **probe_settings,
) -> dict:
    """Probe the base and every stage on every task; store and return both matrices.

    Rows: ``base`` then one per stage; columns: the tasks in the given order. Cells already
    in ``<lineage>/end_task/matrix.json`` for the same stage, task file sha256 and probe
    settings are reused, and the file is rewritten after each new cell, so an interrupted
    run keeps what it computed.
    """
    from das_engine.bases import load_model, load_tokenizer
    from das_engine.distributed import device as pick_device
    from das_engine.lineage import sha256_file

    if not tasks:
        raise ConfigError("at least one labelled task is needed")
    settings = {"mode": "linear", "seed": 0, "test_fraction": 0.3, **probe_settings}
    skey = _settings_key(settings)
    store_path = Path(lineage.path) / MATRIX_FILE
    stored = read_json(store_path) if store_path.exists() else {}
    if stored.get("format") != FORMAT_VERSION:
        stored = {}
    cells: dict = stored.get("cells", {})
    task_names = list(tasks)
    examples = {name: load_task(Path(path)) for name, path in tasks.items()}  # fail fast
    shas = {name: sha256_file(Path(path)) for name, path in tasks.items()}
    doc = {
        "format": FORMAT_VERSION,
        "tasks": {n: {"path": str(p), "sha256": shas[n]} for n, p in tasks.items()},
        "cells": cells,
        "latest": stored.get("latest"),
    }
    stages = lineage.stages
    rows = [("base", lineage.base_dir)] + [(s.dir.name, s.model_dir) for s in stages]
    computed = 0
    acc: list[list[float | None]] = []
    f1: list[list[float | None]] = []
    for row_key, model_dir in rows:
        model = tokenizer = None
        for name in task_names:
            key = f"{row_key}|{shas[name]}|{skey}"
            if key not in cells:
                if model is None:
                    model = load_model(model_dir).to(pick_device(settings.get("device", "auto")))
                    tokenizer = load_tokenizer(model_dir)
                if progress:
                    progress(f"probing {row_key} on {name}")
                cells[key] = {
                    **probe(model, tokenizer, examples[name], **settings),
                    "row": row_key,
                    "task": name,
                }
                computed += 1
                write_json(store_path, doc)
        del model
        acc.append([cells[f"{row_key}|{shas[n]}|{skey}"]["accuracy"] for n in task_names])
        f1.append([cells[f"{row_key}|{shas[n]}|{skey}"]["macro_f1"] for n in task_names])
    domains = [s.name for s in stages]
    result = {
        "rows": ["base"] + domains,
        "tasks": task_names,
        "accuracy": acc,
        "macro_f1": f1,
        "settings": settings,
        "summary": {
            "accuracy": summarize_scores(domains, task_names, acc[0], acc[1:]),
            "macro_f1": summarize_scores(domains, task_names, f1[0], f1[1:]),
        },
    }
    doc["latest"] = result
    write_json(store_path, doc)
    return {**result, "computed": computed}


def stored_matrix(lineage) -> dict | None:
    """The last end-task result written for this lineage (None if never evaluated)."""
    path = Path(lineage.path) / MATRIX_FILE
    if not path.exists():
        return None
    return read_json(path).get("latest")
