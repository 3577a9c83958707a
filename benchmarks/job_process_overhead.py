"""What running each job in a fresh process costs: the time from starting a ``spawn`` child
to the moment it has imported what a job needs (the runner, the engine, torch, accelerate)
and answered, against the length of a training stage. Prints seconds per start.

    .venv/bin/python benchmarks/job_process_overhead.py [--runs 5]
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time


def _child(conn) -> None:  # noqa: ANN001
    import accelerate  # noqa: F401
    import torch  # noqa: F401

    import das_engine.lineage  # noqa: F401
    import worker.runner  # noqa: F401

    conn.send("ready")
    conn.close()


def one_start() -> float:
    ctx = multiprocessing.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    started = time.perf_counter()
    process = ctx.Process(target=_child, args=(send,))
    process.start()
    send.close()
    assert recv.recv() == "ready"
    elapsed = time.perf_counter() - started
    process.join()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    times = [one_start() for _ in range(args.runs)]
    print(
        f"spawned job process ready in {statistics.median(times):.2f} s median "
        f"(min {min(times):.2f}, max {max(times):.2f}, {args.runs} runs)"
    )


if __name__ == "__main__":
    main()
