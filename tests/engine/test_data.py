"""Corpus reading, validation with line numbers, and the deterministic held-out split."""

import gzip
import json

import pytest

from das_engine.data import ChunkStore, build_datasets, iter_documents, validate_corpus
from das_engine.errors import CorpusError

from .conftest import LEGAL, write_corpus


def test_txt_blocks_and_lines(tmp_path):
    blocks = tmp_path / "blocks.txt"
    blocks.write_text("first doc\nstill first\n\n\nsecond doc\n")
    assert list(iter_documents(blocks)) == ["first doc\nstill first", "second doc"]
    lines = tmp_path / "lines.txt"
    lines.write_text("one\ntwo\n  \nthree\n".replace("  \n", ""))
    assert list(iter_documents(lines)) == ["one", "two", "three"]


def test_jsonl_and_gzip(tmp_path):
    rows = [{"text": "alpha beta"}, {"text": "gamma", "id": 2}]
    path = tmp_path / "c.jsonl.gz"
    with gzip.open(path, "wt") as fh:
        fh.write("\n".join(json.dumps(r) for r in rows) + "\n")
    assert list(iter_documents(path)) == ["alpha beta", "gamma"]
    report = validate_corpus(path)
    assert report.ok and report.documents == 2 and report.compressed and report.format == "jsonl"


def test_a_byte_order_mark_is_ignored(tmp_path):
    """Windows editors save UTF-8 with a BOM: JSON must still parse, text must not keep it."""
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + b'{"text": "alpha"}\n{"text": "beta"}\n')
    assert validate_corpus(jsonl).ok
    assert list(iter_documents(jsonl)) == ["alpha", "beta"]
    txt = tmp_path / "bom.txt"
    txt.write_bytes("\ufeffcaf\u00e9 au lait\n\nsecond\n".encode())
    assert list(iter_documents(txt)) == ["caf\u00e9 au lait", "second"]
    later = tmp_path / "late.jsonl"  # a BOM anywhere else is data, and invalid JSON
    later.write_bytes(b'{"text": "a"}\n\xef\xbb\xbf{"text": "b"}\n')
    assert not validate_corpus(later).ok


def test_validation_reports_line_numbers(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": \n{"body": "x"}\n{"text": 5}\n')
    report = validate_corpus(path)
    assert not report.ok
    lines = {p["line"]: p["message"] for p in report.problems}
    assert "malformed JSON" in lines[2]
    assert 'missing "text"' in lines[3]
    assert "string" in lines[4]
    with pytest.raises(CorpusError, match="line 2"):
        list(iter_documents(path))


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"", "empty"),
        (b"  \n\n\t\n", "empty"),
        (b"caf\xe9 latin-1\n", "UTF-8"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00", "binary"),
    ],
)
def test_unusable_corpora(tmp_path, content, needle):
    path = tmp_path / "x.txt"
    path.write_bytes(content)
    report = validate_corpus(path)
    assert not report.ok
    assert any(needle in p["message"] for p in report.problems), report.problems


def test_overlong_line_and_gzip_bomb(tmp_path):
    path = tmp_path / "long.txt"
    path.write_text("x" * 5000 + "\nshort\n")
    report = validate_corpus(path, max_line_chars=1000)
    assert report.problems[0]["line"] == 1 and "longer" in report.problems[0]["message"]
    bomb = tmp_path / "bomb.txt.gz"
    with gzip.open(bomb, "wb") as fh:
        fh.write(b"a" * 5_000_000)
    assert bomb.stat().st_size < 50_000
    report = validate_corpus(bomb, max_uncompressed_bytes=1_000_000, max_line_chars=10_000_000)
    assert not report.ok and "decompressed" in report.problems[0]["message"]


def test_split_is_deterministic_and_disjoint(tmp_path, tokenizer):
    corpus = write_corpus(tmp_path / "legal.txt", LEGAL, docs=60)
    a = build_datasets(
        corpus, tokenizer, tmp_path / "a", block_size=32, objective="mlm", eval_fraction=0.2, seed=7
    )
    b = build_datasets(
        corpus, tokenizer, tmp_path / "b", block_size=32, objective="mlm", eval_fraction=0.2, seed=7
    )
    assert a == b and a["eval_chunks"] > 0 and a["train_chunks"] > a["eval_chunks"]
    ta, tb = ChunkStore(tmp_path / "a" / "train"), ChunkStore(tmp_path / "b" / "train")
    assert (ta.rows(range(len(ta)))["input_ids"] == tb.rows(range(len(tb)))["input_ids"]).all()
    rows = ta.rows([0])
    assert rows["input_ids"].shape == (1, 32)
    assert rows["input_ids"][0, 0] == tokenizer.cls_token_id  # chunks wrapped as <s> ... </s>


def test_too_little_text_is_a_corpus_error(tmp_path, tokenizer):
    path = tmp_path / "tiny.txt"
    path.write_text("hello\n")
    with pytest.raises(CorpusError, match="too little"):
        build_datasets(
            path,
            tokenizer,
            tmp_path / "o",
            block_size=64,
            objective="mlm",
            eval_fraction=0.1,
            seed=0,
        )


def test_tokenizer_round_trip_encodes_real_tokens(tokenizer, tmp_path):
    """Guards the spec's trap: a RoBERTa tokenizer built wrongly emits only <s></s>."""
    ids = tokenizer("The licensee shall distribute copies.")["input_ids"]
    assert len(ids) > 4
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert again("The licensee shall distribute copies.")["input_ids"] == ids
    assert again.decode(ids, skip_special_tokens=True) == "The licensee shall distribute copies."


def test_a_few_chunks_still_give_both_splits(tmp_path, tokenizer):
    """With 2-19 chunks and eval_fraction 0.05, 'every 20th chunk' would hold out none."""
    path = tmp_path / "short.txt"
    path.write_text(LEGAL * 2 + "\n")  # one document of a few chunks
    counts = build_datasets(
        path, tokenizer, tmp_path / "o", block_size=32, objective="mlm", eval_fraction=0.05, seed=0
    )
    assert 2 <= counts["train_chunks"] + counts["eval_chunks"] < 20
    assert counts["eval_chunks"] >= 1 and counts["train_chunks"] >= 1
