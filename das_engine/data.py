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
import multiprocessing as mp
import os
import shutil
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from das_engine.errors import ConfigError, CorpusError

GZIP_MAGIC = b"\x1f\x8b"
MAX_PROBLEMS = 20
#: a txt corpus's first block may grow to this many characters before the reader looks
#: ahead for a blank line (none: one document per line, streamed)
LOOKAHEAD_CHARS = 8 << 20


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
        block_chars = 0
        has_blank = False  # the file holds a blank line (seen, or found ahead)
        lines_mode = False  # decided: the file has no blank line, so each line is a doc
        for number, line in _iter_lines(fh, report, max_line_chars):
            report.lines = number
            if line is None:
                continue
            if lines_mode:
                yield line
                continue
            if not line.strip():
                has_blank = True
                if block:
                    yield "\n".join(block)
                    block, block_chars = [], 0
                continue
            block.append(line)
            block_chars += len(line)
            if not has_blank and block_chars > LOOKAHEAD_CHARS:
                # memory must not grow with a one-document-per-line corpus: look ahead once
                # for a blank line instead of holding the whole file
                if not _has_blank_line(path, fmt, max_line_chars, max_bytes):
                    lines_mode = True
                    yield from block
                    block, block_chars = [], 0
                has_blank = not lines_mode  # else a blank line lies ahead
        if block:
            if has_blank:
                yield "\n".join(block)
            else:
                yield from block


def _has_blank_line(path: Path, fmt: str, max_line_chars: int, max_bytes: int | None) -> bool:
    """Whether a txt corpus holds a blank line (same reading rules, problems not kept)."""
    scratch = CorpusReport(format=fmt)
    with _open_bytes(path, max_bytes) as fh:
        return any(
            line is not None and not line.strip()
            for _, line in _iter_lines(fh, scratch, max_line_chars)
        )


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

#: documents per tokenizer call, and a cap on their characters (a batch of huge documents
#: stays one document); neither changes the output, only memory and parallel granularity
BATCH_DOCS = 256
BATCH_CHARS = 1 << 20
#: below this corpus size (bytes on disk, gzip counted x4) tokenization stays in-process:
#: starting worker processes costs more than it saves
PARALLEL_MIN_BYTES = 16 << 20
NUM_PROC_ENV = "DAS_TOKENIZE_PROCS"


def _held_out(seed: int, doc_number: int, fraction: float) -> bool:
    digest = hashlib.sha256(f"{seed}:{doc_number}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_num_proc(corpus: Path | None) -> int:
    """Tokenizer processes for ``corpus``: ``$DAS_TOKENIZE_PROCS`` when set, else 1 for a
    small corpus and ``min(4, CPUs)`` for a large one (>= 16 MiB)."""
    env = os.environ.get(NUM_PROC_ENV, "").strip()
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise ConfigError(f"{NUM_PROC_ENV} must be an integer, got {env!r}") from None
    if corpus is None:
        return 1
    size = Path(corpus).stat().st_size
    if is_gzip(Path(corpus)):
        size *= 4
    return 1 if size < PARALLEL_MIN_BYTES else min(4, _cpu_count())


def _batches(docs: Iterable[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if len(batch) >= BATCH_DOCS or chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _encode(tokenizer, docs: list[str]) -> list[np.ndarray]:
    """Each document's token ids, no special tokens (the chunker adds them)."""
    ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
    return [np.asarray(x, dtype=np.int32) for x in ids]


_WORKER_TOKENIZER = None


def _worker_init(tokenizer) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer


def _worker_encode(docs: list[str]) -> list[np.ndarray]:
    return _encode(_WORKER_TOKENIZER, docs)


def encode_batches(docs: Iterable[str], tokenizer, num_proc: int = 1) -> Iterator[list[np.ndarray]]:
    """Token ids of ``docs`` in order, one list per batch of documents.

    With ``num_proc > 1`` the batches are tokenized by a pool of worker processes; at most
    ``2 * num_proc`` batches are in flight, so memory does not grow with the corpus, and
    results come back in document order, so the output is the same as in one process.
    """
    if num_proc <= 1 or mp.current_process().daemon:  # a daemon may not start children
        for batch in _batches(docs):
            yield _encode(tokenizer, batch)
        return
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    # the workers tokenize one batch each, single-threaded; setting the variable also
    # keeps the Rust tokenizer from warning about the fork
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    pool = ProcessPoolExecutor(
        num_proc,
        mp_context=mp.get_context(method),
        initializer=_worker_init,
        initargs=(tokenizer,),
    )
    try:
        window: deque = deque()
        for batch in _batches(docs):
            window.append(pool.submit(_worker_encode, batch))
            if len(window) >= 2 * num_proc:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved


@dataclass
class ChunkBlock:
    """Consecutive chunks as two [n, block_size] arrays."""

    input_ids: np.ndarray  # int32
    attention_mask: np.ndarray  # int8

    def __len__(self) -> int:
        return len(self.input_ids)

    def rows(self) -> Iterator[dict]:
        for ids, mask in zip(self.input_ids.tolist(), self.attention_mask.tolist(), strict=True):
            yield {"input_ids": ids, "attention_mask": mask}


class Chunker:
    """Concatenates documents (a separator after each) and cuts fixed-size chunks; with
    the MLM objective each chunk is wrapped as ``<s> ... </s>``; the last partial chunk is
    padded (and dropped when it holds only separators).

    Linear in the corpus: tokens wait in a list of arrays and are concatenated only once
    enough for a chunk have arrived; the leftover (< one chunk) is carried over. So every
    token is copied a bounded number of times; ``copied`` counts those copies.
    """

    def __init__(self, tokenizer, block_size: int, objective: str) -> None:
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
        self._sep = np.asarray([] if sep is None else [sep], dtype=np.int32)
        self.carry = np.zeros(0, dtype=np.int32)
        self.pending: list[np.ndarray] = []
        self.waiting = 0  # tokens in carry + pending
        self.copied = 0

    def add(self, ids) -> None:
        """One document's token ids."""
        ids = np.asarray(ids, dtype=np.int32)
        self.pending.append(ids)
        self.waiting += len(ids)
        if len(self._sep):
            self.pending.append(self._sep)
            self.waiting += 1

    def take(self) -> ChunkBlock | None:
        """The full chunks that can be cut now (None when there are none)."""
        if self.waiting < self.body:
            return None
        stream = np.concatenate([self.carry, *self.pending])
        self.copied += len(stream)
        self.pending = []
        n = len(stream) // self.body
        self.carry = stream[n * self.body :].copy()
        self.copied += len(self.carry)
        self.waiting = len(self.carry)
        body = stream[: n * self.body].reshape(n, self.body)
        ids = np.empty((n, self.block_size), dtype=np.int32)
        if self.wrap:
            ids[:, 0], ids[:, 1:-1], ids[:, -1] = self.bos, body, self.sep
        else:
            ids[:] = body
        self.copied += ids.size
        return ChunkBlock(ids, np.ones((n, self.block_size), dtype=np.int8))

    def finish(self) -> Iterator[ChunkBlock]:
        """The remaining full chunks, then the padded last one."""
        block = self.take()
        if block is not None:
            yield block
        rest = np.concatenate([self.carry, *self.pending])
        self.carry, self.pending, self.waiting = np.zeros(0, dtype=np.int32), [], 0
        if len(rest) == 0 or (self.sep is not None and bool((rest == self.sep).all())):
            return
        if self.wrap:
            rest = np.concatenate([[self.bos], rest, [self.sep]]).astype(np.int32)
        n = len(rest)
        ids = np.full((1, self.block_size), self.pad, dtype=np.int32)
        ids[0, :n] = rest
        mask = np.zeros((1, self.block_size), dtype=np.int8)
        mask[0, :n] = 1
        self.copied += n
        yield ChunkBlock(ids, mask)


def chunk_blocks(
    docs: Iterable[str], tokenizer, block_size: int, objective: str, num_proc: int = 1
) -> Iterator[ChunkBlock]:
    """All of ``docs`` as one stream of chunks."""
    chunker = Chunker(tokenizer, block_size, objective)
    for encoded in encode_batches(docs, tokenizer, num_proc):
        for ids in encoded:
            chunker.add(ids)
        block = chunker.take()
        if block is not None:
            yield block
    yield from chunker.finish()


class SplitWriter:
    """Streams chunks into one Arrow file that ``ChunkStore`` memory-maps (record batches of
    ``BATCH_ROWS`` rows, then the remainder)."""

    FILE = "chunks.arrow"
    BATCH_ROWS = 1024

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
        self.blocks: list[ChunkBlock] = []
        self.buffered = 0
        self.chunks = 0
        self.tokens = 0

    def add(self, row: dict) -> None:
        """One chunk as lists (``input_ids``, ``attention_mask``)."""
        self.add_block(
            ChunkBlock(
                np.asarray([row["input_ids"]], dtype=np.int32),
                np.asarray([row["attention_mask"]], dtype=np.int8),
            )
        )

    def add_block(self, block: ChunkBlock) -> None:
        self.blocks.append(block)
        self.buffered += len(block)
        self.chunks += len(block)
        self.tokens += int(block.attention_mask.sum(dtype=np.int64))
        if self.buffered >= self.BATCH_ROWS:
            self._write(final=False)

    def _write(self, final: bool) -> None:
        if not self.blocks:
            return
        ids = np.concatenate([b.input_ids for b in self.blocks])
        mask = np.concatenate([b.attention_mask for b in self.blocks])
        full = len(ids) if final else len(ids) // self.BATCH_ROWS * self.BATCH_ROWS
        for start in range(0, full, self.BATCH_ROWS):
            end = min(start + self.BATCH_ROWS, full)
            self.writer.write_batch(self._batch(ids[start:end], mask[start:end]))
        self.blocks = [ChunkBlock(ids[full:], mask[full:])] if full < len(ids) else []
        self.buffered = len(ids) - full

    def _batch(self, ids: np.ndarray, mask: np.ndarray):
        pa = self.pa
        n, width = ids.shape
        offsets = pa.array(np.arange(0, (n + 1) * width, width, dtype=np.int32))
        return pa.RecordBatch.from_arrays(
            [
                pa.ListArray.from_arrays(offsets, pa.array(ids.reshape(-1))),
                pa.ListArray.from_arrays(offsets, pa.array(mask.reshape(-1))),
            ],
            schema=self.schema,
        )

    def close(self) -> None:
        self._write(final=True)
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
    num_proc: int | None = None,
) -> dict[str, int]:
    """Tokenize ``corpus`` into ``out_dir/train`` and ``out_dir/eval`` in one streaming pass.

    ``num_proc`` tokenizer processes (None: ``default_num_proc``); the output does not
    depend on it. Returns the chunk and token counts. Raises ``CorpusError`` for an
    unusable corpus.
    """
    out_dir = Path(out_dir)
    procs = default_num_proc(corpus) if num_proc is None else max(1, num_proc)
    writers = {"train": SplitWriter(out_dir / "train"), "eval": SplitWriter(out_dir / "eval")}
    chunkers = {k: Chunker(tokenizer, block_size, objective) for k in writers}
    docs_in = {k: 0 for k in writers}
    n_docs = 0
    try:
        docs = iter_documents(corpus, max_line_chars=max_line_chars)
        for encoded in encode_batches(docs, tokenizer, procs):
            for ids in encoded:
                split = "eval" if _held_out(seed, n_docs, eval_fraction) else "train"
                chunkers[split].add(ids)
                docs_in[split] += 1
                n_docs += 1
            for split, chunker in chunkers.items():
                block = chunker.take()
                if block is not None:
                    writers[split].add_block(block)
        for split, chunker in chunkers.items():
            for block in chunker.finish():
                writers[split].add_block(block)
    finally:
        for w in writers.values():
            w.close()
    if n_docs == 0:
        raise CorpusError(f"{Path(corpus).name}: the corpus is empty or holds only whitespace")
    if writers["train"].chunks and writers["eval"].chunks:
        return _counts(writers)

    # too few documents for a document-level split (so the corpus is small, or a few huge
    # documents): hold out every k-th chunk of the whole stream instead. When one split got
    # every document its store *is* that stream, read back rather than tokenized again.
    whole = [s for s in writers if docs_in[s] == n_docs]
    source = out_dir / f".{whole[0]}.all" if whole else None
    if source is not None:
        if source.exists():
            shutil.rmtree(source)
        (out_dir / whole[0]).rename(source)
        total = writers[whole[0]].chunks
    else:  # documents without any token went to the other split: count the stream
        total = sum(
            len(b) for b in _stream(corpus, tokenizer, block_size, objective, procs, max_line_chars)
        )
    try:
        if total < 2:
            raise CorpusError(
                f"{Path(corpus).name}: too little text: it must fill at least two chunks of "
                f"{block_size} tokens (one to train on, one to evaluate)"
            )
        k = min(max(2, round(1 / eval_fraction)), total)  # every split gets >= 1 chunk
        blocks = (
            read_blocks(source)
            if source is not None
            else _stream(corpus, tokenizer, block_size, objective, procs, max_line_chars)
        )
        writers = {"train": SplitWriter(out_dir / "train"), "eval": SplitWriter(out_dir / "eval")}
        first = 0  # number of the block's first chunk in the stream
        try:
            for block in blocks:
                held = (np.arange(first, first + len(block)) + 1) % k == 0
                first += len(block)
                for split, pick in (("eval", held), ("train", ~held)):
                    if pick.any():
                        writers[split].add_block(
                            ChunkBlock(block.input_ids[pick], block.attention_mask[pick])
                        )
        finally:
            for w in writers.values():
                w.close()
    finally:
        if source is not None:
            shutil.rmtree(source, ignore_errors=True)
    return _counts(writers)


def _stream(corpus, tokenizer, block_size: int, objective: str, procs: int, max_line_chars: int):
    docs = iter_documents(corpus, max_line_chars=max_line_chars)
    return chunk_blocks(docs, tokenizer, block_size, objective, procs)


def read_blocks(split_dir: Path) -> Iterator[ChunkBlock]:
    """The chunks of a written split, one ``ChunkBlock`` per Arrow record batch."""
    import pyarrow as pa

    with pa.memory_map(str(Path(split_dir) / SplitWriter.FILE)) as source:
        for batch in pa.ipc.open_stream(source):
            n = batch.num_rows
            ids = batch.column(0).flatten().to_numpy().reshape(n, -1)
            mask = batch.column(1).flatten().to_numpy().reshape(n, -1)
            yield ChunkBlock(ids.astype(np.int32), mask.astype(np.int8))


def write_rows(rows, target: Path) -> SplitWriter:
    """Write chunks given as dicts of lists (or ``ChunkBlock`` objects) to ``target``."""
    writer = SplitWriter(target)
    try:
        for row in rows:
            if isinstance(row, ChunkBlock):
                writer.add_block(row)
            else:
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
    corpus: Path,
    tokenizer,
    target: Path,
    *,
    block_size: int,
    objective: str,
    split: str = "eval",
    num_proc: int | None = None,
) -> dict[str, int]:
    """Tokenize a whole corpus into one split (a separate evaluation or general corpus)."""
    procs = default_num_proc(corpus) if num_proc is None else max(1, num_proc)
    blocks = chunk_blocks(iter_documents(corpus), tokenizer, block_size, objective, procs)
    writer = write_rows(blocks, target)
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
