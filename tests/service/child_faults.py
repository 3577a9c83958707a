"""Faults injected into a job's child process (``JobRunner(child_setup=...)``): the child is
a fresh interpreter, so a monkeypatch in the test process never reaches it; these
functions, importable by name, patch the engine there before the job starts."""

from __future__ import annotations

import os
import signal


def raise_in_add_domain(exc: BaseException) -> None:
    """``Lineage.add_domain`` reports one training step, then raises ``exc``."""
    from das_engine.lineage import Lineage

    def explode(self, *args, progress=None, **kwargs):  # noqa: ANN001, ANN202
        from das_engine.trainer import ProgressEvent

        progress(ProgressEvent("training", 1, 4, loss=1.0))
        raise exc

    Lineage.add_domain = explode


def kill_at_step(step: int) -> None:
    """SIGKILL the child (as the kernel's OOM killer would) when training reaches ``step``."""
    from das_engine import trainer

    real = trainer.Trainer._micro_batch

    def micro_batch(self, at: int, micro: int):  # noqa: ANN001, ANN202
        if at == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, at, micro)

    trainer.Trainer._micro_batch = micro_batch


def record_niceness(path: str) -> None:
    """Write the child's niceness (the scheduler priority it trains at) to ``path``."""
    with open(path, "w") as f:
        f.write(str(os.nice(0)))
