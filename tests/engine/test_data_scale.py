"""Corpus-scale data path: linear chunking, parallel tokenization, streaming line-per-doc
reading; and, above all, the same stores as the implementation it replaced.

The reference below is a copy of the previous chunker and writer (list buffer cut with
``del buffer[:n]``, rows written with ``RecordBatch.from_pylist``), kept only to compare.
"""

from __future__ import annotations

import gzip
import json
import random
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from das_engine import data
from das_engine.data import (
    Chunker,
    ChunkStore,
    SplitWriter,
    build_datasets,
    build_single_split,
    chunk_blocks,
    default_num_proc,
    encode_batches,
    iter_documents,
)
from das_engine.errors import ConfigError

from .conftest import COOKING, LEGAL, write_corpus

# -- the previous implementation, verbatim in behaviour ----------------------------------


class LegacyChunker:
    def __init__(self, tokenizer, block_size, objective):
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
        self.buffer, self.pending = [], []

    def _emit(self, ids):
        ids = [self.bos, *ids, self.sep] if self.wrap else ids
        n = len(ids)
        return {
            "input_ids": ids + [self.pad] * (self.block_size - n),
            "attention_mask": [1] * n + [0] * (self.block_size - n),
        }

    def _flush(self):
        if self.pending:
            for ids in self.tokenizer(self.pending, add_special_tokens=False)["input_ids"]:
                self.buffer.extend(ids)
                if self.sep is not None:
                    self.buffer.append(self.sep)
            self.pending = []
        while len(self.buffer) >= self.body:
            yield self._emit(self.buffer[: self.body])
            del self.buffer[: self.body]

    def feed(self, doc):
        self.pending.append(doc)
        if len(self.pending) >= 256:
            yield from self._flush()

    def finish(self):
        yield from self._flush()
        if self.buffer and any(t != self.sep for t in self.buffer):
            yield self._emit(self.buffer)
        self.buffer = []


def legacy_chunks(tokenizer, docs, block_size, objective):
    chunker = LegacyChunker(tokenizer, block_size, objective)
    for doc in docs:
        yield from chunker.feed(doc)
    yield from chunker.finish()


class LegacyWriter:
    def __init__(self, target):
        import pyarrow as pa

        self.pa = pa
        target.mkdir(parents=True)
        self.schema = pa.schema(
            [("input_ids", pa.list_(pa.int32())), ("attention_mask", pa.list_(pa.int8()))]
        )
        self.sink = pa.OSFile(str(target / SplitWriter.FILE), "wb")
        self.writer = pa.ipc.new_stream(self.sink, self.schema)
        self.rows, self.chunks, self.tokens = [], 0, 0

    def add(self, row):
        self.rows.append(row)
        self.chunks += 1
        self.tokens += sum(row["attention_mask"])
        if len(self.rows) >= 1024:
            self._write()

    def _write(self):
        if self.rows:
            self.writer.write_batch(self.pa.RecordBatch.from_pylist(self.rows, schema=self.schema))
            self.rows = []

    def close(self):
        self._write()
        self.writer.close()
        self.sink.close()


def legacy_build(corpus, tokenizer, out_dir, *, block_size, objective, eval_fraction, seed):
    writers = {"train": LegacyWriter(out_dir / "train"), "eval": LegacyWriter(out_dir / "eval")}
    chunkers = {k: LegacyChunker(tokenizer, block_size, objective) for k in writers}
    for i, doc in enumerate(iter_documents(corpus)):
        split = "eval" if data._held_out(seed, i, eval_fraction) else "train"
        for row in chunkers[split].feed(doc):
            writers[split].add(row)
    for split, chunker in chunkers.items():
        for row in chunker.finish():
            writers[split].add(row)
    for w in writers.values():
        w.close()
    if not (writers["train"].chunks and writers["eval"].chunks):
        import shutil

        rows = list(legacy_chunks(tokenizer, iter_documents(corpus), block_size, objective))
        k = min(max(2, round(1 / eval_fraction)), len(rows))
        picked = {"eval": rows[k - 1 :: k], "train": [r for j, r in enumerate(rows) if (j + 1) % k]}
        for split, split_rows in picked.items():
            shutil.rmtree(out_dir / split)
            writers[split] = LegacyWriter(out_dir / split)
            for r in split_rows:
                writers[split].add(r)
            writers[split].close()
    return {
        f"{s}_{what}": getattr(w, what) for s, w in writers.items() for what in ("chunks", "tokens")
    }


class IdTokenizer:
    """A document is its token ids written as text ("5 9 12"): any id stream can be fed."""

    def __init__(self, cls=None, sep=None, pad=None, bos=None, eos=None):
        self.cls_token_id, self.sep_token_id, self.pad_token_id = cls, sep, pad
        self.bos_token_id, self.eos_token_id = bos, eos

    def __call__(self, docs, add_special_tokens=False):
        assert not add_special_tokens
        return {"input_ids": [[int(t) for t in d.split() if t.isdigit()] for d in docs]}


def file_bytes(path):
    return (path / SplitWriter.FILE).read_bytes()


def assert_same_stores(new_dir, old_dir):
    for split in ("train", "eval"):
        assert file_bytes(new_dir / split) == file_bytes(old_dir / split), split


# -- identical output on the fixtures ------------------------------------------------------


def long_document(n_words: int, seed: int = 0) -> str:
    """One document (a block of lines, no blank line) of about ``n_words`` words."""
    rng = random.Random(seed)
    words = (LEGAL + COOKING).split()
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(n_words // 12)]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def fixture_corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("fixtures")
    out = {
        "legal_blocks": write_corpus(root / "legal.txt", LEGAL, docs=60),
        "cooking_blocks": write_corpus(root / "cooking.txt", COOKING, docs=300),
        "one_document": root / "short.txt",
        "lines": root / "lines.txt",
        "jsonl_gz": root / "mixed.jsonl.gz",
        "long_and_short": root / "long.txt",
    }
    out["one_document"].write_text(LEGAL * 2 + "\n")
    out["lines"].write_text("\n".join(LEGAL.split(". ")) + "\n")
    with gzip.open(out["jsonl_gz"], "wt") as fh:
        for i in range(700):  # > 2 tokenizer batches
            fh.write(json.dumps({"text": (LEGAL if i % 3 else COOKING)[i % 50 :]}) + "\n")
    out["long_and_short"].write_text(
        long_document(30_000) + "\n\n" + COOKING + "\n\n" + LEGAL + "\n"
    )
    return out


@pytest.mark.parametrize(
    "name",
    ["legal_blocks", "cooking_blocks", "one_document", "lines", "jsonl_gz", "long_and_short"],
)
@pytest.mark.parametrize(("objective", "block_size"), [("mlm", 32), ("clm", 24)])
def test_stores_are_byte_identical_to_the_previous_implementation(
    fixture_corpora, tokenizer, tmp_path, name, objective, block_size
):
    corpus = fixture_corpora[name]
    kw = dict(block_size=block_size, objective=objective, eval_fraction=0.2, seed=7)
    old = legacy_build(corpus, tokenizer, tmp_path / "old", **kw)
    new = build_datasets(corpus, tokenizer, tmp_path / "new", **kw, num_proc=1)
    assert new == old
    assert new["train_chunks"] > 0 and new["eval_chunks"] > 0
    assert_same_stores(tmp_path / "new", tmp_path / "old")
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["eval", "train"]
    # the separate evaluation / general corpus path cuts the same stream
    build_single_split(
        corpus, tokenizer, tmp_path / "single", block_size=block_size, objective=objective
    )
    rows = list(legacy_chunks(tokenizer, iter_documents(corpus), block_size, objective))
    store = ChunkStore(tmp_path / "single")
    assert len(store) == len(rows)
    got = store.rows(range(len(store)))
    assert got["input_ids"].tolist() == [r["input_ids"] for r in rows]
    assert got["attention_mask"].tolist() == [r["attention_mask"] for r in rows]


def test_more_than_one_arrow_batch_is_laid_out_as_before(tokenizer, tmp_path):
    """> 1024 chunks per split: record batches of 1024 rows then the rest, as before."""
    corpus = write_corpus(tmp_path / "big.txt", LEGAL + COOKING, docs=1200)
    kw = dict(block_size=16, objective="mlm", eval_fraction=0.3, seed=1)
    old = legacy_build(corpus, tokenizer, tmp_path / "old", **kw)
    assert old["train_chunks"] > 2048 and old["eval_chunks"] > 1024
    assert build_datasets(corpus, tokenizer, tmp_path / "new", **kw, num_proc=1) == old
    assert_same_stores(tmp_path / "new", tmp_path / "old")


def test_parallel_tokenization_gives_the_same_stores(fixture_corpora, tokenizer, tmp_path):
    corpus = fixture_corpora["jsonl_gz"]
    kw = dict(block_size=32, objective="mlm", eval_fraction=0.1, seed=3)
    one = build_datasets(corpus, tokenizer, tmp_path / "one", **kw, num_proc=1)
    two = build_datasets(corpus, tokenizer, tmp_path / "two", **kw, num_proc=2)
    assert one == two
    assert_same_stores(tmp_path / "two", tmp_path / "one")
    docs = list(iter_documents(corpus))
    serial = [ids for batch in encode_batches(docs, tokenizer, 1) for ids in batch]
    parallel = [ids for batch in encode_batches(iter(docs), tokenizer, 2) for ids in batch]
    assert len(serial) == len(parallel) == len(docs)
    assert all(np.array_equal(a, b) for a, b in zip(serial, parallel, strict=True))


def test_a_split_of_documents_without_tokens_falls_back_as_before(tmp_path):
    """A held-out document that tokenizes to nothing leaves that split empty: the every k-th
    chunk rule then applies to the stream of all documents (counted again)."""
    tok = IdTokenizer(cls=0, sep=2, pad=1)
    corpus = tmp_path / "c.txt"
    corpus.write_text(" ".join(str(5 + i % 40) for i in range(300)) + "\n\nnot-a-number\n")
    seed = next(
        s for s in range(100) if data._held_out(s, 1, 0.5) and not data._held_out(s, 0, 0.5)
    )
    kw = dict(block_size=16, objective="mlm", eval_fraction=0.5, seed=seed)
    old = legacy_build(corpus, tok, tmp_path / "old", **kw)
    assert old["eval_chunks"] > 0 and old["train_chunks"] > 0
    assert build_datasets(corpus, tok, tmp_path / "new", **kw, num_proc=1) == old
    assert_same_stores(tmp_path / "new", tmp_path / "old")
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["eval", "train"]


# -- the chunker against the reference on arbitrary id streams ------------------------------

TOKENIZERS = {
    "roberta-like": IdTokenizer(cls=0, sep=2, pad=1),
    "gpt2-like": IdTokenizer(bos=50, eos=50),
    "no-specials": IdTokenizer(),
    "sep-is-zero": IdTokenizer(cls=5, sep=0),
}


@settings(max_examples=150, deadline=None)
@given(
    docs=st.lists(st.lists(st.integers(0, 60), min_size=0, max_size=90), max_size=40),
    kind=st.sampled_from(sorted(TOKENIZERS)),
    objective=st.sampled_from(["mlm", "clm"]),
    block_size=st.integers(3, 20),
    batch_docs=st.integers(1, 7),
)
def test_chunker_cuts_the_same_chunks_as_the_reference(
    docs, kind, objective, block_size, batch_docs
):
    tok = TOKENIZERS[kind]
    texts = [" ".join(map(str, d)) for d in docs]
    expected = list(legacy_chunks(tok, texts, block_size, objective))
    with mock.patch.object(data, "BATCH_DOCS", batch_docs):  # flush points must not matter
        got = [
            row for block in chunk_blocks(texts, tok, block_size, objective) for row in block.rows()
        ]
    assert got == expected


# -- linear work ---------------------------------------------------------------------------


def copies_for(n_tokens: int, block_size: int = 128, pieces: int = 1) -> int:
    """Token copies made by the chunker to cut ``n_tokens`` fed as ``pieces`` documents."""
    chunker = Chunker(TOKENIZERS["roberta-like"], block_size, "mlm")
    ids = np.arange(3, n_tokens + 3, dtype=np.int32) % 1000 + 3
    produced = 0
    for part in np.array_split(ids, pieces):
        chunker.add(part)
        block = chunker.take()
        produced += 0 if block is None else len(block)
    produced += sum(len(b) for b in chunker.finish())
    total, body = n_tokens + pieces, block_size - 2  # a separator after each document
    assert produced == total // body + (total % body > 1)  # a lone final separator is dropped
    return chunker.copied


@pytest.mark.parametrize("pieces", [1, 37])
def test_doubling_a_document_doubles_the_chunking_work(pieces):
    """The old ``del buffer[:n]`` moved O(n^2 / block) tokens for one long document; the
    chunker copies each token a bounded number of times, so the work is linear."""
    w1, w2, w4 = (copies_for(n, pieces=pieces) for n in (285_000, 570_000, 1_140_000))
    assert 1.95 < w2 / w1 < 2.05 and 1.95 < w4 / w2 < 2.05
    assert w4 < 4 * 1_140_000


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 400), min_size=1, max_size=60),
    block_size=st.integers(8, 64),
)
def test_chunker_copies_are_bounded_by_the_tokens_fed(sizes, block_size):
    chunker = Chunker(TOKENIZERS["roberta-like"], block_size, "mlm")
    for n in sizes:
        chunker.add(np.full(n, 7, dtype=np.int32))
        chunker.take()
    list(chunker.finish())
    fed = sum(sizes) + len(sizes)  # a separator after each document
    body = block_size - 2
    assert chunker.copied <= (3 + block_size / body) * fed + 2 * block_size


# -- tokenizer processes and streaming reading ------------------------------------------------


def test_default_num_proc(tmp_path, monkeypatch):
    small = tmp_path / "small.txt"
    small.write_text("a few words\n")
    monkeypatch.delenv(data.NUM_PROC_ENV, raising=False)
    assert default_num_proc(small) == 1
    monkeypatch.setattr(data, "PARALLEL_MIN_BYTES", 4)
    assert default_num_proc(small) == min(4, data._cpu_count())
    monkeypatch.setenv(data.NUM_PROC_ENV, "3")
    assert default_num_proc(small) == 3
    monkeypatch.setenv(data.NUM_PROC_ENV, "many")
    with pytest.raises(ConfigError, match=data.NUM_PROC_ENV):
        default_num_proc(small)


def legacy_txt_documents(lines: list[str]) -> list[str]:
    """The txt rule as the previous reader applied it, on lines already decoded."""
    docs, block, saw_blank = [], [], False
    for line in lines:
        if not line.strip():
            saw_blank = True
            if block:
                docs.append("\n".join(block))
                block = []
            continue
        block.append(line)
    if block:
        docs.extend(["\n".join(block)] if saw_blank else block)
    return docs


@settings(max_examples=120, deadline=None)
@given(
    lines=st.lists(
        st.one_of(st.text("ab c", min_size=1, max_size=6), st.sampled_from(["", " ", "\t"])),
        min_size=1,
        max_size=30,
    ),
    lookahead=st.integers(0, 12),
)
def test_txt_reading_with_lookahead_keeps_the_document_rule(tmp_path_factory, lines, lookahead):
    path = tmp_path_factory.mktemp("txt") / "c.txt"
    path.write_text("\n".join(lines) + "\n")
    decoded = path.read_text().split("\n")[:-1]
    with mock.patch.object(data, "LOOKAHEAD_CHARS", lookahead):
        got = list(data._documents(path, data.CorpusReport(format="txt"), 1000, None))
    assert got == legacy_txt_documents(decoded)


def test_one_document_per_line_is_streamed(tmp_path, monkeypatch):
    """With no blank line, documents come out before the file has been read to its end."""
    path = tmp_path / "lines.txt"
    path.write_text("\n".join(f"line {i} of the corpus" for i in range(5000)) + "\n")
    monkeypatch.setattr(data, "LOOKAHEAD_CHARS", 1000)
    report = data.CorpusReport(format="txt")
    docs = data._documents(path, report, 1000, None)
    assert next(docs) == "line 0 of the corpus"
    assert report.lines < 100  # the reader is near the start, not holding 5000 lines
    assert sum(1 for _ in docs) == 4999
