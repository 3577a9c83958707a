"""Corpus-scale data path: chunking time against document length, and peak memory against
corpus size.

``chunking``: one document of N tokens (N = 285k, 570k, 1.14M, 2.28M by default): the
chunker alone on its token ids, the tokenizer alone, and the whole ``build_datasets`` (the
document plus 40 short ones), each with its ratio to the previous size. Linear work gives
ratios near 2; the previous chunker (``del buffer[:n]``) gives ~4.

``memory``: generated corpora of S MB (blank-line-separated documents, or one document
per line) tokenized by ``build_datasets`` in a fresh process each; prints wall time,
tokens/s and the peak RSS of the main process and of the largest tokenizer worker.

    python benchmarks/corpus_scale.py chunking
    python benchmarks/corpus_scale.py memory --sizes-mb 25,50,100,200 --num-proc 1,2
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = (
    "the licensee shall not distribute copies of the program without notice any warranty is "
    "disclaimed to extent permitted by applicable law contributor grants perpetual worldwide "
    "royalty free licence work whisk eggs with sugar until pale then fold in flour and melted "
    "butter bake cake for forty minutes skewer comes out clean golden season soup salt pepper "
    "little lemon juice before serving harbour anchor tide lighthouse compile branch commit"
).split()


def words(n: int, rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def one_document(path: Path, n_tokens: int, tokenizer) -> str:
    """A corpus whose first document holds about ``n_tokens`` tokens (lines of 12 words),
    then 40 short ones. Returns the long document."""
    rng = random.Random(0)
    sample = "\n".join(words(12, rng) for _ in range(1000))
    per_line = len(tokenizer(sample, add_special_tokens=False)["input_ids"]) / 1000
    doc = "\n".join(words(12, rng) for _ in range(round(n_tokens / per_line)))
    short = [words(40, rng) for _ in range(40)]
    path.write_text("\n\n".join([doc, *short]) + "\n")
    return doc


def _build(corpus: Path, tokenizer, out: Path, block_size: int, num_proc: int) -> dict:
    """``build_datasets`` (also the previous one, without ``num_proc``: ``PYTHONPATH`` at
    an older checkout gives the "before" figures)."""
    import inspect

    from das_engine.data import build_datasets

    kw = (
        {"num_proc": num_proc} if "num_proc" in inspect.signature(build_datasets).parameters else {}
    )
    return build_datasets(
        corpus,
        tokenizer,
        out,
        block_size=block_size,
        objective="mlm",
        eval_fraction=0.05,
        seed=0,
        **kw,
    )


class Pretokenized:
    """The real tokenizer's special ids, answering from a cache: times the chunker alone."""

    def __init__(self, tokenizer, ids: list[int]) -> None:
        for name in ("cls_token_id", "sep_token_id", "pad_token_id", "bos_token_id"):
            setattr(self, name, getattr(tokenizer, name))
        self.eos_token_id = tokenizer.eos_token_id
        self.ids = ids

    def __call__(self, docs, add_special_tokens=False):
        return {"input_ids": [self.ids for _ in docs]}


def chunk_only(tokenizer, ids: list[int], block_size: int) -> float:
    """Seconds to cut one document's ids into chunks (this Chunker, or the previous one)."""
    from das_engine.data import Chunker

    fake = Pretokenized(tokenizer, ids)
    t0 = time.perf_counter()
    chunker = Chunker(fake, block_size, "mlm")
    if hasattr(chunker, "take"):  # this implementation
        import numpy as np

        chunker.add(np.asarray(ids, dtype=np.int32))
        chunker.take()
        list(chunker.finish())
    else:  # the previous one tokenizes inside feed/finish
        list(chunker.feed("doc"))
        list(chunker.finish())
    return time.perf_counter() - t0


def chunking(args) -> None:
    from das_engine.bases import bundled_tokenizer

    tokenizer = bundled_tokenizer()
    print(
        f"{'tokens':>9} {'chunk s':>8} {'ratio':>6} {'tokenize s':>10} {'ratio':>6} "
        f"{'build s':>8} {'ratio':>6}"
    )
    prev = None
    with tempfile.TemporaryDirectory() as tmp:
        for n in [int(x) for x in args.tokens.split(",")]:
            corpus = Path(tmp) / f"doc-{n}.txt"
            doc = one_document(corpus, n, tokenizer)
            t0 = time.perf_counter()
            ids = tokenizer([doc], add_special_tokens=False)["input_ids"][0]
            t_tok = time.perf_counter() - t0
            t_chunk = min(chunk_only(tokenizer, ids, args.block_size) for _ in range(args.repeat))
            t0 = time.perf_counter()
            _build(corpus, tokenizer, Path(tmp) / "out", args.block_size, 1)
            t_build = time.perf_counter() - t0
            now = (t_chunk, t_tok, t_build)
            ratios = [f"{a / b:.2f}" if prev else "" for a, b in zip(now, prev or now, strict=True)]
            print(
                f"{len(ids):>9} {t_chunk:>8.3f} {ratios[0]:>6} {t_tok:>10.2f} {ratios[1]:>6} "
                f"{t_build:>8.2f} {ratios[2]:>6}",
                flush=True,
            )
            prev = now


def write_corpus(path: Path, megabytes: float, layout: str) -> None:
    """Documents of 100-300 words: blank-line-separated blocks of lines, or one per line."""
    rng = random.Random(1)
    target = int(megabytes * 1e6)
    written = 0
    with open(path, "w") as fh:
        while written < target:
            doc = words(rng.randint(100, 300), rng)
            if layout == "blocks":
                doc = "\n".join(doc[i : i + 200] for i in range(0, len(doc), 200)) + "\n\n"
            else:
                doc += "\n"
            fh.write(doc)
            written += len(doc)


def _child(corpus: str, out: str, num_proc: int) -> None:
    """Run one build in this (fresh) process and print its figures as JSON."""
    from das_engine.bases import bundled_tokenizer

    tokenizer = bundled_tokenizer()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    counts = _build(Path(corpus), tokenizer, Path(out), 128, num_proc)
    seconds = time.perf_counter() - t0
    result = {
        "seconds": seconds,
        "tokens": counts["train_tokens"] + counts["eval_tokens"],
        "rss_before_mb": before / 1024,
        "rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }
    print(json.dumps(result))


def memory(args) -> None:
    sizes = [float(x) for x in args.sizes_mb.split(",")]
    procs = [int(x) for x in args.num_proc.split(",")]
    print(
        f"{'layout':>7} {'MB':>6} {'procs':>5} {'tokens':>11} {'s':>7} {'Mtok/s':>7} "
        f"{'RSS start MB':>12} {'RSS peak MB':>11} {'worker peak MB':>14}"
    )
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for layout in args.layouts.split(","):
            for mb in sizes:
                corpus = Path(tmp) / f"{layout}-{mb}.txt"
                write_corpus(corpus, mb, layout)
                for n in procs:
                    cmd = [sys.executable, __file__, "_child", str(corpus), f"{tmp}/out", str(n)]
                    line = subprocess.run(cmd, check=True, capture_output=True, text=True)
                    r = json.loads(line.stdout.strip().splitlines()[-1])
                    print(
                        f"{layout:>7} {corpus.stat().st_size / 1e6:>6.0f} {n:>5} "
                        f"{r['tokens']:>11} {r['seconds']:>7.1f} "
                        f"{r['tokens'] / r['seconds'] / 1e6:>7.2f} {r['rss_before_mb']:>12.0f} "
                        f"{r['rss_peak_mb']:>11.0f} "
                        f"{r['worker_peak_mb'] if n > 1 else 0:>14.0f}",
                        flush=True,
                    )
                corpus.unlink()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        _child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    c = sub.add_parser("chunking")
    c.add_argument("--tokens", default="285000,570000,1140000,2280000")
    c.add_argument("--block-size", type=int, default=128)
    c.add_argument("--repeat", type=int, default=3, help="chunker timings, best of")
    m = sub.add_parser("memory")
    m.add_argument("--sizes-mb", default="25,50,100,200")
    m.add_argument("--num-proc", default="1,2")
    m.add_argument("--layouts", default="blocks,lines")
    m.add_argument("--tmp", default=None, help="where the generated corpora go")
    args = parser.parse_args()
    {"chunking": chunking, "memory": memory}[args.what](args)


if __name__ == "__main__":
    main()
