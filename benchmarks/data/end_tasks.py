"""Labelled end tasks for the benchmark's domains, built offline from the same Debian text.

One JSONL file per domain (``{"text": ..., "label": ...}``, the format ``das_engine.end_task``
reads), balanced over its classes, seeded, deterministic for the same installed packages:

  scripture  a two-verse passage of the King James Bible -> its book's section (law,
             history, wisdom, prophets, gospels and acts, epistles and revelation)
  postgres   a paragraph of the PostgreSQL manual -> the part of the manual its page
             belongs to, from the page's file name (SQL commands, functions, data types,
             server configuration, system catalogs and views, client and server C APIs,
             applications)
  computing  a FOLDOC definition with its ``<category>`` tag removed -> that category
             (language, networking, programming, operating system, company, hardware)

Run after ``fetch_domains.sh`` (same packages), standard library only::

    python3 benchmarks/data/end_tasks.py --out benchmarks/data/out/end_tasks
"""

from __future__ import annotations

import argparse
import glob
import json
import random
import re
import sys
from collections.abc import Iterable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from extract import _Text, dictd_entries, kjv_chapters  # noqa: E402  (a sibling script, not a package)

#: books of the King James Bible in order, by the section the task asks for
KJV_SECTIONS = {
    "law": "Genesis Exodus Leviticus Numbers Deuteronomy",
    "history": "Joshua Judges Ruth 1Samuel 2Samuel 1Kings 2Kings 1Chronicles 2Chronicles"
    " Ezra Nehemiah Esther",
    "wisdom": "Job Psalms Proverbs Ecclesiastes Song",
    "prophets": "Isaiah Jeremiah Lamentations Ezekiel Daniel Hosea Joel Amos Obadiah Jonah"
    " Micah Nahum Habakkuk Zephaniah Haggai Zechariah Malachi",
    "gospels": "Matthew Mark Luke John Acts",
    "epistles": "Romans 1Corinthians 2Corinthians Galatians Ephesians Philippians Colossians"
    " 1Thessalonians 2Thessalonians 1Timothy 2Timothy Titus Philemon Hebrews James 1Peter"
    " 2Peter 1John 2John 3John Jude Revelation",
}

#: PostgreSQL manual page-name prefixes -> the part of the manual
PG_PARTS = {
    "sql-": "sql_commands",
    "functions-": "functions",
    "datatype-": "data_types",
    "runtime-config-": "server_config",
    "catalog-": "catalogs",
    "view-": "catalogs",
    "libpq-": "c_apis",
    "spi-": "c_apis",
    "ecpg-": "c_apis",
    "app-": "applications",
}

FOLDOC_CATEGORIES = ("language", "networking", "programming", "operating system", "company")
FOLDOC_CATEGORIES += ("hardware",)


def _clip(text: str, max_chars: int) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= max_chars else text[:max_chars].rsplit(" ", 1)[0]


def scripture_examples(max_chars: int) -> Iterable[tuple[str, str]]:
    """(two consecutive verses, section of their book), the whole Bible in order."""
    section_of = {b: s for s, books in KJV_SECTIONS.items() for b in books.split()}
    for heading, verses in kjv_chapters():
        # "Genesis 1", "1 Samuel 3", "Song of Solomon 2": the book is all but the number
        book = re.sub(r"\s+\d+$", "", heading).replace(" ", "")
        label = section_of.get(book) or section_of.get(book.split("of")[0])
        if label:
            for k in range(0, len(verses) - 1, 2):
                yield _clip(" ".join(verses[k : k + 2]), max_chars), label


class _Paragraphs(_Text):
    """The manual's text with one block element per line (source line breaks are spaces)."""

    def handle_data(self, data):
        super().handle_data(data.replace("\n", " "))


def postgres_examples(max_chars: int) -> Iterable[tuple[str, str]]:
    """(a paragraph of at least 80 characters, the manual part of its page)."""
    root = sorted(glob.glob("/usr/share/doc/postgresql-doc-*/html"))[-1]
    for path in sorted(glob.glob(root + "/*.html")):
        name = Path(path).name
        part = next((p for pre, p in PG_PARTS.items() if name.startswith(pre)), None)
        if part is None:
            continue
        parser = _Paragraphs()
        parser.feed(Path(path).read_text(encoding="utf-8", errors="replace"))
        for para in "".join(parser.parts).split("\n"):
            para = para.strip()
            if len(para) >= 80:
                yield _clip(para, max_chars), part


def computing_examples(max_chars: int) -> Iterable[tuple[str, str]]:
    """(a FOLDOC definition without its headword and tag, the tag)."""
    tag = re.compile(r"<(" + "|".join(FOLDOC_CATEGORIES) + r")>")
    for entry in dictd_entries("foldoc"):
        m = tag.search(entry)
        if m is None:
            continue
        body = entry[m.end() :]
        body = re.sub(r"<[^>]*>", " ", body)  # other tags would name the class
        if len(body.strip()) >= 60:
            yield _clip(body, max_chars), m.group(1).replace(" ", "_")


TASKS = {
    "scripture": scripture_examples,
    "postgres": postgres_examples,
    "computing": computing_examples,
}


def balanced(pairs: Iterable[tuple[str, str]], per_class: int, seed: int) -> list[dict]:
    """``per_class`` examples of every class (the classes with fewer are dropped), shuffled."""
    by_label: dict[str, list[str]] = {}
    for text, label in pairs:
        by_label.setdefault(label, []).append(text)
    rng = random.Random(seed)
    rows = []
    for label in sorted(by_label):
        texts = sorted(set(by_label[label]))
        if len(texts) < per_class:
            continue
        rows += [{"text": t, "label": label} for t in rng.sample(texts, per_class)]
    rng.shuffle(rows)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "end_tasks")
    ap.add_argument("--per-class", type=int, default=60)
    ap.add_argument("--max-chars", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default=",".join(TASKS))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name in [n for n in args.only.split(",") if n]:
        rows = balanced(TASKS[name](args.max_chars), args.per_class, args.seed)
        path = args.out / f"{name}.jsonl"
        with open(path, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        classes = sorted({r["label"] for r in rows})
        print(f"{name:10s} {len(rows):5d} examples, {len(classes)} classes -> {path}")


if __name__ == "__main__":
    main()
