"""Corpus files -> validated documents -> tokenized, chunked, memory-mapped datasets.

Formats (optionally gzip-compressed, detected by magic bytes):
- ``.txt``: documents are blocks separated by one or more blank lines; a file with no
  blank line at all is read as one document per non-empty line.
- ``.jsonl``: one JSON object per line with a string field ``"text"``.

The held-out split is deterministic: a document goes to evaluation when a hash of
(seed, document number) falls under ``eval_fraction``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from das_engine.errors import CorpusError

GZIP_MAGIC = b"\x1f\x8b"
MAX_PROBLEMS = 20


def is_gzip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == GZIP_MAGIC


def corpus_format(path: Path) -> str:
    name = Path(path).name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    return "jsonl" if name.endswith((".jsonl", ".json", ".ndjson")) else "txt"


class _CappedReader(io.RawIOBase):
    """Stops a decompression bomb: raises once more than ``limit`` bytes came out."""

    def __init__(self, raw, limit: int | None) -> None:
        self.raw, self.limit, self.count = raw, limit, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self.raw.readinto(b)
        self.count += n
        if self.limit is not None and self.count > self.limit:
            raise CorpusError(f"corpus expands to more than {self.limit} bytes when decompressed")
        return n


def _open_bytes(path: Path, max_uncompressed_bytes: int | None) -> io.BufferedReader:
    raw = gzip.open(path, "rb") if is_gzip(path) else open(path, "rb")  # noqa: SIM115
    return io.BufferedReader(_CappedReader(raw, max_uncompressed_bytes), buffer_size=1 << 16)


@dataclass
class CorpusReport:
    """What validation found; ``problems`` name the line where one applies."""

    format: str
    documents: int = 0
    characters: int = 0
    lines: int = 0
    compressed: bool = False
    problems: list[dict] = field(default_factory=list)
    problem_count: int = 0

    @property
    def ok(self) -> bool:
        return self.problem_count == 0

    def add(self, line: int | None, message: str) -> None:
        self.problem_count += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append({"line": line, "message": message})

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        return d


def _iter_lines(fh, report: CorpusReport, max_line_chars: int) -> Iterator[tuple[int, str | None]]:
    """Yield (line number, text or None when the line is unusable), recording problems."""
    number = 0
    while True:
        raw = fh.readline(max_line_chars * 4 + 2)
        if not raw:
            return
        number += 1
        if not raw.endswith(b"\n") and len(raw) > max_line_chars * 4:
            report.add(number, f"line longer than {max_line_chars} characters")
            while raw and not raw.endswith(b"\n"):  # skip the rest of the line
                raw = fh.readline(1 << 20)
            yield number, None
            continue
        if b"\x00" in raw:
            report.add(number, "binary data (NUL byte): not a text corpus")
            yield number, None
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            report.add(number, f"not valid UTF-8 (byte {exc.start})")
            yield number, None
            continue
        text = text.rstrip("\r\n")
        if number == 1 and text.startswith("\ufeff"):  # a byte-order mark (Windows editors)
            text = text[1:]
        if len(text) > max_line_chars:
            report.add(number, f"line longer than {max_line_chars} characters")
            yield number, None
            continue
        yield number, text


def _documents(path: Path, report: CorpusReport, max_line_chars: int, max_bytes: int | None):
    """Yield documents while filling ``report``; shared by validation and tokenization."""
    fmt = report.format
    with _open_bytes(path, max_bytes) as fh:
        if fmt == "jsonl":
            for number, line in _iter_lines(fh, report, max_line_chars):
                report.lines = number
                if line is None or not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    report.add(number, f"malformed JSON: {exc.msg} (column {exc.colno})")
                    continue
                if not isinstance(obj, dict) or "text" not in obj:
                    report.add(number, 'missing "text" field')
                    continue
                if not isinstance(obj["text"], str):
                    report.add(number, '"text" must be a string')
                    continue
                if obj["text"].strip():
                    yield obj["text"]
            return
        # txt: blank-line-separated blocks; with no blank line at all, one doc per line
        block: list[str] = []
        saw_blank = False
        for number, line in _iter_lines(fh, report, max_line_chars):
            report.lines = number
            if line is None:
                continue
            if not line.strip():
                saw_blank = True
                if block:
                    yield "\n".join(block)
                    block = []
                continue
            block.append(line)
        if block:
            if saw_blank:
                yield "\n".join(block)
            else:
                yield from block


def iter_documents(path: Path, *, max_line_chars: int = 1_000_000) -> Iterator[str]:
    """The documents of a corpus file; raises ``CorpusError`` on the first problem."""
    report = CorpusReport(format=corpus_format(path), compressed=is_gzip(path))
    for doc in _documents(Path(path), report, max_line_chars, None):
        if not report.ok:
            break
        yield doc
    if not report.ok:
        p = report.problems[0]
        where = f"line {p['line']}: " if p["line"] else ""
        raise CorpusError(f"{Path(path).name}: {where}{p['message']}", details=report.problems)


def validate_corpus(
    path: Path, *, max_line_chars: int = 1_000_000, max_uncompressed_bytes: int | None = None
) -> CorpusReport:
    """Read the whole corpus once and report every problem (capped at 20 listed)."""
    path = Path(path)
    report = CorpusReport(format=corpus_format(path))
    try:
        report.compressed = is_gzip(path)
        for doc in _documents(path, report, max_line_chars, max_uncompressed_bytes):
            report.documents += 1
            report.characters += len(doc)
    except CorpusError as exc:
        report.add(None, exc.message)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        report.add(None, f"cannot read the file: {exc}")
    if report.ok and report.documents == 0:
        report.add(None, "the corpus is empty or holds only whitespace")
    return report


# -- tokenization ------------------------------------------------------------------------


def _held_out(seed: int, doc_number: int, fraction: float) -> bool:
    digest = hashlib.sha256(f"{seed}:{doc_number}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


class Chunker:
    """Concatenates documents (a separator between them) and cuts fixed-size chunks,
    tokenizing 256 documents at a time; memory stays bounded whatever the corpus size."""

    def __init__(self, tokenizer, block_size: int, objective: str) -> None:
        self.tokenizer = tokenizer
        self.block_size = block_size
        bos = (
            tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
        )
        sep = (
            tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
        )
        self.bos, self.sep = bos, sep
        self.wrap = objective == "mlm" and bos is not None and sep is not None
        self.body = block_size - 2 if self.wrap else block_size
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (sep or 0)
        self.buffer: list[int] = []
        self.pending: list[str] = []

    def _emit(self, ids: list[int]) -> dict:
        ids = [self.bos, *ids, self.sep] if self.wrap else ids
        n = len(ids)
        return {
            "input_ids": ids + [self.pad] * (self.block_size - n),
            "attention_mask": [1] * n + [0] * (self.block_size - n),
        }

    def _flush(self) -> Iterator[dict]:
        if self.pending:
            for ids in self.tokenizer(self.pending, add_special_tokens=False)["input_ids"]:
                self.buffer.extend(ids)
                if self.sep is not None:
                    self.buffer.append(self.sep)
            self.pending = []
        while len(self.buffer) >= self.body:
            yield self._emit(self.buffer[: self.body])
            del self.buffer[: self.body]

    def feed(self, doc: str) -> Iterator[dict]:
        self.pending.append(doc)
        if len(self.pending) >= 256:
            yield from self._flush()

    def finish(self) -> Iterator[dict]:
        yield from self._flush()
        if self.buffer and any(t != self.sep for t in self.buffer):
            yield self._emit(self.buffer)
        self.buffer = []


def _chunks(tokenizer, docs, block_size: int, objective: str) -> Iterator[dict]:
    chunker = Chunker(tokenizer, block_size, objective)
    for doc in docs:
        yield from chunker.feed(doc)
    yield from chunker.finish()


class SplitWriter:
    """Streams chunks into one Arrow file that ``ChunkStore`` memory-maps."""

    FILE = "chunks.arrow"

    def __init__(self, target: Path) -> None:
        import pyarrow as pa

        self.pa = pa
        target = Path(target)
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        self.schema = pa.schema(
            [("input_ids", pa.list_(pa.int32())), ("attention_mask", pa.list_(pa.int8()))]
        )
        self.sink = pa.OSFile(str(target / self.FILE), "wb")
        self.writer = pa.ipc.new_stream(self.sink, self.schema)
        self.rows: list[dict] = []
        self.chunks = 0
        self.tokens = 0

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.chunks += 1
        self.tokens += sum(row["attention_mask"])
        if len(self.rows) >= 1024:
            self._write()

    def _write(self) -> None:
        if self.rows:
            self.writer.write_batch(self.pa.RecordBatch.from_pylist(self.rows, schema=self.schema))
            self.rows = []

    def close(self) -> None:
        self._write()
        self.writer.close()
        self.sink.close()


def build_datasets(
    corpus: Path,
    tokenizer,
    out_dir: Path,
    *,
    block_size: int,
    objective: str,
    eval_fraction: float,
    seed: int,
    max_line_chars: int = 1_000_000,
) -> dict[str, int]:
    """Tokenize ``corpus`` into ``out_dir/train`` and ``out_dir/eval`` in one streaming pass.

    Returns the chunk and token counts. Raises ``CorpusError`` for an unusable corpus.
    """
    out_dir = Path(out_dir)
    writers = {"train": SplitWriter(out_dir / "train"), "eval": SplitWriter(out_dir / "eval")}
    chunkers = {k: Chunker(tokenizer, block_size, objective) for k in writers}
    n_docs = 0
    try:
        for i, doc in enumerate(iter_documents(corpus, max_line_chars=max_line_chars)):
            n_docs += 1
            split = "eval" if _held_out(seed, i, eval_fraction) else "train"
            for row in chunkers[split].feed(doc):
                writers[split].add(row)
        for split, chunker in chunkers.items():
            for row in chunker.finish():
                writers[split].add(row)
    finally:
        for w in writers.values():
            w.close()
    if n_docs == 0:
        raise CorpusError(f"{Path(corpus).name}: the corpus is empty or holds only whitespace")
    if writers["train"].chunks and writers["eval"].chunks:
        return _counts(writers)
    # too few documents for a document-level split (so the corpus is small): hold out
    # every k-th chunk instead
    rows = list(_chunks(tokenizer, iter_documents(corpus), block_size, objective))
    if len(rows) < 2:
        raise CorpusError(
            f"{Path(corpus).name}: too little text: it must fill at least two chunks of "
            f"{block_size} tokens (one to train on, one to evaluate)"
        )
    k = min(max(2, round(1 / eval_fraction)), len(rows))  # every split gets >= 1 chunk
    picked = {"eval": rows[k - 1 :: k], "train": [r for j, r in enumerate(rows) if (j + 1) % k]}
    for split, split_rows in picked.items():
        writers[split] = write_rows(split_rows, out_dir / split)
    return _counts(writers)


def write_rows(rows, target: Path) -> SplitWriter:
    writer = SplitWriter(target)
    try:
        for row in rows:
            writer.add(row)
    finally:
        writer.close()
    return writer


def _counts(writers: dict[str, SplitWriter]) -> dict[str, int]:
    out = {}
    for split, w in writers.items():
        out[f"{split}_chunks"] = w.chunks
        out[f"{split}_tokens"] = w.tokens
    return out


def build_single_split(
    corpus: Path, tokenizer, target: Path, *, block_size: int, objective: str, split: str = "eval"
) -> dict[str, int]:
    """Tokenize a whole corpus into one split (a separate evaluation or general corpus)."""
    writer = write_rows(_chunks(tokenizer, iter_documents(corpus), block_size, objective), target)
    if writer.chunks == 0:
        raise CorpusError(f"{Path(corpus).name}: the corpus is empty or holds only whitespace")
    return _counts({split: writer})


class ChunkStore:
    """A memory-mapped split, read as tensors by row indices."""

    def __init__(self, path: Path) -> None:
        from datasets import Dataset

        self.dataset = Dataset.from_file(str(Path(path) / SplitWriter.FILE)).with_format("numpy")

    def __len__(self) -> int:
        return len(self.dataset)

    def rows(self, indices) -> dict:
        import torch

        batch = self.dataset[[int(i) for i in indices]]
        return {
            "input_ids": torch.from_numpy(np.asarray(batch["input_ids"], dtype=np.int64)),
            "attention_mask": torch.from_numpy(np.asarray(batch["attention_mask"], dtype=np.int64)),
        }
