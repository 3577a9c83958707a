"""Turn the text shipped by Debian packages into plain-text corpora for the benchmark.

Run by ``fetch_domains.sh`` after it installed the packages; standard library only.
Each output is ``<out>/<domain>.txt``: UTF-8, documents separated by one blank line (the
format ``das_engine.data`` reads), capped at ``--max-mb`` megabytes, deterministic.

Domains (source package, licence in docs/benchmark.md):
  general     GCIDE dictionary entries (dict-gcide)            -- base pre-training + general eval
  scripture   King James Bible, one chapter per document (bible-kjv)
  postgres    PostgreSQL 15 manual, one HTML page per document (postgresql-doc-15)
  python      Python 3.11 documentation, one page per document (python3.11-doc)
  computing   FOLDOC + Jargon File entries (dict-foldoc, dict-jargon)
"""

from __future__ import annotations

import argparse
import glob
import gzip
import html.parser
import re
import subprocess
from pathlib import Path

WS = re.compile(r"[ \t]+")
SPLIT = "\x00section\x00"
NAV = re.compile(r"(Prev|Next|Up|Home|Submit correction|«|»|\||Navigation)+.*?")


def squash(text: str) -> str:
    """One document: trimmed lines, no blank lines inside (a blank line ends a document)."""
    lines = [WS.sub(" ", ln).strip() for ln in text.splitlines()]
    return "\n".join(ln for ln in lines if ln)


def write(docs, path: Path, max_bytes: int) -> tuple[int, int]:
    n = size = 0
    with open(path, "w", encoding="utf-8") as fh:
        for doc in docs:
            doc = squash(doc)
            if len(doc) < 40:
                continue
            data = doc + "\n\n"
            size += len(data.encode("utf-8"))
            if size > max_bytes:
                break
            fh.write(data)
            n += 1
    return n, min(size, max_bytes)


# -- dictd databases (GCIDE, FOLDOC, Jargon) -------------------------------------------
def dictd_entries(name: str):
    """Entries of a dictd database in headword order, markup of GCIDE removed."""
    base = Path("/usr/share/dictd")
    raw = gzip.open(base / f"{name}.dict.dz").read()  # dictzip is gzip-compatible
    index = (base / f"{name}.index").read_text(encoding="utf-8", errors="replace").splitlines()
    seen = set()
    b64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

    def dec(s: str) -> int:
        v = 0
        for ch in s:
            v = v * 64 + b64.index(ch)
        return v

    for line in index:
        parts = line.split("\t")
        if len(parts) < 3 or parts[0].startswith("00database"):
            continue
        off, length = dec(parts[1]), dec(parts[2])
        if (off, length) in seen:
            continue
        seen.add((off, length))
        text = raw[off : off + length].decode("utf-8", errors="replace")
        text = re.sub(r"\[(1913 Webster|PJC|WordNet 1\.5|Century Dict\.)[^\]]*\]", "", text)
        text = re.sub(r"[{}\\]", "", text)
        yield text


def general(out: Path, max_bytes: int):
    return write(dictd_entries("gcide"), out / "general.txt", max_bytes)


def computing(out: Path, max_bytes: int):
    def docs():
        yield from dictd_entries("foldoc")
        yield from dictd_entries("jargon")

    return write(docs(), out / "computing.txt", max_bytes)


# -- the King James Bible through the bible-kjv program ---------------------------------
def kjv_chapters():
    """(heading, verses) per chapter of the whole Bible, as the bible-kjv program prints it:
    a "Book N" heading line, then numbered verse lines."""
    text = subprocess.run(
        ["bible", "-l0", "Gen1:1-Rev22:21"],
        capture_output=True,
        text=True,
        check=True,
        stdin=subprocess.DEVNULL,
    ).stdout
    heading, verses = None, []
    for line in text.splitlines():
        s = line.strip()
        if not s:
            continue
        m = re.match(r"^\d+\s+(.*)$", s)
        if m:
            verses.append(m.group(1))
        else:  # a heading such as "Genesis 1": a new chapter
            if verses:
                yield heading, verses
            heading, verses = s, []
    if verses:
        yield heading, verses


def scripture(out: Path, max_bytes: int):
    docs = (" ".join(verses) for _, verses in kjv_chapters())
    return write(docs, out / "scripture.txt", max_bytes)


# -- HTML manuals -----------------------------------------------------------------------
class _Text(html.parser.HTMLParser):
    BLOCK = {"p", "div", "pre", "li", "tr", "h4", "dt", "dd", "br", "table"}
    SECTION = {"h1", "h2", "h3"}  # a heading starts a new document
    SKIP = {"script", "style", "head", "nav"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skip += 1
        elif tag in self.SECTION:
            self.parts.append(f"\n{SPLIT}\n")
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP and self.skip:
            self.skip -= 1
        elif tag in self.BLOCK or tag in self.SECTION:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data)


def html_pages(pattern: str, drop: re.Pattern | None = None, first: tuple[str, ...] = ()):
    """Pages as documents; paths containing an entry of ``first`` come first, in that order."""

    def key(path: str):
        rank = next((i for i, f in enumerate(first) if f in path), len(first))
        return rank, path

    for path in sorted(glob.glob(pattern, recursive=True), key=key):
        if drop is not None and drop.search(path):
            continue
        p = _Text()
        p.feed(Path(path).read_text(encoding="utf-8", errors="replace"))
        for section in "".join(p.parts).split(SPLIT):
            lines = [ln.strip() for ln in section.splitlines()]
            # drop navigation lines (Prev/Next/Up/Home bars)
            keep = [ln for ln in lines if ln and not NAV.fullmatch(ln)]
            if len(keep) > 1:  # a lone heading is not a document
                yield "\n".join(keep)


def postgres(out: Path, max_bytes: int):
    pat = sorted(glob.glob("/usr/share/doc/postgresql-doc-*/html"))[-1] + "/*.html"
    drop = re.compile(r"/(release-|bookindex|biblio|errcodes-appendix|sql-keywords)")
    return write(html_pages(pat, drop), out / "postgres.txt", max_bytes)


def python(out: Path, max_bytes: int):
    root = sorted(glob.glob("/usr/share/doc/python3.*-doc/html"))[-1]
    drop = re.compile(r"/(whatsnew|genindex|py-modindex|_static|_sources|search\.html)")
    first = ("/tutorial/", "/reference/", "/howto/", "/library/", "/faq/")
    return write(html_pages(root + "/**/*.html", drop, first), out / "python.txt", max_bytes)


DOMAINS = {
    "general": general,
    "scripture": scripture,
    "postgres": postgres,
    "python": python,
    "computing": computing,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    ap.add_argument("--max-mb", type=float, default=8.0)
    ap.add_argument("--general-max-mb", type=float, default=24.0)
    ap.add_argument("--only", default=",".join(DOMAINS))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.only.split(","):
        cap = args.general_max_mb if name == "general" else args.max_mb
        n, size = DOMAINS[name](args.out, int(cap * 1e6))
        print(f"{name:10s} {n:7d} documents {size / 1e6:7.2f} MB -> {args.out / (name + '.txt')}")


if __name__ == "__main__":
    main()
