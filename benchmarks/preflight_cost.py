"""What the add-domain pre-flight costs: ``app.preflight.measure_corpus`` (tokenize until the
corpus is known to fill the engine's chunks; for an epochs-based job on to ``SAMPLE_CHARS``
characters, the sample of its token estimate) against the
whole-file validation an upload already does (``das_engine.data.validate_corpus``), for
corpora of growing size. The pre-flight should stay flat while validation grows.

    .venv/bin/python benchmarks/preflight_cost.py [--sizes-mb 0.01 1 20]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path


def corpus(path: Path, megabytes: float) -> None:
    line = "the court held that the contract was void because the defendant lacked capacity\n\n"
    path.write_text(line * max(1, int(megabytes * 1e6 / len(line))), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[0.01, 1.0, 20.0])
    parser.add_argument("--block-size", type=int, default=128)
    args = parser.parse_args()

    from app.preflight import measure_corpus
    from das_engine.bases import builtin_tiny_dir, load_tokenizer
    from das_engine.data import validate_corpus

    tokenizer = load_tokenizer(builtin_tiny_dir())
    print(
        f"{'corpus MB':>10} {'max_steps ms':>13} {'epochs ms':>10} {'validate ms':>12} "
        f"{'epochs/validate':>16}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for mb in args.sizes_mb:
            path = Path(tmp) / f"c{mb}.txt"
            corpus(path, mb)
            start = time.perf_counter()
            quick = measure_corpus(
                path,
                tokenizer,
                threading.Lock(),
                block_size=args.block_size,
                objective="mlm",
                need=2,
                sample_chars=0,
            )
            fixed = time.perf_counter() - start
            start = time.perf_counter()
            m = measure_corpus(
                path,
                tokenizer,
                threading.Lock(),
                block_size=args.block_size,
                objective="mlm",
                need=2,
                split=(42, 0.05),
            )
            pre = time.perf_counter() - start
            start = time.perf_counter()
            validate_corpus(path)
            full = time.perf_counter() - start
            assert quick.chunks >= 2 or quick.complete
            print(
                f"{mb:>10g} {fixed * 1e3:>13.1f} {pre * 1e3:>10.1f} {full * 1e3:>12.1f} "
                f"{pre / full:>16.2f}  ({m.chunks} chunks read)"
            )


if __name__ == "__main__":
    main()
