"""A Celery worker whose training steps last at least ``DAS_TEST_STEP_SECONDS`` (a test
wrapper, never used in production): a job then lasts long enough for a fault to be injected
while it trains, however fast the machine.

    python -m tests.reliability.throttled_worker -A worker.celery_app worker ...
"""

from __future__ import annotations

import os
import sys
import time


def throttle() -> None:
    from das_engine import trainer

    delay = float(os.environ.get("DAS_TEST_STEP_SECONDS", "0"))
    real = trainer.Trainer._micro_batch

    def slow_micro_batch(self, step: int, micro: int):  # noqa: ANN001, ANN202
        time.sleep(delay)
        return real(self, step, micro)

    trainer.Trainer._micro_batch = slow_micro_batch


def main() -> None:
    throttle()
    from celery.__main__ import main as celery_main

    sys.argv = ["celery", *sys.argv[1:]]
    celery_main()


if __name__ == "__main__":
    main()
elif __name__ == "__mp_main__":
    # each job trains in a child process started with "spawn", which imports the worker's
    # main module (this one) under this name: the steps are slow there too
    throttle()
