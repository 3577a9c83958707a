"""A cheap check, before a lineage is stored, that a local base model directory holds what
training will load: readable weights (each safetensors file's header parsed and its size
checked against the tensors it declares, no tensor read) and a tokenizer. The engine only
reads the config at that point; without this, a folder with missing or truncated weights
would be accepted and fail later, in the job."""

from __future__ import annotations

import json
import struct
from pathlib import Path

WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
TOKENIZER = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)
MAX_HEADER_BYTES = 100 << 20


def _safetensors_problem(path: Path) -> str | None:
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                return f"{path.name} is truncated"
            (length,) = struct.unpack("<Q", raw)
            if length > min(MAX_HEADER_BYTES, size - 8):
                return f"{path.name} is truncated or not a safetensors file"
            header = json.loads(fh.read(length))
        end = max(
            (int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"),
            default=0,
        )
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return f"{path.name} is not a readable safetensors file"
    if 8 + length + end > size:
        return f"{path.name} is truncated ({size} bytes, its header needs {8 + length + end})"
    return None


def model_files_problem(directory: Path) -> str | None:
    """Why ``directory`` cannot be trained from, or None when its files look complete."""
    names = {p.name for p in directory.iterdir()} if directory.is_dir() else set()
    if not any(w in names for w in WEIGHTS) and "pytorch_model.bin.index.json" not in names:
        return "no model weights (model.safetensors or pytorch_model.bin)"
    shards: list[str] = []
    if "model.safetensors" in names:
        shards = ["model.safetensors"]
    elif "model.safetensors.index.json" in names:
        try:
            index = json.loads((directory / "model.safetensors.index.json").read_text())
            shards = sorted(set(index["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError):
            return "model.safetensors.index.json is not readable"
    for shard in shards:
        if "/" in shard or "\\" in shard or shard not in names:
            return f"weight file {shard} is missing"
        problem = _safetensors_problem(directory / shard)
        if problem:
            return problem
    if not any(t in names for t in TOKENIZER):
        return "no tokenizer files (tokenizer.json or a vocabulary)"
    return None
